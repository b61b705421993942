//! Bad input of every kind: exit code 2, the culprit named, and nothing written
//! (no slot, no publication, no control schema, no rows).

use schemashift_lab::cluster::{Cluster, ClusterOptions};
use schemashift_lab::scenario::{load_users, users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::{connect, schemashift, slot_and_publication_count, write_spec, TestEnv};

/// Source and target databases with the users tables; the target is empty.
async fn users_tables(source_dsn: &str, target_dsn: &str) -> anyhow::Result<()> {
    let s = connect(source_dsn).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 500).await?;
    connect(target_dsn).await?.batch_execute(TARGET_DDL).await?;
    Ok(())
}

async fn assert_refused(
    env: &TestEnv,
    yaml: &str,
    source_dsn: &str,
    needles: &[&str],
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, yaml)?;
    for cmd in ["plan", "run"] {
        let out = schemashift(&[cmd, &spec])?;
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
    if let Ok(counts) = slot_and_publication_count(source_dsn).await {
        assert_eq!(counts, (0, 0), "no slot or publication");
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
    users_tables(&env.source_dsn, &env.target_dsn).await?;
    let good = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, None);

    // (what is wrong, the spec edit, what the message must name)
    let cases: [(&str, &str, &str, &[&str]); 11] = [
        (
            "unknown source column",
            "bio: bio",
            "bio: biography",
            &["biography", "\"bio\""],
        ),
        (
            "unknown source table",
            "source: public.users",
            "source: public.userz",
            &["userz", "does not exist"],
        ),
        (
            "unparseable expression",
            "split_last(full_name)",
            "split_last(full_name",
            &["last_name", "cannot parse"],
        ),
        (
            "expression that does not evaluate",
            "bio: bio",
            "bio: bio::int",
            &["\"bio\"", "does not evaluate"],
        ),
        (
            "unknown key column",
            "key: id",
            "key: email_hash",
            &["email_hash"],
        ),
        (
            "YAML typo",
            "key: id",
            "key: id\n    shard_rowz: 5",
            &["shard_rowz"],
        ),
        (
            "negative throttle allowance",
            "\ntables:",
            "\nthrottle:\n  probe_increase: -1\ntables:",
            &["throttle.probe_increase", "-1"],
        ),
        (
            "host CPU limit over 100%",
            "\ntables:",
            "\nthrottle:\n  max_host_cpu: 1.5\ntables:",
            &["throttle.max_host_cpu", "1.5"],
        ),
        (
            "replay batch of zero changes",
            "\ntables:",
            "\nreplay:\n  batch: 0\ntables:",
            &["replay.batch", "0"],
        ),
        (
            "unknown replay setting",
            "\ntables:",
            "\nreplay:\n  size: 10\ntables:",
            &["size"],
        ),
        (
            "key not mapped",
            "    columns:\n      id: id\n",
            "    columns:\n",
            &["\"id\"", "id: id"],
        ),
    ];
    for (what, from, to, needles) in cases {
        assert!(good.contains(from), "case {what}: the spec has no {from:?}");
        assert_refused(&env, &good.replace(from, to), &env.source_dsn, needles).await?;
    }
    // Unreachable database, with a password that must not be printed.
    let unreachable = good.replacen(
        &env.source_dsn,
        "postgres://postgres:s3cret@127.0.0.1:1/nowhere",
        1,
    );
    assert_refused(
        &env,
        &unreachable,
        "postgres://migrator@127.0.0.1:1/nowhere",
        &["127.0.0.1:1/nowhere"],
    )
    .await?;
    let out = schemashift(&["plan", "/nonexistent.yaml"])?;
    assert_eq!(out.status.code(), Some(2));
    // A non-empty target.
    connect(&env.target_dsn)
        .await?
        .batch_execute(
            "INSERT INTO users (id, email, first_name, last_name) VALUES (1, 'x@y', 'a', 'b')",
        )
        .await?;
    let dir = tempfile::tempdir()?;
    let out = schemashift(&["run", &write_spec(&dir, &good)?])?;
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
    schemashift_tests::migrator_and_app(&connect(&src.dsn("postgres")).await?).await?;
    let dsn = src
        .dsn("app")
        .replacen("postgres://postgres@", "postgres://migrator@", 1);
    users_tables(&dsn, &env.target_dsn).await?;
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

/// Inputs of distributed mode, the Kafka change log and merges: exit 2, culprit named.
#[tokio::test]
async fn bad_fleet_kafka_and_lookup_input_exits_2_naming_it() -> anyhow::Result<()> {
    let env = TestEnv::new("bad_fleet_input").await?;
    users_tables(&env.source_dsn, &env.target_dsn).await?;
    let good = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, None);
    // Nothing listens on port 1: the brokers cannot be reached.
    let unreachable = format!("{good}changelog: kafka://127.0.0.1:1\n");
    assert_refused(
        &env,
        &unreachable,
        &env.source_dsn,
        &["Kafka brokers 127.0.0.1:1"],
    )
    .await?;
    let bad_lookup = good.replacen(
        "    columns:\n",
        "    lookups:\n      - table: public.no_such_table\n        key: id\n    columns:\n",
        1,
    );
    assert_refused(
        &env,
        &bad_lookup,
        &env.source_dsn,
        &["lookups[0]", "no_such_table", "does not exist"],
    )
    .await?;
    // The FDW strategy reads one foreign table: it cannot serve a merge.
    let fdw_merge = bad_lookup.replacen(
        "    key: id
",
        "    key: id
    strategy: fdw
",
        1,
    );
    assert_refused(
        &env,
        &fdw_merge,
        &env.source_dsn,
        &[
            "table public.users",
            "strategy fdw cannot read lookup tables",
        ],
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &good)?;
    let out = schemashift(&["coordinator", &spec, "--listen", "not-an-address"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot listen on not-an-address"), "{err}");
    let missing = dir
        .path()
        .join("no-such-ca.pem")
        .to_string_lossy()
        .into_owned();
    let out = schemashift(&[
        "coordinator",
        &spec,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &missing,
        "--tls-key",
        &missing,
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no-such-ca.pem"), "{err}");
    let out = schemashift(&["worker", "--coordinator", "not a url"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("coordinator address not a url"), "{err}");
    assert_eq!(slot_and_publication_count(&env.source_dsn).await?, (0, 0));
    env.drop_all().await
}

#[tokio::test]
async fn coordinator_reachable_from_other_hosts_without_token_and_tls_refuses_to_start(
) -> anyhow::Result<()> {
    let env = TestEnv::new("exposed_coord").await?;
    users_tables(&env.source_dsn, &env.target_dsn).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, None),
    )?;
    let bin = schemashift_tests::schemashift_bin();
    // Neither, and a token alone (it would travel, with the passwords handed out, in clear).
    for token in [None, Some("a-token")] {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["coordinator", &spec, "--listen", "0.0.0.0:0"])
            .env("RUST_LOG", "warn")
            .env_remove("SCHEMASHIFT_TOKEN")
            .stdin(std::process::Stdio::null());
        if let Some(t) = token {
            cmd.env("SCHEMASHIFT_TOKEN", t);
        }
        let out = cmd.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "token {token:?}: {err}");
        assert!(
            err.contains("0.0.0.0:0")
                && err.contains("SCHEMASHIFT_TOKEN")
                && err.contains("--tls-cert"),
            "names the address and what to add: {err}"
        );
    }
    assert_eq!(slot_and_publication_count(&env.source_dsn).await?, (0, 0));
    assert!(
        !schemashift_tests::has_control_schema(&env.target_dsn).await?,
        "no control schema"
    );
    env.drop_all().await
}
