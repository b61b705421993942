//! The coordinator service: hands out backfill shards, then change-log partitions, to
//! whichever workers ask, in-process (embedded mode) or over gRPC (distributed mode).
//! Lease state lives in the control schema, so the rules hold across restarts of the
//! coordinator: a lease is an epoch, and every commit of work is fenced by it.

use crate::control::Store;
use crate::throttle::Throttle;
use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::pg::describe;
use schemashift_common::pg::Session;
use schemashift_common::retry::{Class, Classify};
use schemashift_common::service::{
    Beat, CoordinatorService, LeaseRef, PartitionLease, Progress, RangeCheck, Registration,
    ServiceError, Work, WorkerInfo,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_postgres::Client;
use verify_round::VerifyRound;

mod verify_round;
mod workers;

use workers::Seen;

/// How many lease TTLs a silent worker is still waited for at the end, to be told the run
/// is over.
pub const DONE_GRACE_TTLS: u32 = 3;

/// What the coordinator hands out now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Backfill,
    Replay,
    /// Workers compare ranges (replay pauses; the coordinator catches up afterwards).
    Verify,
    /// The run is over for workers.
    Stop,
}

pub struct ControlCoordinator {
    target: Session,
    store: Store,
    registration: Registration,
    stage: watch::Sender<Stage>,
    workers: Mutex<HashMap<String, Seen>>,
    verify: Mutex<VerifyRound>,
    traceparent: Mutex<Option<String>>,
    throttle: Arc<Throttle>,
    /// Set during a cutover: replay is then never held back (see [`ReplayUnheld`]).
    cutting_over: AtomicBool,
    /// Set while the indexes deferred past the first catch-up are built: replay leases
    /// are given back and none is handed out (see [`ReplayStopped`]).
    replay_stopped: AtomicBool,
    /// Woken when a shard completes or fails, so the driver need not poll fast.
    pub changed: Notify,
}

/// While alive, the throttle does not hold replay back: a cutover's freeze must stay short,
/// and writes carried over after the switch must arrive promptly.
pub struct ReplayUnheld(Arc<ControlCoordinator>);

impl Drop for ReplayUnheld {
    fn drop(&mut self) {
        self.0.cutting_over.store(false, Ordering::Relaxed);
    }
}

/// While alive, workers replay nothing: their partitions come back at their next beat and
/// are not leased again, so an index build's table lock does not leave a replay batch
/// waiting on it past its lease.
pub struct ReplayStopped(Arc<ControlCoordinator>);

impl Drop for ReplayStopped {
    fn drop(&mut self) {
        self.0.replay_stopped.store(false, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

fn unavailable(e: tokio_postgres::Error) -> ServiceError {
    ServiceError::Unavailable(describe(&e))
}

impl ControlCoordinator {
    /// The control session, reopened if it closed; a database that stays away makes the
    /// service unavailable (workers retry), a refused login is said as it is.
    async fn session(&self) -> Result<Arc<Client>, ServiceError> {
        self.target.get().await.map_err(|e| match e.class() {
            Class::Transient => ServiceError::Unavailable(e.to_string()),
            Class::Permanent | Class::Fenced => ServiceError::Rejected(e.to_string()),
        })
    }
}

fn lease_text(lease: &LeaseRef) -> String {
    match lease {
        LeaseRef::Shard { shard, .. } => format!("shard {shard}"),
        LeaseRef::Partitions(p) => format!(
            "replay {}",
            p.iter()
                .map(|l| l.part.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

fn split(parts: &[PartitionLease]) -> (Vec<i32>, Vec<i64>) {
    parts.iter().map(|l| (l.part as i32, l.epoch.0)).unzip()
}

impl ControlCoordinator {
    pub fn new(
        target: Client,
        registration: Registration,
        stage: Stage,
        throttle: Arc<Throttle>,
    ) -> Self {
        let store = Store::new(&registration.plan.control_schema);
        ControlCoordinator {
            target: Session::new(target, registration.target.clone(), "target"),
            store,
            registration,
            stage: watch::Sender::new(stage),
            workers: Mutex::new(HashMap::new()),
            verify: Mutex::new(VerifyRound::default()),
            traceparent: Mutex::new(None),
            throttle,
            cutting_over: AtomicBool::new(false),
            replay_stopped: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// Until the guard drops, workers replay nothing.
    pub fn replay_stopped(self: &Arc<Self>) -> ReplayStopped {
        self.replay_stopped.store(true, Ordering::Relaxed);
        ReplayStopped(self.clone())
    }

    /// Until the guard drops, replay partitions are not held back by the throttle.
    pub fn replay_unheld(self: &Arc<Self>) -> ReplayUnheld {
        self.cutting_over.store(true, Ordering::Relaxed);
        ReplayUnheld(self.clone())
    }

    /// The run span workers should parent their spans on.
    pub fn set_traceparent(&self, tp: Option<String>) {
        if let Ok(mut t) = self.traceparent.lock() {
            *t = tp;
        }
    }

    pub fn set_stage(&self, stage: Stage) {
        self.stage.send_replace(stage);
    }

    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    pub fn lease_ttl(&self) -> Duration {
        self.registration.lease_ttl
    }

    fn ttl(&self) -> f64 {
        self.registration.lease_ttl.as_secs_f64()
    }

    async fn lease_shard(&self, worker: &WorkerInfo) -> Result<Option<Work>, ServiceError> {
        let Some(r) = self
            .session()
            .await?
            .query_opt(&self.store.sql.lease_shard(), &[&worker.id, &self.ttl()])
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        Ok(Some(Work::Backfill {
            shard: crate::control::shard_from_row(&r),
            epoch: LeaseEpoch(r.get(5)),
        }))
    }

    /// A fair share of the partitions: ceil(partitions / live workers).
    async fn lease_partitions(
        &self,
        worker: &WorkerInfo,
    ) -> Result<Vec<PartitionLease>, ServiceError> {
        let parts = self.registration.plan.partitions as usize;
        let share = parts.div_ceil(self.live_workers()) as i64;
        let rows = self
            .session()
            .await?
            .query(
                &self.store.sql.lease_partitions(),
                &[&worker.id, &self.ttl(), &share],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| PartitionLease {
                part: r.get::<_, i32>(0) as u32,
                epoch: LeaseEpoch(r.get(1)),
            })
            .collect())
    }
}

impl CoordinatorService for ControlCoordinator {
    async fn register(&self, worker: &WorkerInfo) -> Result<Registration, ServiceError> {
        tracing::info!(worker = %worker.id, host = %worker.host, "worker registered");
        self.seen(worker, false);
        self.touch(worker, None, Progress::default(), "registered")
            .await;
        let mut reg = self.registration.clone();
        reg.traceparent = self.traceparent.lock().ok().and_then(|t| t.clone());
        Ok(reg)
    }

    async fn lease(&self, worker: &WorkerInfo, progress: Progress) -> Result<Work, ServiceError> {
        let work = match self.stage() {
            // The source is under stress: no new shard until it recovers.
            Stage::Backfill if self.throttle.throttled() => Work::Wait(Duration::from_millis(250)),
            // As many copies run as the host has room for.
            Stage::Backfill if !self.throttle.may_start(self.lease_ttl()) => {
                Work::Wait(Duration::from_millis(250))
            }
            Stage::Backfill => match self.lease_shard(worker).await? {
                Some(work) => {
                    if let Work::Backfill { shard, epoch } = &work {
                        self.throttle.copying(shard.id, *epoch, self.lease_ttl());
                    }
                    work
                }
                // Others hold the remaining shards (one may expire and come back), or the
                // backfill is over and replay starts soon.
                None => Work::Wait(Duration::from_millis(200)),
            },
            Stage::Replay if self.replay_stopped.load(Ordering::Relaxed) => {
                Work::Wait(Duration::from_millis(200))
            }
            Stage::Replay => {
                let partitions = self.lease_partitions(worker).await?;
                if partitions.is_empty() {
                    Work::Wait(Duration::from_millis(500))
                } else if self.replay_stopped.load(Ordering::Relaxed) {
                    // Stopped while these were leased: whoever stopped replay may have
                    // counted the held leases before this one, so give them back.
                    let (p, e) = split(&partitions);
                    self.session()
                        .await?
                        .execute(
                            &self.store.sql.release_partitions(),
                            &[&p, &e, &None::<String>],
                        )
                        .await
                        .map_err(unavailable)?;
                    Work::Wait(Duration::from_millis(200))
                } else {
                    Work::Replay { partitions }
                }
            }
            // Paused by an operator: no verify range either.
            Stage::Verify if self.throttle.paused() => Work::Wait(Duration::from_millis(250)),
            Stage::Verify => self
                .lease_verify()
                .unwrap_or(Work::Wait(Duration::from_millis(200))),
            Stage::Stop => Work::Done,
        };
        let (lease, state) = match &work {
            Work::Backfill { shard, epoch } => (
                Some(lease_text(&LeaseRef::Shard {
                    shard: shard.id,
                    epoch: *epoch,
                })),
                "backfill",
            ),
            Work::Replay { partitions } => (
                Some(lease_text(&LeaseRef::Partitions(partitions.clone()))),
                "replay",
            ),
            Work::Verify { shard, .. } => (Some(format!("verify {}", shard.id)), "verify"),
            Work::Wait(_) => (None, "idle"),
            Work::Done => (None, "done"),
        };
        self.seen(worker, matches!(work, Work::Done));
        self.touch(worker, lease, progress, state).await;
        Ok(work)
    }

    async fn heartbeat(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        progress: Progress,
    ) -> Result<Beat, ServiceError> {
        self.seen(worker, false);
        let held = match lease {
            LeaseRef::Shard { shard, epoch } => {
                self.session()
                    .await?
                    .execute(
                        &self.store.sql.extend_lease(),
                        &[&shard.0, &epoch.0, &self.ttl()],
                    )
                    .await
                    .map_err(unavailable)?
                    == 1
            }
            LeaseRef::Partitions(parts) => {
                let (p, e) = split(parts);
                let n = self
                    .session()
                    .await?
                    .query(&self.store.sql.extend_partitions(), &[&p, &e, &self.ttl()])
                    .await
                    .map_err(unavailable)?
                    .len();
                n == parts.len()
            }
        };
        if let (false, LeaseRef::Shard { shard, epoch }) = (held, lease) {
            self.throttle.finished(*shard, *epoch);
        }
        let state = if matches!(lease, LeaseRef::Shard { .. }) {
            "backfill"
        } else {
            "replay"
        };
        self.touch(worker, Some(lease_text(lease)), progress, state)
            .await;
        Ok(match (held, self.stage()) {
            (false, _) => Beat::Lost,
            (true, Stage::Stop) => Beat::Stop,
            // Replay pauses while workers verify.
            (true, Stage::Verify) if matches!(lease, LeaseRef::Partitions(_)) => Beat::Stop,
            (true, Stage::Backfill | Stage::Replay)
                if matches!(lease, LeaseRef::Partitions(_))
                    && self.replay_stopped.load(Ordering::Relaxed) =>
            {
                Beat::Stop
            }
            (true, Stage::Backfill)
                if matches!(lease, LeaseRef::Shard { .. }) && self.throttle.throttled() =>
            {
                Beat::Hold
            }
            // Over the host's CPU allowance: the copies with the highest shard ids wait.
            (true, Stage::Backfill)
                if matches!(lease, LeaseRef::Shard { shard, epoch }
                    if !self.throttle.copying(*shard, *epoch, self.lease_ttl())) =>
            {
                Beat::Hold
            }
            // Replay applies to the target, but its catch-up reads the source's WAL and, on
            // a shared host, competes with it: it waits too, except during a cutover.
            (true, Stage::Backfill | Stage::Replay)
                if matches!(lease, LeaseRef::Partitions(_))
                    && self.throttle.throttled()
                    && !self.cutting_over.load(Ordering::Relaxed) =>
            {
                Beat::Hold
            }
            (true, Stage::Backfill | Stage::Replay | Stage::Verify) => Beat::Keep,
        })
    }

    async fn completed(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        rows: u64,
        _bytes: u64,
    ) -> Result<(), ServiceError> {
        // The rows committed with the done mark, fenced by the epoch; a report from a
        // lease that was taken over since is refused and changes nothing here.
        let done = self
            .session()
            .await?
            .query_opt(&self.store.sql.shard_done_at(), &[&shard.0, &epoch.0])
            .await
            .map_err(unavailable)?
            .is_some();
        if !done {
            return Err(ServiceError::Rejected(format!(
                "shard {shard}: completion under lease epoch {epoch} refused: the shard is not \
                 done under that lease (it was leased again since)"
            )));
        }
        tracing::debug!(worker = %worker.id, %shard, rows, "shard reported done");
        self.throttle.finished(shard, epoch);
        self.changed.notify_one();
        Ok(())
    }

    async fn verified(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        result: Result<RangeCheck, String>,
    ) -> Result<(), ServiceError> {
        self.seen(worker, false);
        {
            let mut v = self
                .verify
                .lock()
                .map_err(|_| ServiceError::Unavailable("verify state poisoned".into()))?;
            match v.leased.get(&shard) {
                Some((_, e, _)) if *e == epoch => {}
                // A late answer for a range handed to someone else since: theirs counts.
                _ => {
                    return Err(ServiceError::Rejected(format!(
                        "verify lease of shard {shard} lost"
                    )))
                }
            }
            let Some((s, _, _)) = v.leased.remove(&shard) else {
                return Ok(());
            };
            match result {
                Ok(check) => v.results.push((s.table, check)),
                Err(why) => {
                    tracing::warn!(worker = %worker.id, %shard, reason = %why, "verify of a range failed");
                    let f = v.failures.entry(shard).or_insert((0, String::new()));
                    f.0 += 1;
                    f.1 = why;
                    v.pending.push_back(s);
                }
            }
        }
        self.changed.notify_one();
        Ok(())
    }

    async fn failed(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        reason: String,
    ) -> Result<(), ServiceError> {
        tracing::info!(worker = %worker.id, lease = %lease_text(lease), "work returned after failure");
        match lease {
            LeaseRef::Shard { shard, epoch } => {
                self.throttle.finished(*shard, *epoch);
                self.session()
                    .await?
                    .execute(&self.store.sql.fail_shard(), &[&shard.0, &epoch.0, &reason])
                    .await
                    .map_err(unavailable)?;
            }
            LeaseRef::Partitions(parts) => {
                let (p, e) = split(parts);
                let reason = (!reason.is_empty()).then_some(reason);
                self.session()
                    .await?
                    .execute(&self.store.sql.release_partitions(), &[&p, &e, &reason])
                    .await
                    .map_err(unavailable)?;
            }
        }
        self.changed.notify_one();
        Ok(())
    }
}
