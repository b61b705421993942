-- Tables that stopped alone: their shards kept failing (a mapping that raises for some
-- rows, a target constraint the data violates). Their shards are not handed out, replay
-- skips their changes and verify their rows, and no cutover happens while a row is here;
-- `schemashift run` again re-copies such a table whole and deletes its row.
CREATE TABLE IF NOT EXISTS {schema}.stopped_tables (
    table_idx   int PRIMARY KEY,
    -- The shard that failed, and its key range.
    shard_id    bigint NOT NULL,
    lo          text[],
    hi          text[],
    attempts    int NOT NULL,
    error       text NOT NULL,
    -- The mapped column whose expression raises on that range, when one does.
    column_name text,
    since       timestamptz NOT NULL DEFAULT now()
);
