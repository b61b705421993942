//! Bad input of every kind: exit code 2, the culprit named, and nothing written
//! (no slot, no publication, no control schema, no rows).

use schemashift_common::cluster::{Cluster, ClusterOptions};
use schemashift_common::scenario::{load_users, users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::{connect, schemashift_bin, TestEnv};
use std::process::{Command, Stdio};

async fn assert_refused(
    env: &TestEnv,
    yaml: &str,
    source_dsn: &str,
    needles: &[&str],
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("spec.yaml");
    std::fs::write(&p, yaml)?;
    for cmd in ["plan", "run"] {
        let out = Command::new(schemashift_bin())
            .args([cmd, &p.to_string_lossy()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{cmd} must exit 2; stderr: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{cmd}: message should name {n:?}: {err}");
        }
        assert!(!err.contains("s3cret"), "password leaked: {err}");
    }
    if let Ok(s) = connect(source_dsn).await {
        let row = s
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()), (SELECT count(*) FROM pg_publication)",
                &[],
            )
            .await?;
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (0, 0),
            "no slot or publication"
        );
    }
    let t = connect(&env.target_dsn).await?;
    let ctl: bool = t
        .query_one("SELECT to_regnamespace('schemashift') IS NOT NULL", &[])
        .await?
        .get(0);
    assert!(!ctl, "no control schema");
    let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
    assert_eq!(rows, 0, "no rows written");
    Ok(())
}

#[tokio::test]
async fn bad_input_exits_2_names_the_culprit_and_writes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("bad_input").await?;
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 500).await?;
    connect(&env.target_dsn)
        .await?
        .batch_execute(TARGET_DDL)
        .await?;
    let good = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, None);
    let src = env.source_dsn.clone();

    assert_refused(
        &env,
        &good.replace("bio: bio", "bio: biography"),
        &src,
        &["biography", "\"bio\""],
    )
    .await?;
    assert_refused(
        &env,
        &good.replace("source: public.users", "source: public.userz"),
        &src,
        &["userz", "does not exist"],
    )
    .await?;
    assert_refused(
        &env,
        &good.replace("split_last(full_name)", "split_last(full_name"),
        &src,
        &["last_name", "cannot parse"],
    )
    .await?;
    assert_refused(
        &env,
        &good.replace("bio: bio", "bio: bio::int"),
        &src,
        &["\"bio\"", "does not evaluate"],
    )
    .await?;
    assert_refused(
        &env,
        &good.replace("key: id", "key: email_hash"),
        &src,
        &["email_hash"],
    )
    .await?;
    assert_refused(
        &env,
        &good.replace("key: id", "key: id\n    shard_rowz: 5"),
        &src,
        &["shard_rowz"],
    )
    .await?;
    assert_refused(
        &env,
        &good.replace("    columns:\n      id: id\n", "    columns:\n"),
        &src,
        &["\"id\"", "id: id"],
    )
    .await?;
    // Unreachable database, with a password that must not be printed.
    let unreachable = good.replacen(
        &env.source_dsn,
        "postgres://postgres:s3cret@127.0.0.1:1/nowhere",
        1,
    );
    assert_refused(
        &env,
        &unreachable,
        "postgres://postgres@127.0.0.1:1/nowhere",
        &["127.0.0.1:1/nowhere"],
    )
    .await?;
    // A non-empty target.
    let t = connect(&env.target_dsn).await?;
    t.batch_execute(
        "INSERT INTO users (id, email, first_name, last_name) VALUES (1, 'x@y', 'a', 'b')",
    )
    .await?;
    let out = Command::new(schemashift_bin())
        .args(["plan", "/nonexistent.yaml"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("spec.yaml");
    std::fs::write(&p, &good)?;
    let out = Command::new(schemashift_bin())
        .args(["run", &p.to_string_lossy()])
        .env("RUST_LOG", "warn")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    env.drop_all().await
}

#[tokio::test]
async fn source_without_logical_wal_level_is_refused_before_any_write() -> anyhow::Result<()> {
    let src = Cluster::start(ClusterOptions {
        wal_level: "replica".into(),
        ..ClusterOptions::default()
    })
    .await?;
    let env = TestEnv::new("wal_level").await?;
    let dsn = src.dsn("postgres");
    let s = connect(&dsn).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 100).await?;
    connect(&env.target_dsn)
        .await?
        .batch_execute(TARGET_DDL)
        .await?;
    assert_refused(
        &env,
        &users_spec_yaml(&dsn, &env.target_dsn, 2, None),
        &dsn,
        &["wal_level"],
    )
    .await?;
    env.drop_all().await?;
    src.stop().await?;
    Ok(())
}
