//! Prometheus metrics on `prometheus-client`, served by hyper with `/metrics` only. The
//! values live in memory: a refresher reads the control state (the numbers `status` and
//! the report show) once per interval, whatever the number of scrapers, and a scrape only
//! encodes the registry.

use crate::error::CoordinatorError;
use crate::ops::{status, Status};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use schemashift_common::spec::Spec;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often the refresher reads the control state.
const REFRESH: Duration = Duration::from_secs(1);
/// How long a scraper may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

type Labels = Vec<(&'static str, &'static str)>;
type FloatGauge = Gauge<f64, AtomicU64>;

const PHASES: [&str; 8] = [
    "none",
    "planned",
    "backfill",
    "replay",
    "verify",
    "verified",
    "cut_over",
    "rolled_back",
];

/// The run's metrics, set from the control state.
pub struct Metrics {
    registry: Registry,
    /// Set once the first refresh succeeded: before it a scrape gets 503, not zeros.
    ready: std::sync::atomic::AtomicBool,
    /// Counter totals last seen, to add only what is new (counters only go up).
    seen: Mutex<Seen>,
    phase: Family<Labels, Gauge>,
    shards: Family<Labels, Gauge>,
    rows_copied: Counter,
    bytes_copied: Counter,
    changes_captured: Counter,
    changes_applied: Counter,
    replay_lag_changes: Gauge,
    replay_rate: FloatGauge,
    slot_lag_bytes: Gauge,
    slot_retained_bytes: Gauge,
    freeze_ms: FloatGauge,
    errors: Family<Labels, Counter>,
    replay_failing: Gauge,
    throttled: Gauge,
    paused: Gauge,
    throttled_seconds: Counter<f64, AtomicU64>,
    workers: Gauge,
}

#[derive(Default)]
struct Seen {
    rows: u64,
    bytes: u64,
    captured: u64,
    applied: u64,
    shard_errors: u64,
    throttled_seconds: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("schemashift");
        let m = Metrics::registered_in(&mut registry);
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The families registered in `registry` (a fleet member's sub-registry carries the
    /// `member` label); the returned value's own registry is empty.
    fn registered_in(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            ready: Default::default(),
            seen: Mutex::default(),
            phase: Family::default(),
            shards: Family::default(),
            rows_copied: Counter::default(),
            bytes_copied: Counter::default(),
            changes_captured: Counter::default(),
            changes_applied: Counter::default(),
            replay_lag_changes: Gauge::default(),
            replay_rate: FloatGauge::default(),
            slot_lag_bytes: Gauge::default(),
            slot_retained_bytes: Gauge::default(),
            freeze_ms: FloatGauge::default(),
            errors: Family::default(),
            replay_failing: Gauge::default(),
            throttled: Gauge::default(),
            paused: Gauge::default(),
            throttled_seconds: Counter::default(),
            workers: Gauge::default(),
        };
        let r = registry;
        r.register("phase", "1 for the run's current phase", m.phase.clone());
        r.register("shards", "Shards by state", m.shards.clone());
        r.register(
            "rows_copied",
            "Rows committed by the backfill",
            m.rows_copied.clone(),
        );
        r.register(
            "bytes_copied",
            "Bytes streamed by the backfill",
            m.bytes_copied.clone(),
        );
        r.register(
            "changes_captured",
            "Changes in the change log",
            m.changes_captured.clone(),
        );
        r.register(
            "changes_applied",
            "Changes applied by replay",
            m.changes_applied.clone(),
        );
        r.register(
            "replay_lag_changes",
            "Changes captured but not applied yet",
            m.replay_lag_changes.clone(),
        );
        r.register(
            "replay_rate_changes_per_second",
            "Changes applied per second by the workers replaying now",
            m.replay_rate.clone(),
        );
        r.register(
            "slot_lag_bytes",
            "Source WAL not yet confirmed by capture",
            m.slot_lag_bytes.clone(),
        );
        r.register(
            "slot_retained_wal_bytes",
            "Source WAL the slot keeps",
            m.slot_retained_bytes.clone(),
        );
        r.register(
            "freeze_ms",
            "Write freeze of the cutover, 0 before it",
            m.freeze_ms.clone(),
        );
        r.register(
            "errors",
            "Work given back after an error, by kind",
            m.errors.clone(),
        );
        r.register(
            "replay_failing",
            "Replay batch failures since the last success, summed over partitions",
            m.replay_failing.clone(),
        );
        r.register(
            "throttled",
            "1 while new shards are held back for the source's health",
            m.throttled.clone(),
        );
        r.register(
            "paused",
            "1 while an operator has the run paused (schemashift pause)",
            m.paused.clone(),
        );
        r.register(
            "throttled_seconds",
            "Time spent throttled",
            m.throttled_seconds.clone(),
        );
        r.register(
            "workers",
            "Workers heard from in the last 30 s",
            m.workers.clone(),
        );
        m
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Adds to a counter what a total grew by since last seen.
fn advance(counter: &Counter, seen: &mut u64, total: u64) {
    counter.inc_by(total.saturating_sub(*seen));
    *seen = (*seen).max(total);
}

impl Metrics {
    /// Sets every metric from a status.
    pub fn update(&self, st: &Status) {
        for p in PHASES {
            self.phase
                .get_or_create(&vec![("phase", p)])
                .set(i64::from(st.phase == p));
        }
        let s = &st.shards;
        for (state, n) in [
            ("pending", s.pending),
            ("leased", s.leased),
            ("done", s.done),
            ("stopped", s.stopped),
        ] {
            self.shards.get_or_create(&vec![("state", state)]).set(n);
        }
        let shard_errors: i64 = st
            .shard_list
            .iter()
            .map(|sh| i64::from(sh.attempts - 1).max(0))
            .sum();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            advance(&self.rows_copied, &mut seen.rows, to_u64(s.rows_done));
            advance(&self.bytes_copied, &mut seen.bytes, to_u64(s.bytes_done));
            advance(
                &self.changes_captured,
                &mut seen.captured,
                to_u64(st.changes_logged),
            );
            advance(
                &self.changes_applied,
                &mut seen.applied,
                to_u64(st.changes_applied),
            );
            let errors = self.errors.get_or_create(&vec![("kind", "shard")]);
            advance(&errors, &mut seen.shard_errors, to_u64(shard_errors));
            let grown = st.throttled_seconds - seen.throttled_seconds;
            if grown > 0.0 {
                self.throttled_seconds.inc_by(grown);
                seen.throttled_seconds = st.throttled_seconds;
            }
        }
        self.replay_lag_changes.set(st.replay_lag_changes);
        self.replay_rate.set(
            st.workers
                .iter()
                .filter(|w| w.state == "replay")
                .map(|w| w.rows_per_s)
                .sum(),
        );
        let (lag, retained) = st
            .slot
            .as_ref()
            .map_or((0, 0), |s| (s.unconfirmed_bytes, s.retained_wal_bytes));
        self.slot_lag_bytes.set(lag);
        self.slot_retained_bytes.set(retained);
        self.freeze_ms.set(
            st.report
                .as_ref()
                .and_then(|r| r["cutover"]["freeze_ms"].as_f64())
                .unwrap_or(0.0),
        );
        self.replay_failing.set(st.replay_failures);
        self.throttled.set(i64::from(st.throttled));
        self.paused.set(i64::from(st.paused.is_some()));
        let busy = st
            .workers
            .iter()
            .filter(|w| w.seconds_since_seen < 30.0)
            .count();
        self.workers.set(busy as i64);
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The exposition text (OpenMetrics); None before the first update.
    pub fn render(&self) -> Option<String> {
        if !self.ready.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).ok()?;
        Some(out)
    }
}

/// Renders the exposition text, or None before the first refresh.
pub trait Render: Send + Sync + 'static {
    fn render(&self) -> Option<String>;
}

impl Render for Metrics {
    fn render(&self) -> Option<String> {
        Metrics::render(self)
    }
}

/// The HTTP side: `GET /metrics` and nothing else.
pub fn router<R: Render>(metrics: Arc<R>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.render() {
                        Some(body) => (
                            StatusCode::OK,
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        None => {
                            (StatusCode::SERVICE_UNAVAILABLE, "not measured yet\n").into_response()
                        }
                    }
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served\n") })
}

/// Serves `router` on `listener` until `shutdown`; a connection that sends no request
/// head within [`READ_TIMEOUT`] is closed.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    loop {
        let (sock, _) = tokio::select! {
            a = listener.accept() => a.map_err(|e| CoordinatorError::Serve(format!("metrics: {e}")))?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

/// Refreshes the metrics from the control state every [`REFRESH`] and serves them, until
/// `shutdown`. A failed refresh keeps the last values (and says so in the log).
pub async fn serve(
    listener: TcpListener,
    spec: Arc<Spec>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let mut registry = Registry::with_prefix("schemashift");
    let metrics = Metrics::registered_in(&mut registry);
    let set = MetricSet {
        registry,
        members: vec![((*spec).clone(), metrics)],
    };
    serve_set(listener, set, shutdown).await
}

/// [`serve`] for a fleet: one endpoint, every metric labelled with its member.
pub async fn serve_fleet(
    listener: TcpListener,
    members: Vec<(String, Spec)>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let mut registry = Registry::with_prefix("schemashift");
    let mut list = Vec::new();
    for (name, spec) in members {
        let sub = registry.sub_registry_with_label(("member".into(), name.into()));
        list.push((spec, Metrics::registered_in(sub)));
    }
    let set = MetricSet {
        registry,
        members: list,
    };
    serve_set(listener, set, shutdown).await
}

/// One registry and the runs whose metrics are in it (one, or a fleet's members).
struct MetricSet {
    registry: Registry,
    members: Vec<(Spec, Metrics)>,
}

impl Render for MetricSet {
    fn render(&self) -> Option<String> {
        // Ready once every run was read (before that a scrape gets 503, not zeros).
        if !self
            .members
            .iter()
            .all(|(_, m)| m.ready.load(std::sync::atomic::Ordering::Acquire))
        {
            return None;
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).ok()?;
        Some(out)
    }
}

async fn serve_set(
    listener: TcpListener,
    set: MetricSet,
    shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let set = Arc::new(set);
    let refresher = {
        let (set, mut shutdown) = (set.clone(), shutdown.clone());
        async move {
            loop {
                for (spec, m) in &set.members {
                    match status(spec).await {
                        Ok(st) => m.update(&st),
                        Err(e) => tracing::warn!(error = %e, "metrics not refreshed"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
    };
    let (a, b) = tokio::join!(refresher, serve_http(listener, router(set), shutdown));
    a.and(b)
}

/// Binds the metrics address: an unusable one is bad input, said before the run starts.
pub async fn bind(addr: &str) -> Result<TcpListener, CoordinatorError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| CoordinatorError::Listen {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
    tracing::info!(addr, "metrics listening");
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.expect("read");
        buf
    }

    /// No database anywhere: a scrape reads only memory.
    #[tokio::test]
    async fn scrapes_read_memory_and_only_metrics_is_served() {
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, rx) = watch::channel(false);
        let server = tokio::spawn(serve_http(listener, router(metrics.clone()), rx));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 503"));
        let mut st = Status {
            phase: "replay".into(),
            changes_logged: 7,
            ..Status::default()
        };
        st.shards.done = 3;
        st.shards.rows_done = 1_000;
        metrics.update(&st);
        st.shards.rows_done = 1_500;
        metrics.update(&st);
        let body = get(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        for line in [
            "schemashift_phase{phase=\"replay\"} 1",
            "schemashift_phase{phase=\"backfill\"} 0",
            "schemashift_shards{state=\"done\"} 3",
            "schemashift_rows_copied_total 1500",
            "schemashift_changes_captured_total 7",
        ] {
            assert!(body.contains(line), "{line} in {body}");
        }
        for path in ["/", "/metricsx", "/metrics/x"] {
            let other = get(addr, path).await;
            assert!(other.starts_with("HTTP/1.1 404"), "{path}: {other}");
        }
        // A client that never sends its request does not hold a connection forever.
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(
            READ_TIMEOUT + Duration::from_secs(5),
            silent.read_to_end(&mut buf),
        )
        .await;
        assert!(closed.is_ok(), "a silent client is dropped");
        stop.send_replace(true);
        server.await.expect("join").expect("serve");
    }
}
