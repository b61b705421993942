//! Throttling, gh-ost style: a probe watches the source's health (latency of a one-row
//! read of a migrated table, replica replay lag, lock waiters) and, while a limit from the
//! spec is exceeded, the coordinator starts no new backfill shard. Replay is not held back:
//! its lag is what the cutover waits for. The state is saved for `status` and metrics.

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

/// One look at the source: the first limit exceeded, if any.
async fn check(
    source: &Client,
    probe: &str,
    limits: &ThrottleSpec,
) -> Result<Option<String>, tokio_postgres::Error> {
    let t0 = Instant::now();
    source.query(probe, &[]).await?;
    let latency = t0.elapsed();
    if latency > limits.probe_latency {
        return Ok(Some(format!(
            "probe read took {} ms (limit {} ms)",
            latency.as_millis(),
            limits.probe_latency.as_millis()
        )));
    }
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
    let mut last: Option<Option<String>> = None;
    loop {
        let verdict = match check(&source, &probe, &limits).await {
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
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
