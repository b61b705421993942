//! SQL of the control schema (in the target database), shared by the coordinator,
//! which owns the run's state, and workers, which commit their work fenced by lease.

use crate::sql::quote_ident;

pub const DDL: &str = include_str!("control.sql");
pub const HISTORY_DDL: &str = include_str!("history.sql");
/// The operator's pause: part of the control schema, and created alone for runs made
/// before it existed.
pub const PAUSE_DDL: &str = include_str!("pause.sql");
/// Tables that stopped alone: part of the control schema, and created alone for runs made
/// before it existed.
pub const STOPPED_DDL: &str = include_str!("stopped.sql");

/// The control schema's statements, with the schema name quoted once.
#[derive(Clone, Debug)]
pub struct ControlSql {
    schema: String,
    /// `<control schema>_history`, quoted: what `cleanup` leaves.
    history: String,
}

impl ControlSql {
    pub fn new(schema: &str) -> Self {
        ControlSql {
            schema: quote_ident(schema),
            history: quote_ident(&format!("{schema}_history")),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn ddl(&self) -> String {
        format!(
            "{}\n{}\n{}",
            DDL.replace("{schema}", &self.schema),
            self.pause_ddl(),
            self.stopped_ddl()
        )
    }

    pub fn stopped_ddl(&self) -> String {
        STOPPED_DDL.replace("{schema}", &self.schema)
    }

    /// Indexes of the stopped tables (replay skips their changes).
    pub fn stopped_table_indexes(&self) -> String {
        format!("SELECT table_idx FROM {}", self.table("stopped_tables"))
    }

    pub fn pause_ddl(&self) -> String {
        PAUSE_DDL.replace("{schema}", &self.schema)
    }

    pub fn history_schema(&self) -> &str {
        &self.history
    }

    pub fn history_ddl(&self) -> String {
        HISTORY_DDL.replace("{history}", &self.history)
    }

    /// The history's events table.
    pub fn history(&self) -> String {
        format!("{}.events", self.history)
    }

    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", self.schema, quote_ident(name))
    }

    /// Leases the biggest pending (or expired) shard; bumping the epoch fences the old holder.
    pub fn lease_shard(&self) -> String {
        let s = self.table("shards");
        format!(
            "UPDATE {s} SET state = 'leased', lease_epoch = lease_epoch + 1, worker = $1, \
             lease_expires_at = now() + make_interval(secs => $2), attempts = attempts + 1, \
             started_at = now() \
             WHERE shard_id = (SELECT shard_id FROM {s} WHERE state = 'pending' \
               OR (state = 'leased' AND lease_expires_at < now()) \
               ORDER BY est_rows DESC, shard_id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING shard_id, table_idx, lo, hi, est_rows, lease_epoch"
        )
    }

    /// Marks a shard done inside the worker's COPY transaction; 0 rows means the lease was lost.
    pub fn complete_shard(&self) -> String {
        format!(
            "UPDATE {} SET state = 'done', rows = $3, bytes = $4, finished_at = now(), \
             lease_expires_at = NULL WHERE shard_id = $1 AND lease_epoch = $2 AND state = 'leased'",
            self.table("shards")
        )
    }

    /// One row when the shard is done under lease epoch $2.
    pub fn shard_done_at(&self) -> String {
        format!(
            "SELECT 1 FROM {} WHERE shard_id = $1 AND lease_epoch = $2 AND state = 'done'",
            self.table("shards")
        )
    }

    pub fn extend_lease(&self) -> String {
        format!(
            "UPDATE {} SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE shard_id = $1 AND lease_epoch = $2 AND state = 'leased'",
            self.table("shards")
        )
    }

    pub fn fail_shard(&self) -> String {
        format!(
            "UPDATE {} SET state = 'pending', last_error = $3, lease_expires_at = NULL \
             WHERE shard_id = $1 AND lease_epoch = $2 AND state = 'leased'",
            self.table("shards")
        )
    }

    /// Reads the next changes of one partition after a position.
    pub fn read_changes(&self) -> String {
        format!(
            "SELECT seq, table_idx, op, lsn::text, old_key, vals, unchanged, ordinal FROM {} \
             WHERE part = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            self.table("changes")
        )
    }

    /// Saves a partition's position inside the transaction that applied its changes;
    /// 0 rows means another worker leased the partition since (roll back).
    pub fn save_replay_position(&self) -> String {
        format!(
            "UPDATE {} SET seq = $2, applied = applied + $3, updated_at = now(), failures = 0, \
             last_lsn = $5::text::pg_lsn, last_ordinal = $6 WHERE part = $1 AND lease_epoch = $4",
            self.table("replay")
        )
    }

    pub fn replay_position(&self) -> String {
        format!(
            "SELECT coalesce(r.seq, 0), r.last_lsn::text, r.last_ordinal \
             FROM (SELECT 1) AS one LEFT JOIN {} r ON r.part = $1",
            self.table("replay")
        )
    }

    /// Leases up to $3 partitions that are free, expired, or stale leases of this same
    /// worker (it restarted); bumping the epoch fences any previous holder.
    pub fn lease_partitions(&self) -> String {
        let r = self.table("replay");
        format!(
            "UPDATE {r} SET lease_epoch = lease_epoch + 1, worker = $1, \
             lease_expires_at = now() + make_interval(secs => $2) \
             WHERE part IN (SELECT part FROM {r} WHERE worker IS NULL OR worker = $1 \
               OR lease_expires_at < now() ORDER BY part LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING part, lease_epoch"
        )
    }

    /// Extends the partition leases still held (parts $1 with epochs $2); returns those.
    pub fn extend_partitions(&self) -> String {
        format!(
            "UPDATE {r} SET lease_expires_at = now() + make_interval(secs => $3) \
             FROM unnest($1::int[], $2::bigint[]) AS l(part, epoch) \
             WHERE {r}.part = l.part AND {r}.lease_epoch = l.epoch RETURNING {r}.part",
            r = self.table("replay")
        )
    }

    /// Gives partitions back (parts $1 with epochs $2); $3 is the failure reason, if any.
    pub fn release_partitions(&self) -> String {
        format!(
            "UPDATE {r} SET worker = NULL, lease_expires_at = NULL, \
             failures = failures + CASE WHEN $3::text IS NULL THEN 0 ELSE 1 END, \
             last_error = coalesce($3, last_error) \
             FROM unnest($1::int[], $2::bigint[]) AS l(part, epoch) \
             WHERE {r}.part = l.part AND {r}.lease_epoch = l.epoch",
            r = self.table("replay")
        )
    }

    /// Records a worker's visit for status: what it holds and how fast it goes.
    pub fn touch_worker(&self) -> String {
        let w = self.table("workers");
        format!(
            "INSERT INTO {w} AS w (worker, host, lease, rows, changes) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (worker) DO UPDATE SET host = EXCLUDED.host, lease = EXCLUDED.lease, \
             rows_per_s = CASE WHEN now() > w.last_seen \
               THEN greatest(EXCLUDED.rows + EXCLUDED.changes - w.rows - w.changes, 0) \
                    / extract(epoch FROM now() - w.last_seen) ELSE w.rows_per_s END, \
             rows = EXCLUDED.rows, changes = EXCLUDED.changes, last_seen = now(), state = $6"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_name_is_quoted_everywhere() {
        let c = ControlSql::new("ctl\"x");
        assert!(c.ddl().contains("CREATE SCHEMA IF NOT EXISTS \"ctl\"\"x\""));
        assert!(!c.ddl().contains("{schema}"));
        assert!(c.lease_shard().contains("\"ctl\"\"x\".\"shards\""));
    }
}
