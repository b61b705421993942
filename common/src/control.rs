//! SQL of the control schema (in the target database), shared by the coordinator,
//! which owns the run's state, and workers, which commit their work fenced by lease.

use crate::sql::quote_ident;

pub const DDL: &str = include_str!("control.sql");

/// The control schema's statements, with the schema name quoted once.
#[derive(Clone, Debug)]
pub struct ControlSql {
    schema: String,
}

impl ControlSql {
    pub fn new(schema: &str) -> Self {
        ControlSql {
            schema: quote_ident(schema),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn ddl(&self) -> String {
        DDL.replace("{schema}", &self.schema)
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
            "SELECT seq, table_idx, op, lsn::text, old_key, vals, unchanged FROM {} \
             WHERE part = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            self.table("changes")
        )
    }

    pub fn save_replay_position(&self) -> String {
        format!(
            "INSERT INTO {} (part, seq, applied) VALUES ($1, $2, $3) ON CONFLICT (part) DO UPDATE \
             SET seq = EXCLUDED.seq, applied = {}.applied + EXCLUDED.applied, updated_at = now()",
            self.table("replay"),
            self.table("replay")
        )
    }

    pub fn replay_position(&self) -> String {
        format!(
            "SELECT coalesce((SELECT seq FROM {} WHERE part = $1), 0)",
            self.table("replay")
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
