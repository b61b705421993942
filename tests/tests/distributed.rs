//! Distributed mode with real processes: a gRPC coordinator and worker processes that come
//! and go (kill -9 included), against real PostgreSQL clusters.

use schemashift_lab::load::{start_load, LoadOptions};
use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{
    connect, free_port, local_listen, schemashift, spawn_workers, table_diff, users_env,
    write_spec, Proc, TestEnv,
};
use std::time::Duration;
use tokio_postgres::Client;

const LIMIT: Duration = Duration::from_secs(180);

/// Shards as (done, leased, total) and whether some shard is leased by `worker`.
async fn shard_state(t: &Client, worker: &str) -> (i64, i64, i64, bool) {
    let Ok(r) = t
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'leased'), \
             count(*), coalesce(bool_or(state = 'leased' AND worker = $1), false) FROM schemashift.shards",
            &[&worker],
        )
        .await
    else {
        return (0, 0, 0, false);
    };
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Polls until `f` holds, for at most `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Source and target equal by our own compare.
/// `rows`: the source's row count when nothing writes, to check each row was copied once.
async fn assert_complete(env: &TestEnv, rows: Option<i64>) -> anyhow::Result<()> {
    let s = connect(&env.source_dsn).await?;
    let t = connect(&env.target_dsn).await?;
    if let Some(rows) = rows {
        let copied: i64 = t
            .query_one("SELECT sum(rows)::bigint FROM schemashift.shards", &[])
            .await?
            .get(0);
        assert_eq!(
            copied, rows,
            "each row committed by exactly one shard lease"
        );
    }
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    Ok(())
}

fn coordinator_args<'a>(spec: &'a str, listen: &'a str, until: &'a str) -> Vec<&'a str> {
    schemashift_tests::coordinator_args(spec, listen, until, &["--json"])
}

#[tokio::test]
async fn coordinator_and_three_workers_migrate_under_write_load_with_zero_diffs(
) -> anyhow::Result<()> {
    let env = users_env("dist_three_workers", 30_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 3, Some(2_500)),
    )?;
    let (listen, url) = local_listen()?;
    let load = start_load(
        env.source_dsn.clone(),
        LoadOptions {
            rate_per_sec: 300,
            ..LoadOptions::default()
        },
    )
    .await?;
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &coordinator_args(&spec, &listen, "cutover"),
        &[],
    )?;
    let mut workers = spawn_workers(dir.path(), &url, &["w0", "w1", "w2"], &[])?;
    let status = coord.wait(LIMIT).await?;
    let stats = load.stop().await;
    assert!(status.success(), "coordinator: {}", coord.stderr_tail());
    let report: serde_json::Value = serde_json::from_str(&coord.stdout())?;
    assert_eq!(report["phase"], "cut_over");
    assert_eq!(stats.failed, 0, "application writes must wait, not fail");
    for w in workers.iter_mut() {
        let s = w.wait(Duration::from_secs(30)).await?;
        assert!(
            s.success(),
            "{} exits 0 when the run is over: {}",
            w.name,
            w.stderr_tail()
        );
    }
    // Every worker took part.
    let t = connect(&env.target_dsn).await?;
    let busy: i64 = t
        .query_one(
            "SELECT count(*) FROM schemashift.workers WHERE rows > 0 OR changes > 0",
            &[],
        )
        .await?
        .get(0);
    assert!(busy >= 2, "work spread across workers ({busy} did some)");
    let st = schemashift(&["status", &spec, "--json"])?;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    let ids: Vec<&str> = st["workers"]
        .as_array()
        .map(|a| a.iter().filter_map(|w| w["worker"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["w0", "w1", "w2"], "status lists each worker");
    let shards = st["shard_list"].as_array().map_or(0, |a| a.len());
    assert!(shards >= 10, "status lists each shard ({shards})");
    // Writes that waited on the freeze land after it; carry them over, then compare.
    let v = schemashift(&["verify", &spec])?;
    assert!(
        v.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert_complete(&env, None).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

/// A coordinator (until verify, 2 s leases) over 150K users rows in 10K-row shards, and
/// one worker `a` working for it.
struct Cluster {
    env: TestEnv,
    dir: tempfile::TempDir,
    spec: String,
    url: String,
    coord: Proc,
    a: Proc,
    t: Client,
}

async fn coordinator_and_worker_a(name: &str) -> anyhow::Result<Cluster> {
    let env = users_env(name, 150_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(10_000)),
    )?;
    let (listen, url) = local_listen()?;
    let coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &coordinator_args(&spec, &listen, "verify"),
        &[],
    )?;
    let a = Proc::spawn(
        dir.path(),
        "worker-a",
        &["worker", "--coordinator", &url, "--id", "a"],
        &[],
    )?;
    let t = connect(&env.target_dsn).await?;
    Ok(Cluster {
        env,
        dir,
        spec,
        url,
        coord,
        a,
        t,
    })
}

#[tokio::test]
async fn worker_killed_mid_shard_is_replaced_and_no_shard_commits_twice() -> anyhow::Result<()> {
    let Cluster {
        env,
        dir,
        spec,
        url,
        mut coord,
        mut a,
        t,
    } = coordinator_and_worker_a("dist_kill_worker").await?;
    // Kill while `a` holds a lease, after it committed something.
    until(LIMIT, "worker a mid-shard", || async {
        let (done, _, total, a_holds) = shard_state(&t, "a").await;
        done >= 2 && done < total && a_holds
    })
    .await?;
    a.kill9().await?;
    let (done, _, total, _) = shard_state(&t, "a").await;
    assert!(done < total, "kill came too late ({done} of {total} done)");
    let mut b = Proc::spawn(
        dir.path(),
        "worker-b",
        &["worker", "--coordinator", &url, "--id", "b"],
        &[],
    )?;
    let status = coord.wait(LIMIT).await?;
    assert!(status.success(), "coordinator: {}", coord.stderr_tail());
    assert!(
        b.wait(Duration::from_secs(30)).await?.success(),
        "{}",
        b.stderr_tail()
    );
    let retaken: i64 = t
        .query_one(
            "SELECT count(*) FROM schemashift.shards WHERE attempts >= 2",
            &[],
        )
        .await?
        .get(0);
    assert!(retaken >= 1, "the killed worker's shard was leased again");
    assert_complete(&env, Some(150_000)).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn worker_stopped_past_its_lease_and_continued_has_its_work_refused() -> anyhow::Result<()> {
    let Cluster {
        env,
        dir,
        spec,
        url,
        mut coord,
        mut a,
        t,
    } = coordinator_and_worker_a("dist_sigstop").await?;
    until(LIMIT, "worker a mid-shard", || async {
        let (done, _, total, a_holds) = shard_state(&t, "a").await;
        done >= 1 && done < total && a_holds
    })
    .await?;
    // Frozen with its sessions and its uncommitted shard open, past its 2 s lease.
    a.freeze(true)?;
    let mut b = Proc::spawn(
        dir.path(),
        "worker-b",
        &["worker", "--coordinator", &url, "--id", "b"],
        &[],
    )?;
    until(LIMIT, "a's shard leased again by b", || async {
        let Ok(r) = t
            .query_one(
                "SELECT count(*) FROM schemashift.shards WHERE attempts >= 2 \
                 AND (state = 'done' OR worker = 'b')",
                &[],
            )
            .await
        else {
            return false;
        };
        r.get::<_, i64>(0) >= 1
    })
    .await?;
    a.freeze(false)?;
    let status = coord.wait(LIMIT).await?;
    assert!(status.success(), "coordinator: {}", coord.stderr_tail());
    for w in [&mut a, &mut b] {
        let st = w.wait(Duration::from_secs(30)).await?;
        assert!(st.success(), "{}: {}", w.name, w.stderr_tail());
    }
    assert!(
        a.stderr().contains("lease lost"),
        "the continued worker learned it lost its lease: {}",
        a.stderr_tail()
    );
    // Every row committed by exactly one lease, and the target equals the source.
    assert_complete(&env, Some(150_000)).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn coordinator_killed_mid_backfill_restarts_and_workers_reconnect() -> anyhow::Result<()> {
    let env = users_env("dist_kill_coord", 150_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(10_000)),
    )?;
    let (listen, url) = local_listen()?;
    let args = coordinator_args(&spec, &listen, "verify");
    let mut first = Proc::spawn(dir.path(), "coordinator-1", &args, &[])?;
    let mut workers = spawn_workers(dir.path(), &url, &["x", "y"], &[])?;
    let t = connect(&env.target_dsn).await?;
    until(LIMIT, "backfill under way", || async {
        let (done, _, total, _) = shard_state(&t, "").await;
        done >= 2 && done < total
    })
    .await?;
    first.kill9().await?;
    let (done, _, total, _) = shard_state(&t, "").await;
    assert!(done < total, "kill came too late ({done} of {total} done)");
    let mut second = Proc::spawn(dir.path(), "coordinator-2", &args, &[])?;
    let status = second.wait(LIMIT).await?;
    assert!(
        status.success(),
        "restarted coordinator: {}",
        second.stderr_tail()
    );
    let report: serde_json::Value = serde_json::from_str(&second.stdout())?;
    assert_eq!(report["resumed"], true);
    for w in workers.iter_mut() {
        let s = w.wait(Duration::from_secs(30)).await?;
        assert!(
            s.success(),
            "{} reconnected and finished: {}",
            w.name,
            w.stderr_tail()
        );
    }
    assert_complete(&env, Some(150_000)).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

/// A throwaway CA and a certificate for localhost signed by it (PEM files in `dir`).
fn make_certs(dir: &std::path::Path) -> anyhow::Result<()> {
    let sh = |script: &str| -> anyhow::Result<()> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=schemashift-test-ca")?;
    sh("openssl req -newkey rsa:2048 -nodes -keyout key.pem -out leaf.csr -subj /CN=localhost")?;
    sh("printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > leaf.ext && \
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 1 -extfile leaf.ext")?;
    // A worker's client certificate, signed by the same CA.
    sh("openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=schemashift-worker")?;
    sh("printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext && \
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.ext")
}

#[tokio::test]
async fn mutual_tls_lets_in_only_workers_with_a_client_certificate() -> anyhow::Result<()> {
    let env = users_env("dist_mtls", 5_000).await?;
    let dir = tempfile::tempdir()?;
    make_certs(dir.path())?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(1_000)),
    )?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let url = format!("https://localhost:{port}");
    let path = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (cert, key, ca) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
    let (client_cert, client_key) = (path("client.pem"), path("client.key"));
    let mut args = coordinator_args(&spec, &listen, "verify");
    args.extend([
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    // No token: the client certificate is the credential.
    let coord = Proc::spawn(dir.path(), "coordinator", &args, &[])?;
    let mut stranger = Proc::spawn(
        dir.path(),
        "stranger",
        &[
            "worker",
            "--coordinator",
            &url,
            "--id",
            "stranger",
            "--tls-ca",
            &ca,
        ],
        &[],
    )?;
    // Its calls fail while it has no certificate to show.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !stranger.stderr().contains("retrying") {
        anyhow::ensure!(
            stranger.is_running() && tokio::time::Instant::now() < deadline,
            "{}",
            stranger.stderr_tail()
        );
        tokio::task::yield_now().await;
    }
    stranger.kill9().await?;
    let member = Proc::spawn(
        dir.path(),
        "member",
        &[
            "worker",
            "--coordinator",
            &url,
            "--id",
            "member",
            "--tls-ca",
            &ca,
            "--tls-cert",
            &client_cert,
            "--tls-key",
            &client_key,
        ],
        &[],
    )?;
    completes_with_only(env, &spec, coord, member).await
}

#[tokio::test]
async fn worker_with_wrong_token_is_refused_and_the_right_one_migrates_over_tls(
) -> anyhow::Result<()> {
    let env = users_env("dist_token_tls", 5_000).await?;
    let dir = tempfile::tempdir()?;
    make_certs(dir.path())?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(1_000)),
    )?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let url = format!("https://localhost:{port}");
    let (cert, key, ca) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    let (cert, key, ca) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
        ca.to_string_lossy().into_owned(),
    );
    let mut args = coordinator_args(&spec, &listen, "verify");
    args.extend(["--tls-cert", &cert, "--tls-key", &key]);
    let coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &args,
        &[("SCHEMASHIFT_TOKEN", "right-token")],
    )?;
    let worker = |name: &str, token: Option<&str>| -> anyhow::Result<Proc> {
        let envs: Vec<(&str, &str)> = token
            .map(|t| ("SCHEMASHIFT_TOKEN", t))
            .into_iter()
            .collect();
        let mut w = schemashift_tests::spawn_workers_with(
            dir.path(),
            &url,
            &[name],
            &["--tls-ca", &ca],
            &envs,
        )?;
        w.pop().ok_or_else(|| anyhow::anyhow!("no worker"))
    };
    let mut wrong = worker("wrong", Some("wrong-token"))?;
    let s = wrong.wait(Duration::from_secs(60)).await?;
    assert_eq!(
        s.code(),
        Some(2),
        "refused is bad input: {}",
        wrong.stderr_tail()
    );
    assert!(
        wrong.stderr().contains("wrong token"),
        "{}",
        wrong.stderr_tail()
    );
    assert!(!wrong.stderr().contains("right-token") && !coord.stderr().contains("right-token"));
    let mut none = worker("none", None)?;
    let s = none.wait(Duration::from_secs(60)).await?;
    assert_eq!(s.code(), Some(2), "{}", none.stderr_tail());
    assert!(
        none.stderr().contains("requires a token"),
        "{}",
        none.stderr_tail()
    );

    let right = worker("right", Some("right-token"))?;
    completes_with_only(env, &spec, coord, right).await
}

/// The coordinator and `worker` finish cleanly, `worker` was the only one let in, and
/// the target equals the source; then everything is cleaned up.
async fn completes_with_only(
    env: TestEnv,
    spec: &str,
    mut coord: Proc,
    mut worker: Proc,
) -> anyhow::Result<()> {
    let status = coord.wait(LIMIT).await?;
    assert!(status.success(), "coordinator: {}", coord.stderr_tail());
    assert!(
        worker.wait(Duration::from_secs(30)).await?.success(),
        "{}",
        worker.stderr_tail()
    );
    let t = connect(&env.target_dsn).await?;
    let workers: Vec<String> = t
        .query("SELECT worker FROM schemashift.workers ORDER BY 1", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        workers,
        [worker.name.as_str()],
        "refused workers never got in"
    );
    assert_complete(&env, Some(5_000)).await?;
    schemashift(&["cleanup", spec])?;
    env.drop_all().await
}
