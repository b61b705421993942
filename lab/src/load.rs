//! A paced write load against the source `users` table, standing in for the application while
//! a migration runs (demo, tests): inserts, updates, deletes, with per-operation latency.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemashift_common::pg::Connector;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

/// `application_name` of the load's sessions, so tests and operators can find them.
pub const LOAD_APPLICATION_NAME: &str = "schemashift-load";

/// Operations per second one connection is asked to carry; more connections above it.
const OPS_PER_CONNECTION: u32 = 400;
const MAX_CONNECTIONS: u32 = 8;
/// Shortest pacing tick; faster rates run several operations per tick.
const MIN_TICK: Duration = Duration::from_millis(5);
/// Share (percent) of non-TOAST updates that write a new large bio.
const BIO_UPDATE_PCT: u32 = 10;
/// How far past a random id a TOAST update looks for a row with an out-of-line bio.
const TOAST_SEARCH_SPAN: i64 = 10_000;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Total operations per second over all connections.
    pub rate_per_sec: u32,
    /// Relative weights of the operation kinds (need not add up to 100).
    pub insert_pct: u8,
    pub update_pct: u8,
    pub delete_pct: u8,
    /// Reads of one row by key (the application's reads).
    pub read_pct: u8,
    /// Share of updates that touch only `updated_at`/`full_name` of rows whose bio is TOASTed,
    /// leaving bio untouched (pgoutput then sends it as "unchanged TOAST").
    pub toast_update_pct: u8,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            rate_per_sec: 300,
            insert_pct: 60,
            update_pct: 30,
            delete_pct: 10,
            read_pct: 0,
            toast_update_pct: 20,
        }
    }
}

#[path = "load_histogram.rs"]
mod histogram;
#[path = "load_session.rs"]
mod session;
pub use histogram::LatencyHistogram;
pub use session::{split_name, Schema};
use session::{Route, Session};

#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Updates (counted in `updates` too) that changed a row with an out-of-line bio.
    pub toast_updates: u64,
    pub failed: u64,
    pub reconnects: u64,
    /// Longest time one write took, waits for locks (e.g. a cutover freeze) included.
    pub max_write_wait: Duration,
    /// Writes (inserts, updates, deletes).
    pub latencies_us: LatencyHistogram,
    pub reads: u64,
    /// Per operation kind: insert, update, delete, read.
    pub insert_us: LatencyHistogram,
    pub update_us: LatencyHistogram,
    pub delete_us: LatencyHistogram,
    pub read_us: LatencyHistogram,
}

impl LoadStats {
    /// Successful operations.
    pub fn ops(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }

    pub fn p50(&self) -> Duration {
        Duration::from_micros(self.latencies_us.p50())
    }

    pub fn p95(&self) -> Duration {
        Duration::from_micros(self.latencies_us.p95())
    }

    pub fn p99(&self) -> Duration {
        Duration::from_micros(self.latencies_us.p99())
    }
}

/// A running load; stop it with [`LoadHandle::stop`] (dropping it stops it too, unawaited).
pub struct LoadHandle {
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl LoadHandle {
    /// Stops the load, waits for operations in flight, returns the final counts.
    pub async fn stop(mut self) -> LoadStats {
        let _ = self.stop_tx.send(true);
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "load task ended abnormally");
            }
        }
        self.stats()
    }

    /// A function returning the counts so far, for a task that outlives this borrow.
    pub fn stats_reader(&self) -> impl Fn() -> LoadStats + Send + 'static {
        let stats = Arc::clone(&self.shared.stats);
        move || lock(&stats).clone()
    }

    /// A handle that moves the load to another database (see [`LoadRouter::switch`]).
    pub fn router(&self) -> LoadRouter {
        LoadRouter(Arc::clone(&self.shared))
    }

    /// The counts so far.
    pub fn stats(&self) -> LoadStats {
        lock(&self.shared.stats).clone()
    }
}

/// Moves a running load, e.g. from a task waiting for the cutover's switch.
#[derive(Clone)]
pub struct LoadRouter(Arc<Shared>);

impl LoadRouter {
    /// Each connection finishes its operation in flight, then reconnects to `dsn` and
    /// speaks `schema` from its next operation on.
    pub fn switch(&self, dsn: &str, schema: Schema) -> anyhow::Result<()> {
        let connector = Connector::new(dsn)
            .map_err(anyhow::Error::msg)?
            .application_name(LOAD_APPLICATION_NAME);
        self.0.route.send_replace(Route { connector, schema });
        Ok(())
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
    }
}

fn lock(stats: &Mutex<LoadStats>) -> std::sync::MutexGuard<'_, LoadStats> {
    // A panic while holding the lock cannot leave the counters inconsistent enough to matter.
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the load; it runs until [`LoadHandle::stop`].
pub async fn start_load(dsn: String, opts: LoadOptions) -> anyhow::Result<LoadHandle> {
    start_load_with_shutdown(dsn, opts, None).await
}

/// Like [`start_load`], and also stops when `shutdown` turns true (or its sender is dropped).
pub async fn start_load_with_shutdown(
    dsn: String,
    opts: LoadOptions,
    shutdown: Option<watch::Receiver<bool>>,
) -> anyhow::Result<LoadHandle> {
    let connector = Connector::new(&dsn)
        .map_err(anyhow::Error::msg)?
        .application_name(LOAD_APPLICATION_NAME);
    let connections = if opts.rate_per_sec == 0 {
        0
    } else {
        opts.rate_per_sec
            .div_ceil(OPS_PER_CONNECTION)
            .min(MAX_CONNECTIONS)
    };
    let route = Route {
        connector,
        schema: Schema::Old,
    };
    let mut sessions = Vec::new();
    for _ in 0..connections {
        sessions.push(Session::open(&route).await?);
    }
    let max_id: i64 = match sessions.first() {
        Some(s) => s
            .client
            .query_one("SELECT coalesce(max(id), 0) FROM public.users", &[])
            .await?
            .get(0),
        None => 0,
    };
    let shared = Arc::new(Shared {
        route: watch::channel(route).0,
        opts: opts.clone(),
        max_id: AtomicI64::new(max_id),
        prefix: format!("{:08x}", rand::thread_rng().gen::<u32>()),
        stats: Arc::new(Mutex::new(LoadStats::default())),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let per_connection = f64::from(opts.rate_per_sec) / f64::from(connections.max(1));
    let mut tasks = Vec::new();
    for (worker, session) in sessions.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let stop = stop_rx.clone();
        let external = shutdown.clone();
        let span = tracing::info_span!("load", worker);
        tasks.push(tokio::spawn(
            async move {
                run_worker(worker, session, shared, per_connection, stop, external).await;
            }
            .instrument(span),
        ));
    }
    tracing::info!(rate = opts.rate_per_sec, connections, "write load started");
    Ok(LoadHandle {
        shared,
        stop_tx,
        tasks,
    })
}

struct Shared {
    route: watch::Sender<Route>,
    opts: LoadOptions,
    max_id: AtomicI64,
    /// Makes emails of this load unique against earlier runs on the same table.
    prefix: String,
    stats: Arc<Mutex<LoadStats>>,
}

#[derive(Debug, Clone, Copy)]
enum OpKind {
    Insert,
    UpdateName,
    UpdateBio,
    UpdateToasted,
    Delete,
    Read,
}

fn pick_op(rng: &mut StdRng, opts: &LoadOptions) -> Option<OpKind> {
    let (i, u, d, rd) = (
        u32::from(opts.insert_pct),
        u32::from(opts.update_pct),
        u32::from(opts.delete_pct),
        u32::from(opts.read_pct),
    );
    if i + u + d + rd == 0 {
        return None;
    }
    let r = rng.gen_range(0..i + u + d + rd);
    if r >= i + u + d {
        return Some(OpKind::Read);
    }
    Some(if r < i {
        OpKind::Insert
    } else if r < i + u {
        if rng.gen_range(0..100) < u32::from(opts.toast_update_pct) {
            OpKind::UpdateToasted
        } else if rng.gen_range(0..100) < BIO_UPDATE_PCT {
            OpKind::UpdateBio
        } else {
            OpKind::UpdateName
        }
    } else {
        OpKind::Delete
    })
}

/// Resolves once `rx` holds true or its sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn stop_requested(
    stop: &mut watch::Receiver<bool>,
    external: &mut Option<watch::Receiver<bool>>,
) {
    match external {
        Some(ext) => tokio::select! {
            _ = stopped(stop) => {}
            _ = stopped(ext) => {}
        },
        None => stopped(stop).await,
    }
}

async fn run_worker(
    worker: usize,
    mut session: Session,
    shared: Arc<Shared>,
    rate: f64,
    mut stop: watch::Receiver<bool>,
    mut external: Option<watch::Receiver<bool>>,
) {
    let mut rng = StdRng::from_entropy();
    let tick = Duration::from_secs_f64(1.0 / rate).max(MIN_TICK);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut credit = 0.0;
    let mut counter: u64 = 0;
    let mut route = shared.route.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stop_requested(&mut stop, &mut external) => break,
            _ = interval.tick() => {}
        }
        credit += rate * tick.as_secs_f64();
        while credit >= 1.0 {
            credit -= 1.0;
            let Some(kind) = pick_op(&mut rng, &shared.opts) else {
                continue;
            };
            if route.has_changed().unwrap_or(false) {
                let to = route.borrow_and_update().clone();
                match Session::open(&to).await {
                    Ok(s) => session = s,
                    // Retried like any lost connection, on the new route.
                    Err(e) => {
                        tracing::debug!(error = %e, "load switch: connect failed");
                        match reconnect(&shared, &mut stop, &mut external).await {
                            Some(s) => session = s,
                            None => return,
                        }
                    }
                }
            }
            counter += 1;
            let email = format!("load.{}.{worker}.{counter}@example.com", shared.prefix);
            let started = Instant::now();
            let result = session.execute(&shared, &mut rng, kind, &email).await;
            let elapsed = started.elapsed();
            let mut lost = false;
            if let Err(e) = record(&shared.stats, kind, elapsed, result) {
                tracing::debug!(error = %e, ?kind, "load operation failed");
                lost = connection_lost(&e);
            }
            if lost || session.client.is_closed() {
                match reconnect(&shared, &mut stop, &mut external).await {
                    Some(s) => session = s,
                    None => return,
                }
                // Operations missed while disconnected are not made up in a burst.
                credit = 0.0;
                interval.reset();
            }
        }
    }
}

fn record(
    stats: &Mutex<LoadStats>,
    kind: OpKind,
    elapsed: Duration,
    result: Result<u64, tokio_postgres::Error>,
) -> Result<(), tokio_postgres::Error> {
    let mut stats = lock(stats);
    let affected = match result {
        Ok(affected) => affected,
        Err(e) => {
            stats.failed += 1;
            return Err(e);
        }
    };
    let us = elapsed.as_micros() as u64;
    if !matches!(kind, OpKind::Read) {
        stats.latencies_us.record(us);
        stats.max_write_wait = stats.max_write_wait.max(elapsed);
    }
    match kind {
        OpKind::Insert => {
            stats.inserts += 1;
            stats.insert_us.record(us);
        }
        OpKind::Delete => {
            stats.deletes += 1;
            stats.delete_us.record(us);
        }
        OpKind::UpdateToasted => {
            stats.updates += 1;
            stats.toast_updates += affected;
            stats.update_us.record(us);
        }
        OpKind::UpdateName | OpKind::UpdateBio => {
            stats.updates += 1;
            stats.update_us.record(us);
        }
        OpKind::Read => {
            stats.reads += 1;
            stats.read_us.record(us);
        }
    }
    Ok(())
}

/// Whether an error means the session is gone; the client may notice a moment later.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.is_closed()
        || e.code().is_some_and(|c| {
            *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
        })
}

/// Reconnects with backoff until it works or the load is stopped (None).
async fn reconnect(
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    external: &mut Option<watch::Receiver<bool>>,
) -> Option<Session> {
    let mut delay = Duration::from_millis(50);
    loop {
        let route = shared.route.borrow().clone();
        match Session::open(&route).await {
            Ok(session) => {
                lock(&shared.stats).reconnects += 1;
                tracing::info!("load reconnected");
                return Some(session);
            }
            Err(e) => tracing::debug!(error = %e, "load reconnect failed"),
        }
        tokio::select! {
            _ = stop_requested(stop, external) => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
