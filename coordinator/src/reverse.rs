//! Reverse sync: after the cutover the application writes to the target, and those
//! writes flow back into the old schema with the spec's `reverse` mappings, so a rollback
//! loses nothing. It is the forward pipeline mirrored: a slot on the target (created just
//! before the cutover freeze; its start is marked inside it, before the application is
//! switched), a change log and replay
//! position in a `<control_schema>_reverse` schema on the source database, and the same
//! replayer applying to the source tables. Replay sessions carry replication origins, so
//! neither direction sends the other's writes back.

use crate::capture::{capture_position_sql, ensure_slot, flush_wal, wal_lsn, Capture, WalPosition};
use crate::control::{Phase, Store};
use crate::error::CoordinatorError;
use schemashift_changelog::replay::PartitionReplayer;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{LeaseEpoch, Lsn, RunId};
use schemashift_common::pg::{connect, install_helpers, mark_origin};
use schemashift_common::plan::{ColumnMap, LogPlan, RunPlan, SourceColumn, TablePlan};
use schemashift_common::service::PartitionLease;
use schemashift_common::spec::Spec;
use schemashift_common::sql::{quote_ident, MappedExpr};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

/// The reverse run's control schema, in the source database.
pub fn schema(spec: &Spec) -> String {
    format!("{}_reverse", spec.control_schema)
}

async fn target_columns(
    target: &Client,
    table: &str,
) -> Result<Vec<SourceColumn>, CoordinatorError> {
    Ok(target
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
             ORDER BY attnum",
            &[&table],
        )
        .await
        .map_err(db("reading target columns"))?
        .iter()
        .map(|r| SourceColumn {
            name: r.get(0),
            sql_type: r.get(1),
        })
        .collect())
}

/// Why reverse sync cannot run for a spec.
#[derive(Debug, Clone)]
pub enum NoWayBack {
    /// Source columns it could not write, one line per table: a spec error while
    /// `cutover.reverse` is on.
    Unfillable(Vec<String>),
    /// Something reverse sync does not do (merges).
    Unsupported(String),
}

impl std::fmt::Display for NoWayBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoWayBack::Unfillable(lines) => f.write_str(&lines.join("; ")),
            NoWayBack::Unsupported(why) => f.write_str(why),
        }
    }
}

/// Source columns that are NOT NULL without a default (reverse sync must fill them).
async fn required_source_columns(
    source: &Client,
    table: &str,
) -> Result<Vec<String>, CoordinatorError> {
    Ok(source
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) \
             AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attnotnull AND NOT atthasdef",
            &[&table],
        )
        .await
        .map_err(db("reading source columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The mirrored plan with a note per source column reverse sync leaves alone, or why
/// reverse sync is not possible (a merge, or a NOT NULL source column without a default
/// that has neither a `reverse` expression nor a target column copied from it as is).
/// A nullable or defaulted column without one gets NULL or its default on rows that
/// reverse sync inserts, and keeps its value on rows it updates.
pub async fn plan(
    spec: &Spec,
    fwd: &RunPlan,
    source: &Client,
    target: &Client,
) -> Result<Result<(RunPlan, Vec<String>), NoWayBack>, CoordinatorError> {
    let mut tables = Vec::new();
    let mut notes = Vec::new();
    let mut unfillable = Vec::new();
    for t in &fwd.tables {
        let Some(ts) = spec.tables.get(t.index as usize) else {
            return Ok(Err(NoWayBack::Unsupported(format!(
                "table {} is not in the spec",
                t.source
            ))));
        };
        if t.refreshes() {
            return Ok(Err(NoWayBack::Unsupported(format!(
                "table {} is a merge; reverse sync of merges is not supported",
                t.target
            ))));
        }
        let tcols = target_columns(target, &t.target.to_string()).await?;
        let required = required_source_columns(source, &t.source.to_string()).await?;
        let names: Vec<String> = tcols.iter().map(|c| c.name.clone()).collect();
        let mut columns = Vec::new();
        let mut missing = Vec::new();
        for sc in &t.source_columns {
            let expr = match ts.reverse.as_ref().and_then(|r| r.get(&sc.name)) {
                Some(e) => e.clone(),
                None => match t.columns.iter().find(|c| {
                    c.deps == [sc.name.clone()]
                        && (c.expr == sc.name || c.expr == quote_ident(&sc.name))
                }) {
                    Some(c) => quote_ident(&c.target),
                    None if required.contains(&sc.name) => {
                        missing.push(sc.name.clone());
                        continue;
                    }
                    None => {
                        notes.push(format!(
                            "table {}: source column {} has no `reverse` expression and is not copied as is: \
                             rows reverse sync inserts get NULL or its default there, rows it updates keep theirs",
                            t.source, sc.name
                        ));
                        continue;
                    }
                },
            };
            let m = MappedExpr::parse(&expr, &fwd.helpers, &names).map_err(|e| {
                CoordinatorError::State(format!("table {}: reverse of {}: {e}", t.source, sc.name))
            })?;
            columns.push(ColumnMap {
                target: sc.name.clone(),
                target_type: sc.sql_type.clone(),
                expr: m.sql,
                bare_column: m.bare_column.filter(|b| m.deps.contains(b)),
                deps: m.deps.into_iter().collect(),
            });
        }
        if !missing.is_empty() {
            unfillable.push(format!(
                "table {}: source column(s) {} are NOT NULL without a default and have no `reverse` \
                 expression (nor a target column copied from them as is), so reverse sync could not \
                 write them; add `reverse: {{{}: <expression over target columns>}}` to the table, or \
                 set `cutover: {{reverse: false}}` to cut over without a way back",
                t.source,
                missing.join(", "),
                missing[0]
            ));
            continue;
        }
        tables.push(TablePlan {
            index: t.index,
            source: t.target.clone(),
            target: t.source.clone(),
            key: t.target_key.clone(),
            target_key: t.key.clone(),
            columns,
            source_columns: tcols,
            sequences: Vec::new(),
            estimated_rows: 0,
            estimated_bytes: 0,
            shard_rows: 1,
            lookups: Vec::new(),
            transfer: Default::default(),
        });
    }
    if !unfillable.is_empty() {
        return Ok(Err(NoWayBack::Unfillable(unfillable)));
    }
    Ok(Ok((
        RunPlan {
            helpers: fwd.helpers.clone(),
            tables,
            partitions: 1,
            control_schema: schema(spec),
            changelog: LogPlan::Postgres,
            // The application runs on the target now: reverse sync goes after it.
            low_priority: fwd.low_priority,
            replay_batch: fwd.replay_batch,
            // Reverse sync makes its own on the target, which it owns.
            publication: None,
            spec_print: None,
        },
        notes,
    )))
}

/// Before the freeze: the mirrored plan, its control state on the source and the slot on
/// the target. Creating a slot waits for the target's running transactions, so it happens
/// while the application still writes, never inside the freeze. `Err(why)` when reverse
/// sync is not possible.
pub async fn prepare(
    spec: &Spec,
    fwd: &RunPlan,
    target: &Client,
) -> Result<Result<ReverseStart, String>, CoordinatorError> {
    let mut source = connect(&spec.source, "source").await?;
    let rplan = match plan(spec, fwd, &source, target).await? {
        Ok((p, notes)) => {
            for note in notes {
                tracing::info!(note = %note, "reverse sync");
            }
            p
        }
        Err(why) => return Ok(Err(why.to_string())),
    };
    let store = Store::new(&rplan.control_schema);
    if store.load(&source).await?.is_none() {
        let run_id = RunId::generate();
        store
            .init(
                &mut source,
                &run_id,
                &spec.fingerprint(),
                &rplan,
                &[],
                false,
            )
            .await?;
        store.set_phase(&source, Phase::Replay).await?;
    }
    let state = store
        .load(&source)
        .await?
        .ok_or_else(|| CoordinatorError::State("reverse control state vanished".into()))?;
    ensure_slot(target, &rplan, &state.slot).await?;
    tracing::info!(slot = %state.slot, "reverse sync slot ready on the target");
    Ok(Ok(ReverseStart {
        source,
        control: ControlSql::new(&rplan.control_schema),
    }))
}

/// What the freeze needs to start reverse sync: one statement on an open session.
pub struct ReverseStart {
    source: Client,
    control: ControlSql,
}

impl ReverseStart {
    /// Inside the freeze, before the switch: reverse sync starts at the target's WAL
    /// position now. Every target commit before it is skipped: those are forward replay's
    /// writes, already on the source (and without origins they would flow back). Never
    /// moves the start back, so an aborted attempt followed by a later one is fine.
    pub async fn mark(&self, target: &Client) -> Result<Lsn, CoordinatorError> {
        let lsn = wal_lsn(target, WalPosition::Insert).await?;
        self.source
            .execute(&capture_position_sql(&self.control), &[&lsn.to_string()])
            .await
            .map_err(db("marking where reverse sync starts"))?;
        Ok(lsn)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReverseReport {
    pub changes_captured: u64,
    pub changes_applied: u64,
    pub seconds: f64,
}

/// How long reverse sync runs.
pub enum Until {
    /// Until shutdown (`schemashift reverse`).
    Shutdown(watch::Receiver<bool>),
    /// Until every target commit before this WAL position is applied (rollback).
    Lsn(Lsn),
}

/// Captures target changes into the reverse change log and applies them to the source.
pub async fn sync(spec: &Spec, until: Until) -> Result<ReverseReport, CoordinatorError> {
    let t0 = Instant::now();
    let schema = schema(spec);
    let store = Store::new(&schema);
    let control_db = connect(&spec.source, "source").await?;
    let Some(state) = store.load(&control_db).await? else {
        return Err(CoordinatorError::State(
            "no reverse sync is set up: it starts at the cutover (with `reverse` mappings in the spec)".into(),
        ));
    };
    let plan = Arc::new(state.plan);
    let target = connect(&spec.target, "target").await?;
    // Rows the replayer must read again (a key change that withheld an unchanged
    // out-of-line value) come from the target, mapped back by the reverse expressions.
    install_helpers(&target, &plan.helpers, "target").await?;
    let mut capture = Capture::open(
        connect(&spec.target, "target").await?,
        spec.target.clone(),
        connect(&spec.source, "source").await?,
        spec.source.clone(),
        plan.clone(),
        state.slot.clone(),
    )
    .await?;
    // The applier: helpers for the reverse expressions, an origin so forward capture
    // (should it run) skips these writes, and a fresh lease that fences other appliers.
    let mut applier = connect(&spec.source, "source").await?;
    install_helpers(&applier, &plan.helpers, "source").await?;
    mark_origin(&applier, "reverse").await;
    let worker = format!("reverse-{}", std::process::id());
    // Take the partition whoever holds it: the newest applier (a rollback, say) wins and
    // the epoch fences the older one's next write.
    let epoch: i64 = control_db
        .query_one(
            &format!(
                "UPDATE {} SET lease_epoch = lease_epoch + 1, worker = $1, \
                 lease_expires_at = now() + interval '1 day' WHERE part = 0 RETURNING lease_epoch",
                ControlSql::new(&schema).table("replay")
            ),
            &[&worker],
        )
        .await
        .map_err(db("leasing the reverse partition"))?
        .get(0);
    let mut replayer = PartitionReplayer::open(
        &applier,
        plan.clone(),
        PartitionLease {
            part: 0,
            epoch: LeaseEpoch(epoch),
        },
    )
    .await?;
    let mut report = ReverseReport::default();
    let mut shutdown = match &until {
        Until::Shutdown(s) => Some(s.clone()),
        Until::Lsn(_) => None,
    };
    if let Until::Lsn(_) = until {
        flush_wal(&target).await?;
    }
    loop {
        let (_, cut_short, head) = capture.round().await?;
        loop {
            let n = replayer
                .step(&mut applier, &target, plan.replay_batch())
                .await?;
            report.changes_applied += n as u64;
            if n == 0 {
                break;
            }
        }
        match &until {
            Until::Lsn(l) if head >= *l && !cut_short => break,
            Until::Lsn(_) => continue,
            Until::Shutdown(_) => {}
        }
        if let Some(s) = shutdown.as_mut() {
            if *s.borrow() {
                break;
            }
            if !cut_short {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = s.changed() => {}
                }
            }
        }
    }
    report.changes_captured = control_db
        .query_one(
            &format!(
                "SELECT count(*) FROM {}",
                ControlSql::new(&schema).table("changes")
            ),
            &[],
        )
        .await
        .map_err(db("counting reverse changes"))?
        .get::<_, i64>(0) as u64;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The target's WAL insert position now: `sync` to it applies every write made so far.
pub async fn now(spec: &Spec) -> Result<Lsn, CoordinatorError> {
    let target = connect(&spec.target, "target").await?;
    wal_lsn(&target, WalPosition::Insert).await
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RollbackReport {
    pub freeze_ms: f64,
    pub changes_applied: u64,
    pub seconds: f64,
}

/// The longest the rollback may hold the target frozen: the spec's freeze budget, but
/// never below what opening reverse sync's sessions takes on a busy host.
fn rollback_freeze_limit(spec: &Spec) -> Duration {
    spec.cutover.freeze_timeout.max(Duration::from_secs(5))
}

/// After the cutover: apply the target's writes to the source while it stays writable,
/// then freeze the target tables, apply the rest, run the switch-back hook, release.
/// Nothing written on either side is lost; a freeze that would pass its limit is released
/// with nothing switched.
/// Each source sequence to at least its target sequence's last value (never back), inside
/// the rollback's freeze: the target's writes are all on the source by now.
async fn move_sequences_back(
    spec: &Spec,
    fwd: &RunPlan,
    frozen: &tokio_postgres::Transaction<'_>,
) -> Result<(), CoordinatorError> {
    let sequences: Vec<_> = fwd.tables.iter().flat_map(|t| &t.sequences).collect();
    if sequences.is_empty() {
        return Ok(());
    }
    let source = connect(&spec.source, "source").await?;
    for s in sequences {
        // The names come from pg_get_serial_sequence: already quoted.
        let last: i64 = frozen
            .query_one(
                &format!("SELECT last_value FROM {}", s.target_sequence),
                &[],
            )
            .await
            .map_err(db("reading the target sequence for the rollback"))?
            .get(0);
        source
            .query_one(
                &format!(
                    "SELECT setval($1::text::regclass, greatest($2::bigint, (SELECT last_value FROM {})))",
                    s.source_sequence
                ),
                &[&s.source_sequence, &last],
            )
            .await
            .map_err(db("moving the source sequence back past the target's"))?;
    }
    Ok(())
}

pub async fn rollback(spec: &Spec, fwd: &RunPlan) -> Result<RollbackReport, CoordinatorError> {
    let t0 = Instant::now();
    // Most of the backlog goes before the freeze, so the freeze only covers the tail.
    let early = sync(spec, Until::Lsn(now(spec).await?)).await?;
    let mut target = connect(&spec.target, "target").await?;
    let tables = fwd
        .tables
        .iter()
        .map(|t| t.target.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let tx = target
        .transaction()
        .await
        .map_err(db("starting the rollback freeze"))?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(db("setting lock_timeout"))?;
    tx.batch_execute(&format!("LOCK TABLE {tables} IN EXCLUSIVE MODE"))
        .await
        .map_err(db("freezing writes on the target for the rollback"))?;
    let frozen = Instant::now();
    let lsn = wal_lsn(&tx, WalPosition::Insert).await?;
    let limit = rollback_freeze_limit(spec);
    let synced = match tokio::time::timeout(limit, sync(spec, Until::Lsn(lsn))).await {
        Ok(r) => r?,
        Err(_) => {
            // Dropping the transaction releases the freeze; the source was not switched to.
            drop(tx);
            return Err(CoordinatorError::State(format!(
                "rollback: the target's last writes did not reach the source within {} s of \
                 freezing; the freeze was released and nothing was switched; run `schemashift \
                 rollback` again",
                limit.as_secs()
            )));
        }
    };
    // Rows the application inserted on the target now exist on the source too: its
    // sequences move past the target's, or the application's next inserts there would
    // collide with them once it is switched back.
    move_sequences_back(spec, fwd, &tx).await?;
    if let Some(cmd) = &spec.cutover.switch_back_command {
        let run = spec.shell(cmd).kill_on_drop(true).status();
        let left = limit.saturating_sub(frozen.elapsed());
        let status = tokio::time::timeout(left, run)
            .await
            .map_err(|_| {
                CoordinatorError::State(format!(
                    "switch_back_command ran past the rollback freeze limit ({} s) and was \
                     killed; the freeze was released; check where the application points and \
                     run `schemashift rollback` again",
                    limit.as_secs()
                ))
            })?
            .map_err(|e| {
                CoordinatorError::State(format!("switch_back_command cannot start: {e}"))
            })?;
        if !status.success() {
            return Err(CoordinatorError::State(format!(
                "switch_back_command failed ({status}); the target stays frozen until this process exits, nothing was switched"
            )));
        }
    }
    Store::new(&spec.control_schema)
        .set_phase(&tx, Phase::RolledBack)
        .await?;
    tx.commit()
        .await
        .map_err(db("releasing the rollback freeze"))?;
    Ok(RollbackReport {
        freeze_ms: frozen.elapsed().as_secs_f64() * 1000.0,
        changes_applied: early.changes_applied + synced.changes_applied,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
