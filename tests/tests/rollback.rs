//! After the cutover: target writes flow back into the old schema (reverse sync), and a
//! rollback switches back losing nothing; a freeze that cannot get its locks aborts
//! cleanly and leaves the source writable.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, schemashift, table_diff, users_env, write_spec, Proc};
use std::time::Duration;

fn ok(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let out = schemashift(args)?;
    anyhow::ensure!(
        out.status.success(),
        "schemashift {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Application writes in the new schema (names without inner spaces in last names, so the
/// split of the rebuilt full name gives them back).
const TARGET_WRITES_1: &str = "
    INSERT INTO users (email, first_name, last_name, bio) VALUES
      ('after1@example.com', 'Grace Brewster', 'Hopper', 'admiral'), ('after2@example.com', 'Cher', '', NULL);
    UPDATE users SET first_name = 'Ada', last_name = 'Lovelace' WHERE id % 10 = 3;
    UPDATE users SET bio = 'changed after cutover' WHERE id % 10 = 4;
    DELETE FROM users WHERE id % 10 = 5;";
const TARGET_WRITES_2: &str = "
    INSERT INTO users (email, first_name, last_name) VALUES ('after3@example.com', 'Alan', 'Turing');
    UPDATE users SET last_name = 'Hopper-Murray' WHERE email = 'after1@example.com';
    DELETE FROM users WHERE id % 10 = 6;";

#[tokio::test]
async fn target_writes_after_cutover_reach_the_old_schema_and_rollback_loses_nothing(
) -> anyhow::Result<()> {
    let env = users_env("reverse_sync", 5_000).await?;
    let dir = tempfile::tempdir()?;
    let switched_back = dir.path().join("switched-back");
    let spec = write_spec(
        &dir,
        &format!(
            "{}cutover:\n  switch_back_command: touch {}\n",
            users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(1_000)),
            switched_back.display()
        ),
    )?;
    let out = ok(&["run", &spec, "--until", "cutover", "--json"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["cutover"]["reverse_sync"], true, "{report}");
    let s = connect(&env.source_dsn).await?;
    let t = connect(&env.target_dsn).await?;
    t.batch_execute(TARGET_WRITES_1).await?;
    ok(&["reverse", &spec, "--once"])?;
    assert_eq!(
        table_diff(&s, &t).await?,
        (0, 0, 0),
        "reverse sync brought the target writes back"
    );
    let rebuilt: String = s
        .query_one(
            "SELECT full_name FROM users WHERE email = 'after1@example.com'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        rebuilt, "Grace Brewster Hopper",
        "the reverse mapping rebuilt full_name"
    );

    t.batch_execute(TARGET_WRITES_2).await?;
    let out = ok(&["rollback", &spec])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("switched back"), "{err}");
    assert!(switched_back.exists(), "switch_back_command ran");
    assert_eq!(
        table_diff(&s, &t).await?,
        (0, 0, 0),
        "rollback lost nothing"
    );
    let slots: i64 = t
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(slots, 0, "the reverse slot is gone after the rollback");
    env.drop_all().await
}

#[tokio::test]
async fn cutover_that_cannot_get_its_locks_aborts_and_leaves_the_source_writable(
) -> anyhow::Result<()> {
    let env = users_env("lock_abort", 3_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(1_000)),
    )?;
    ok(&["run", &spec])?;
    // A long transaction holds a lock that conflicts with the freeze.
    let blocker = connect(&env.source_dsn).await?;
    blocker
        .batch_execute("BEGIN; LOCK TABLE users IN SHARE MODE")
        .await?;
    let mut cut = Proc::spawn(dir.path(), "cutover", &["cutover", &spec], &[])?;
    let status = cut.wait(Duration::from_secs(120)).await?;
    assert_eq!(status.code(), Some(1), "{}", cut.stderr_tail());
    assert!(
        cut.stderr().contains("could not freeze"),
        "{}",
        cut.stderr_tail()
    );
    blocker.batch_execute("COMMIT").await?;
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(
        "SET lock_timeout = '2s'; INSERT INTO users (email, full_name) VALUES ('still@writable.example', 'Still Writable')",
    )
    .await?;
    let st = ok(&["status", &spec, "--json"])?;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    assert_ne!(
        st["phase"], "cut_over",
        "the aborted cutover switched nothing"
    );
    // With the blocker gone, the same cutover goes through.
    ok(&["cutover", &spec])?;
    ok(&["verify", &spec])?;
    assert_eq!(
        table_diff(&s, &connect(&env.target_dsn).await?).await?,
        (0, 0, 0)
    );
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn throttling_holds_shards_back_while_the_source_is_over_its_limit() -> anyhow::Result<()> {
    let env = users_env("throttle", 3_000).await?;
    let dir = tempfile::tempdir()?;
    // A limit no probe can meet: the source always counts as stressed.
    let spec = write_spec(
        &dir,
        &format!(
            "{}throttle:\n  probe_latency: 0s\n",
            users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(500))
        ),
    )?;
    let mut run = Proc::spawn(dir.path(), "run", &["run", &spec], &[])?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut throttled_reads = 0;
    while throttled_reads < 3 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never throttled");
        let st = schemashift(&["status", &spec, "--json"])?;
        let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        if st["throttled"] == true {
            assert!(
                st["throttle_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("probe read")),
                "{st}"
            );
            assert_eq!(
                st["shards"]["done"], 0,
                "no shard starts while throttled: {st}"
            );
            assert_eq!(st["shards"]["leased"], 0, "{st}");
            throttled_reads += 1;
        }
    }
    run.kill9().await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn throttling_holds_replay_while_the_source_is_over_its_limit() -> anyhow::Result<()> {
    let env = users_env("throttle_replay", 2_000).await?;
    let (plain_dir, held_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let yaml = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(500));
    let plain = write_spec(&plain_dir, &yaml)?;
    ok(&["run", &plain, "--until", "backfill"])?;
    // Written after the backfill: only replay brings these over.
    connect(&env.source_dsn)
        .await?
        .batch_execute(
            "INSERT INTO users (email, full_name) \
             SELECT 'late' || g || '@example.com', 'Late Writer' FROM generate_series(1, 300) g",
        )
        .await?;
    // The same run resumed with a limit no probe can meet.
    let held = write_spec(
        &held_dir,
        &format!("{yaml}throttle:\n  probe_latency: 0s\n"),
    )?;
    let mut run = Proc::spawn(
        held_dir.path(),
        "run",
        &["run", &held, "--until", "replay"],
        &[],
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut held_reads = 0;
    while held_reads < 4 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never held replay");
        let st = schemashift(&["status", &held, "--json"])?;
        let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        let logged = st["changes_logged"].as_i64().unwrap_or(0);
        if st["throttled"] == true && logged >= 300 {
            // Captured, not applied: without the hold 300 changes take one batch.
            assert_eq!(st["changes_applied"].as_i64(), Some(0), "{st}");
            assert!(run.is_running(), "the run finished while throttled");
            held_reads += 1;
        }
    }
    run.kill9().await?;
    // Released (the plain spec again), replay applies everything.
    ok(&["run", &plain, "--until", "verify"])?;
    let (s, t) = (
        connect(&env.source_dsn).await?,
        connect(&env.target_dsn).await?,
    );
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    schemashift(&["cleanup", &plain])?;
    env.drop_all().await
}

#[tokio::test]
async fn load_command_reports_percentiles_per_operation() -> anyhow::Result<()> {
    let env = users_env("load_command", 2_000).await?;
    // Without the explicit flag nothing is written.
    let refused = schemashift(&["load", &env.source_dsn, "--seconds", "1"])?;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-writes"));
    let out = ok(&[
        "load",
        &env.source_dsn,
        "--allow-writes",
        "--rate",
        "200",
        "--seconds",
        "2",
        "--json",
    ])?;
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(r["failed"], 0, "{r}");
    let ops = r["operations"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = ops.iter().filter_map(|o| o["op"].as_str()).collect();
    assert_eq!(names, ["read", "insert", "update", "delete"]);
    for o in &ops {
        assert!(o["count"].as_u64().unwrap_or(0) > 0, "{o}");
        assert!(o["p50_ms"].as_f64() <= o["p99_ms"].as_f64(), "{o}");
    }
    env.drop_all().await
}

#[tokio::test]
async fn bulk_sessions_run_at_the_lowest_priority_when_the_database_is_local() -> anyhow::Result<()>
{
    let env = users_env("low_priority", 10).await?;
    let bulk = connect(&env.source_dsn).await?;
    let app = connect(&env.source_dsn).await?;
    assert!(schemashift_common::pg::lower_priority(&bulk).await);
    // Field 19 of /proc/PID/stat (after the parenthesised name) is the nice value.
    let nice = |pid: i32| -> anyhow::Result<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        Ok(rest
            .split_whitespace()
            .nth(16)
            .unwrap_or_default()
            .parse()?)
    };
    let pid = "SELECT pg_backend_pid()";
    let bulk_pid: i32 = bulk.query_one(pid, &[]).await?.get(0);
    let app_pid: i32 = app.query_one(pid, &[]).await?.get(0);
    assert_eq!(nice(bulk_pid)?, 19);
    assert_eq!(nice(app_pid)?, 0, "other sessions keep their priority");
    let cgroups = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/cgroup"));
    if let Some(dir) = schemashift_common::idle_group::group() {
        // The idle class: the application's backends preempt ours as soon as they wake.
        assert_eq!(std::fs::read_to_string(dir.join("cpu.idle"))?.trim(), "1");
        assert!(cgroups(bulk_pid)?.contains("/schemashift-bulk\n"));
        assert!(!cgroups(app_pid)?.contains("schemashift-bulk"));
    } else if let Ok(group) = std::fs::read_to_string(format!("/proc/{bulk_pid}/autogroup")) {
        assert!(group.trim_end().ends_with("nice 19"), "{group}");
    }
    env.drop_all().await
}
