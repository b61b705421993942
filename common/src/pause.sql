-- An operator's pause (`schemashift pause`): while this row exists, copies and replay hold
-- (capture goes on); it outlives restarts until `schemashift resume` deletes it.
CREATE TABLE IF NOT EXISTS {schema}.pause (
    id      int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    since   timestamptz NOT NULL DEFAULT now(),
    by_user text NOT NULL,
    by_host text NOT NULL
);
