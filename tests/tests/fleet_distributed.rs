//! A fleet in distributed mode: one coordinator serves every member, worker processes take
//! work of any member, and the fleet's limits hold across processes because the coordinator
//! hands out a shard lease only with a pass of the fleet's gate.

use schemashift_lab::load::{start_load, LoadOptions};
use schemashift_tests::fleet::{four_members, sample, shards_done};
use schemashift_tests::{
    connect, coordinator_args, local_listen, schemashift, spawn_workers, table_diff,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_serves_the_fleet_to_worker_processes_one_copy_per_server_and_a_killed_worker_frees_its_slot(
) -> anyhow::Result<()> {
    let (envs, dir, spec) = four_members("dfleet", 1).await?;
    let mut targets = Vec::new();
    for e in &envs {
        targets.push(connect(&e.target_dsn).await?);
    }
    // Writes on two members; the other two stay still so their copied rows can be counted.
    let mut loads = Vec::new();
    for e in &envs[2..] {
        loads.push(
            start_load(
                e.source_dsn.clone(),
                LoadOptions {
                    rate_per_sec: 50,
                    ..LoadOptions::default()
                },
            )
            .await?,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let admins = vec![
        envs[0].source_dsn_for("postgres"),
        envs[0].target_dsn_for("postgres"),
    ];
    let mut dbs = Vec::new();
    for e in &envs {
        dbs.push(e.source_db.clone());
        dbs.push(e.target_db.clone());
    }
    let sampler = tokio::spawn(sample(admins, dbs, stop.clone()));

    let (listen, url) = local_listen()?;
    let t0 = Instant::now();
    let mut coord = schemashift_tests::Proc::spawn(
        dir.path(),
        "coordinator",
        &coordinator_args(&spec, &listen, "verify", &["--json"]),
        &[],
    )?;
    let mut workers = spawn_workers(dir.path(), &url, &["a", "b"], &[])?;
    // 4 members × 15 shards: kill worker a once the fleet is under way. Its pass holds a
    // slot on both servers (per_host 1) until its lease runs out; if the coordinator never
    // took it back, no member could copy again and the run would not finish.
    while shards_done(&targets).await < 6 {
        anyhow::ensure!(coord.is_running(), "{}", coord.stderr_tail());
        anyhow::ensure!(t0.elapsed() < LIMIT, "the fleet never got going");
        tokio::task::yield_now().await;
    }
    workers[0].kill9().await?;
    let done = shards_done(&targets).await;
    assert!(done < 60, "kill came too late ({done} of 60 done)");
    let mut more = spawn_workers(dir.path(), &url, &["c"], &[])?;

    let status = coord.wait(LIMIT).await?;
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst = sampler.await??;
    eprintln!(
        "distributed fleet of 4 × 30,000 rows, per_host 1, a worker killed: {:.1} s; most of \
         ours at once per cluster (reading+builds, writing+builds): {worst:?}",
        took.as_secs_f64()
    );
    assert!(status.success(), "coordinator: {}", coord.stderr_tail());
    let doc: serde_json::Value = serde_json::from_str(&coord.stdout())?;
    let members = doc["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 4, "{doc}");
    for m in &members {
        assert_eq!(m["status"], "done", "{m}");
        assert_eq!(m["phase"], "verified", "{m}");
    }
    for (i, w) in worst.iter().enumerate() {
        assert!(w.0 <= 1 && w.1 <= 1, "cluster {i}: {worst:?}");
    }
    assert!(
        worst.iter().all(|w| w.0 == 1),
        "the sampler saw copies: {worst:?}"
    );
    for w in workers.iter_mut().skip(1).chain(more.iter_mut()) {
        let s = w.wait(Duration::from_secs(60)).await?;
        assert!(s.success(), "{} exits 0: {}", w.name, w.stderr_tail());
    }
    // One worker process copies for several members.
    let mut copied_for = 0;
    for t in &targets {
        let n: i64 = t
            .query_one(
                "SELECT count(*) FROM schemashift.workers WHERE worker = 'b' AND rows > 0",
                &[],
            )
            .await?
            .get(0);
        copied_for += n;
    }
    assert!(copied_for >= 2, "worker b copied for {copied_for} members");

    for l in loads {
        l.stop().await;
    }
    // Writes after the run reached verify: carried over by a fleet verify, then compared.
    let out = schemashift(&["verify", &spec])?;
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, (e, t)) in envs.iter().zip(&targets).enumerate() {
        if i < 2 {
            let copied: i64 = t
                .query_one("SELECT sum(rows)::bigint FROM schemashift.shards", &[])
                .await?
                .get(0);
            assert_eq!(copied, 30_000, "member m{i}: each row committed once");
        }
        let s = connect(&e.source_dsn).await?;
        assert_eq!(table_diff(&s, t).await?, (0, 0, 0), "member m{i}");
    }
    schemashift(&["cleanup", &spec])?;
    for e in envs {
        e.drop_all().await?;
    }
    Ok(())
}

/// The fleet coordinator killed with -9 mid-backfill and started again on the same address:
/// the workers ride out the gap, every member resumes from its control schema, and no shard
/// commits twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_coordinator_killed_mid_backfill_resumes_every_member_committing_each_shard_once(
) -> anyhow::Result<()> {
    let (envs, dir, spec) = four_members("dfleet_kill", 2).await?;
    let mut targets = Vec::new();
    for e in &envs {
        targets.push(connect(&e.target_dsn).await?);
    }
    let (listen, url) = local_listen()?;
    let args = coordinator_args(&spec, &listen, "verify", &["--json"]);
    let mut coord = schemashift_tests::Proc::spawn(dir.path(), "coordinator", &args, &[])?;
    let mut workers = spawn_workers(dir.path(), &url, &["a", "b"], &[])?;
    let t0 = Instant::now();
    while shards_done(&targets).await < 8 {
        anyhow::ensure!(coord.is_running(), "{}", coord.stderr_tail());
        anyhow::ensure!(t0.elapsed() < LIMIT, "the fleet never got going");
        tokio::task::yield_now().await;
    }
    coord.kill9().await?;
    let done = shards_done(&targets).await;
    assert!(done < 60, "kill came too late ({done} of 60 done)");
    let mut again = schemashift_tests::Proc::spawn(dir.path(), "coordinator-2", &args, &[])?;
    let status = again.wait(LIMIT).await?;
    assert!(status.success(), "coordinator: {}", again.stderr_tail());
    let doc: serde_json::Value = serde_json::from_str(&again.stdout())?;
    let members = doc["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 4, "{doc}");
    for w in workers.iter_mut() {
        let s = w.wait(Duration::from_secs(60)).await?;
        assert!(s.success(), "{} exits 0: {}", w.name, w.stderr_tail());
    }
    for (i, (e, t)) in envs.iter().zip(&targets).enumerate() {
        let (rows, copied): (i64, i64) = {
            let r = t
                .query_one(
                    "SELECT (SELECT count(*) FROM users), \
                            (SELECT sum(rows)::bigint FROM schemashift.shards)",
                    &[],
                )
                .await?;
            (r.get(0), r.get(1))
        };
        assert_eq!(
            (rows, copied),
            (30_000, 30_000),
            "member m{i}: each row committed once"
        );
        let s = connect(&e.source_dsn).await?;
        assert_eq!(table_diff(&s, t).await?, (0, 0, 0), "member m{i}");
    }
    schemashift(&["cleanup", &spec])?;
    for e in envs {
        e.drop_all().await?;
    }
    Ok(())
}
