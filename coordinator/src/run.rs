//! Embedded mode: the coordinator and its workers in one process. Resumes from the
//! control state when there is one; phases: backfill → replay → verify (→ cutover).

use crate::capture::{ensure_slot, flush_wal, wal_lsn, Capture, CaptureProgress, WalPosition};
use crate::control::{Phase, Store};
use crate::error::CoordinatorError;
use crate::plan::{plan, PlanOptions, TableAnalysis};
use crate::service::EmbeddedCoordinator;
use schemashift_common::ids::{Lsn, RunId};
use schemashift_common::pg::{connect, install_helpers};
use schemashift_common::plan::RunPlan;
use schemashift_common::service::Registration;
use schemashift_common::spec::Spec;
use schemashift_worker::replay::PartitionReplayer;
use schemashift_worker::runner::run_backfill;
use schemashift_worker::verify::{recheck_keys, verify_range, KeyDiff};
use schemashift_worker::WorkerError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::Instrument;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Until {
    Backfill,
    Replay,
    Verify,
    Cutover,
}

pub struct RunOptions {
    pub workers: Option<usize>,
    pub until: Until,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifySummary {
    pub source_rows: i64,
    pub target_rows: i64,
    pub ranges: usize,
    pub differing: Vec<KeyDiff>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub phase: String,
    pub resumed: bool,
    pub tables: Vec<TableAnalysis>,
    pub shards: i64,
    pub rows_copied: i64,
    pub bytes_copied: i64,
    pub backfill_seconds: f64,
    pub rows_per_second: f64,
    pub changes_captured: i64,
    pub changes_replayed: i64,
    pub lag_seconds: f64,
    pub verify: Option<VerifySummary>,
    pub cutover: Option<crate::cutover::CutoverReport>,
    pub total_seconds: f64,
}

/// Replay tasks, one per change-log partition, with their applied positions.
pub struct ReplayPool {
    pub positions: Arc<Vec<AtomicI64>>,
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<Result<u64, WorkerError>>>,
}

impl ReplayPool {
    async fn start(
        spec: &Spec,
        plan: Arc<RunPlan>,
        capture: watch::Receiver<CaptureProgress>,
    ) -> Result<Self, CoordinatorError> {
        let (stop, stop_rx) = watch::channel(false);
        let positions: Arc<Vec<AtomicI64>> =
            Arc::new((0..plan.partitions).map(|_| AtomicI64::new(0)).collect());
        let mut handles = Vec::new();
        for part in 0..plan.partitions {
            let mut target = connect(&spec.target, "target").await?;
            install_helpers(&target, &plan.helpers, "target").await?;
            let mut rep = PartitionReplayer::open(&target, plan.clone(), part).await?;
            positions[part as usize].store(rep.position().0, Ordering::SeqCst);
            let (positions, mut stop_rx, mut capture) =
                (positions.clone(), stop_rx.clone(), capture.clone());
            let span = tracing::info_span!("replay", partition = part);
            handles.push(tokio::spawn(
                async move {
                    let mut applied = 0u64;
                    loop {
                        let n = rep.step(&mut target, 5_000).await?;
                        applied += n as u64;
                        positions[part as usize].store(rep.position().0, Ordering::SeqCst);
                        if *stop_rx.borrow() {
                            return Ok(applied);
                        }
                        if n == 0 {
                            tokio::select! {
                                _ = capture.changed() => {}
                                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                                _ = stop_rx.changed() => {}
                            }
                        }
                    }
                }
                .instrument(span),
            ));
        }
        Ok(ReplayPool {
            positions,
            stop,
            handles,
        })
    }

    async fn stop(self) -> Result<(), CoordinatorError> {
        self.stop.send_replace(true);
        for h in self.handles {
            h.await
                .map_err(|e| CoordinatorError::State(format!("replay task panicked: {e}")))??;
        }
        Ok(())
    }

    /// The error of a replay task that ended while it should still run.
    async fn failure(&mut self) -> Option<CoordinatorError> {
        let i = self.handles.iter().position(|h| h.is_finished())?;
        Some(match self.handles.swap_remove(i).await {
            Ok(Err(e)) => e.into(),
            Ok(Ok(_)) => CoordinatorError::State("replay stopped early".into()),
            Err(e) => CoordinatorError::State(format!("replay task panicked: {e}")),
        })
    }
}

/// What a capture task that ended tells about why.
fn capture_error(
    r: Result<Result<(), CoordinatorError>, tokio::task::JoinError>,
) -> CoordinatorError {
    match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => CoordinatorError::State("capture stopped".into()),
        Err(e) => CoordinatorError::State(format!("capture task panicked: {e}")),
    }
}

/// Everything a running migration holds; shared by run, verify and cutover.
pub struct RunCtx {
    pub spec: Spec,
    pub plan: Arc<RunPlan>,
    pub store: Store,
    pub run_id: RunId,
    pub source: Client,
    pub target: Client,
    pub capture: watch::Receiver<CaptureProgress>,
    capture_stop: watch::Sender<bool>,
    capture_wake: Arc<tokio::sync::Notify>,
    capture_task: JoinHandle<Result<(), CoordinatorError>>,
    pub replay: Option<ReplayPool>,
    pub workers: usize,
    pub report: RunReport,
    started: Instant,
}

impl RunCtx {
    /// Opens or creates the run: plans (failing with every problem before any write),
    /// records the plan, creates publication and slot, and starts capture.
    pub async fn open(spec: &Spec, workers: Option<usize>) -> Result<RunCtx, CoordinatorError> {
        let started = Instant::now();
        let workers = workers.or(spec.workers).unwrap_or(4).max(1);
        let source = connect(&spec.source, "source").await?;
        let mut target = connect(&spec.target, "target").await?;
        let store = Store::new(&spec.control_schema);
        let mut report = RunReport::default();
        let state = match store.load(&target).await? {
            Some(s) => {
                if s.fingerprint != spec.fingerprint() {
                    return Err(CoordinatorError::State(format!(
                        "the control schema {} holds a run (id {}) of a different spec; \
                         finish or `schemashift cleanup` it first",
                        store.sql.schema(),
                        s.run_id
                    )));
                }
                if s.phase == Phase::RolledBack {
                    return Err(CoordinatorError::State(
                        "this run was rolled back; run `schemashift cleanup` to start over".into(),
                    ));
                }
                tracing::info!(run_id = %s.run_id, phase = s.phase.as_str(), "resuming run");
                report.resumed = true;
                s
            }
            None => {
                let planned = plan(
                    spec,
                    &source,
                    &target,
                    &PlanOptions {
                        workers,
                        resuming: false,
                    },
                )
                .await?;
                let run_id = RunId::generate();
                store
                    .init(
                        &mut target,
                        &run_id,
                        &spec.fingerprint(),
                        &planned.plan,
                        &planned.shards,
                    )
                    .await?;
                report.tables = planned.analysis;
                tracing::info!(%run_id, shards = planned.shards.len(), "run planned");
                store
                    .load(&target)
                    .await?
                    .ok_or_else(|| CoordinatorError::State("control state vanished".into()))?
            }
        };
        // The slot must exist before the first row is read.
        let slot_exists: bool = source
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&state.slot],
            )
            .await
            .map_err(|e| CoordinatorError::db("checking slot", &e))?
            .get(0);
        if state.phase > Phase::Planned && !slot_exists {
            return Err(CoordinatorError::State(format!(
                "replication slot {} is gone, so changes since the backfill started are lost; \
                 run `schemashift cleanup`, empty the target tables and start again",
                state.slot
            )));
        }
        let plan = Arc::new(state.plan);
        // recheck() evaluates mapped rows on this session, inside the freeze too.
        install_helpers(&source, &plan.helpers, "source").await?;
        ensure_slot(&source, &plan, &state.slot).await?;
        if state.phase == Phase::Planned {
            store.set_phase(&target, Phase::Backfill).await?;
        }
        let cap = Capture::open(
            connect(&spec.source, "source").await?,
            connect(&spec.target, "target").await?,
            plan.clone(),
            state.slot.clone(),
        )
        .await?;
        let (progress_tx, capture) = watch::channel(CaptureProgress {
            caught_up_to: Lsn(0),
            caught_up_at: Instant::now(),
            changes: 0,
        });
        let (capture_stop, stop_rx) = watch::channel(false);
        let capture_wake = Arc::new(tokio::sync::Notify::new());
        let capture_task = tokio::spawn(
            cap.run(
                progress_tx,
                stop_rx,
                Duration::from_millis(100),
                capture_wake.clone(),
            )
            .instrument(tracing::info_span!("capture", run_id = %state.run_id, slot = %state.slot)),
        );
        report.run_id = state.run_id.0.clone();
        Ok(RunCtx {
            spec: spec.clone(),
            plan,
            store,
            run_id: state.run_id,
            source,
            target,
            capture,
            capture_stop,
            capture_wake,
            capture_task,
            replay: None,
            workers,
            report,
            started,
        })
    }

    pub async fn phase(&self) -> Result<Phase, CoordinatorError> {
        Ok(self
            .store
            .load(&self.target)
            .await?
            .map(|s| s.phase)
            .unwrap_or(Phase::Planned))
    }

    pub async fn backfill(
        &mut self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), CoordinatorError> {
        let t0 = Instant::now();
        let released = self.store.release_all_leases(&self.target).await?;
        if released > 0 {
            tracing::info!(released, "released leases of a previous process");
        }
        let svc = Arc::new(EmbeddedCoordinator::new(
            connect(&self.spec.target, "target").await?,
            Registration {
                source: self.spec.source.clone(),
                target: self.spec.target.clone(),
                plan: (*self.plan).clone(),
                lease_ttl: Duration::from_secs(30),
            },
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..self.workers {
            let id = format!("embedded-{w}");
            let span = tracing::info_span!("worker", worker = %id, run_id = %self.run_id);
            tasks.spawn(run_backfill(svc.clone(), id, shutdown.clone()).instrument(span));
        }
        let mut ticker = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(_))) => {}
                    Some(Ok(Err(e))) => return Err(e.into()),
                    Some(Err(e)) => return Err(CoordinatorError::State(format!("worker task panicked: {e}"))),
                },
                _ = ticker.tick() => {
                    let c = self.store.shard_counts(&self.target).await?;
                    let secs = t0.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(done = c.done, leased = c.leased, pending = c.pending, rows = c.rows_done,
                        rows_per_s = (c.rows_done as f64 / secs) as u64, "backfill progress");
                }
                r = &mut self.capture_task => return Err(capture_error(r)),
            }
        }
        if *shutdown.borrow() {
            return Err(CoordinatorError::Interrupted);
        }
        let c = self.store.shard_counts(&self.target).await?;
        if c.pending + c.leased > 0 {
            return Err(CoordinatorError::State(format!(
                "backfill ended with {} shards not done",
                c.pending + c.leased
            )));
        }
        self.report.shards = c.done;
        self.report.rows_copied = c.rows_done;
        self.report.bytes_copied = c.bytes_done;
        self.report.backfill_seconds = t0.elapsed().as_secs_f64();
        self.report.rows_per_second = c.rows_done as f64 / self.report.backfill_seconds.max(0.001);
        self.store.set_phase(&self.target, Phase::Replay).await?;
        Ok(())
    }

    pub async fn start_replay(&mut self) -> Result<(), CoordinatorError> {
        if self.replay.is_none() {
            self.replay =
                Some(ReplayPool::start(&self.spec, self.plan.clone(), self.capture.clone()).await?);
        }
        Ok(())
    }

    /// Waits until every source commit before now is captured and applied; returns the
    /// change-log head it reached and how long that took (the lag).
    pub async fn catch_up(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<(i64, Duration), CoordinatorError> {
        self.catch_up_on(None, deadline).await
    }

    /// Like [`Self::catch_up`], but to a WAL position read elsewhere (inside a freeze).
    pub async fn catch_up_on(
        &mut self,
        lsn: Option<Lsn>,
        deadline: Option<Instant>,
    ) -> Result<(i64, Duration), CoordinatorError> {
        let t0 = Instant::now();
        self.start_replay().await?;
        let l = match lsn {
            Some(l) => l,
            None => wal_lsn(&self.source, WalPosition::Insert).await?,
        };
        // Make everything up to `l` decodable now rather than when the WAL writer gets to it.
        flush_wal(&self.source).await?;
        self.capture_wake.notify_one();
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "catch-up: wal flushed"
        );
        let timed_out = |d: Option<Instant>| d.is_some_and(|d| Instant::now() > d);
        loop {
            if self.capture.borrow().caught_up_to >= l {
                break;
            }
            if self.capture_task.is_finished() {
                return Err(capture_error((&mut self.capture_task).await));
            }
            if timed_out(deadline) {
                return Err(CoordinatorError::CutoverAborted(
                    "capture did not catch up in time".into(),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), self.capture.changed()).await;
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "catch-up: captured");
        let head = schemashift_worker::replay::head(&self.target, &self.store.sql)
            .await
            .map_err(|e| CoordinatorError::db("reading change log head", &e))?;
        let parts = self
            .target
            .query(
                &format!(
                    "SELECT part, max(seq) FROM {} WHERE seq <= $1 GROUP BY part",
                    self.store.sql.table("changes")
                ),
                &[&head],
            )
            .await
            .map_err(|e| CoordinatorError::db("reading change log", &e))?;
        let want: BTreeMap<usize, i64> = parts
            .iter()
            .map(|r| (r.get::<_, i32>(0) as usize, r.get::<_, i64>(1)))
            .collect();
        while let Some(pool) = self.replay.as_mut() {
            if want.iter().all(|(p, s)| {
                pool.positions
                    .get(*p)
                    .is_none_or(|x| x.load(Ordering::SeqCst) >= *s)
            }) {
                break;
            }
            if let Some(e) = pool.failure().await {
                return Err(e);
            }
            if timed_out(deadline) {
                return Err(CoordinatorError::CutoverAborted(
                    "replay did not catch up in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((head, t0.elapsed()))
    }

    /// Compares every shard range; then re-checks differing keys after replay caught up
    /// (writes during the compare cause transient differences).
    pub async fn verify(&mut self) -> Result<VerifySummary, CoordinatorError> {
        let t0 = Instant::now();
        let shards = self.store.shards(&self.target).await?;
        let queue = Arc::new(tokio::sync::Mutex::new(
            shards.into_iter().map(|(s, _, _)| s).collect::<Vec<_>>(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.workers {
            let source = connect(&self.spec.source, "source").await?;
            install_helpers(&source, &self.plan.helpers, "source").await?;
            let target = connect(&self.spec.target, "target").await?;
            let (queue, plan) = (queue.clone(), self.plan.clone());
            tasks.spawn(async move {
                let mut out = Vec::new();
                loop {
                    let Some(shard) = queue.lock().await.pop() else { return Ok::<_, WorkerError>(out) };
                    let Some(table) = plan.table(shard.table) else { continue };
                    let check = verify_range(&source, &target, table, &shard.range)
                        .instrument(tracing::info_span!("verify", shard = %shard.id, table = %table.describe()))
                        .await?;
                    out.push((shard.table, check));
                }
            });
        }
        let mut summary = VerifySummary::default();
        let mut diffs: Vec<(u32, KeyDiff)> = Vec::new();
        while let Some(j) = tasks.join_next().await {
            let checks =
                j.map_err(|e| CoordinatorError::State(format!("verify task panicked: {e}")))??;
            for (t, c) in checks {
                summary.ranges += 1;
                summary.source_rows += c.source_rows;
                summary.target_rows += c.target_rows;
                diffs.extend(c.diffs.into_iter().map(|d| (t, d)));
            }
        }
        for round in 0..10 {
            if diffs.is_empty() {
                break;
            }
            tracing::info!(
                round,
                differing = diffs.len(),
                "re-checking differing keys after catch-up"
            );
            self.catch_up(None).await?;
            let keys: Vec<(u32, Vec<String>)> =
                diffs.into_iter().map(|(t, d)| (t, d.key)).collect();
            diffs = self.recheck(&keys).await?;
        }
        summary.differing = diffs.into_iter().map(|(_, d)| d).collect();
        summary.seconds = t0.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// Compares just these keys (table index, key) on both sides.
    pub async fn recheck(
        &self,
        keys: &[(u32, Vec<String>)],
    ) -> Result<Vec<(u32, KeyDiff)>, CoordinatorError> {
        let mut by_table: BTreeMap<u32, Vec<Vec<String>>> = BTreeMap::new();
        for (t, k) in keys {
            by_table.entry(*t).or_default().push(k.clone());
        }
        let mut out = Vec::new();
        for (t, keys) in by_table {
            let Some(table) = self.plan.table(t) else {
                continue;
            };
            out.extend(
                recheck_keys(&self.source, &self.target, table, &keys)
                    .await?
                    .into_iter()
                    .map(|d| (t, d)),
            );
        }
        Ok(out)
    }

    /// Stops replay and capture; reports counts.
    pub async fn finish(mut self) -> Result<RunReport, CoordinatorError> {
        if let Some(pool) = self.replay.take() {
            pool.stop().await?;
        }
        self.capture_stop.send_replace(true);
        match (&mut self.capture_task).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(CoordinatorError::State(format!(
                    "capture task panicked: {e}"
                )))
            }
        }
        let counts = self
            .target
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {}), (SELECT coalesce(sum(applied), 0)::bigint FROM {})",
                    self.store.sql.table("changes"),
                    self.store.sql.table("replay")
                ),
                &[],
            )
            .await
            .map_err(|e| CoordinatorError::db("reading counts", &e))?;
        self.report.changes_captured = counts.get(0);
        self.report.changes_replayed = counts.get(1);
        let c = self.store.shard_counts(&self.target).await?;
        self.report.shards = c.done;
        self.report.rows_copied = c.rows_done;
        self.report.bytes_copied = c.bytes_done;
        self.report.phase = self.phase().await?.as_str().to_owned();
        self.report.total_seconds = self.started.elapsed().as_secs_f64();
        let json = serde_json::to_value(&self.report).unwrap_or_default();
        self.store.save_report(&self.target, &json).await?;
        Ok(self.report)
    }
}

/// `schemashift run`: plan or resume, then go as far as `until`.
pub async fn run(
    spec: &Spec,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, CoordinatorError> {
    let mut ctx = RunCtx::open(spec, opts.workers).await?;
    let phase = ctx.phase().await?;
    if phase == Phase::CutOver {
        tracing::info!("run already cut over");
        return ctx.finish().await;
    }
    if phase <= Phase::Backfill {
        ctx.backfill(&shutdown).await?;
    }
    if opts.until == Until::Backfill {
        return ctx.finish().await;
    }
    let (_, lag) = ctx.catch_up(None).await?;
    ctx.report.lag_seconds = lag.as_secs_f64();
    if opts.until == Until::Replay {
        return ctx.finish().await;
    }
    ctx.store.set_phase(&ctx.target, Phase::Verify).await?;
    let summary = ctx.verify().await?;
    let clean = summary.differing.is_empty();
    if clean {
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
    if opts.until == Until::Cutover {
        let cut = crate::cutover::cutover(&mut ctx).await?;
        ctx.report.cutover = Some(cut);
    }
    ctx.finish().await
}
