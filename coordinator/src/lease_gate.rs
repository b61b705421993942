//! A distributed fleet's gate, on the coordinator's side: a member's shard lease is handed
//! out only with a pass of the fleet's gate (the pool, a slot on each of its two servers),
//! held until the shard completes, is given back, is lost, or its lease runs out. Embedded
//! fleets take the same pass in the worker loop; remote workers cannot share one gate, so
//! the coordinator takes it for them.

use schemashift_common::fleet::{GatePass, MemberGate};
use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::service::{
    Beat, CoordinatorService, LeaseRef, Progress, RangeCheck, Registration, ServiceError, Work,
    WorkerInfo,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a lease call waits for a pass before telling the worker to ask again: well
/// under the client's call timeout, and the board picks by priority, not by who asked
/// first, so asking again loses nothing.
const ASK: Duration = Duration::from_secs(2);
/// What a worker told to wait waits before asking again.
const AGAIN: Duration = Duration::from_millis(50);

pub struct GatedLeases<S> {
    inner: Arc<S>,
    gate: MemberGate,
    /// A pass is held this long past the last sign of its worker (the lease's own TTL).
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    /// False once the member handed out replay, verify or done: from then on its work
    /// takes no copy slot (its replay must keep up whatever the fleet is copying).
    copying: bool,
    held: HashMap<ShardId, Held>,
}

struct Held {
    pass: GatePass,
    seen: Instant,
}

impl<S: CoordinatorService> GatedLeases<S> {
    pub fn new(inner: Arc<S>, gate: MemberGate, ttl: Duration) -> Self {
        GatedLeases {
            inner,
            gate,
            ttl,
            state: Mutex::new(State {
                copying: true,
                held: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the map is still sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes whose worker went silent (killed, cut off): their leases expired, so their
    /// slots go back. Returned to be dropped outside the lock (a drop enters the gate).
    fn expired(&self) -> Vec<Held> {
        let now = Instant::now();
        let mut state = self.lock();
        let gone: Vec<ShardId> = state
            .held
            .iter()
            .filter(|(_, h)| now.duration_since(h.seen) > self.ttl)
            .map(|(s, _)| *s)
            .collect();
        gone.iter().filter_map(|s| state.held.remove(s)).collect()
    }

    fn release(&self, shard: ShardId, rows: u64) {
        let held = self.lock().held.remove(&shard);
        if let Some(mut h) = held {
            h.pass.worked(rows);
        }
    }

    /// Passes held now (for tests and status).
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }
}

impl<S: CoordinatorService> CoordinatorService for GatedLeases<S> {
    async fn register(&self, worker: &WorkerInfo) -> Result<Registration, ServiceError> {
        self.inner.register(worker).await
    }

    async fn lease(&self, worker: &WorkerInfo, progress: Progress) -> Result<Work, ServiceError> {
        drop(self.expired());
        let copying = self.lock().copying;
        let pass = if copying {
            match tokio::time::timeout(ASK, self.gate.copy()).await {
                Ok(p) => Some(p),
                Err(_) => return Ok(Work::Wait(AGAIN)),
            }
        } else {
            None
        };
        let work = self.inner.lease(worker, progress).await?;
        let replaced = {
            let mut state = self.lock();
            match (&work, pass) {
                (Work::Backfill { shard, .. }, Some(pass)) => state.held.insert(
                    shard.id,
                    Held {
                        pass,
                        seen: Instant::now(),
                    },
                ),
                (Work::Backfill { .. } | Work::Wait(_), _) => None,
                (Work::Replay { .. } | Work::Verify { .. } | Work::Done, _) => {
                    state.copying = false;
                    None
                }
            }
        };
        // A shard leased again after its lease expired: the old pass is done with.
        drop(replaced);
        Ok(work)
    }

    async fn heartbeat(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        progress: Progress,
    ) -> Result<Beat, ServiceError> {
        let beat = self.inner.heartbeat(worker, lease, progress).await?;
        if let LeaseRef::Shard { shard, .. } = lease {
            match beat {
                Beat::Keep | Beat::Hold | Beat::Stop => {
                    if let Some(h) = self.lock().held.get_mut(shard) {
                        h.seen = Instant::now();
                    }
                }
                Beat::Lost => self.release(*shard, 0),
            }
        }
        Ok(beat)
    }

    async fn completed(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        rows: u64,
        bytes: u64,
    ) -> Result<(), ServiceError> {
        let done = self
            .inner
            .completed(worker, shard, epoch, rows, bytes)
            .await;
        self.release(shard, rows);
        done
    }

    async fn verified(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        result: Result<RangeCheck, String>,
    ) -> Result<(), ServiceError> {
        self.inner.verified(worker, shard, epoch, result).await
    }

    async fn failed(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        reason: String,
    ) -> Result<(), ServiceError> {
        let given = self.inner.failed(worker, lease, reason).await;
        if let LeaseRef::Shard { shard, .. } = lease {
            self.release(*shard, 0);
        }
        given
    }
}
