//! Prometheus text metrics, rendered on each scrape from the control state (so they are
//! the same numbers `status` and the report show), served on a plain HTTP port.

use crate::error::CoordinatorError;
use crate::ops::{status, Status};
use schemashift_common::spec::Spec;
use std::fmt::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// The exposition text of a status.
pub fn render(st: &Status) -> String {
    let mut o = String::new();
    let phases = [
        "none",
        "planned",
        "backfill",
        "replay",
        "verify",
        "verified",
        "cut_over",
        "rolled_back",
    ];
    let phase_labels: Vec<String> = phases.iter().map(|p| format!("phase=\"{p}\"")).collect();
    let phase_samples: Vec<(&str, f64)> = phases
        .iter()
        .zip(&phase_labels)
        .map(|(p, l)| (l.as_str(), f64::from(u8::from(st.phase == *p))))
        .collect();
    metric(
        &mut o,
        "schemashift_phase",
        "gauge",
        "1 for the run's current phase.",
        &phase_samples,
    );
    let s = &st.shards;
    metric(
        &mut o,
        "schemashift_shards",
        "gauge",
        "Shards by state.",
        &[
            ("state=\"pending\"", s.pending as f64),
            ("state=\"leased\"", s.leased as f64),
            ("state=\"done\"", s.done as f64),
        ],
    );
    metric(
        &mut o,
        "schemashift_rows_copied_total",
        "counter",
        "Rows committed by the backfill.",
        &[("", s.rows_done as f64)],
    );
    metric(
        &mut o,
        "schemashift_bytes_copied_total",
        "counter",
        "Bytes streamed by the backfill.",
        &[("", s.bytes_done as f64)],
    );
    metric(
        &mut o,
        "schemashift_changes_captured_total",
        "counter",
        "Changes in the change log.",
        &[("", st.changes_logged as f64)],
    );
    metric(
        &mut o,
        "schemashift_changes_applied_total",
        "counter",
        "Changes applied by replay.",
        &[("", st.changes_applied as f64)],
    );
    metric(
        &mut o,
        "schemashift_replay_lag_changes",
        "gauge",
        "Changes captured but not applied yet.",
        &[("", st.replay_lag_changes as f64)],
    );
    let replay_rate: f64 = st
        .workers
        .iter()
        .filter(|w| w.state == "replay")
        .map(|w| w.rows_per_s)
        .sum();
    metric(
        &mut o,
        "schemashift_replay_rate_changes_per_second",
        "gauge",
        "Changes applied per second by the workers replaying now.",
        &[("", replay_rate)],
    );
    let (lag_bytes, retained) = st.slot.as_ref().map_or((0.0, 0.0), |s| {
        (s.unconfirmed_bytes as f64, s.retained_wal_bytes as f64)
    });
    metric(
        &mut o,
        "schemashift_slot_lag_bytes",
        "gauge",
        "Source WAL not yet confirmed by capture.",
        &[("", lag_bytes)],
    );
    metric(
        &mut o,
        "schemashift_slot_retained_wal_bytes",
        "gauge",
        "Source WAL the slot keeps.",
        &[("", retained)],
    );
    let freeze_ms = st
        .report
        .as_ref()
        .and_then(|r| r["cutover"]["freeze_ms"].as_f64())
        .unwrap_or(0.0);
    metric(
        &mut o,
        "schemashift_freeze_ms",
        "gauge",
        "Write freeze of the cutover, 0 before it.",
        &[("", freeze_ms)],
    );
    let shard_errors: i64 = st
        .shard_list
        .iter()
        .map(|sh| i64::from(sh.attempts - 1).max(0))
        .sum();
    metric(
        &mut o,
        "schemashift_errors_total",
        "counter",
        "Work given back after an error, by kind.",
        &[("kind=\"shard\"", shard_errors as f64)],
    );
    metric(
        &mut o,
        "schemashift_replay_failing",
        "gauge",
        "Replay batch failures since the last success, summed over partitions.",
        &[("", st.replay_failures as f64)],
    );
    metric(
        &mut o,
        "schemashift_throttled",
        "gauge",
        "1 while new shards are held back for the source's health.",
        &[("", f64::from(u8::from(st.throttled)))],
    );
    metric(
        &mut o,
        "schemashift_throttled_seconds_total",
        "counter",
        "Time spent throttled.",
        &[("", st.throttled_seconds)],
    );
    let busy = st
        .workers
        .iter()
        .filter(|w| w.seconds_since_seen < 30.0)
        .count();
    metric(
        &mut o,
        "schemashift_workers",
        "gauge",
        "Workers heard from in the last 30 s.",
        &[("", busy as f64)],
    );
    o
}

/// How long a scraper may take to send its request line.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the request is `GET /metrics` (a query string allowed).
fn is_metrics_request(req: &[u8]) -> bool {
    let line = req
        .split(|b| *b == b'\r' || *b == b'\n')
        .next()
        .unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return false;
    };
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    method == b"GET" && path == b"/metrics"
}

/// Serves `GET /metrics` until `shutdown`; any other request gets 404.
pub async fn serve(
    listener: TcpListener,
    spec: Arc<Spec>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    loop {
        let (mut sock, _) = tokio::select! {
            a = listener.accept() => a.map_err(|e| CoordinatorError::Serve(format!("metrics: {e}")))?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let spec = spec.clone();
        tokio::spawn(async move {
            // One request line is all we need; a client that sends none in time is dropped.
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(READ_TIMEOUT, sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let (code, body) = if !is_metrics_request(&buf[..n]) {
                ("404 Not Found", "only GET /metrics is served\n".to_owned())
            } else {
                match status(&spec).await {
                    Ok(st) => ("200 OK", render(&st)),
                    Err(e) => (
                        "503 Service Unavailable",
                        format!("# status unavailable: {e}\n"),
                    ),
                }
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
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

    #[test]
    fn only_get_metrics_is_served() {
        assert!(is_metrics_request(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(is_metrics_request(b"GET /metrics?x=1 HTTP/1.1\r\n"));
        assert!(!is_metrics_request(b"GET / HTTP/1.1\r\n"));
        assert!(!is_metrics_request(b"GET /metricsx HTTP/1.1\r\n"));
        assert!(!is_metrics_request(b"POST /metrics HTTP/1.1\r\n"));
        assert!(!is_metrics_request(b""));
    }
}
