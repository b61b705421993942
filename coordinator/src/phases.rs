//! The phases of a run in order: backfill → replay → verify (→ cutover), from wherever
//! the control state says the run is, as far as `until`.

use crate::backfill::Backfill;
use crate::control::Phase;
use crate::error::CoordinatorError;
use crate::replay::CatchUp;
use crate::run::{RunCtx, RunEvent, RunOptions, RunReport, Until, Workers};
use crate::verify::Verify;
use schemashift_common::spec::Spec;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// `schemashift run`: plan or resume, then go as far as `until`.
pub async fn run(
    spec: &Spec,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, CoordinatorError> {
    let metrics = match &opts.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let mut ctx = RunCtx::open_with(
        spec,
        Workers::Embedded(opts.workers, opts.local),
        crate::stopped::OnStopped::Resume,
        opts.planned,
    )
    .await?;
    if let Some(listener) = metrics {
        ctx.serve_metrics(listener);
    }
    ctx.set_events(opts.events);
    drive(ctx, opts.until, shutdown).await
}

/// Takes an open run as far as `until`; the same for embedded and remote workers.
pub async fn drive(
    ctx: RunCtx,
    until: Until,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, CoordinatorError> {
    // The root of the run's trace; workers parent their spans on it.
    let span = tracing::info_span!("run", run_id = %ctx.run_id, until = ?until);
    ctx.svc
        .set_traceparent(span.in_scope(schemashift_common::trace::current_traceparent));
    drive_phases(ctx, until, shutdown).instrument(span).await
}

async fn drive_phases(
    mut ctx: RunCtx,
    until: Until,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, CoordinatorError> {
    let phase = ctx.phase().await?;
    if phase == Phase::CutOver {
        tracing::info!("run already cut over");
        return ctx.finish().await;
    }
    if phase <= Phase::Backfill {
        Backfill::new(&mut ctx)
            .drive(&shutdown)
            .instrument(tracing::info_span!("backfill"))
            .await?;
    }
    ctx.event(RunEvent::BackfillDone);
    if until == Until::Backfill {
        build_deferred(&mut ctx).await?;
        return end(ctx).await;
    }
    let (_, mut lag) = CatchUp::new(&mut ctx)
        .now(None)
        .instrument(tracing::info_span!("replay"))
        .await?;
    // The changes made during the backfill are applied: now the deferred indexes, then
    // the changes made while they were built.
    if build_deferred(&mut ctx).await? {
        (_, lag) = CatchUp::new(&mut ctx)
            .now(None)
            .instrument(tracing::info_span!("replay"))
            .await?;
    }
    ctx.report.lag_seconds = lag.as_secs_f64();
    if until == Until::Replay {
        return end(ctx).await;
    }
    ctx.store.set_phase(&ctx.target, Phase::Verify).await?;
    let summary = Verify::new(&mut ctx)
        .drive()
        .instrument(tracing::info_span!("verify"))
        .await?;
    let clean = summary.differing.is_empty();
    // With a table stopped, the run is verified only in part: it stays in verify.
    let partial = !summary.skipped_tables.is_empty();
    if clean && !partial {
        ctx.store.set_phase(&ctx.target, Phase::Verified).await?;
    }
    ctx.report.verify = Some(summary);
    if !clean {
        let report = ctx.finish().await?;
        let n = report.verify.as_ref().map_or(0, |v| v.differing.len());
        return Err(CoordinatorError::State(format!(
            "verify found {n} differing rows after re-checks (see `schemashift verify --json`); not cutting over"
        )));
    }
    if until == Until::Cutover && partial {
        return end(ctx).await;
    }
    if until == Until::Cutover {
        let cut = crate::cutover::cutover(&mut ctx)
            .instrument(tracing::info_span!("cutover"))
            .await?;
        ctx.report.cutover = Some(cut);
    }
    end(ctx).await
}

/// Builds the indexes deferred past the first catch-up (see [`crate::indexes`]) with
/// replay stopped: a build holds a SHARE lock on its table, and a replay batch waiting on
/// it would miss its heartbeats and lose its lease. Returns whether there were any (a
/// resumed run may have built them already).
async fn build_deferred(ctx: &mut RunCtx) -> Result<bool, CoordinatorError> {
    let stopped = crate::backfill::stopped_targets(ctx).await?;
    if !crate::indexes::deferred_pending(&ctx.target, &ctx.store, &stopped).await? {
        return Ok(false);
    }
    let t0 = Instant::now();
    let _stopped = ctx.svc.replay_stopped();
    // Live workers give their partitions back at their next beat, a third of the lease
    // TTL at most; a lease still held after a whole TTL has expired, and its holder is
    // fenced. Leases of a crashed process have no one to wait for.
    let deadline = t0 + ctx.svc.lease_ttl();
    while Instant::now() < deadline
        && ctx
            .store
            .replay_leases_held(&ctx.target, &ctx.svc.live_worker_ids())
            .await?
            > 0
    {
        if let Some(e) = ctx.local_failure().await {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::failpoint("deferred-indexes-replay-stopped");
    let built = crate::backfill::build_indexes(ctx, crate::indexes::IndexSet::All, &stopped)
        .instrument(tracing::info_span!("indexes"))
        .await?;
    tracing::info!(
        indexes = built,
        seconds = t0.elapsed().as_secs_f64(),
        "deferred indexes built"
    );
    Ok(true)
}

/// Ends the run: its report, or the tables that stopped, what to fix and how to resume.
async fn end(mut ctx: RunCtx) -> Result<RunReport, CoordinatorError> {
    let stopped = crate::stopped::list(&ctx.target, &ctx.store.sql, &ctx.plan).await?;
    ctx.report.stopped = stopped.clone();
    let report = ctx.finish().await?;
    if stopped.is_empty() {
        return Ok(report);
    }
    Err(CoordinatorError::TablesStopped(crate::stopped::message(
        &stopped,
    )))
}
