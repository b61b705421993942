-- What happened to each run, kept apart from the control schema so that `cleanup` (which
-- drops the control schema) leaves it: phases, operator commands with who and where,
-- throttle holds, the cutover's freeze and switch, rollback, cleanup.
CREATE SCHEMA IF NOT EXISTS {history};

CREATE TABLE IF NOT EXISTS {history}.events (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    run_id  text NOT NULL,
    kind    text NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}',
    by_user text,
    by_host text
);
