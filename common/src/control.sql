-- Control state of a schemashift run, kept in the target database so that a shard's
-- rows and its "done" mark commit in one transaction. {schema} is replaced (quoted).
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.run (
    id          int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    run_id      text NOT NULL,
    fingerprint text NOT NULL,
    plan        jsonb NOT NULL,
    phase       text NOT NULL,
    slot        text NOT NULL,
    publication text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    report      jsonb
);

CREATE TABLE IF NOT EXISTS {schema}.shards (
    shard_id         bigint PRIMARY KEY,
    table_idx        int NOT NULL,
    lo               text[],
    hi               text[],
    est_rows         bigint NOT NULL,
    state            text NOT NULL,
    lease_epoch      bigint NOT NULL DEFAULT 0,
    worker           text,
    lease_expires_at timestamptz,
    attempts         int NOT NULL DEFAULT 0,
    rows             bigint,
    bytes            bigint,
    started_at       timestamptz,
    finished_at      timestamptz,
    last_error       text
);

-- The embedded change log: decoded source changes in commit order.
CREATE TABLE IF NOT EXISTS {schema}.changes (
    seq       bigserial PRIMARY KEY,
    part      int NOT NULL,
    table_idx int NOT NULL,
    op        "char" NOT NULL,
    lsn       pg_lsn NOT NULL,
    -- Place in its source transaction: (lsn, ordinal) orders a partition's changes and
    -- lets replay drop a copy written twice, as it does for Kafka.
    ordinal   int NOT NULL,
    old_key   text[],
    vals      text[],
    unchanged int2[]
);
CREATE INDEX IF NOT EXISTS changes_part_seq ON {schema}.changes (part, seq);
-- Capture analyzes the log each time it doubles (replay's read needs its size to pick the
-- index); a 3,000-row sample of the two columns that read filters and orders by gives that
-- plan, where the default 30,000 made the ANALYZEs a tenth of a short capture's time.
ALTER TABLE {schema}.changes ALTER COLUMN part SET STATISTICS 10, ALTER COLUMN seq SET STATISTICS 10;
-- Append-only, read by index, analyzed by capture and dropped by cleanup: autovacuum's
-- passes over it (set visibility bits, analyze again) would only take the target's CPU
-- from replay. A pass against transaction ID wraparound still runs when one is due.
ALTER TABLE {schema}.changes SET (autovacuum_enabled = false);

-- Last source commit whose changes are in the change log (end LSN).
CREATE TABLE IF NOT EXISTS {schema}.capture (
    id         int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    lsn        pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Where each Kafka partition's log ends, as capture's acknowledged deliveries say (offset
-- + 1), saved with the capture position. Brokers' own answers to "latest offset" are not
-- relied on: some Kafka-protocol brokers report a batch's first offset there.
CREATE TABLE IF NOT EXISTS {schema}.log_heads (
    part int PRIMARY KEY,
    head bigint NOT NULL
);

-- Applied position per change-log partition, written with the changes it covers and
-- fenced by the partition's lease epoch (one worker applies a partition at a time).
CREATE TABLE IF NOT EXISTS {schema}.replay (
    part             int PRIMARY KEY,
    seq              bigint NOT NULL,
    applied          bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    lease_epoch      bigint NOT NULL DEFAULT 0,
    worker           text,
    lease_expires_at timestamptz,
    failures         int NOT NULL DEFAULT 0,
    last_error       text,
    -- The last change applied (commit LSN, ordinal): re-sent Kafka duplicates are not after it.
    last_lsn         pg_lsn,
    last_ordinal     int
);

-- Workers the coordinator has seen, for status.
CREATE TABLE IF NOT EXISTS {schema}.workers (
    worker        text PRIMARY KEY,
    host          text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    lease         text,
    rows          bigint NOT NULL DEFAULT 0,
    changes       bigint NOT NULL DEFAULT 0,
    rows_per_s    double precision NOT NULL DEFAULT 0,
    state         text NOT NULL DEFAULT 'active'
);

-- Foreign keys of the target tables, dropped for the load (shards and replay partitions
-- commit in any order) and put back after the cutover: NOT VALID, then VALIDATE.
CREATE TABLE IF NOT EXISTS {schema}.constraints (
    table_name text NOT NULL,
    name       text NOT NULL,
    definition text NOT NULL,
    restored   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (table_name, name)
);

-- Throttling: whether new shards are held back now, why, and for how long in all.
CREATE TABLE IF NOT EXISTS {schema}.throttle (
    id        int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    throttled boolean NOT NULL,
    reason    text,
    since     timestamptz NOT NULL,
    seconds   double precision NOT NULL DEFAULT 0,
    episodes  int NOT NULL DEFAULT 0,
    -- Times the probe's baseline was measured again because holding did not bring the
    -- probe back (the slowdown was not ours), and the last such reason.
    rebaselines       int NOT NULL DEFAULT 0,
    rebaseline_reason text
);
-- The probe latency "slower" is measured against (a fleet shares one per source server).
ALTER TABLE {schema}.throttle ADD COLUMN IF NOT EXISTS baseline_ms double precision;

-- Indexes of the target tables, dropped for the backfill (maintaining them row by row costs
-- more than building them once) and built again, in parallel, after it. constraint_type is
-- 'p' or 'u' when the index backed a primary key or unique constraint, put back after.
CREATE TABLE IF NOT EXISTS {schema}.indexes (
    table_name text NOT NULL,
    name       text NOT NULL,
    definition text NOT NULL,
    restored   boolean NOT NULL DEFAULT false,
    constraint_type text,
    PRIMARY KEY (table_name, name)
);
ALTER TABLE {schema}.indexes ADD COLUMN IF NOT EXISTS constraint_type text;
-- Relative cost of the build's sort (collatable key columns compare by locale): the
-- costliest builds start first, so parallel builds end together.
ALTER TABLE {schema}.indexes ADD COLUMN IF NOT EXISTS sort_cost int NOT NULL DEFAULT 1;
