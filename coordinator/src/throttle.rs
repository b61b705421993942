//! Throttling, gh-ost style: a probe watches the source's health (latency of a one-row
//! read of a migrated table, against its own latency before the copy started and an
//! absolute limit; replica replay lag; lock waiters) and, while a limit from the spec is
//! exceeded, the coordinator starts no new backfill shard and running copies pause at the
//! next heartbeat. Replay is not held back: its lag is what the cutover waits for. The
//! state is saved for `status` and metrics.

use crate::error::CoordinatorError;
use schemashift_common::control::ControlSql;
use schemashift_common::plan::RunPlan;
use schemashift_common::spec::{Spec, ThrottleSpec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

/// Shared with the service: whether to hold new shards back.
#[derive(Debug, Default)]
pub struct Throttle {
    on: AtomicBool,
}

impl Throttle {
    /// Held back until the first probe says the source is fine.
    pub fn new(enabled: bool) -> Self {
        Throttle {
            on: AtomicBool::new(enabled),
        }
    }

    pub fn throttled(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }
}

/// Probe latencies of the last half second: enough to see a trend, short enough that a
/// pause shows in the probe before the next heartbeat.
const WINDOW: usize = 10;
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Below this the probe's own noise dominates; a relative limit never goes tighter.
const MIN_SLACK: Duration = Duration::from_micros(100);

/// The 90th percentile of a few latencies (the second largest of ten).
fn p90(samples: &[Duration]) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    v.get((v.len() * 9).div_ceil(10).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// The probe's latency at the start, before any copy runs (workers are held until the
/// first verdict): what "slower" is measured against.
async fn baseline(source: &Client, probe: &str) -> Result<Duration, tokio_postgres::Error> {
    let mut samples = Vec::with_capacity(40);
    for _ in 0..40 {
        let t0 = Instant::now();
        source.query(probe, &[]).await?;
        samples.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(p90(&samples))
}

/// The first limit the recent probes exceed, if any.
fn judge(window: &[Duration], base: Duration, limits: &ThrottleSpec) -> Option<String> {
    let now = p90(window);
    if now > limits.probe_latency {
        return Some(format!(
            "probe read took {:.2} ms (limit {} ms)",
            now.as_secs_f64() * 1e3,
            limits.probe_latency.as_millis()
        ));
    }
    let allowed = base
        .mul_f64(1.0 + limits.probe_increase)
        .max(base + MIN_SLACK);
    (now > allowed).then(|| {
        format!(
            "probe read {:.2} ms is {:.0}% slower than before the run ({:.2} ms; limit {:.0}%)",
            now.as_secs_f64() * 1e3,
            (now.as_secs_f64() / base.as_secs_f64().max(1e-6) - 1.0) * 100.0,
            base.as_secs_f64() * 1e3,
            limits.probe_increase * 100.0
        )
    })
}

/// Replica lag and lock waiters: the first limit exceeded, if any.
async fn check_server(
    source: &Client,
    limits: &ThrottleSpec,
) -> Result<Option<String>, tokio_postgres::Error> {
    let r = source
        .query_one(
            "SELECT coalesce((SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication), 0)::float8, \
             (SELECT count(*) FROM pg_locks WHERE NOT granted)",
            &[],
        )
        .await?;
    let (lag, waiters): (f64, i64) = (r.get(0), r.get(1));
    if lag > limits.replica_lag.as_secs_f64() {
        return Ok(Some(format!(
            "replica replay lag {lag:.1} s (limit {} s)",
            limits.replica_lag.as_secs_f64()
        )));
    }
    if waiters > limits.lock_waiters {
        return Ok(Some(format!(
            "{waiters} sessions wait on locks (limit {})",
            limits.lock_waiters
        )));
    }
    Ok(None)
}

/// One probe, then (every few probes) the server-wide checks.
async fn check(
    source: &Client,
    probe: &str,
    window: &mut Vec<Duration>,
    base: Duration,
    limits: &ThrottleSpec,
    server_check: bool,
    last_server: &mut Option<String>,
) -> Result<Option<String>, tokio_postgres::Error> {
    let t0 = Instant::now();
    source.query(probe, &[]).await?;
    if window.len() == WINDOW {
        window.remove(0);
    }
    window.push(t0.elapsed());
    if server_check {
        *last_server = check_server(source, limits).await?;
    }
    Ok(judge(window, base, limits).or_else(|| last_server.clone()))
}

/// Probes every `every` until shutdown; records each change of state in the control schema.
pub async fn watch_source(
    spec: Spec,
    plan: Arc<RunPlan>,
    source: Client,
    target: Client,
    state: Arc<Throttle>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let limits = spec.throttle.clone();
    if !limits.enabled {
        return Ok(());
    }
    let probe = match plan.tables.first() {
        Some(t) => format!("SELECT 1 FROM ONLY {} LIMIT 1", t.source),
        None => "SELECT 1".to_owned(),
    };
    let sql = ControlSql::new(&plan.control_schema);
    let save = format!(
        "INSERT INTO {} (id, throttled, reason, since) VALUES (1, $1, $2, now()) \
         ON CONFLICT (id) DO UPDATE SET throttled = EXCLUDED.throttled, reason = EXCLUDED.reason, \
         since = EXCLUDED.since, seconds = {t}.seconds + CASE WHEN {t}.throttled \
           THEN extract(epoch FROM now() - {t}.since) ELSE 0 END, \
         episodes = {t}.episodes + CASE WHEN EXCLUDED.throttled THEN 1 ELSE 0 END",
        sql.table("throttle"),
        t = sql.table("throttle"),
    );
    let base = match baseline(&source, &probe).await {
        Ok(b) => b,
        Err(e) => {
            return Err(CoordinatorError::db("measuring the probe's baseline", &e));
        }
    };
    tracing::info!(
        baseline_ms = base.as_secs_f64() * 1e3,
        "throttle probe baseline measured"
    );
    let (mut window, mut last_server) = (Vec::with_capacity(WINDOW), None);
    let mut last: Option<Option<String>> = None;
    for n in 0u64.. {
        let checked = check(
            &source,
            &probe,
            &mut window,
            base,
            &limits,
            n % 5 == 0,
            &mut last_server,
        )
        .await;
        let verdict = match checked {
            Ok(v) => v,
            // A probe that fails is a source in trouble too.
            Err(e) => Some(format!(
                "probe failed: {}",
                schemashift_common::pg::describe(&e)
            )),
        };
        state.on.store(verdict.is_some(), Ordering::Relaxed);
        let changed = last
            .as_ref()
            .is_none_or(|l| l.is_some() != verdict.is_some());
        if changed {
            match &verdict {
                Some(why) => {
                    tracing::warn!(reason = %why, "throttling: no new shards until the source recovers")
                }
                None if last.is_some() => tracing::info!("throttle released"),
                None => {}
            }
            if let Err(e) = target.execute(&save, &[&verdict.is_some(), &verdict]).await {
                tracing::debug!(error = %schemashift_common::pg::describe(&e), "throttle state not saved");
            }
        }
        last = Some(verdict);
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[f64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_secs_f64(m / 1e3)).collect()
    }

    #[test]
    fn probe_within_its_allowance_does_not_throttle() {
        let limits = ThrottleSpec::default();
        let base = Duration::from_micros(400);
        // p90 of ten is the second largest: one outlier is ignored.
        let window = ms(&[0.40, 0.41, 0.39, 0.42, 0.40, 0.43, 0.40, 0.41, 0.42, 5.0]);
        assert_eq!(judge(&window, base, &limits), None);
    }

    #[test]
    fn probe_slower_than_its_baseline_throttles_and_says_why() {
        let limits = ThrottleSpec::default();
        let base = Duration::from_micros(400);
        let window = ms(&[0.9, 1.1, 0.8, 1.2, 0.9, 1.0, 1.3, 0.9, 1.0, 1.1]);
        let why = judge(&window, base, &limits).expect("throttled");
        assert!(why.contains("slower than before the run"), "{why}");
    }

    #[test]
    fn tiny_baselines_get_the_minimum_slack() {
        let limits = ThrottleSpec::default();
        let base = Duration::from_micros(100);
        // +50% but only 50 µs: noise, not load.
        assert_eq!(judge(&ms(&[0.15; 10]), base, &limits), None);
        assert!(judge(&ms(&[0.25; 10]), base, &limits).is_some());
    }

    #[test]
    fn absolute_limit_applies_whatever_the_baseline() {
        let limits = ThrottleSpec {
            probe_increase: 100.0,
            ..ThrottleSpec::default()
        };
        let base = Duration::from_millis(40);
        let why = judge(&ms(&[60.0; 10]), base, &limits).expect("throttled");
        assert!(why.contains("limit 50 ms"), "{why}");
    }
}
