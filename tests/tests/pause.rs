//! An operator's pause: nothing copied and nothing replayed while paused, capture going
//! on; a coordinator killed with -9 and restarted stays paused; after `resume` the run
//! completes with 0 differences; a pause after the cutover is refused.

use schemashift_lab::load::{start_load, LoadOptions};
use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{
    assert_verified_no_diffs, connect, schemashift, schemashift_ok, users_env, wait_shards_done,
    write_spec, Proc,
};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How long the test watches a paused run for movement.
const HELD: Duration = Duration::from_secs(4);
/// Long enough for the pause to be read (250 ms) and a copy or replay batch under way to
/// reach its next heartbeat.
const SETTLE: Duration = Duration::from_secs(3);

/// Rows committed on the target, changes applied by replay, changes captured.
async fn progress(t: &Client) -> anyhow::Result<(i64, i64, i64)> {
    let r = t
        .query_one(
            "SELECT (SELECT count(*) FROM users), \
             (SELECT coalesce(sum(applied), 0)::bigint FROM schemashift.replay), \
             (SELECT count(*) FROM schemashift.changes)",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Watches the paused run for [`HELD`] after [`SETTLE`]: rows and replay stand still,
/// capture goes on (the load keeps writing).
async fn stands_still(t: &Client, run: &mut Proc, what: &str) -> anyhow::Result<()> {
    let settled = Instant::now() + SETTLE;
    while Instant::now() < settled {
        anyhow::ensure!(run.is_running(), "{what}: {}", run.stderr_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = progress(t).await?;
    let pending: i64 = t
        .query_one(
            "SELECT count(*) FROM schemashift.shards WHERE state <> 'done'",
            &[],
        )
        .await?
        .get(0);
    assert!(pending > 0, "{what}: the pause landed mid-backfill");
    let end = Instant::now() + HELD;
    while Instant::now() < end {
        let now = progress(t).await?;
        assert_eq!(
            (now.0, now.1),
            (before.0, before.1),
            "{what}: rows copied or changes replayed while paused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = progress(t).await?;
    assert!(
        after.2 > before.2,
        "{what}: capture goes on while paused ({} then {} changes)",
        before.2,
        after.2
    );
    Ok(())
}

#[tokio::test]
async fn paused_run_moves_nothing_stays_paused_across_a_kill_and_completes_after_resume(
) -> anyhow::Result<()> {
    let env = users_env("pause", 150_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &format!(
            "{}throttle:\n  enabled: false\n",
            users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(2_000))
        ),
    )?;
    let load = start_load(
        env.source_dsn.clone(),
        LoadOptions {
            rate_per_sec: 200,
            ..LoadOptions::default()
        },
    )
    .await?;
    let args = ["run", spec.as_str(), "--until", "verify", "--json"];
    let mut run = Proc::spawn(dir.path(), "run", &args, &[])?;
    let t = connect(&env.target_dsn).await?;
    wait_shards_done(&t, 2, &mut run).await?;

    let out = schemashift_ok(&["pause", &spec])?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(said.contains("paused since"), "{said}");
    let status: serde_json::Value =
        serde_json::from_slice(&schemashift_ok(&["status", &spec, "--json"])?.stdout)?;
    assert!(
        status["paused"]["by_user"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
            && status["paused"]["by_host"]
                .as_str()
                .is_some_and(|h| !h.is_empty()),
        "status says who paused: {status}"
    );
    stands_still(&t, &mut run, "paused").await?;

    // Killed while paused and started again: it stays paused.
    run.kill9().await?;
    let mut run = Proc::spawn(dir.path(), "run-again", &args, &[])?;
    stands_still(&t, &mut run, "restarted while paused").await?;

    let out = schemashift_ok(&["resume", &spec])?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resumed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = run.wait(Duration::from_secs(180)).await?;
    let stats = load.stop().await;
    assert!(status.success(), "{}", run.stderr_tail());
    assert_eq!(stats.failed, 0);
    assert_verified_no_diffs(&env, &spec).await?;

    // After the cutover a pause has nothing to hold: refused, exit 2.
    schemashift_ok(&["cutover", &spec])?;
    let out = schemashift(&["pause", &spec])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("before the cutover only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    schemashift_ok(&["cleanup", &spec])?;

    // The history outlives cleanup: phases, the pause and resume with who and where, the
    // cutover's freeze, the cleanup.
    let history: serde_json::Value =
        serde_json::from_slice(&schemashift_ok(&["history", &spec, "--json"])?.stdout)?;
    let events = history.as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in ["planned", "phase", "pause", "resume", "cutover", "cleanup"] {
        assert!(kinds.contains(&k), "history has {k}: {kinds:?}");
    }
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "phase")
        .filter_map(|e| e["detail"]["phase"].as_str())
        .collect();
    for p in ["backfill", "replay", "verify", "verified", "cut_over"] {
        assert!(phases.contains(&p), "history has phase {p}: {phases:?}");
    }
    let pause = events.iter().find(|e| e["kind"] == "pause");
    assert!(
        pause.is_some_and(|p| p["by_user"].is_string() && p["by_host"].is_string()),
        "{pause:?}"
    );
    let cutover = events.iter().find(|e| e["kind"] == "cutover");
    assert!(
        cutover.is_some_and(|c| c["detail"]["freeze_ms"].as_f64().is_some_and(|f| f > 0.0)),
        "{cutover:?}"
    );
    connect(&env.target_dsn)
        .await?
        .batch_execute("DROP SCHEMA schemashift_history CASCADE")
        .await?;
    env.drop_all().await
}
