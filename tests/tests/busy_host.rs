//! A host made busy by work that is not ours: holding copies back cannot bring the probe
//! back to its baseline, so the throttle measures the baseline again and the run finishes.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, users_env, wait_shards_done, write_spec, Proc};
use std::time::{Duration, Instant};

/// Large enough that the run is not over before the busy loops have been noticed.
const ROWS: u64 = 100_000;

/// A plain busy loop at normal priority, killed when dropped.
fn busy_loop() -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .kill_on_drop(true)
        .spawn()?)
}

#[tokio::test]
async fn host_busy_with_other_work_after_the_baseline_still_finishes_the_run() -> anyhow::Result<()>
{
    // The same run on a quiet host first, for the ratio the report below prints.
    let quiet = users_env("quiet_host", ROWS).await?;
    let qdir = tempfile::tempdir()?;
    let qspec = write_spec(
        &qdir,
        &users_spec_yaml(&quiet.source_dsn, &quiet.target_dsn, 2, Some(5_000)),
    )?;
    let q0 = Instant::now();
    schemashift_tests::schemashift_ok(&["run", &qspec, "--until", "verify"])?;
    let quiet_secs = q0.elapsed().as_secs_f64();
    quiet.drop_all().await?;

    let env = users_env("busy_host", ROWS).await?;
    let dir = tempfile::tempdir()?;
    // The throttle on (the default), as a user would run it.
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(5_000)),
    )?;
    let t0 = Instant::now();
    let mut run = Proc::spawn(
        dir.path(),
        "run",
        &["run", &spec, "--until", "verify", "--json"],
        &[],
    )?;
    // After the baseline and the first shard: every core gets a busy loop.
    let t = connect(&env.target_dsn).await?;
    wait_shards_done(&t, 1, &mut run).await?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let loops = (0..cores)
        .map(|_| busy_loop())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let status = run.wait(Duration::from_secs(300)).await?;
    drop(loops);
    assert!(status.success(), "run: {}", run.stderr_tail());
    let report: serde_json::Value = serde_json::from_str(&run.stdout())?;
    let busy_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "busy host: run took {busy_secs:.1} s with {cores} busy loops against {quiet_secs:.1} s \
         without ({:.1}x); baseline re-taken: {}",
        busy_secs / quiet_secs.max(0.001),
        report["throttle_baseline_retaken"]
    );
    for line in run.stderr().lines().filter(|l| {
        ["throttl", "phase", "progress", "rebuilt", "copies allowed"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!("{line}");
    }
    let why = report["throttle_baseline_retaken"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("not ours"),
        "the report says the baseline was re-taken and why: {report}\n{}",
        run.stderr_tail()
    );
    let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    assert_eq!(rows, ROWS as i64);
    env.drop_all().await
}
