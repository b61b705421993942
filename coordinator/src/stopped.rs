//! A table that stops alone: when one of its shards has failed [`MAX_ATTEMPTS`] times (a
//! mapping that raises for some rows, a target constraint the data violates), the whole
//! table stops, not the range (a key-changing update moves rows across ranges): its
//! shards are no longer handed out, replay passes over its changes, verify over its rows,
//! and no cutover happens; the other tables go on. The stop is kept in the control schema
//! with the failing shard's key range, the error and, when one is found, the mapped column
//! whose expression raises there. The next `schemashift run` re-copies the table whole
//! (the changes replay passed over are gone), under the spec's new mapping if it was fixed.
//!
//! [`MAX_ATTEMPTS`]: crate::backfill::MAX_ATTEMPTS

use crate::control::{Phase, Store};
use crate::error::CoordinatorError;
use schemashift_common::control::ControlSql;
use schemashift_common::plan::{RunPlan, ShardRange, TablePlan};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

/// One stopped table, as `status` and the run's error show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoppedTable {
    pub table_index: u32,
    /// `source -> target`.
    pub table: String,
    pub shard: i64,
    /// The failing shard's key range, `[lo, hi)`.
    pub range: String,
    pub attempts: i32,
    pub error: String,
    /// The target column whose mapping expression raises on that range, if one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// RFC 3339, UTC.
    pub since: String,
}

impl StoppedTable {
    /// What the operator should change before running again.
    pub fn fix(&self) -> String {
        match &self.column {
            Some(c) => format!(
                "fix the mapping of column {c:?} of this table in the spec (it raises for rows \
                 in that range)"
            ),
            None => "the target refused these rows: fix the target table (a constraint or a \
                     type the values do not fit) or the table's mapping in the spec"
                .into(),
        }
    }
}

impl std::fmt::Display for StoppedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} stopped: shard {} (key range {}) failed {} times: {}",
            self.table, self.shard, self.range, self.attempts, self.error
        )
    }
}

/// The run's end when tables stopped: each, what to fix, and how to resume.
pub fn message(stopped: &[StoppedTable]) -> String {
    let mut out = String::new();
    for s in stopped {
        out.push_str(&format!("{s}\n  to fix: {}\n", s.fix()));
    }
    out.push_str(
        "the other tables went on; no cutover while a table is stopped. After the fix, run the \
         same `schemashift run SPEC` again: it copies the stopped tables again, from the start",
    );
    out
}

fn db(context: &'static str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError {
    move |e| CoordinatorError::db(context, &e)
}

/// The stopped tables of the run (none for a run made before tables could stop).
pub async fn list(
    target: &impl GenericClient,
    sql: &ControlSql,
    plan: &RunPlan,
) -> Result<Vec<StoppedTable>, CoordinatorError> {
    let table = sql.table("stopped_tables");
    let exists = schemashift_common::pg::table_exists(target, &table)
        .await
        .map_err(db("reading stopped tables"))?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = target
        .query(
            &format!(
                "SELECT table_idx, shard_id, lo, hi, attempts, error, column_name, \
                 to_char(since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                 FROM {table} ORDER BY table_idx"
            ),
            &[],
        )
        .await
        .map_err(db("reading stopped tables"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let index = r.get::<_, i32>(0) as u32;
            StoppedTable {
                table_index: index,
                table: plan
                    .table(index)
                    .map_or_else(|| format!("#{index}"), TablePlan::describe),
                shard: r.get(1),
                range: ShardRange {
                    lo: r.get(2),
                    hi: r.get(3),
                }
                .to_string(),
                attempts: r.get(4),
                error: r.get(5),
                column: r.get(6),
                since: r.get(7),
            }
        })
        .collect())
}

/// The first mapped column whose expression raises on the range, evaluated on the source
/// session (helpers installed). None when all evaluate: the target refused the rows.
async fn raising_column(source: &Client, table: &TablePlan, range: &ShardRange) -> Option<String> {
    for c in &table.columns {
        if let Err(e) = source
            .query_one(&table.column_probe_sql(c, range), &[])
            .await
        {
            tracing::debug!(column = %c.target, error = %schemashift_common::pg::describe(&e), "mapping raises");
            return Some(c.target.clone());
        }
    }
    None
}

/// Stops every table with a shard that failed `max_attempts` times (and may have been
/// leased once more since) and is not stopped yet; returns those it stopped now. A shard of the table being copied loses its lease (its
/// commit is refused, its rows roll back).
pub async fn stop_failing(
    source: &Client,
    target: &mut Client,
    store: &Store,
    plan: &RunPlan,
    max_attempts: i32,
) -> Result<Vec<StoppedTable>, CoordinatorError> {
    let (shards, stopped) = (store.sql.table("shards"), store.sql.table("stopped_tables"));
    let failing = target
        .query(
            &format!(
                "SELECT DISTINCT ON (s.table_idx) s.table_idx, s.shard_id, s.lo, s.hi, s.attempts, \
                 s.last_error FROM {shards} s \
                 WHERE (s.state = 'pending' AND s.attempts >= $1 OR s.state = 'leased' AND s.attempts > $1) \
                 AND s.last_error IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM {stopped} x WHERE x.table_idx = s.table_idx) \
                 ORDER BY s.table_idx, s.shard_id"
            ),
            &[&max_attempts],
        )
        .await
        .map_err(db("looking for failing shards"))?;
    for r in &failing {
        let index: i32 = r.get(0);
        let range = ShardRange {
            lo: r.get(2),
            hi: r.get(3),
        };
        let column = match plan.table(index as u32) {
            Some(t) => raising_column(source, t, &range).await,
            None => None,
        };
        let e = db("stopping a table");
        let tx = target.transaction().await.map_err(&e)?;
        tx.execute(
            &format!(
                "INSERT INTO {stopped} (table_idx, shard_id, lo, hi, attempts, error, column_name) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (table_idx) DO NOTHING"
            ),
            &[
                &index,
                &r.get::<_, i64>(1),
                &range.lo,
                &range.hi,
                &r.get::<_, i32>(4),
                &r.get::<_, String>(5),
                &column,
            ],
        )
        .await
        .map_err(&e)?;
        // A newer epoch fences the copies still running: their rows roll back.
        tx.execute(
            &format!(
                "UPDATE {shards} SET state = 'stopped', lease_epoch = lease_epoch + 1, \
                 lease_expires_at = NULL WHERE table_idx = $1 AND state IN ('pending', 'leased')"
            ),
            &[&index],
        )
        .await
        .map_err(&e)?;
        crate::history::record(
            &tx,
            &store.sql,
            "table_stopped",
            serde_json::json!({
                "table": plan.table(index as u32).map(TablePlan::describe),
                "shard": r.get::<_, i64>(1),
                "range": range.to_string(),
                "attempts": r.get::<_, i32>(4),
                "column": column,
            }),
            crate::history::By::Run,
        )
        .await;
        tx.commit().await.map_err(&e)?;
    }
    let now = list(&*target, &store.sql, plan).await?;
    let new: Vec<StoppedTable> = now
        .into_iter()
        .filter(|s| {
            failing
                .iter()
                .any(|r| r.get::<_, i32>(0) as u32 == s.table_index)
        })
        .collect();
    for s in &new {
        tracing::warn!(table = %s.table, shard = s.shard, range = %s.range, attempts = s.attempts,
            column = ?s.column, error = %s.error, "table stopped: its shard keeps failing; the other tables go on");
    }
    Ok(new)
}

/// Takes the stopped tables up again, in one transaction: their target rows are deleted
/// (replay passed over their changes, so what was copied is stale), their shards are
/// pending from attempt 0, and the run goes back to the backfill, where replay waits, so
/// the table converges as in a first backfill. `plan` is saved with `fingerprint` (the
/// stopped tables re-planned under a fixed spec).
pub async fn resume(
    target: &mut Client,
    store: &Store,
    plan: &RunPlan,
    fingerprint: &str,
    stopped: &[StoppedTable],
    phase: Phase,
) -> Result<(), CoordinatorError> {
    let e = db("resuming stopped tables");
    let tx = target.transaction().await.map_err(&e)?;
    let plan_json =
        serde_json::to_string(plan).map_err(|x| CoordinatorError::State(x.to_string()))?;
    tx.execute(
        &format!(
            "UPDATE {} SET plan = $1::text::jsonb, fingerprint = $2",
            store.sql.table("run")
        ),
        &[&plan_json, &fingerprint],
    )
    .await
    .map_err(&e)?;
    let indexes: Vec<i32> = stopped.iter().map(|s| s.table_index as i32).collect();
    for s in stopped {
        let Some(t) = plan.table(s.table_index) else {
            continue;
        };
        // TRUNCATE when the role may (fast, no dead rows); else DELETE, which replay's
        // rights cover anyway.
        let may_truncate: bool = tx
            .query_one(
                "SELECT has_table_privilege($1, 'TRUNCATE')",
                &[&t.target.to_string()],
            )
            .await
            .map_err(&e)?
            .get(0);
        let empty = if may_truncate {
            format!("TRUNCATE ONLY {}", t.target)
        } else {
            format!("DELETE FROM ONLY {}", t.target)
        };
        tx.batch_execute(&empty).await.map_err(&e)?;
        crate::history::record(
            &tx,
            &store.sql,
            "table_resumed",
            serde_json::json!({ "table": s.table, "stopped_since": s.since }),
            crate::history::By::Operator,
        )
        .await;
        tracing::info!(table = %s.table, "stopped table resumed: copying it again from the start");
    }
    tx.execute(
        &format!(
            "UPDATE {} SET state = 'pending', attempts = 0, last_error = NULL, rows = NULL, \
             bytes = NULL, worker = NULL, started_at = NULL, finished_at = NULL, \
             lease_expires_at = NULL, lease_epoch = lease_epoch + 1 WHERE table_idx = ANY ($1)",
            store.sql.table("shards")
        ),
        &[&indexes],
    )
    .await
    .map_err(&e)?;
    tx.execute(
        &format!(
            "DELETE FROM {} WHERE table_idx = ANY ($1)",
            store.sql.table("stopped_tables")
        ),
        &[&indexes],
    )
    .await
    .map_err(&e)?;
    if phase > Phase::Backfill {
        store.set_phase(&tx, Phase::Backfill).await?;
    }
    tx.commit().await.map_err(&e)?;
    Ok(())
}

/// Whether opening a run takes its stopped tables up again (`run`, `coordinator`) or
/// leaves them stopped (`verify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStopped {
    Resume,
    Keep,
}

/// A recorded run opened under `spec`. A different spec is refused, unless all it changes
/// is the mapping of stopped tables: with [`OnStopped::Resume`] those are re-planned under
/// it. With `Resume`, the stopped tables are then taken up again ([`resume`]). Returns the
/// state to go on from.
pub async fn reopen(
    spec: &schemashift_common::spec::Spec,
    state: crate::control::RunState,
    source: &Client,
    target: &mut Client,
    store: &Store,
    workers: usize,
    on: OnStopped,
) -> Result<crate::control::RunState, CoordinatorError> {
    use schemashift_common::spec_print::SpecPrint;
    // Runs made before tables could stop get the table now.
    target
        .batch_execute(&store.sql.stopped_ddl())
        .await
        .map_err(db("creating the stopped tables' table"))?;
    let stopped = list(&*target, &store.sql, &state.plan).await?;
    let fingerprint = spec.fingerprint();
    let mut plan = state.plan.clone();
    if state.fingerprint != fingerprint {
        let differs = |why: &str| {
            CoordinatorError::State(format!(
                "the control schema {} holds a run (id {}) of a different spec{why}; finish or \
                 `schemashift cleanup` it first",
                store.sql.schema(),
                state.run_id
            ))
        };
        let Some(recorded) = &state.plan.spec_print else {
            return Err(differs(""));
        };
        let names: Vec<String> = plan.tables.iter().map(TablePlan::describe).collect();
        let ids = stopped.iter().map(|s| s.table_index).collect();
        let changed = recorded
            .replannable(&SpecPrint::of(spec), &ids, &names)
            .map_err(|why| differs(&format!(" ({why})")))?;
        if !changed.is_empty() && on == OnStopped::Keep {
            return Err(CoordinatorError::State(format!(
                "the spec changes the mapping of stopped tables ({}); `schemashift run SPEC` \
                 copies them again under it",
                changed
                    .iter()
                    .map(|i| names.get(*i as usize).cloned().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !changed.is_empty() {
            replan(spec, source, target, workers, &changed, &mut plan).await?;
        }
        plan.spec_print = Some(SpecPrint::of(spec));
    }
    if on == OnStopped::Keep || stopped.is_empty() {
        return Ok(state);
    }
    resume(target, store, &plan, &fingerprint, &stopped, state.phase).await?;
    Ok(crate::control::RunState {
        plan,
        fingerprint,
        phase: state.phase.min(Phase::Backfill),
        ..state
    })
}

/// Replaces the plans of tables `changed` by their plans under `spec`.
async fn replan(
    spec: &schemashift_common::spec::Spec,
    source: &Client,
    target: &Client,
    workers: usize,
    changed: &[u32],
    plan: &mut RunPlan,
) -> Result<(), CoordinatorError> {
    let planned = crate::plan::plan(
        spec,
        source,
        target,
        &crate::plan::PlanOptions {
            workers,
            resuming: true,
        },
    )
    .await?;
    for i in changed {
        let (Some(new), Some(slot)) = (
            planned.plan.table(*i),
            plan.tables.iter_mut().find(|t| t.index == *i),
        ) else {
            continue;
        };
        // The strategy stays as measured when the run started.
        let transfer = slot.transfer;
        *slot = new.clone();
        slot.transfer = transfer;
        tracing::info!(table = %slot.describe(), "stopped table re-planned under the spec's new mapping");
    }
    Ok(())
}

/// `schemashift cutover` while a table is stopped: refused before anything is frozen.
pub async fn refuse_cutover(spec: &schemashift_common::spec::Spec) -> Result<(), CoordinatorError> {
    let target = schemashift_common::pg::connect(&spec.target, "target").await?;
    let store = Store::new(&spec.control_schema);
    let Some(state) = store.load(&target).await? else {
        return Ok(());
    };
    check_cutover(&target, &store.sql, &state.plan).await
}

/// Refuses a cutover while any table is stopped, naming each.
pub async fn check_cutover(
    target: &impl GenericClient,
    sql: &ControlSql,
    plan: &RunPlan,
) -> Result<(), CoordinatorError> {
    let stopped = list(target, sql, plan).await?;
    if stopped.is_empty() {
        return Ok(());
    }
    Err(CoordinatorError::CutoverRefused(format!(
        "{}; a cutover would leave it behind. {}, then run `schemashift run SPEC` to copy it again",
        stopped
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("; "),
        stopped
            .iter()
            .map(|s| format!("For {}: {}", s.table, s.fix()))
            .collect::<Vec<_>>()
            .join(". ")
    )))
}
