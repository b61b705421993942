//! The fleet's gate: every member's copies and index builds wait here for their turn, and
//! the [`Board`] (pure) decides whose turn it is when a slot frees: the fleet's one worker
//! pool, `limits.per_host` per server, the busiest servers and the biggest members first.

use crate::fleet::server_of;
use crate::schedule::{Board, Kind, Limits, Slot};
use crate::spec::Spec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, Mutex as AsyncMutex, OwnedMutexGuard};

pub struct HostGate {
    state: Mutex<State>,
    /// `strategy: auto`'s measurements per (source server, target server): table → (copy,
    /// fdw) rows/s. Members on the same two servers have the same tables, so the first one
    /// measures and the others keep its choice instead of copying the sample twice again.
    measured: Mutex<HashMap<ServerPair, Arc<AsyncMutex<Measured>>>>,
    /// The throttle probe's baseline per source server, taken by the first member on it
    /// before any copy of the fleet runs there. Each member measuring its own would take
    /// it while the others already copy, and members would hold on each other's load.
    baselines: Mutex<HashMap<String, Arc<AsyncMutex<Option<Duration>>>>>,
}

/// (source server, target server), `host:port` each.
type ServerPair = (String, String);

/// Rows/s measured by copy and by fdw, per source table.
pub type Measured = HashMap<String, (f64, f64)>;

struct State {
    board: Board,
    /// In the order they asked.
    waiting: Vec<Waiter>,
}

struct Waiter {
    slot: Slot,
    kind: Kind,
    tx: oneshot::Sender<GatePass>,
}

/// Held while a copy or an index build runs; dropping it lets the next one in.
pub struct GatePass {
    gate: Arc<HostGate>,
    slot: Slot,
    kind: Kind,
    done: u64,
}

impl GatePass {
    /// Counts `rows` copied under this pass off the member's work left (when it drops).
    pub fn worked(&mut self, rows: u64) {
        self.done += rows;
    }
}

impl Drop for GatePass {
    fn drop(&mut self) {
        let undelivered = {
            let mut state = self.gate.lock();
            state.board.finish(self.slot, self.kind, self.done);
            self.gate.dispatch(&mut state)
        };
        // Dropped outside the lock: each gives its slots back and lets the next one in.
        drop(undelivered);
    }
}

impl HostGate {
    pub fn new(per_host: Option<usize>, pool: usize) -> Arc<HostGate> {
        Arc::new(HostGate {
            state: Mutex::new(State {
                board: Board::new(Limits { pool, per_host }),
                waiting: Vec::new(),
            }),
            measured: Mutex::new(HashMap::new()),
            baselines: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the board's counts are still sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A member of the fleet with `rows` (estimated) to copy.
    pub fn member(self: &Arc<Self>, spec: &Spec, rows: u64) -> MemberGate {
        let servers = (server_of(&spec.source), server_of(&spec.target));
        let slot = self.lock().board.add_member(&servers.0, &servers.1, rows);
        MemberGate {
            gate: self.clone(),
            slot,
            servers,
            share: usize::MAX,
            joined: Arc::new(AtomicUsize::new(0)),
            spare: false,
        }
    }

    /// Starts whatever waiting work the board picks until nothing more fits. Returns the
    /// passes whose waiters gave up meanwhile, for the caller to drop after the lock.
    fn dispatch(self: &Arc<Self>, state: &mut State) -> Vec<GatePass> {
        let mut undelivered = Vec::new();
        loop {
            state.waiting.retain(|w| !w.tx.is_closed());
            let asks: Vec<(Slot, Kind)> = state.waiting.iter().map(|w| (w.slot, w.kind)).collect();
            let Some(i) = state.board.pick(&asks) else {
                return undelivered;
            };
            let w = state.waiting.remove(i);
            state.board.start(w.slot, w.kind);
            let pass = GatePass {
                gate: self.clone(),
                slot: w.slot,
                kind: w.kind,
                done: 0,
            };
            if let Err(pass) = w.tx.send(pass) {
                undelivered.push(pass);
            }
        }
    }

    async fn enter(self: &Arc<Self>, slot: Slot, kind: Kind) -> GatePass {
        loop {
            let (tx, rx) = oneshot::channel();
            let undelivered = {
                let mut state = self.lock();
                state.waiting.push(Waiter { slot, kind, tx });
                self.dispatch(&mut state)
            };
            drop(undelivered);
            // `dispatch` drops a sender unsent only once its receiver is gone, so this waits
            // until the pass comes; asking again is only a guard.
            if let Ok(pass) = rx.await {
                return pass;
            }
        }
    }
}

/// One member's way through the gate.
#[derive(Clone)]
pub struct MemberGate {
    gate: Arc<HostGate>,
    slot: Slot,
    servers: ServerPair,
    /// How many of the member's workers ask for copies first (its share of the pool).
    share: usize,
    /// Workers of the member that took their gate so far.
    joined: Arc<AtomicUsize>,
    /// This worker is beyond the member's share: its copies take only what is left.
    spare: bool,
}

impl MemberGate {
    /// The member's first `n` workers ask for copies first; the others are spares
    /// ([`crate::schedule::member_workers`] gives `n`). Without it every worker asks first.
    pub fn with_share(mut self, n: usize) -> Self {
        self.share = n.max(1);
        self
    }

    /// The gate for one more worker of this member (each worker takes its own once): a first
    /// worker while the member's share lasts, then spares. A spare's database sessions open
    /// only if it ever gets a slot, so a fleet holds the sessions its pool uses.
    pub fn for_worker(&self) -> MemberGate {
        let rank = self.joined.fetch_add(1, Ordering::Relaxed);
        MemberGate {
            spare: rank >= self.share,
            ..self.clone()
        }
    }

    /// A shard copy: a slot of the fleet's pool, and one on each server it reads or writes.
    pub async fn copy(&self) -> GatePass {
        let kind = if self.spare { Kind::Spare } else { Kind::Copy };
        self.gate.enter(self.slot, kind).await
    }

    /// What members on this member's two servers measured so far; held while this member
    /// measures, so the next one waits and reads its result.
    pub async fn measured(&self) -> OwnedMutexGuard<Measured> {
        let cell = {
            // A poisoned map only means a panic elsewhere; its entries are still sound.
            let mut map = self.gate.measured.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(self.servers.clone()).or_default().clone()
        };
        cell.lock_owned().await
    }

    /// The throttle baseline of this member's source server; held while the first member
    /// there measures it (its copies and everyone's wait for its probe's first verdict).
    pub async fn probe_baseline(&self) -> OwnedMutexGuard<Option<Duration>> {
        let cell = {
            // A poisoned map only means a panic elsewhere; its entries are still sound.
            let mut map = self
                .gate
                .baselines
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.entry(self.servers.0.clone()).or_default().clone()
        };
        cell.lock_owned().await
    }

    /// The member's run ended: whatever its estimate said is left, nothing is.
    pub fn finished(&self) {
        self.gate.lock().board.worked(self.slot, u64::MAX);
    }

    /// An index build on the target.
    pub async fn build(&self) -> GatePass {
        self.gate.enter(self.slot, Kind::Build).await
    }
}
