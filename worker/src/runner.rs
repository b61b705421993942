//! The worker loop: register, ask for work, do it, report; until the coordinator says
//! the run is over. Work is a backfill shard or a set of change-log partitions. Failed
//! work is given back and the coordinator decides when a run fails; coordinator and
//! database connections are re-established with bounded exponential backoff.

use crate::backfill::{copy_shard, CopyPacing, CopyProgress};
use crate::WorkerError;
use schemashift_changelog::replay::PartitionReplayer;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::LeaseEpoch;
use schemashift_common::pg::{connect, install_helpers};
use schemashift_common::plan::{RunPlan, Shard};
use schemashift_common::retry::{retry, Backoff, Class, Classify};
use schemashift_common::service::{
    Beat, CoordinatorService, LeaseRef, PartitionLease, Progress, Registration, ServiceError, Work,
    WorkerInfo,
};
use schemashift_common::trace::set_parent;
use schemashift_common::verify::verify_range;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::Instrument;

#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerStats {
    pub shards: u64,
    pub rows: u64,
    pub bytes: u64,
    pub changes: u64,
    pub retries: u64,
}

impl WorkerStats {
    pub fn add(&mut self, other: &WorkerStats) {
        self.shards += other.shards;
        self.rows += other.rows;
        self.bytes += other.bytes;
        self.changes += other.changes;
        self.retries += other.retries;
    }

    fn progress(&self) -> Progress {
        Progress {
            rows: self.rows,
            bytes: self.bytes,
            changes: self.changes,
        }
    }
}

/// How long an idle replayer waits before looking at the change log again.
const REPLAY_IDLE: Duration = Duration::from_millis(20);
/// How often a held replay asks whether it may go on.
const REPLAY_HELD_BEAT: Duration = Duration::from_millis(250);

/// Calls the coordinator, retrying while it is unreachable.
async fn call<T, F, Fut>(me: &WorkerInfo, what: &str, f: F) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ServiceError>>,
{
    retry(what, Backoff::Coordinator, f)
        .await
        .map_err(|e| match e {
            ServiceError::Unauthenticated(_) => {
                WorkerError::Refused(format!("worker {} cannot {what}: {e}", me.id))
            }
            ServiceError::Unavailable(_) | ServiceError::Rejected(_) => {
                WorkerError::Coordinator(format!("worker {} cannot {what}: {e}", me.id))
            }
        })
}

struct Sessions {
    source: Client,
    target: Client,
}

impl Sessions {
    async fn open(reg: &Registration) -> Result<Self, WorkerError> {
        let open = || async {
            let source = connect(&reg.source, "source").await?;
            install_helpers(&source, &reg.plan.helpers, "source").await?;
            let target = connect(&reg.target, "target").await?;
            // Replay evaluates the mapping on the target.
            install_helpers(&target, &reg.plan.helpers, "target").await?;
            // Reverse sync after the cutover must not send our own writes back.
            schemashift_common::pg::mark_origin(&target, "forward").await;
            if reg.plan.low_priority {
                for s in [&source, &target] {
                    schemashift_common::pg::lower_priority(s).await;
                }
            }
            Ok::<_, WorkerError>(Sessions { source, target })
        };
        retry("opening database sessions", Backoff::Database, open).await
    }

    fn closed(&self) -> bool {
        self.source.is_closed() || self.target.is_closed()
    }

    /// Opened at the first work that needs them: a worker serving a fleet holds connections
    /// only to the members it works for.
    async fn ready<'a>(
        slot: &'a mut Option<Sessions>,
        reg: &Registration,
    ) -> Result<&'a mut Sessions, WorkerError> {
        if slot.as_ref().is_some_and(Sessions::closed) {
            *slot = None;
        }
        match slot {
            Some(s) => Ok(s),
            None => Ok(slot.insert(Sessions::open(reg).await?)),
        }
    }
}

struct Worker<S> {
    svc: Arc<S>,
    me: WorkerInfo,
    reg: Registration,
    plan: Arc<RunPlan>,
    control: ControlSql,
    stats: WorkerStats,
    shutdown: watch::Receiver<bool>,
}

/// Runs one worker until the coordinator says the run is over, or shutdown.
pub async fn run_worker<S: CoordinatorService>(
    svc: Arc<S>,
    me: WorkerInfo,
    shutdown: watch::Receiver<bool>,
    gate: Option<schemashift_common::fleet::MemberGate>,
) -> Result<WorkerStats, WorkerError> {
    // This worker's own place among its member's workers (first or spare).
    let gate = gate.map(|g| g.for_worker());
    let reg = call(&me, "register", || svc.register(&me)).await?;
    tracing::info!(worker = %me.id, run_id = %reg.run_id, "worker registered");
    let mut w = Worker {
        plan: Arc::new(reg.plan.clone()),
        control: ControlSql::new(&reg.plan.control_schema),
        svc,
        me,
        reg,
        stats: WorkerStats::default(),
        shutdown,
    };
    let mut sessions: Option<Sessions> = None;
    // Past the backfill (replay, verify) a member's work takes no copy slot: its replay
    // must keep up with its writes whatever the rest of the fleet is copying.
    let mut copying = true;
    loop {
        if *w.shutdown.borrow() {
            return Ok(w.stats);
        }
        // In a fleet a copy waits for its place (the pool, a slot on each of its servers)
        // before taking a lease, so a lease never runs out while it waits.
        let mut pass = match &gate {
            Some(g) if copying => tokio::select! {
                p = g.copy() => Some(p),
                _ = w.shutdown.changed() => continue,
            },
            _ => None,
        };
        let progress = w.stats.progress();
        let work = call(&w.me, "lease work", || w.svc.lease(&w.me, progress)).await?;
        match &work {
            Work::Backfill { .. } | Work::Wait(_) => {}
            Work::Replay { .. } | Work::Verify { .. } | Work::Done => copying = false,
        }
        if !matches!(work, Work::Backfill { .. }) {
            drop(pass.take());
        }
        match work {
            Work::Backfill { shard, epoch } => {
                let before = w.stats.rows;
                let s = Sessions::ready(&mut sessions, &w.reg).await?;
                let copied = w.backfill(s, shard, epoch).await;
                if let Some(p) = pass.as_mut() {
                    p.worked(w.stats.rows.saturating_sub(before));
                }
                copied?
            }
            Work::Replay { partitions } => {
                let s = Sessions::ready(&mut sessions, &w.reg).await?;
                w.replay(s, partitions).await?
            }
            Work::Verify { shard, epoch } => {
                let s = Sessions::ready(&mut sessions, &w.reg).await?;
                w.verify(s, shard, epoch).await
            }
            Work::Wait(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = w.shutdown.changed() => {}
                }
            }
            Work::Done => {
                tracing::info!(worker = %w.me.id, shards = w.stats.shards, rows = w.stats.rows,
                    changes = w.stats.changes, "worker done");
                return Ok(w.stats);
            }
        }
    }
}

impl<S: CoordinatorService> Worker<S> {
    /// Gives work back; the coordinator counts failures and decides when the run fails.
    async fn give_back(&mut self, lease: &LeaseRef, e: &WorkerError) {
        self.stats.retries += 1;
        let reason = e.to_string();
        if let Err(err) = call(&self.me, "return work", || {
            self.svc.failed(&self.me, lease, reason.clone())
        })
        .await
        {
            // The lease expires on its own; nothing is lost.
            tracing::warn!(error = %err, "could not return work");
        }
        // Not straight back into the same failure.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    async fn backfill(
        &mut self,
        sessions: &mut Sessions,
        shard: Shard,
        epoch: LeaseEpoch,
    ) -> Result<(), WorkerError> {
        let Some(table) = self.plan.table(shard.table) else {
            return Err(WorkerError::Coordinator(format!(
                "shard {} names unknown table {}",
                shard.id, shard.table
            )));
        };
        let span = tracing::info_span!("shard", run_id = %self.reg.run_id, worker = %self.me.id,
            table = %table.describe(), shard = %shard.id, range = %shard.range, epoch = epoch.0,
            rows = tracing::field::Empty, bytes = tracing::field::Empty);
        set_parent(&span, self.reg.traceparent.as_deref());
        let progress = Arc::new(CopyProgress::default());
        let lease = LeaseRef::Shard {
            shard: shard.id,
            epoch,
        };
        // Heartbeats keep the lease while the copy runs and say when to pause it (throttle).
        // A lost lease stops the copy at once (its transaction rolls back); the fenced commit
        // refuses it anyway if the news comes late.
        let (hold_tx, hold) = tokio::sync::watch::channel(false);
        let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
        let beat = {
            let (svc, me, progress, lease) = (
                self.svc.clone(),
                self.me.clone(),
                progress.clone(),
                lease.clone(),
            );
            let base = self.stats.progress();
            // Often enough that a pause takes effect while the source is still strained.
            let every = (self.reg.lease_ttl / 3).min(Duration::from_millis(300));
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let p = Progress {
                            rows: base.rows + progress.messages.load(Ordering::Relaxed),
                            bytes: base.bytes + progress.bytes.load(Ordering::Relaxed),
                            changes: base.changes,
                        };
                        match svc.heartbeat(&me, &lease, p).await {
                            Ok(Beat::Lost) => {
                                tracing::warn!("lease lost while copying: stopping the copy");
                                lost_tx.send_replace(true);
                                return;
                            }
                            Ok(Beat::Hold) => {
                                hold_tx.send_if_modified(|h| !std::mem::replace(h, true));
                            }
                            Ok(Beat::Keep | Beat::Stop) => {
                                hold_tx.send_if_modified(|h| std::mem::replace(h, false));
                            }
                            Err(_) => {}
                        }
                    }
                }
                .instrument(span.clone()),
            )
        };
        let copy = copy_shard(
            &sessions.source,
            &mut sessions.target,
            &self.control,
            table,
            &shard,
            epoch,
            CopyPacing { progress, hold },
        )
        .instrument(span.clone());
        let (result, aborted) = tokio::select! {
            r = copy => (r, false),
            _ = lost.wait_for(|l| *l) => (Err(WorkerError::LeaseLost {
                table: table.describe(),
                shard: shard.id,
            }), true),
        };
        beat.abort();
        if aborted {
            // The sessions were left mid-COPY; fresh ones are simpler than draining them.
            *sessions = Sessions::open(&self.reg).await?;
        }
        match result {
            Ok(out) => {
                span.record("rows", out.rows);
                span.record("bytes", out.bytes);
                span.in_scope(|| {
                    tracing::info!(rows = out.rows, bytes = out.bytes, "shard copied")
                });
                self.stats.shards += 1;
                self.stats.rows += out.rows;
                self.stats.bytes += out.bytes;
                // The commit already counted; the report only speeds the coordinator up.
                // Sent in the shard's span: the coordinator's handler joins the run's trace.
                let _ = self
                    .svc
                    .completed(&self.me, shard.id, epoch, out.rows, out.bytes)
                    .instrument(span.clone())
                    .await;
            }
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "shard failed"));
                if e.class() != Class::Fenced {
                    self.give_back(&lease, &e).await;
                }
            }
        }
        Ok(())
    }

    /// Compares one range; the coordinator collects the results (and retries failures).
    async fn verify(&mut self, sessions: &Sessions, shard: Shard, epoch: LeaseEpoch) {
        let result = match self.plan.table(shard.table) {
            Some(table) => {
                let span = tracing::info_span!("verify", run_id = %self.reg.run_id, worker = %self.me.id,
                    table = %table.describe(), shard = %shard.id, range = %shard.range);
                set_parent(&span, self.reg.traceparent.as_deref());
                verify_range(&sessions.source, &sessions.target, table, &shard.range)
                    .instrument(span)
                    .await
                    .map_err(|e| e.to_string())
            }
            None => Err(format!(
                "shard {} names unknown table {}",
                shard.id, shard.table
            )),
        };
        if let Err(e) = self.svc.verified(&self.me, shard.id, epoch, result).await {
            // Rejected: someone else verifies it now; unavailable: the lease runs out.
            tracing::info!(error = %e, shard = %shard.id, "verify result not taken");
        }
    }

    /// Applies the leased partitions until the coordinator says stop, the lease is lost,
    /// or shutdown; then gives them back.
    async fn replay(
        &mut self,
        sessions: &mut Sessions,
        partitions: Vec<PartitionLease>,
    ) -> Result<(), WorkerError> {
        let lease = LeaseRef::Partitions(partitions.clone());
        let parts = partitions
            .iter()
            .map(|p| p.part.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let span = tracing::info_span!("replay", run_id = %self.reg.run_id, worker = %self.me.id,
            partitions = %parts, changes = tracing::field::Empty);
        set_parent(&span, self.reg.traceparent.as_deref());
        let before = self.stats.changes;
        let outcome = self
            .replay_loop(sessions, &partitions, &lease)
            .instrument(span.clone())
            .await;
        span.record("changes", self.stats.changes - before);
        match outcome {
            Ok(true) => {
                // One try: at shutdown the coordinator may be gone, and the lease expires anyway.
                let _ = self.svc.failed(&self.me, &lease, String::new()).await;
            }
            Ok(false) => {}
            Err(e) if e.class() == Class::Fenced => {
                span.in_scope(|| tracing::info!(error = %e, "replay lease lost"));
            }
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "replay failed"));
                self.give_back(&lease, &e).await;
            }
        }
        Ok(())
    }

    /// Ok(true): stopped while holding the lease (give it back); Ok(false): lease lost.
    async fn replay_loop(
        &mut self,
        sessions: &mut Sessions,
        partitions: &[PartitionLease],
        lease: &LeaseRef,
    ) -> Result<bool, WorkerError> {
        let mut replayers = Vec::with_capacity(partitions.len());
        for l in partitions {
            replayers.push(PartitionReplayer::open(&sessions.target, self.plan.clone(), *l).await?);
        }
        let every = (self.reg.lease_ttl / 3).min(Duration::from_secs(1));
        // The first beat comes before the first batch, so a hold applies from the start.
        let mut last_beat: Option<Instant> = None;
        let mut held = false;
        loop {
            if *self.shutdown.borrow() {
                return Ok(true);
            }
            let beat_every = if held { REPLAY_HELD_BEAT } else { every };
            if last_beat.is_none_or(|t| t.elapsed() >= beat_every) {
                last_beat = Some(Instant::now());
                match self
                    .svc
                    .heartbeat(&self.me, lease, self.stats.progress())
                    .await
                {
                    // Throttled: apply nothing until a beat says go on (positions stay put).
                    Ok(Beat::Hold) => {
                        if !held {
                            tracing::debug!("replay held by the throttle");
                        }
                        held = true;
                    }
                    Ok(Beat::Keep) => held = false,
                    Ok(Beat::Stop) => return Ok(true),
                    Ok(Beat::Lost) => return Ok(false),
                    // Keep applying: every position write is fenced by the lease epoch.
                    Err(e) if e.is_transient() => {
                        tracing::debug!(error = %e, "heartbeat failed")
                    }
                    Err(e) => return Err(WorkerError::Coordinator(e.to_string())),
                }
            }
            let mut applied = 0;
            if !held {
                for r in replayers.iter_mut() {
                    applied += r
                        .step(
                            &mut sessions.target,
                            &sessions.source,
                            self.plan.replay_batch(),
                        )
                        .await?;
                }
            }
            self.stats.changes += applied as u64;
            if applied == 0 {
                let idle = if held { REPLAY_HELD_BEAT } else { REPLAY_IDLE };
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = self.shutdown.changed() => {}
                }
            }
        }
    }
}
