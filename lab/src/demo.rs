//! `schemashift demo`: two throwaway clusters, the users scenario, an application
//! write load during the whole migration, cutover, an independent compare, a report.

use crate::cluster::{Cluster, ClusterOptions};
use crate::load::{start_load, LoadOptions, Schema};
use crate::scenario::{load_users, users_spec_yaml, SOURCE_DDL, SPLIT_FUNCTIONS, TARGET_DDL};
use anyhow::Context;
use schemashift_common::spec::Spec;
use schemashift_coordinator::run::{run, RunEvent, RunOptions, RunReport, Until};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Default, Serialize)]
pub struct DemoReport {
    pub rows: u64,
    pub run: RunReport,
    pub load_inserts: u64,
    pub load_updates: u64,
    pub load_toast_updates: u64,
    pub load_deletes: u64,
    pub load_failed: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_write_wait_ms: f64,
    pub split_accuracy: f64,
    pub accuracy_sample: u64,
    /// Missing, extra, different rows by the demo's own compare.
    pub diff: (u64, u64, u64),
    pub total_seconds: f64,
    /// Write p95 over a quiet period before the migration, during the backfill, during
    /// the rest of the run (replay, verify, cutover), and on the target after the switch.
    pub p95_before_ms: f64,
    pub p95_during_ms: f64,
    pub p95_rest_ms: f64,
    pub p95_after_ms: f64,
    /// Write p50, p95 and p99 before the migration and during the backfill.
    pub percentiles_before_ms: [f64; 3],
    pub percentiles_during_ms: [f64; 3],
    /// Application writes made on the target after the switch, and whether reverse sync
    /// brought every one of them to the old schema (the compare after it).
    pub writes_after_switch: u64,
    pub reverse_applied: u64,
    pub throttling: bool,
    /// With --rollback: target writes after the cutover, rollback time, and the compare
    /// of every row after switching back.
    pub rollback_seconds: Option<f64>,
    pub rollback_diff: Option<(u64, u64, u64)>,
}

/// The demo application's runtime; dropping a runtime inside another one would block it,
/// so it is shut down in the background, on every path out of the demo.
struct AppRuntime(Option<tokio::runtime::Runtime>);

impl AppRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for AppRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

async fn client(dsn: &str) -> anyhow::Result<Client> {
    let (c, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .with_context(|| "connecting to a demo cluster")?;
    tokio::spawn(conn);
    c.batch_execute("SET TimeZone = 'UTC'").await?;
    Ok(c)
}

pub async fn demo(
    rows: u64,
    workers: usize,
    load_rate: u32,
    throttle: bool,
    rollback: bool,
    host: &crate::Host,
) -> anyhow::Result<DemoReport> {
    let t0 = Instant::now();
    tracing::info!("starting source and target clusters");
    let (src, tgt) = tokio::try_join!(
        Cluster::start(ClusterOptions::default()),
        Cluster::start(ClusterOptions::default())
    )
    .context("starting the demo's PostgreSQL clusters")?;
    for (c, db, ddl) in [(&src, "app", SOURCE_DDL), (&tgt, "app_v2", TARGET_DDL)] {
        client(&c.dsn("postgres"))
            .await?
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        client(&c.dsn(db)).await?.batch_execute(ddl).await?;
    }
    let (src_dsn, tgt_dsn) = (src.dsn("app"), tgt.dsn("app_v2"));
    let source = client(&src_dsn).await?;
    tracing::info!(rows, "loading the users scenario");
    load_users(&source, rows).await.context("loading users")?;
    let mut spec = Spec::parse(&users_spec_yaml(&src_dsn, &tgt_dsn, workers, None))?;
    spec.throttle.enabled = throttle;

    tracing::info!(ops_per_s = load_rate, "starting the application write load");
    // The application is not our process: its tasks get a runtime of their own, so its
    // latency is not spent queued behind the migration's tasks.
    let app_runtime = AppRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("demo-app")
            .enable_all()
            .build()
            .context("starting the demo application's runtime")?,
    ));
    let load = app_runtime
        .handle()
        .spawn(start_load(
            src_dsn.clone(),
            LoadOptions {
                rate_per_sec: load_rate,
                ..LoadOptions::default()
            },
        ))
        .await??;
    // The migration's own threads (this process: relaying COPY data, capture, replay) are
    // bulk work like its database sessions; the application's runtime keeps its priority.
    if spec.throttle.enabled && spec.throttle.low_priority {
        let n = schemashift_common::pg::lower_own_threads("demo-app");
        tracing::debug!(threads = n, "migration threads at the lowest priority");
    }
    // The application's latency before the migration starts, to compare with during: long
    // enough (about 2,400 operations at the default rate) that its p95 is not noise.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let before = load.stats();
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    let bars = (host.progress)(&spec);
    // The demo's application follows the run: latency snapshots at its milestones, and a
    // move to the new schema at the switch, as a real application's switch would.
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let watcher = {
        let (router, stats_of, tgt_dsn) = (load.router(), load.stats_reader(), tgt_dsn.clone());
        tokio::spawn(async move {
            let mut backfilled = None;
            while let Some(e) = events.recv().await {
                match e {
                    RunEvent::BackfillDone => backfilled = Some(stats_of()),
                    RunEvent::Switched => {
                        if let Err(e) = router.switch(&tgt_dsn, Schema::New) {
                            tracing::warn!(error = %e, "demo load not switched");
                        }
                        return (backfilled, Some(stats_of()));
                    }
                }
            }
            (backfilled, None)
        })
    };
    let result = run(
        &spec,
        RunOptions {
            workers: Some(workers),
            until: Until::Cutover,
            events: Some(events_tx),
            ..RunOptions::new(host.local.clone())
        },
        shutdown,
    )
    .await;
    bars();
    let (backfilled, switched) = watcher.await.unwrap_or((None, None));
    let mut report = result.map_err(|e| anyhow::anyhow!("{e}"))?;
    // A few seconds of the application on the new schema, then its writes go back to the
    // old one by reverse sync (what a rollback would rely on).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let stats = load.stop().await;
    let p95 = |h: &crate::load::LatencyHistogram| h.p95() as f64 / 1e3;
    let at_switch = switched.unwrap_or_else(|| stats.clone());
    let backfilled = backfilled.unwrap_or_else(|| at_switch.clone());
    let during = backfilled.latencies_us.since(&before.latencies_us);
    let p95_before_ms = p95(&before.latencies_us);
    let p95_during_ms = p95(&during);
    let percentiles =
        |h: &crate::load::LatencyHistogram| [h.p50(), h.p95(), h.p99()].map(|us| us as f64 / 1e3);
    let percentiles_before_ms = percentiles(&before.latencies_us);
    let percentiles_during_ms = percentiles(&during);
    let p95_rest_ms = p95(&at_switch.latencies_us.since(&backfilled.latencies_us));
    let p95_after_ms = p95(&stats.latencies_us.since(&at_switch.latencies_us));
    let writes_after_switch = stats.ops().saturating_sub(at_switch.ops());
    let reverse = schemashift_coordinator::reverse::now(&spec)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let reverse_applied = schemashift_coordinator::reverse::sync(
        &spec,
        schemashift_coordinator::reverse::Until::Lsn(reverse),
    )
    .await
    .map_err(|e| anyhow::anyhow!("reverse sync: {e}"))?
    .changes_applied;
    // Source writes that waited on the freeze were carried over by the cutover; verify
    // now compares both sides after the reverse sync.
    let v = schemashift_coordinator::ops::verify(&spec, host.local.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    report.verify = Some(v);

    let target = client(&tgt_dsn).await?;
    let diff = compare(&source, &target).await?;
    let (accuracy, sample) = split_accuracy(&source, &target).await?;
    let (mut rollback_seconds, mut rollback_diff) = (None, None);
    if rollback {
        // The application now writes to the new schema; then we change our minds.
        target
            .batch_execute(
                // Past every id the load used.
                "INSERT INTO users (id, email, first_name, last_name) SELECT max(id) + 1000, 'after.cutover@example.com', 'Ada', 'Lovelace' FROM users;
                 UPDATE users SET bio = 'edited after the cutover' WHERE id % 1000 = 7;
                 DELETE FROM users WHERE id % 1000 = 9;",
            )
            .await?;
        let out = schemashift_coordinator::ops::rollback(&spec)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rollback_seconds = out.switched_back.map(|s| s.seconds);
        rollback_diff = Some(compare(&source, &target).await?);
    }
    let out = DemoReport {
        rows,
        run: report,
        load_inserts: stats.inserts,
        load_updates: stats.updates,
        load_toast_updates: stats.toast_updates,
        load_deletes: stats.deletes,
        load_failed: stats.failed,
        p50_ms: stats.p50().as_secs_f64() * 1e3,
        p95_ms: stats.p95().as_secs_f64() * 1e3,
        p99_ms: stats.p99().as_secs_f64() * 1e3,
        max_write_wait_ms: stats.max_write_wait.as_secs_f64() * 1e3,
        split_accuracy: accuracy,
        accuracy_sample: sample,
        diff,
        total_seconds: t0.elapsed().as_secs_f64(),
        p95_before_ms,
        p95_during_ms,
        p95_rest_ms,
        p95_after_ms,
        percentiles_before_ms,
        percentiles_during_ms,
        writes_after_switch,
        reverse_applied,
        throttling: throttle,
        rollback_seconds,
        rollback_diff,
    };
    drop((source, target));
    let _ = tokio::join!(src.stop(), tgt.stop());
    drop(app_runtime);
    Ok(out)
}

/// Row-by-row compare by the demo itself (not the tool's verify).
async fn compare(source: &Client, target: &Client) -> anyhow::Result<(u64, u64, u64)> {
    for f in SPLIT_FUNCTIONS {
        let sql = f.replacen("CREATE FUNCTION ", "CREATE OR REPLACE FUNCTION pg_temp.", 1);
        source.batch_execute(&sql).await?;
    }
    let s = source
        .query(
            "SELECT id, md5(ROW(email, pg_temp.split_first(full_name), pg_temp.split_last(full_name), bio, created_at, updated_at)::text) FROM users",
            &[],
        )
        .await?;
    let t = target
        .query("SELECT id, md5(ROW(email, first_name, last_name, bio, created_at, updated_at)::text) FROM users", &[])
        .await?;
    let mut tm: HashMap<i64, String> = t.iter().map(|r| (r.get(0), r.get(1))).collect();
    let (mut missing, mut different) = (0, 0);
    for r in &s {
        match tm.remove(&r.get::<_, i64>(0)) {
            None => missing += 1,
            Some(h) if h != r.get::<_, String>(1) => different += 1,
            Some(_) => {}
        }
    }
    Ok((missing, tm.len() as u64, different))
}

fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Round trip `concat_names(split(x)) = x` (whitespace-normalised) on 10,000 random rows.
async fn split_accuracy(source: &Client, target: &Client) -> anyhow::Result<(f64, u64)> {
    let s = source
        .query(
            "SELECT id, full_name FROM users ORDER BY random() LIMIT 10000",
            &[],
        )
        .await?;
    let ids: Vec<i64> = s.iter().map(|r| r.get(0)).collect();
    let t = target
        .query(
            "SELECT id, first_name, last_name FROM users WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    let names: HashMap<i64, (String, String)> =
        t.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
    let mut ok = 0u64;
    for r in &s {
        let full: String = r.get(1);
        if let Some((f, l)) = names.get(&r.get::<_, i64>(0)) {
            let joined = [f.as_str(), l.as_str()]
                .iter()
                .filter(|p| !p.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            if normalise(&joined) == normalise(&full) {
                ok += 1;
            }
        }
    }
    let n = s.len().max(1) as f64;
    Ok((ok as f64 / n, s.len() as u64))
}
