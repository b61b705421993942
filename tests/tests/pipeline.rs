//! End-to-end behaviour of `schemashift run` against real PostgreSQL clusters
//! (source and target are separate clusters), driven through the real binary.

use schemashift_lab::load::{start_load, LoadOptions, LoadStats};
use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{
    assert_verified_no_diffs, connect, schemashift, schemashift_bin, schemashift_ok,
    schemashift_to_failpoint, slot_and_publication_count, table_diff, unrestored_index_count,
    users_env, users_index_names, write_spec, TestEnv,
};
use std::process::{Command, Stdio};

/// The scenario target's primary key and unique constraint, as (name, contype).
const USERS_KEY_CONSTRAINTS: [(&str, &str); 2] = [("users_email_key", "u"), ("users_pkey", "p")];

/// Primary key and unique constraints of the target's `users`, as (name, contype).
async fn key_constraints(t: &tokio_postgres::Client) -> anyhow::Result<Vec<(String, String)>> {
    Ok(t.query(
        "SELECT conname::text, contype::text FROM pg_constraint \
         WHERE conrelid = 'public.users'::regclass AND contype IN ('p', 'u') ORDER BY 1",
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

#[tokio::test]
async fn concurrent_writes_during_backfill_all_reach_the_target() -> anyhow::Result<()> {
    let env = users_env("concurrent_writes", 30_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &format!(
            "{}cutover:\n  switch_command: touch {}\n",
            users_spec_yaml(&env.source_dsn, &env.target_dsn, 3, Some(4_000)),
            dir.path().join("switched").display()
        ),
    )?;
    let (report, stats) = run_to_cutover_under_load(&env.source_dsn, &spec, 400).await?;
    assert_eq!(report["phase"], "cut_over");
    // Strategy auto measured both ways on the servers and kept the faster.
    let t = &report["tables"][0];
    let (copy, fdw) = (
        t["measured_rows_per_s"]["copy"].as_f64().unwrap_or(0.0),
        t["measured_rows_per_s"]["fdw"].as_f64().unwrap_or(0.0),
    );
    assert!(copy > 0.0 && fdw > 0.0, "{t}");
    assert_eq!(
        t["strategy"],
        // fdw only when clearly faster (see `fdw::Speeds::faster`).
        if fdw > copy * 1.25 { "fdw" } else { "copy" },
        "{t}"
    );
    assert!(
        dir.path().join("switched").exists(),
        "switch_command runs during the cutover"
    );
    assert!(
        stats.inserts > 0 && stats.updates > 0 && stats.deletes > 0,
        "the load wrote: {stats:?}"
    );
    assert_eq!(stats.failed, 0, "application writes must wait, not fail");
    assert_verified_no_diffs(&env, &spec).await?;
    // The name indexes were dropped for the backfill and built again after it.
    let indexes = users_index_names(&connect(&env.target_dsn).await?).await?;
    assert_eq!(
        indexes,
        [
            "users_email_key",
            "users_first_name_idx",
            "users_first_name_last_name_idx",
            "users_last_name_idx",
            "users_pkey"
        ]
    );
    // The key and the unique constraint were dropped too, and are back on their rebuilt indexes.
    assert_eq!(
        key_constraints(&connect(&env.target_dsn).await?).await?,
        USERS_KEY_CONSTRAINTS.map(|(n, k)| (n.to_owned(), k.to_owned()))
    );
    let c = schemashift(&["cleanup", &spec])?;
    assert!(c.status.success());
    assert_eq!(
        slot_and_publication_count(&env.source_dsn).await?,
        (0, 0),
        "cleanup leaves no slot or publication"
    );
    env.drop_all().await
}

#[tokio::test]
async fn update_that_leaves_a_toasted_bio_unchanged_keeps_it_in_the_target() -> anyhow::Result<()> {
    let env = users_env("toast_unchanged", 2_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, None),
    )?;
    let s = connect(&env.source_dsn).await?;
    let big: String = (0..400)
        .map(|i| format!("{:x}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let id: i64 = s
        .query_one("INSERT INTO users (email, full_name, bio) VALUES ('toast@example.com', 'Ada Lovelace', $1) RETURNING id", &[&big])
        .await?
        .get(0);
    schemashift_ok(&["run", &spec, "--until", "backfill"])?;
    // pgoutput sends the untouched, out-of-line bio as "unchanged TOAST".
    s.execute(
        "UPDATE users SET full_name = 'Ada King Lovelace', updated_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    schemashift_ok(&["run", &spec])?;
    let t = connect(&env.target_dsn).await?;
    let row = t
        .query_one(
            "SELECT first_name, last_name, bio FROM users WHERE id = $1",
            &[&id],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "Ada King");
    assert_eq!(row.get::<_, String>(1), "Lovelace");
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some(big.as_str())
    );
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn run_killed_mid_backfill_resumes_without_copying_a_shard_twice() -> anyhow::Result<()> {
    killed_mid_backfill_and_resumed("kill_mid_backfill", "auto").await
}

#[tokio::test]
async fn fdw_run_killed_mid_backfill_resumes_without_copying_a_shard_twice() -> anyhow::Result<()> {
    killed_mid_backfill_and_resumed("fdw_kill_mid_backfill", "fdw").await
}

/// kill -9 once some shards (by `strategy`) have committed, then resume: every row once.
async fn killed_mid_backfill_and_resumed(name: &str, strategy: &str) -> anyhow::Result<()> {
    let env = users_env(name, 200_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(10_000)).replace(
            "    key: id\n",
            &format!("    key: id\n    strategy: {strategy}\n"),
        ),
    )?;
    let mut child = Command::new(schemashift_bin())
        .args(["run", &spec])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Kill once some, but not all, shards have committed.
    let t = connect(&env.target_dsn).await?;
    let mut done = 0i64;
    // Throttling may hold the copies back on a busy machine: wait by the clock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        done = t
            .query_one(
                "SELECT CASE WHEN to_regclass('schemashift.shards') IS NULL THEN 0 ELSE \
                 (SELECT count(*) FROM schemashift.shards WHERE state = 'done') END",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if done >= 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    assert!(done >= 3, "the run never got going");
    let total: i64 = t
        .query_one("SELECT count(*) FROM schemashift.shards", &[])
        .await?
        .get(0);
    assert!(
        done < total,
        "kill came too late to test a resume ({done} of {total} done)"
    );

    let out = schemashift(&["run", &spec, "--json"])?;
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["resumed"], true);
    let s = connect(&env.source_dsn).await?;
    let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    let copied: i64 = t
        .query_one("SELECT sum(rows)::bigint FROM schemashift.shards", &[])
        .await?
        .get(0);
    assert_eq!(rows, 200_000);
    assert_eq!(copied, rows, "each row copied exactly once");
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn run_crashed_after_index_builds_resumes_and_puts_key_and_unique_constraints_back(
) -> anyhow::Result<()> {
    let env = users_env("crash_index_rebuild", 20_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(5_000)),
    )?;
    // Aborts (like kill -9) when the unique indexes are built but their constraints are
    // not attached yet.
    schemashift_to_failpoint(
        &["run", &spec, "--until", "backfill"],
        "indexes-built-constraints-not-attached",
    )?;
    let t = connect(&env.target_dsn).await?;
    assert!(
        key_constraints(&t).await?.is_empty(),
        "the crash came before the constraints were attached"
    );
    schemashift_ok(&["run", &spec, "--until", "cutover", "--json"])?;
    assert_eq!(
        key_constraints(&t).await?,
        USERS_KEY_CONSTRAINTS.map(|(n, k)| (n.to_owned(), k.to_owned()))
    );
    let pending = unrestored_index_count(&t).await?;
    assert_eq!(pending, 0, "every recorded index is marked restored");
    schemashift_ok(&["verify", &spec])?;
    let s = connect(&env.source_dsn).await?;
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn status_reports_progress_and_rollback_before_cutover_removes_slot_and_state(
) -> anyhow::Result<()> {
    let env = users_env("status_rollback", 5_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(1_000)),
    )?;
    let none = schemashift_ok(&["status", &spec, "--json"])?;
    let none: serde_json::Value = serde_json::from_slice(&none.stdout)?;
    assert_eq!(none["phase"], "none");

    let run = schemashift_ok(&["run", &spec, "--until", "backfill", "--json"])?;
    let run: serde_json::Value = serde_json::from_slice(&run.stdout)?;
    // Strategy auto does not measure a table no bigger than its 20,000-row sample.
    let t = &run["tables"][0];
    assert!(t["measured_rows_per_s"].is_null(), "{t}");
    assert_eq!(t["strategy"], "copy", "{t}");
    let s = connect(&env.source_dsn).await?;
    s.batch_execute("UPDATE users SET full_name = 'Grace Hopper' WHERE id <= 10")
        .await?;
    let st = schemashift_ok(&["status", &spec, "--json"])?;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    assert_eq!(st["phase"], "replay");
    assert_eq!(st["shards"]["pending"], 0);
    assert_eq!(st["shards"]["rows_done"], 5_000);
    assert!(st["shards"]["done"].as_i64().unwrap_or(0) >= 5);
    assert_eq!(
        st["slot"]["exists"], true,
        "the slot holds changes until replay"
    );

    schemashift_ok(&["rollback", &spec])?;
    assert_eq!(slot_and_publication_count(&env.source_dsn).await?, (0, 0));
    let t = connect(&env.target_dsn).await?;
    let ctl: bool = t
        .query_one("SELECT to_regnamespace('schemashift') IS NOT NULL", &[])
        .await?
        .get(0);
    assert!(!ctl, "rollback drops the control state");
    let after = schemashift_ok(&["status", &spec, "--json"])?;
    let after: serde_json::Value = serde_json::from_slice(&after.stdout)?;
    assert_eq!(after["phase"], "none");
    env.drop_all().await
}

/// `run SPEC --until cutover --json` while the application load writes to the source at
/// `rate` ops/s; the run must succeed. Its report, and what the load did.
async fn run_to_cutover_under_load(
    source_dsn: &str,
    spec: &str,
    rate: u32,
) -> anyhow::Result<(serde_json::Value, LoadStats)> {
    let load = start_load(
        source_dsn.to_owned(),
        LoadOptions {
            rate_per_sec: rate,
            ..LoadOptions::default()
        },
    )
    .await?;
    let spec_s = spec.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        schemashift(&["run", &spec_s, "--until", "cutover", "--json"])
    })
    .await??;
    let stats = load.stop().await;
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((serde_json::from_slice(&out.stdout)?, stats))
}

/// The postgres_fdw servers on the target.
async fn foreign_servers(target_dsn: &str) -> anyhow::Result<i64> {
    Ok(connect(target_dsn)
        .await?
        .query_one("SELECT count(*) FROM pg_foreign_server", &[])
        .await?
        .get(0))
}

#[tokio::test]
async fn fdw_strategy_migrates_under_write_load_with_zero_diffs_and_cleanup_drops_its_server(
) -> anyhow::Result<()> {
    let env = users_env("fdw_strategy", 12_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(3_000))
            .replace("    key: id\n", "    key: id\n    strategy: fdw\n"),
    )?;
    let plan: serde_json::Value =
        serde_json::from_slice(&schemashift_ok(&["plan", &spec, "--json"])?.stdout)?;
    assert_eq!(plan["tables"][0]["strategy"], "fdw", "{plan}");
    assert_eq!(
        foreign_servers(&env.target_dsn).await?,
        0,
        "plan writes nothing"
    );
    let (report, stats) = run_to_cutover_under_load(&env.source_dsn, &spec, 300).await?;
    assert_eq!(stats.failed, 0);
    assert!(
        report["rows_copied"].as_i64().unwrap_or(0) >= 12_000,
        "{report}"
    );
    assert_eq!(foreign_servers(&env.target_dsn).await?, 1);
    assert_verified_no_diffs(&env, &spec).await?;
    schemashift_ok(&["cleanup", &spec])?;
    assert_eq!(
        foreign_servers(&env.target_dsn).await?,
        0,
        "cleanup drops the server, its user mapping and foreign tables"
    );
    env.drop_all().await
}

#[tokio::test]
async fn table_change_log_is_analyzed_as_it_grows_so_replay_reads_it_by_index() -> anyhow::Result<()>
{
    let env = users_env("change_log_analyzed", 12_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, None),
    )?;
    schemashift_ok(&["run", &spec, "--until", "backfill"])?;
    // One statement, 11,000 changes: past the size where capture analyzes the log.
    connect(&env.source_dsn)
        .await?
        .batch_execute("UPDATE public.users SET bio = bio || '.' WHERE id <= 11000")
        .await?;
    schemashift_ok(&["run", &spec, "--until", "verify"])?;
    let row = connect(&env.target_dsn)
        .await?
        .query_one(
            "SELECT analyze_count, autoanalyze_count, n_live_tup FROM pg_stat_user_tables \
             WHERE schemaname = 'schemashift' AND relname = 'changes'",
            &[],
        )
        .await?;
    let (analyzed, auto): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        analyzed >= 1,
        "capture analyzed the change log (autovacuum did {auto} times)"
    );
    schemashift_ok(&["verify", &spec])?;
    schemashift_ok(&["cleanup", &spec])?;
    env.drop_all().await
}

/// PostgreSQL 15 lets one session at a time use a replication origin: every replay session
/// (several workers, several runs on one cluster) must still get one of its own, or its
/// writes would not be marked as ours.
#[tokio::test]
async fn every_replay_session_gets_a_replication_origin_of_its_own() -> anyhow::Result<()> {
    let env = TestEnv::new("origins").await?;
    let mut sessions = Vec::new();
    for i in 0..3 {
        let c = connect(&env.target_dsn).await?;
        assert!(
            schemashift_common::pg::mark_origin(&c, "forward").await,
            "session {i} got no origin"
        );
        sessions.push(c);
    }
    drop(sessions);
    // Their origins are free again for the next sessions; no more are made than ran at once.
    let again = connect(&env.target_dsn).await?;
    assert!(schemashift_common::pg::mark_origin(&again, "forward").await);
    let admin = connect(&env.target_admin_dsn()).await?;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'schemashift\\_forward\\_%'",
            &[],
        )
        .await?
        .get(0);
    assert!((3..=64).contains(&n), "{n} origins");
    env.drop_all().await
}
