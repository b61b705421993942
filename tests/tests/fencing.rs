//! Fencing and supervision against real processes: a worker whose lease was taken over
//! writes nothing and its late completion is refused; a background session that dies
//! (the throttle's probe) neither hangs the run nor goes unsaid.

use schemashift_common::control::ControlSql;
use schemashift_common::ids::LeaseEpoch;
use schemashift_common::pg::install_helpers;
use schemashift_common::plan::Shard;
use schemashift_common::service::{
    CoordinatorService, Progress, Registration, ServiceError, Work, WorkerInfo,
};
use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, local_listen, users_env, write_spec, Proc};
use schemashift_worker::backfill::{copy_shard, CopyPacing, CopyProgress};
use schemashift_worker::grpc::{ClientOptions, GrpcCoordinator};
use schemashift_worker::WorkerError;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        host: "test".into(),
    }
}

/// Asks for work until a backfill shard comes (the run may still be starting).
async fn lease_shard(
    svc: &GrpcCoordinator,
    me: &WorkerInfo,
    limit: Duration,
) -> anyhow::Result<(Shard, LeaseEpoch)> {
    let deadline = Instant::now() + limit;
    loop {
        match svc.lease(me, Progress::default()).await {
            Ok(Work::Backfill { shard, epoch }) => return Ok((shard, epoch)),
            Ok(_) | Err(ServiceError::Unavailable(_)) => {}
            Err(e) => anyhow::bail!("lease: {e}"),
        }
        anyhow::ensure!(Instant::now() < deadline, "{} got no shard", me.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shard copied as a worker copies it, under `epoch`.
async fn copy(reg: &Registration, shard: &Shard, epoch: LeaseEpoch) -> Result<u64, WorkerError> {
    let source = schemashift_common::pg::connect(&reg.source, "source").await?;
    let mut target = schemashift_common::pg::connect(&reg.target, "target").await?;
    install_helpers(&source, &reg.plan.helpers, "source").await?;
    // As a worker does: `strategy: auto` may pick fdw, which maps on the target.
    install_helpers(&target, &reg.plan.helpers, "target").await?;
    let table = reg
        .plan
        .table(shard.table)
        .expect("the shard's table is planned");
    let (_hold_tx, hold) = tokio::sync::watch::channel(false);
    let out = copy_shard(
        &source,
        &mut target,
        &ControlSql::new(&reg.plan.control_schema),
        table,
        shard,
        epoch,
        CopyPacing {
            progress: Arc::new(CopyProgress::default()),
            hold,
        },
    )
    .await?;
    Ok(out.rows)
}

#[tokio::test]
async fn completion_under_a_lease_taken_over_is_refused_and_writes_no_row() -> anyhow::Result<()> {
    let env = users_env("fencing_stale_lease", 2_000).await?;
    let dir = tempfile::tempdir()?;
    // One shard, so the second worker leases the same one once the first lease expires.
    let spec = write_spec(
        &dir,
        &format!(
            "{}throttle:\n  enabled: false\n",
            users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(1_000_000))
        ),
    )?;
    let (listen, url) = local_listen()?;
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &[
            "coordinator",
            &spec,
            "--listen",
            &listen,
            "--until",
            "backfill",
            "--lease-ttl",
            "1s",
        ],
        &[],
    )?;
    let svc = GrpcCoordinator::new(&url, &ClientOptions::default())?;
    let (w1, w2) = (worker("stale"), worker("current"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let reg = loop {
        match svc.register(&w1).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("register: {e}"),
        }
    };
    svc.register(&w2).await?;
    let (shard, e1) = lease_shard(&svc, &w1, Duration::from_secs(60)).await?;
    // The first worker goes silent; its lease expires and the shard is leased again.
    let (again, e2) = lease_shard(&svc, &w2, Duration::from_secs(30)).await?;
    assert_eq!(again.id, shard.id);
    assert!(e2 > e1, "re-leased at a higher epoch ({e1:?} then {e2:?})");

    let stale = copy(&reg, &shard, e1).await;
    assert!(
        matches!(stale, Err(WorkerError::LeaseLost { .. })),
        "the stale copy is rolled back: {stale:?}"
    );
    let t = connect(&env.target_dsn).await?;
    let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    assert_eq!(rows, 0, "the stale lease wrote nothing");
    let refused = svc.completed(&w1, shard.id, e1, 2_000, 0).await;
    assert!(
        matches!(refused, Err(ServiceError::Rejected(_))),
        "completion under epoch {e1:?} refused: {refused:?}"
    );

    assert_eq!(copy(&reg, &shard, e2).await?, 2_000);
    svc.completed(&w2, shard.id, e2, 2_000, 0).await?;
    let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    assert_eq!(rows, 2_000);
    coord.kill9().await?;
    env.drop_all().await
}

#[tokio::test]
async fn throttle_probe_session_killed_mid_run_is_reopened_and_the_run_completes(
) -> anyhow::Result<()> {
    let env = users_env("probe_session_killed", 20_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(2_000)),
    )?;
    let mut run = Proc::spawn(
        dir.path(),
        "run",
        &["run", &spec, "--until", "backfill"],
        &[],
    )?;
    // The probe's session, as soon as it has probed: terminated under the run.
    let admin = connect(&env.source_dsn).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let killed: Option<bool> = admin
            .query_opt(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND query = 'SELECT 1 FROM ONLY \"public\".\"users\" LIMIT 1' LIMIT 1",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        if killed == Some(true) {
            break;
        }
        anyhow::ensure!(
            run.is_running() && Instant::now() < deadline,
            "the probe session never showed up: {}",
            run.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = run.wait(Duration::from_secs(120)).await?;
    assert!(status.success(), "run: {}", run.stderr_tail());
    assert!(
        run.stderr()
            .contains("throttle probe session lost; reconnecting"),
        "the run said what happened: {}",
        run.stderr_tail()
    );
    let t = connect(&env.target_dsn).await?;
    let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    assert_eq!(rows, 20_000);
    env.drop_all().await
}
