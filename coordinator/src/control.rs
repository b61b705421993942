//! The run's durable state in the control schema: phase, plan and shards. A restarted
//! process reads it back and resumes where the last one stopped.

use crate::error::CoordinatorError;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{Lsn, RunId, ShardId};
use schemashift_common::plan::{RunPlan, Shard, ShardRange};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// A shard from a row whose first columns are shard_id, table_idx, lo, hi, est_rows (the
/// order of the shards table, which the lease query returns too).
pub(crate) fn shard_from_row(r: &tokio_postgres::Row) -> Shard {
    Shard {
        id: ShardId(r.get(0)),
        table: r.get::<_, i32>(1) as u32,
        range: ShardRange {
            lo: r.get(2),
            hi: r.get(3),
        },
        estimated_rows: r.get::<_, i64>(4) as u64,
    }
}

/// Phases in order; persisted by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Planned,
    Backfill,
    Replay,
    Verify,
    Verified,
    CutOver,
    RolledBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Backfill => "backfill",
            Phase::Replay => "replay",
            Phase::Verify => "verify",
            Phase::Verified => "verified",
            Phase::CutOver => "cut_over",
            Phase::RolledBack => "rolled_back",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        [
            Phase::Planned,
            Phase::Backfill,
            Phase::Replay,
            Phase::Verify,
            Phase::Verified,
            Phase::CutOver,
            Phase::RolledBack,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

pub struct RunState {
    pub run_id: RunId,
    pub fingerprint: String,
    pub plan: RunPlan,
    pub phase: Phase,
    pub slot: String,
    pub publication: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ShardCounts {
    pub pending: i64,
    pub leased: i64,
    pub done: i64,
    /// Shards of tables that stopped alone.
    pub stopped: i64,
    pub rows_done: i64,
    pub bytes_done: i64,
}

pub struct Store {
    pub sql: ControlSql,
}

fn err(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

impl Store {
    pub fn new(schema: &str) -> Self {
        Store {
            sql: ControlSql::new(schema),
        }
    }

    /// Whether the control schema has this table (it may not exist yet, or be dropped).
    pub async fn has_table(&self, target: &Client, name: &str) -> Result<bool, CoordinatorError> {
        schemashift_common::pg::table_exists(target, &self.sql.table(name))
            .await
            .map_err(err("reading control state"))
    }

    pub async fn load(&self, target: &Client) -> Result<Option<RunState>, CoordinatorError> {
        if !self.has_table(target, "run").await? {
            return Ok(None);
        }
        let Some(row) = target
            .query_opt(
                &format!(
                    "SELECT run_id, fingerprint, plan::text, phase, slot, publication FROM {}",
                    self.sql.table("run")
                ),
                &[],
            )
            .await
            .map_err(err("reading control state"))?
        else {
            return Ok(None);
        };
        let plan: String = row.get(2);
        let phase: String = row.get(3);
        Ok(Some(RunState {
            run_id: RunId(row.get(0)),
            fingerprint: row.get(1),
            plan: serde_json::from_str(&plan).map_err(|e| {
                CoordinatorError::State(format!("control state plan unreadable: {e}"))
            })?,
            phase: Phase::parse(&phase).ok_or_else(|| {
                CoordinatorError::State(format!("control state has unknown phase {phase:?}"))
            })?,
            slot: row.get(4),
            publication: row.get(5),
        }))
    }

    /// Creates the control schema and records plan and shards, in one transaction.
    pub async fn init(
        &self,
        target: &mut Client,
        run_id: &RunId,
        fingerprint: &str,
        plan: &RunPlan,
        shards: &[Shard],
        drop_foreign_keys: bool,
    ) -> Result<(), CoordinatorError> {
        let e = err("creating control state");
        let tx = target.transaction().await.map_err(&e)?;
        tx.batch_execute(&self.sql.ddl()).await.map_err(&e)?;
        crate::history::ensure(&tx, &self.sql).await?;
        let plan_json =
            serde_json::to_string(plan).map_err(|x| CoordinatorError::State(x.to_string()))?;
        tx.execute(
            &format!(
                "INSERT INTO {} (run_id, fingerprint, plan, phase, slot, publication) VALUES ($1, $2, $3::text::jsonb, $4, $5, $5)",
                self.sql.table("run")
            ),
            &[&run_id.0, &fingerprint, &plan_json, &Phase::Planned.as_str(), &run_id.slot_name()],
        )
        .await
        .map_err(&e)?;
        let stmt = tx
            .prepare(&format!(
                "INSERT INTO {} (shard_id, table_idx, lo, hi, est_rows, state) VALUES ($1, $2, $3, $4, $5, 'pending')",
                self.sql.table("shards")
            ))
            .await
            .map_err(&e)?;
        for s in shards {
            tx.execute(
                &stmt,
                &[
                    &s.id.0,
                    &(s.table as i32),
                    &s.range.lo,
                    &s.range.hi,
                    &(s.estimated_rows as i64),
                ],
            )
            .await
            .map_err(&e)?;
        }
        if drop_foreign_keys {
            crate::constraints::record_and_drop(&tx, self, plan).await?;
            crate::indexes::record_and_drop(&tx, self, plan).await?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {} (part, seq) SELECT p, 0 FROM generate_series(0, $1 - 1) AS p",
                self.sql.table("replay")
            ),
            &[&(plan.partitions as i32)],
        )
        .await
        .map_err(&e)?;
        crate::history::record(
            &tx,
            &self.sql,
            "planned",
            serde_json::json!({
                "fingerprint": fingerprint,
                "tables": plan.tables.iter().map(|t| t.describe()).collect::<Vec<_>>(),
                "shards": shards.len(),
            }),
            crate::history::By::Run,
        )
        .await;
        tx.commit().await.map_err(&e)?;
        Ok(())
    }

    /// Replaces the recorded plan (the strategies `auto` measured at run start).
    pub async fn save_plan(&self, target: &Client, plan: &RunPlan) -> Result<(), CoordinatorError> {
        let plan_json =
            serde_json::to_string(plan).map_err(|x| CoordinatorError::State(x.to_string()))?;
        target
            .execute(
                &format!(
                    "UPDATE {} SET plan = $1::text::jsonb",
                    self.sql.table("run")
                ),
                &[&plan_json],
            )
            .await
            .map_err(err("saving the plan"))?;
        Ok(())
    }

    pub async fn set_phase(
        &self,
        target: &impl tokio_postgres::GenericClient,
        phase: Phase,
    ) -> Result<(), CoordinatorError> {
        target
            .execute(
                &format!(
                    "UPDATE {} SET phase = $1, updated_at = now()",
                    self.sql.table("run")
                ),
                &[&phase.as_str()],
            )
            .await
            .map_err(err("saving phase"))?;
        crate::history::record(
            target,
            &self.sql,
            "phase",
            serde_json::json!({ "phase": phase.as_str() }),
            crate::history::By::Run,
        )
        .await;
        tracing::info!(phase = phase.as_str(), "phase changed");
        Ok(())
    }

    pub async fn save_report(
        &self,
        target: &Client,
        report: &serde_json::Value,
    ) -> Result<(), CoordinatorError> {
        target
            .execute(
                &format!(
                    "UPDATE {} SET report = $1::text::jsonb",
                    self.sql.table("run")
                ),
                &[&report.to_string()],
            )
            .await
            .map_err(err("saving report"))?;
        Ok(())
    }

    /// Frees the leases of workers that lived in a previous process of this coordinator
    /// (embedded workers die with it), so their work is handed out at once.
    pub async fn release_leases_of(
        &self,
        target: &Client,
        worker_prefix: &str,
    ) -> Result<u64, CoordinatorError> {
        let pattern = format!("{}%", worker_prefix.replace('%', "\\%").replace('_', "\\_"));
        let shards = target
            .execute(
                &format!(
                    "UPDATE {} SET state = 'pending', lease_epoch = lease_epoch + 1, lease_expires_at = NULL \
                     WHERE state = 'leased' AND worker LIKE $1",
                    self.sql.table("shards")
                ),
                &[&pattern],
            )
            .await
            .map_err(err("releasing leases"))?;
        let parts = target
            .execute(
                &format!(
                    "UPDATE {} SET lease_epoch = lease_epoch + 1, worker = NULL, lease_expires_at = NULL \
                     WHERE worker LIKE $1",
                    self.sql.table("replay")
                ),
                &[&pattern],
            )
            .await
            .map_err(err("releasing leases"))?;
        Ok(shards + parts)
    }

    /// A replay partition that failed this many times stops the run (its last error says
    /// why); so does a shard still pending after that many (its table did not stop).
    pub async fn failing_work(
        &self,
        target: &Client,
        max_attempts: i32,
    ) -> Result<Option<String>, CoordinatorError> {
        let row = target
            .query_opt(
                &format!(
                    "(SELECT format('shard %s failed %s times: %s', shard_id, attempts, last_error) FROM {} \
                      WHERE state = 'pending' AND attempts >= $1 AND last_error IS NOT NULL LIMIT 1) \
                     UNION ALL (SELECT format('replay of partition %s failed %s times: %s', part, failures, last_error) \
                      FROM {} WHERE failures >= $1 LIMIT 1) LIMIT 1",
                    self.sql.table("shards"),
                    self.sql.table("replay")
                ),
                &[&max_attempts],
            )
            .await
            .map_err(err("reading failures"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Applied position per partition.
    pub async fn replay_positions(
        &self,
        target: &Client,
    ) -> Result<BTreeMap<u32, i64>, CoordinatorError> {
        let rows = target
            .query(
                &format!("SELECT part, seq FROM {}", self.sql.table("replay")),
                &[],
            )
            .await
            .map_err(err("reading replay positions"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1)))
            .collect())
    }

    /// Replay partitions one of `workers` holds under a lease that has not expired.
    pub async fn replay_leases_held(
        &self,
        target: &Client,
        workers: &[String],
    ) -> Result<i64, CoordinatorError> {
        Ok(target
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE worker = ANY($1) AND lease_expires_at > now()",
                    self.sql.table("replay")
                ),
                &[&workers],
            )
            .await
            .map_err(err("reading replay leases"))?
            .get(0))
    }

    pub async fn shard_counts(&self, target: &Client) -> Result<ShardCounts, CoordinatorError> {
        let row = target
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'leased'), \
                     count(*) FILTER (WHERE state = 'done'), coalesce(sum(rows) FILTER (WHERE state = 'done'), 0)::bigint, \
                     coalesce(sum(bytes) FILTER (WHERE state = 'done'), 0)::bigint, \
                     count(*) FILTER (WHERE state = 'stopped') FROM {}",
                    self.sql.table("shards")
                ),
                &[],
            )
            .await
            .map_err(err("reading shard counts"))?;
        Ok(ShardCounts {
            pending: row.get(0),
            leased: row.get(1),
            done: row.get(2),
            rows_done: row.get(3),
            bytes_done: row.get(4),
            stopped: row.get(5),
        })
    }

    pub async fn shards(
        &self,
        target: &Client,
    ) -> Result<Vec<(Shard, String, i32)>, CoordinatorError> {
        let rows = target
            .query(
                &format!("SELECT shard_id, table_idx, lo, hi, est_rows, state, attempts FROM {} ORDER BY shard_id", self.sql.table("shards")),
                &[],
            )
            .await
            .map_err(err("reading shards"))?;
        Ok(rows
            .iter()
            .map(|r| (shard_from_row(r), r.get(5), r.get(6)))
            .collect())
    }

    pub async fn capture_position(&self, target: &Client) -> Result<Option<Lsn>, CoordinatorError> {
        let row = target
            .query_opt(
                &format!("SELECT lsn::text FROM {}", self.sql.table("capture")),
                &[],
            )
            .await
            .map_err(err("reading capture position"))?;
        row.map(|r| {
            r.get::<_, String>(0)
                .parse::<Lsn>()
                .map_err(|e| CoordinatorError::State(e.to_string()))
        })
        .transpose()
    }

    pub async fn drop_schema(&self, target: &Client) -> Result<(), CoordinatorError> {
        target
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                self.sql.schema()
            ))
            .await
            .map_err(err("dropping control schema"))
    }
}
