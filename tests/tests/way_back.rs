//! The cutover keeps its way back or refuses, and a run whose replication slot is replaced
//! behind its back stops instead of skipping changes.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, local_listen, schemashift, users_env, write_spec, Proc, TestEnv};
use std::time::{Duration, Instant};

const SOURCE_DDL: &str = "CREATE TABLE people (id bigint PRIMARY KEY, first text NOT NULL, \
     last text NOT NULL, nick text); \
     INSERT INTO people SELECT g, 'f' || g, 'l' || g, CASE WHEN g % 2 = 0 THEN 'n' || g END \
     FROM generate_series(1, 2000) g;";
const TARGET_DDL: &str = "CREATE TABLE people (id bigint PRIMARY KEY, name text NOT NULL);";

fn spec_yaml(env: &TestEnv, reverse: Option<bool>) -> String {
    let cutover = match reverse {
        Some(r) => format!("cutover:\n  reverse: {r}\n"),
        None => String::new(),
    };
    format!(
        "source: {}\ntarget: {}\nworkers: 2\nthrottle:\n  enabled: false\n{cutover}tables:\n  \
         - source: public.people\n    target: public.people\n    key: id\n    columns:\n      \
         id: id\n      name: first || ' ' || last\n",
        env.source_dsn, env.target_dsn
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn cutover_without_a_way_back_is_refused_unless_the_spec_gives_it_up() -> anyhow::Result<()> {
    let env = TestEnv::with_ddl("way_back", SOURCE_DDL, TARGET_DDL).await?;
    let dir = tempfile::tempdir()?;

    // With reverse sync wanted (the default), plan names both NOT NULL columns it could
    // not write back and refuses; the nullable one would only be a note.
    let strict = write_spec(&dir, &spec_yaml(&env, None))?;
    let out = schemashift(&["plan", &strict])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("first, last") && err.contains("reverse"),
        "{err}"
    );
    assert!(
        !err.contains("nick"),
        "a nullable column is not an error: {err}"
    );

    // Giving the way back up: plan lists the columns as a note, the run goes.
    let lax_path = dir.path().join("lax.yaml");
    std::fs::write(&lax_path, spec_yaml(&env, Some(false)))?;
    let lax = lax_path.to_string_lossy().into_owned();
    let out = schemashift(&["plan", &lax])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("note: no reverse sync"),
        "{}",
        stderr(&out)
    );
    let out = schemashift(&["run", &lax, "--until", "verify"])?;
    assert!(out.status.success(), "{}", stderr(&out));

    // The same run with reverse sync asked for again: the cutover refuses before freezing.
    let out = schemashift(&["cutover", &strict])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cutover refused, nothing was frozen or switched"),
        "{}",
        stderr(&out)
    );
    let status = schemashift(&["status", &lax, "--json"])?;
    let st: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(st["phase"], "verified", "nothing switched");
    connect(&env.source_dsn)
        .await?
        .batch_execute("INSERT INTO people VALUES (5000, 'still', 'writable', NULL)")
        .await?;

    // Said in the spec: the cutover goes, and its report does not claim reverse sync.
    let out = schemashift(&["cutover", &lax])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no reverse sync"),
        "the report says there is no way back: {}",
        stderr(&out)
    );
    let t = connect(&env.target_dsn).await?;
    let n: i64 = t
        .query_one("SELECT count(*) FROM people", &[])
        .await?
        .get(0);
    assert_eq!(n, 2001);
    schemashift(&["cleanup", &lax])?;
    env.drop_all().await
}

#[tokio::test]
async fn slot_dropped_and_recreated_mid_run_stops_the_run_naming_the_slot() -> anyhow::Result<()> {
    let env = users_env("slot_recreated", 5_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(1_000)),
    )?;
    // A coordinator without workers: capture streams while the backfill waits.
    let (listen, _) = local_listen()?;
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &["coordinator", &spec, "--listen", &listen],
        &[],
    )?;
    let admin = connect(&env.source_dsn).await?;
    let slot = loop {
        let r = admin
            .query_opt(
                "SELECT s.slot_name::text FROM pg_replication_slots s \
                 JOIN pg_stat_activity a ON a.pid = s.active_pid \
                 WHERE s.database = current_database() AND a.backend_type = 'walsender'",
                &[],
            )
            .await?;
        if let Some(r) = r {
            break r.get::<_, String>(0);
        }
        anyhow::ensure!(coord.is_running(), "{}", coord.stderr_tail());
        tokio::task::yield_now().await;
    };
    // As a failover or an operator would: the slot goes and a new one of the same name
    // comes, later in the WAL; writes happen in between.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
            ))
            .await?;
        let dropped = admin
            .batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
            .await;
        if dropped.is_ok() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "slot never dropped: {dropped:?}");
        tokio::task::yield_now().await;
    }
    admin
        .batch_execute("UPDATE users SET bio = 'lost between the slots' WHERE id % 100 = 1")
        .await?;
    admin
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
        ))
        .await?;
    let status = coord.wait(Duration::from_secs(60)).await?;
    assert!(!status.success(), "the run must not go on");
    let err = coord.stderr();
    assert!(
        err.contains(&format!("replication slot {slot}"))
            || err.contains(&format!("replication slot \"{slot}\"")),
        "the error names the slot: {}",
        coord.stderr_tail()
    );
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}
