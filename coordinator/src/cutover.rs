//! cutover: with replay caught up, freeze writes on the source tables (a lock taken with
//! `lock_timeout`, retried, never an unbounded wait), drain the change log to the
//! source's WAL position inside the freeze, re-check every key changed since the last
//! compare, move target sequences past the source's, run the switch hook, record the
//! switch and release. Any step that would overrun `freeze_timeout` releases and aborts.

use crate::capture::{wal_lsn, WalPosition};
use crate::control::Phase;
use crate::error::CoordinatorError;
use crate::replay::CatchUp;
use crate::run::RunCtx;
use crate::verify::recheck;
use schemashift_changelog::LogHead;
use schemashift_common::change::Op;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;

const LOCK_ATTEMPTS: u32 = 10;
/// Target sequences start this far past the source's: inserts that waited on the freeze
/// take source ids after it, and their late copies must not collide with the ids the
/// switched application gets on the target.
const SEQUENCE_GAP: i64 = 10_000;

#[derive(Clone, Debug, Default, Serialize)]
pub struct CutoverReport {
    pub freeze_ms: f64,
    pub lock_attempts: u32,
    pub lsn: String,
    pub keys_rechecked: usize,
    pub sequences_moved: usize,
    pub late_changes: i64,
    pub foreign_keys_restored: usize,
    /// A reverse slot records target writes for rollback (needs `reverse` mappings).
    pub reverse_sync: bool,
    /// Where the freeze went, in ms from the lock: drained, re-checked, reverse sync started.
    pub drained_ms: f64,
    pub rechecked_ms: f64,
    pub reverse_ms: f64,
    /// Autovacuum workers on the frozen tables cancelled so the lock could be taken.
    pub autovacuums_cancelled: i64,
}

/// Autovacuum takes a lock that conflicts with the freeze and only yields to waiters after
/// `deadlock_timeout`, longer than our `lock_timeout`: cancel it (it starts again later).
/// Not the anti-wraparound kind, which must finish. Needs the right to signal it
/// (superuser, as autovacuum runs as one); without it, nothing happens.
async fn cancel_autovacuum(source: &tokio_postgres::Client, tables: &[String]) -> i64 {
    let sql = "SELECT count(pg_cancel_backend(a.pid)) FROM pg_stat_activity a \
               WHERE a.backend_type = 'autovacuum worker' AND a.query NOT LIKE '%to prevent wraparound%' \
               AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.relation = ANY ($1::text[]::regclass[]))";
    match source.query_one(sql, &[&tables]).await {
        Ok(r) => r.get(0),
        Err(e) => {
            tracing::debug!(error = %schemashift_common::pg::describe(&e), "autovacuum not cancelled");
            0
        }
    }
}

/// Keys touched by changes after `after` (and up to `upto`), per table.
async fn changed_keys(
    ctx: &RunCtx,
    after: &LogHead,
    upto: &LogHead,
) -> Result<Vec<(u32, Vec<String>)>, CoordinatorError> {
    let mut keys: BTreeSet<(u32, Vec<String>)> = BTreeSet::new();
    for c in ctx.log_between(after, upto).await? {
        let Some(table) = ctx.plan.table(c.table) else {
            continue;
        };
        if let Some(old) = &c.old_key {
            keys.insert((c.table, old.clone()));
        }
        if c.op != Op::Delete {
            if let Some(k) = c.key(&table.source_key_index()) {
                keys.insert((c.table, k));
            }
        }
    }
    Ok(keys.into_iter().collect())
}

/// The cutover, excluding a pause for its whole length: refused while the run is paused.
pub async fn cutover(ctx: &mut RunCtx) -> Result<CutoverReport, CoordinatorError> {
    let sql = schemashift_common::control::ControlSql::new(&ctx.spec.control_schema);
    crate::stopped::check_cutover(&ctx.target, &sql, &ctx.plan).await?;
    if !crate::pause::try_cutover_lock(&ctx.target, &sql).await? {
        return Err(CoordinatorError::CutoverRefused(
            "another cutover, or a pause being recorded, holds the cutover lock; try again".into(),
        ));
    }
    let r = match crate::pause::read(&ctx.target, &sql).await {
        Ok(Some(p)) => Err(CoordinatorError::CutoverRefused(format!(
            "the run is {p}; `schemashift resume SPEC` first"
        ))),
        Ok(None) => cutover_unpaused(ctx).await,
        Err(e) => Err(e),
    };
    crate::pause::release_cutover_lock(&ctx.target, &sql).await;
    r
}

async fn cutover_unpaused(ctx: &mut RunCtx) -> Result<CutoverReport, CoordinatorError> {
    let freeze_budget = ctx.spec.cutover.freeze_timeout;
    let mut report = CutoverReport::default();
    let tables = ctx
        .plan
        .tables
        .iter()
        .map(|t| t.source.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let names: Vec<String> = ctx
        .plan
        .tables
        .iter()
        .map(|t| t.source.to_string())
        .collect();
    let lock_timeout_ms = (freeze_budget.as_millis() / 4).clamp(20, 500);
    let _unheld = ctx.svc.replay_unheld();
    let mut source = schemashift_common::pg::connect(&ctx.spec.source, "source").await?;
    // The reverse slot is made while writes still flow: its creation waits for whatever
    // runs on the target, which must never stretch the freeze.
    // Without it a rollback would lose the target's writes: refused before anything is
    // frozen, unless the spec gives the way back up.
    let reverse_start = if ctx.spec.cutover.reverse {
        match crate::reverse::prepare(&ctx.spec, &ctx.plan, &ctx.target).await? {
            Ok(r) => Some(r),
            Err(why) => {
                return Err(CoordinatorError::CutoverRefused(format!(
                    "reverse sync cannot start ({why}), so a rollback would lose the target's writes; \
                     fix the spec, or set `cutover: {{reverse: false}}` to cut over without a way back"
                )))
            }
        }
    } else {
        tracing::warn!(
            "cutover.reverse is false: no reverse sync, so no rollback after the cutover"
        );
        None
    };

    for attempt in 1..=LOCK_ATTEMPTS {
        report.lock_attempts = attempt;
        // Get close first, so the freeze only covers the last few changes.
        let (baseline, lag) = CatchUp::new(ctx).now(None).await?;
        if lag > ctx.spec.cutover.max_lag {
            tracing::info!(
                lag_ms = lag.as_millis() as u64,
                "lag above max_lag; catching up again before freezing"
            );
            continue;
        }
        // The lag the freeze starts from (the seed's "lag before cutover").
        ctx.report.lag_seconds = lag.as_secs_f64();
        let tx = source
            .transaction()
            .await
            .map_err(|e| CoordinatorError::db("starting freeze", &e))?;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = '{lock_timeout_ms}ms'"))
            .await
            .map_err(|e| CoordinatorError::db("setting lock_timeout", &e))?;
        let t0 = Instant::now();
        match tx
            .batch_execute(&format!("LOCK TABLE {tables} IN EXCLUSIVE MODE"))
            .await
        {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::warn!(
                    attempt,
                    "freeze lock not granted within lock_timeout; source stays writable, retrying"
                );
                drop(tx);
                report.autovacuums_cancelled += cancel_autovacuum(&source, &names).await;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                continue;
            }
            Err(e) => return Err(CoordinatorError::db("freezing writes", &e)),
        }
        let deadline = t0 + freeze_budget;
        // Every writer of these tables has committed or waits on us: this LSN covers all.
        let lsn = wal_lsn(&tx, WalPosition::Insert).await?;
        let outcome = async {
            let (head, _) = CatchUp::new(ctx).to(Some(lsn), Some(deadline)).await?;
            let ms = || t0.elapsed().as_secs_f64() * 1e3;
            let drained = ms();
            tracing::debug!(ms = drained, "freeze: drained");
            let mut keys = changed_keys(ctx, &baseline, &head).await?;
            // Keys verify could not settle while they kept changing: settled here, with
            // the writes frozen.
            if let Some(v) = &ctx.report.verify {
                keys.extend(v.still_changing.iter().map(|k| (k.table, k.key.clone())));
                keys.sort();
                keys.dedup();
            }
            let diffs = recheck(ctx, &keys).await?;
            let rechecked = ms();
            tracing::debug!(ms = rechecked, keys = keys.len(), "freeze: re-checked");
            if !diffs.is_empty() {
                return Err(CoordinatorError::CutoverAborted(format!(
                    "{} rows differ inside the freeze (first: {:?})",
                    diffs.len(),
                    diffs.first().map(|d| &d.1.key)
                )));
            }
            let mut moved = 0;
            for t in ctx.plan.tables.iter() {
                for s in &t.sequences {
                    // The names come from pg_get_serial_sequence: already quoted.
                    let last: i64 = tx
                        .query_one(&format!("SELECT last_value FROM {}", s.source_sequence), &[])
                        .await
                        .map_err(|e| CoordinatorError::db("reading source sequence", &e))?
                        .get(0);
                    ctx.target
                        .query_one(
                            &format!("SELECT setval($1::text::regclass, greatest(least($2::bigint, (SELECT seqmax FROM pg_sequence WHERE seqrelid = $1::text::regclass)), (SELECT last_value FROM {})))", s.target_sequence),
                            &[&s.target_sequence, &last.saturating_add(SEQUENCE_GAP)],
                        )
                        .await
                        .map_err(|e| CoordinatorError::db("moving target sequence", &e))?;
                    moved += 1;
                }
            }
            // Before the application moves: every target write from now on flows back.
            // Bounded like every step: writes must not wait past freeze_timeout.
            let left = deadline.saturating_duration_since(Instant::now());
            let reverse = match &reverse_start {
                Some(r) => {
                    tokio::time::timeout(left, r.mark(&ctx.target))
                        .await
                        .map_err(|_| CoordinatorError::CutoverAborted(format!(
                            "starting reverse sync did not finish within freeze_timeout (drained at {drained:.0} ms, re-checked at {rechecked:.0} ms)"
                        )))??;
                    true
                }
                None => false,
            };
            let reverse_ms = ms();
            tracing::debug!(ms = reverse_ms, reverse, "freeze: reverse sync set up");
            if let Some(cmd) = &ctx.spec.cutover.switch_command {
                let left = deadline.saturating_duration_since(Instant::now());
                let status = tokio::time::timeout(left, ctx.spec.shell(cmd).status())
                    .await
                    .map_err(|_| CoordinatorError::CutoverAborted("switch_command did not finish within freeze_timeout".into()))?
                    .map_err(|e| CoordinatorError::CutoverAborted(format!("switch_command cannot start: {e}")))?;
                if !status.success() {
                    return Err(CoordinatorError::CutoverAborted(format!("switch_command failed ({status})")));
                }
            }
            if Instant::now() > deadline {
                return Err(CoordinatorError::CutoverAborted(format!(
                    "freeze would exceed freeze_timeout (drained at {drained:.0} ms, re-checked at {rechecked:.0} ms, \
                     reverse sync started at {reverse_ms:.0} ms, switched at {:.0} ms)",
                    ms()
                )));
            }
            ctx.store.set_phase(&ctx.target, Phase::CutOver).await?;
            ctx.event(crate::run::RunEvent::Switched);
            Ok::<_, CoordinatorError>((keys.len(), moved, head, reverse, [drained, rechecked, reverse_ms]))
        }
        .await;
        match outcome {
            Ok((keys, moved, frozen_head, reverse, [drained, rechecked, reverse_ms])) => {
                report.reverse_sync = reverse;
                (report.drained_ms, report.rechecked_ms, report.reverse_ms) =
                    (drained, rechecked, reverse_ms);
                tx.commit()
                    .await
                    .map_err(|e| CoordinatorError::db("releasing freeze", &e))?;
                report.freeze_ms = t0.elapsed().as_secs_f64() * 1000.0;
                report.lsn = lsn.to_string();
                report.keys_rechecked = keys;
                report.sequences_moved = moved;
                tracing::info!(freeze_ms = report.freeze_ms, lsn = %lsn, "cut over");
                // Writes that waited on the freeze commit on the source after it: carry them over.
                let (after, _) = CatchUp::new(ctx).now(None).await?;
                report.late_changes = ctx.log_between(&frozen_head, &after).await?.len() as i64;
                report.foreign_keys_restored =
                    crate::constraints::restore(&ctx.target, &ctx.store).await?;
                let detail = serde_json::to_value(&report).unwrap_or_default();
                crate::history::record(
                    &ctx.target,
                    &ctx.store.sql,
                    "cutover",
                    detail,
                    crate::history::By::Operator,
                )
                .await;
                return Ok(report);
            }
            Err(e @ CoordinatorError::CutoverAborted(_)) => {
                drop(tx);
                tracing::warn!(error = %e, "cutover attempt aborted; writes released");
                if attempt == LOCK_ATTEMPTS {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(CoordinatorError::CutoverAborted(format!(
        "could not freeze {tables} within lock_timeout after {LOCK_ATTEMPTS} attempts; \
         long transactions on the source hold conflicting locks (see pg_locks / pg_stat_activity)"
    )))
}
