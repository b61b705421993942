//! Embedded mode: the coordinator and its workers in one process. Resumes from the
//! control state when there is one; phases: backfill → replay → verify (→ cutover).

use crate::capture::{ensure_slot, Capture, CaptureProgress};
use crate::control::{Phase, Store};
use crate::error::CoordinatorError;
pub use crate::phases::{drive, run};
use crate::plan::{plan, PlanOptions, TableAnalysis};
use crate::service::{ControlCoordinator, Stage};
use crate::supervise::Supervisor;
pub use crate::verify::VerifySummary;
use futures_util::future::BoxFuture;
use schemashift_changelog::{kafka, ChangeLog, LogHead};
use schemashift_common::change::Change;
use schemashift_common::ids::{Lsn, RunId};
use schemashift_common::pg::{connect, install_helpers};
use schemashift_common::plan::{LogPlan, RunPlan};
use schemashift_common::retry::{retry, Backoff};
use schemashift_common::service::{Registration, WorkerInfo};
use schemashift_common::spec::Changelog;
use schemashift_common::spec::Spec;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tracing::Instrument;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Until {
    Backfill,
    Replay,
    Verify,
    Cutover,
}

/// Runs one worker in this process against the service (embedded mode) until `stop`.
/// The binary supplies it, so the coordinator does not depend on the worker crate.
pub trait LocalWorker: Send + Sync + 'static {
    fn run(
        &self,
        svc: Arc<ControlCoordinator>,
        me: WorkerInfo,
        stop: watch::Receiver<bool>,
    ) -> BoxFuture<'static, Result<(), String>>;

    /// The fleet's limits this run's copies and index builds pass through (a fleet
    /// member's run); none for a run of its own.
    fn gate(&self) -> Option<schemashift_common::fleet::MemberGate> {
        None
    }
}

pub struct RunOptions {
    /// What runs the in-process workers.
    pub local: Arc<dyn LocalWorker>,
    pub workers: Option<usize>,
    pub until: Until,
    /// HOST:PORT for Prometheus metrics while the run goes.
    pub metrics_listen: Option<String>,
    /// Milestones for an application in this process (the demo's load): it measures its
    /// latency per phase and moves to the target at the switch.
    pub events: Option<tokio::sync::mpsc::UnboundedSender<RunEvent>>,
    /// A plan made moments ago with these workers (a fleet's preflight); used instead of
    /// planning again when the run is new.
    pub planned: Option<crate::plan::Planned>,
}

/// See [`RunOptions::events`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEvent {
    /// Every shard is copied and the target's indexes are rebuilt.
    BackfillDone,
    /// Inside the cutover freeze, right after `switch_command`: the application moves now.
    Switched,
}

impl RunOptions {
    /// All the way to the cutover, with the spec's worker count.
    pub fn new(local: Arc<dyn LocalWorker>) -> Self {
        RunOptions {
            local,
            workers: None,
            until: Until::Cutover,
            metrics_listen: None,
            events: None,
            planned: None,
        }
    }
}

/// Where the workers run.
#[derive(Clone)]
pub enum Workers {
    /// This many in this process (`run`, `verify`, `cutover`, `demo`).
    Embedded(Option<usize>, Arc<dyn LocalWorker>),
    /// In other processes, over gRPC (`coordinator`); leases expire after `lease_ttl`. A
    /// fleet member's gate takes its index builds and measuring copies (the shard copies
    /// take theirs lease by lease, in `lease_gate`).
    Remote {
        lease_ttl: Duration,
        gate: Option<schemashift_common::fleet::MemberGate>,
    },
}

/// Name prefix of in-process workers: they die with the process, so a restart frees
/// their leases at once instead of waiting for them to expire.
const EMBEDDED_PREFIX: &str = "embedded-";

struct LocalWorkers {
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<(), String>>,
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
    /// How long the last catch-up took: after the backfill, or with a cutover the one the
    /// freeze started from.
    pub lag_seconds: f64,
    pub verify: Option<VerifySummary>,
    pub cutover: Option<crate::cutover::CutoverReport>,
    pub total_seconds: f64,
    /// Why the throttle measured its baseline again, when it did (the source got slower
    /// for reasons not ours).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_baseline_retaken: Option<String>,
    /// Tables whose shards kept failing: stopped, the others went on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stopped: Vec<crate::stopped::StoppedTable>,
}

/// Everything a running migration holds; shared by run, verify and cutover.
pub struct RunCtx {
    pub(crate) spec: Spec,
    pub(crate) plan: Arc<RunPlan>,
    pub(crate) store: Store,
    pub(crate) run_id: RunId,
    pub(crate) source: Client,
    pub(crate) target: Client,
    pub(crate) capture: watch::Receiver<CaptureProgress>,
    pub(crate) capture_wake: Arc<tokio::sync::Notify>,
    /// Capture, throttle and metrics: the phase loops watch them, `finish` stops them.
    background: Supervisor,
    /// The service workers lease from; the gRPC adapter serves the same one.
    pub(crate) svc: Arc<ControlCoordinator>,
    local: Option<LocalWorkers>,
    pub(crate) workers: usize,
    pub(crate) report: RunReport,
    started: Instant,
    /// See [`RunOptions::events`].
    pub(crate) events: Option<tokio::sync::mpsc::UnboundedSender<RunEvent>>,
    /// See [`LocalWorker::gate`].
    pub(crate) gate: Option<schemashift_common::fleet::MemberGate>,
}

fn spawn_local(
    local: &Arc<dyn LocalWorker>,
    svc: &Arc<ControlCoordinator>,
    workers: usize,
    run_id: &RunId,
) -> LocalWorkers {
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let me = WorkerInfo {
            id: format!("{EMBEDDED_PREFIX}{w}"),
            host: "local".into(),
        };
        let span = tracing::info_span!("worker", worker = %me.id, run_id = %run_id);
        tasks.spawn(local.run(svc.clone(), me, stop_rx.clone()).instrument(span));
    }
    LocalWorkers { stop, tasks }
}

impl RunCtx {
    /// Opens or creates the run: plans (failing with every problem before any write),
    /// records the plan, creates publication and slot, and starts capture.
    /// `on_stopped`: whether tables that stopped alone are copied again now.
    pub async fn open(
        spec: &Spec,
        mode: Workers,
        on_stopped: crate::stopped::OnStopped,
    ) -> Result<RunCtx, CoordinatorError> {
        Self::open_with(spec, mode, on_stopped, None).await
    }

    /// [`RunCtx::open`] with a plan made just before with the same workers (a fleet's
    /// preflight), used when the run is new instead of planning again.
    pub async fn open_with(
        spec: &Spec,
        mode: Workers,
        on_stopped: crate::stopped::OnStopped,
        planned: Option<crate::plan::Planned>,
    ) -> Result<RunCtx, CoordinatorError> {
        let started = Instant::now();
        let workers = match &mode {
            Workers::Embedded(n, _) => n.or(spec.workers).unwrap_or(4).max(1),
            Workers::Remote { .. } => spec.workers.unwrap_or(4).max(1),
        };
        let source = connect(&spec.source, "source").await?;
        let mut target = connect(&spec.target, "target").await?;
        let store = Store::new(&spec.control_schema);
        let mut report = RunReport::default();
        let state = match store.load(&target).await? {
            Some(s) => {
                if s.phase == Phase::RolledBack {
                    return Err(CoordinatorError::State(
                        "this run was rolled back; run `schemashift cleanup` to start over".into(),
                    ));
                }
                // A different spec is refused, unless it fixes stopped tables only.
                let s = crate::stopped::reopen(
                    spec,
                    s,
                    &source,
                    &mut target,
                    &store,
                    workers,
                    on_stopped,
                )
                .await?;
                tracing::info!(run_id = %s.run_id, phase = s.phase.as_str(), "resuming run");
                report.resumed = true;
                s
            }
            None => {
                let planned = match planned.filter(|p| p.plan.partitions == workers as u32) {
                    Some(p) => {
                        // Planning installed the helpers in its own sessions; checks and
                        // `auto`'s measurement below run in these.
                        install_helpers(&source, &p.plan.helpers, "source").await?;
                        install_helpers(&target, &p.plan.helpers, "target").await?;
                        p
                    }
                    None => {
                        plan(
                            spec,
                            &source,
                            &target,
                            &PlanOptions {
                                workers,
                                resuming: false,
                            },
                        )
                        .await?
                    }
                };
                let run_id = RunId::generate();
                let mut planned = planned;
                planned.plan.changelog = match spec.changelog() {
                    Ok(Changelog::Kafka(k)) => LogPlan::Kafka {
                        conn: k.conn,
                        topic: format!("{}{}", k.topic_prefix, run_id.0),
                        replication_factor: k.replication_factor,
                    },
                    Ok(Changelog::Postgres) | Err(_) => LogPlan::Postgres,
                };
                store
                    .init(
                        &mut target,
                        &run_id,
                        &spec.fingerprint(),
                        &planned.plan,
                        &planned.shards,
                        true,
                    )
                    .await?;
                // `auto`: both strategies measured on the real servers, the faster kept. Its
                // copies count against a fleet's limits like the backfill's.
                // In a fleet, members on the same two servers measure once (the first) and
                // keep that choice.
                let gate = match &mode {
                    Workers::Embedded(_, local) => local.gate(),
                    Workers::Remote { gate, .. } => gate.clone(),
                };
                let mut known = match &gate {
                    Some(g) => Some(g.measured().await),
                    None => None,
                };
                let pass = match &gate {
                    Some(g) => Some(g.copy().await),
                    None => None,
                };
                crate::fdw::choose_auto(
                    spec,
                    &source,
                    &target,
                    &store,
                    &mut planned,
                    known.as_deref_mut(),
                )
                .await?;
                drop(pass);
                drop(known);
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
        if let LogPlan::Kafka {
            conn: brokers,
            topic,
            replication_factor,
        } = &plan.changelog
        {
            kafka::ensure_topic(brokers, topic, plan.partitions, *replication_factor).await?;
        }
        if state.phase <= Phase::Backfill {
            crate::fdw::ensure(&target, &spec.source, &plan).await?;
        }
        // recheck() evaluates mapped rows on this session, inside the freeze too.
        install_helpers(&source, &plan.helpers, "source").await?;
        ensure_slot(&source, &plan, &state.slot).await?;
        if state.phase == Phase::Planned {
            store.set_phase(&target, Phase::Backfill).await?;
        }
        let cap = Capture::open(
            connect(&spec.source, "source").await?,
            spec.source.clone(),
            connect(&spec.target, "target").await?,
            spec.target.clone(),
            plan.clone(),
            state.slot.clone(),
        )
        .await?;
        let (progress_tx, capture) = watch::channel(CaptureProgress {
            caught_up_to: Lsn(0),
            caught_up_at: Instant::now(),
            changes: 0,
        });
        let mut background = Supervisor::default();
        let capture_wake = Arc::new(tokio::sync::Notify::new());
        background.spawn(
            "capture",
            tracing::info_span!("capture", run_id = %state.run_id, slot = %state.slot),
            cap.run(
                progress_tx,
                background.stopping(),
                Duration::from_millis(100),
                capture_wake.clone(),
            ),
        );
        report.run_id = state.run_id.0.clone();
        crate::history::ensure(&target, &store.sql).await?;
        let released = store.release_leases_of(&target, EMBEDDED_PREFIX).await?;
        if released > 0 {
            tracing::info!(released, "released leases of a previous process");
        }
        let lease_ttl = match &mode {
            Workers::Embedded(..) => Duration::from_secs(30),
            Workers::Remote { lease_ttl, .. } => *lease_ttl,
        };
        let stage = if state.phase <= Phase::Backfill {
            Stage::Backfill
        } else {
            Stage::Replay
        };
        let throttle = Arc::new(crate::throttle::Throttle::new(spec.throttle.enabled));
        // A run paused before this process started stays paused from its first lease on.
        let sql = schemashift_common::control::ControlSql::new(&spec.control_schema);
        throttle.set_paused(crate::pause::read(&target, &sql).await?.is_some());
        if spec.throttle.enabled {
            background.spawn(
                "throttle",
                tracing::info_span!("throttle", run_id = %state.run_id),
                crate::throttle::watch_source(
                    spec.clone(),
                    plan.clone(),
                    connect(&spec.source, "source").await?,
                    connect(&spec.target, "target").await?,
                    throttle.clone(),
                    match &mode {
                        Workers::Embedded(_, local) => local.gate(),
                        Workers::Remote { gate, .. } => gate.clone(),
                    },
                    background.stopping(),
                ),
            );
        }
        // An operator's pause, read from the control schema by every coordinator.
        background.spawn(
            "pause",
            tracing::info_span!("pause", run_id = %state.run_id),
            crate::pause::watch(spec.clone(), throttle.clone(), background.stopping()),
        );
        let svc = Arc::new(ControlCoordinator::new(
            connect(&spec.target, "target").await?,
            Registration {
                run_id: state.run_id.0.clone(),
                source: spec.source.clone(),
                target: spec.target.clone(),
                plan: (*plan).clone(),
                lease_ttl,
                traceparent: None,
            },
            stage,
            throttle,
        ));
        let local = match &mode {
            Workers::Embedded(_, local) => Some(spawn_local(local, &svc, workers, &state.run_id)),
            Workers::Remote { .. } => None,
        };
        let gate = match &mode {
            Workers::Embedded(_, local) => local.gate(),
            Workers::Remote { gate, .. } => gate.clone(),
        };
        Ok(RunCtx {
            gate,
            spec: spec.clone(),
            plan,
            store,
            run_id: state.run_id,
            source,
            target,
            capture,
            capture_wake,
            background,
            svc,
            local,
            workers,
            report,
            started,
            events: None,
        })
    }

    /// Tells an in-process listener; one that went away does not matter to the run.
    pub(crate) fn event(&self, e: RunEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    /// Milestones go to this listener (the demo's application).
    pub fn set_events(&mut self, events: Option<tokio::sync::mpsc::UnboundedSender<RunEvent>>) {
        self.events = events;
    }

    /// The service workers lease from (the gRPC adapter serves it).
    pub fn service(&self) -> &Arc<ControlCoordinator> {
        &self.svc
    }

    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }

    fn log(&self) -> ChangeLog<'_> {
        ChangeLog::of(&self.plan.changelog, &self.store.sql)
    }

    /// Where each change-log partition ends now.
    pub(crate) async fn log_head(&self) -> Result<LogHead, CoordinatorError> {
        Ok(self.log().head(&self.target).await?)
    }

    /// The changes after `from` up to `to`, per partition.
    pub(crate) async fn log_between(
        &self,
        from: &LogHead,
        to: &LogHead,
    ) -> Result<Vec<Change>, CoordinatorError> {
        Ok(self.log().between(&self.target, from, to).await?)
    }

    pub async fn phase(&self) -> Result<Phase, CoordinatorError> {
        Ok(self
            .store
            .load(&self.target)
            .await?
            .map(|s| s.phase)
            .unwrap_or(Phase::Planned))
    }

    /// The error of an in-process worker that ended with one.
    pub(crate) async fn local_failure(&mut self) -> Option<CoordinatorError> {
        let local = self.local.as_mut()?;
        while let Some(j) = local.tasks.try_join_next() {
            match j {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Some(CoordinatorError::Worker(e)),
                Err(e) => {
                    return Some(CoordinatorError::State(format!(
                        "worker task panicked: {e}"
                    )))
                }
            }
        }
        None
    }

    /// The run's own sessions, opened again (helpers included) if they closed: a server
    /// restart or a killed backend costs a reconnect, not the run. The phase loops call it
    /// on every turn.
    pub(crate) async fn reopen_closed(&mut self) -> Result<(), CoordinatorError> {
        let spec = &self.spec;
        if self.source.is_closed() {
            self.source = retry("reopening the source session", Backoff::Database, || {
                connect(&spec.source, "source")
            })
            .await?;
            install_helpers(&self.source, &self.plan.helpers, "source").await?;
            tracing::info!("source session reopened");
        }
        if self.target.is_closed() {
            self.target = retry("reopening the target session", Backoff::Database, || {
                connect(&spec.target, "target")
            })
            .await?;
            tracing::info!("target session reopened");
        }
        Ok(())
    }

    /// Why a background task (capture, throttle, metrics) ended, if one did.
    pub(crate) fn background_failure(&mut self) -> Option<CoordinatorError> {
        self.background.failure()
    }

    /// Runs a task for the run's length, watched like capture; it ends when the watch
    /// it is given turns true (after the workers were told the run is over).
    pub fn supervise<F>(
        &mut self,
        name: &'static str,
        span: tracing::Span,
        task: impl FnOnce(watch::Receiver<bool>) -> F,
    ) where
        F: std::future::Future<Output = Result<(), CoordinatorError>> + Send + 'static,
    {
        let fut = task(self.background.stopping());
        self.background.spawn(name, span, fut);
    }

    /// Serves metrics for the run's length.
    pub fn serve_metrics(&mut self, listener: tokio::net::TcpListener) {
        let span = tracing::info_span!("metrics", run_id = %self.run_id);
        let spec = Arc::new(self.spec.clone());
        self.supervise("metrics", span, |stop| {
            crate::metrics::serve(listener, spec, stop)
        });
    }

    /// Stops replay and capture; reports counts.
    pub async fn finish(mut self) -> Result<RunReport, CoordinatorError> {
        self.svc.set_stage(Stage::Stop);
        if let Some(mut local) = self.local.take() {
            local.stop.send_replace(true);
            while let Some(j) = local.tasks.join_next().await {
                match j {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "worker ended with an error"),
                    Err(e) => tracing::warn!(error = %e, "worker task panicked"),
                }
            }
        } else {
            // Remote workers learn it at their next call; give them a few lease TTLs to hear.
            let until = Instant::now()
                + self.svc.lease_ttl() * crate::service::DONE_GRACE_TTLS
                + Duration::from_secs(1);
            while !self.svc.all_told_done() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        std::mem::take(&mut self.background).stop().await?;
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
        self.report.throttle_baseline_retaken = self
            .target
            .query_opt(
                &format!(
                    "SELECT rebaseline_reason FROM {} WHERE rebaselines > 0",
                    self.store.sql.table("throttle")
                ),
                &[],
            )
            .await
            .map_err(|e| CoordinatorError::db("reading the throttle state", &e))?
            .and_then(|r| r.get(0));
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
