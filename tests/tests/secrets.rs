//! A password never reaches a statement's text: with `log_statement = 'all'` on a cluster
//! that asks for passwords (scram), a run with `strategy: fdw` (whose user mapping holds the
//! source password) leaves no trace of it in the server log or in our own output. The
//! password comes from `${ENV}` and has a space, both quotes, `@` and `/`, in a URL and in a
//! key=value connection string.

use schemashift_common::sql::quote_literal;
use schemashift_lab::cluster::{Cluster, ClusterOptions};
use schemashift_lab::scenario::{load_users, users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::{connect, schemashift_bin, table_diff, write_spec};

const SECRET: &str = "p a'ss\"w@rd/9";

#[tokio::test]
async fn password_stays_out_of_server_logs_and_output_with_the_fdw_strategy() -> anyhow::Result<()>
{
    let cluster = Cluster::start(ClusterOptions {
        // The fixture's own superuser gets in without a password; the migration role must
        // give its password over TCP, for sessions, replication and postgres_fdw alike.
        hba: Some(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all migrator 127.0.0.1/32 scram-sha-256\n\
             host replication migrator 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ..ClusterOptions::default()
    })
    .await?;
    let admin = connect(&cluster.dsn("postgres")).await?;
    admin
        .batch_execute(&format!(
            "CREATE ROLE migrator LOGIN SUPERUSER REPLICATION PASSWORD {}",
            quote_literal(SECRET)
        ))
        .await?;
    for db in ["old_app", "new_app"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
    }
    // Every statement logged from here on (the fixture's CREATE ROLE above holds the
    // password by necessity).
    admin
        .batch_execute("ALTER SYSTEM SET log_statement = 'all'")
        .await?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;
    loop {
        let fresh = connect(&cluster.dsn("postgres")).await?;
        let v: String = fresh.query_one("SHOW log_statement", &[]).await?.get(0);
        if v == "all" {
            break;
        }
        tokio::task::yield_now().await;
    }
    let s = connect(&cluster.dsn("old_app")).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 4_000).await?;
    connect(&cluster.dsn("new_app"))
        .await?
        .batch_execute(TARGET_DDL)
        .await?;

    let port = cluster.port();
    let source = format!("postgres://migrator:${{MIGRATOR_PW}}@127.0.0.1:{port}/old_app");
    let target = format!(
        "host=127.0.0.1 port={port} dbname=new_app user=migrator password=${{MIGRATOR_PW}}"
    );
    let dir = tempfile::tempdir()?;
    let yaml = users_spec_yaml(&source, &target, 2, Some(1_000))
        .replace("    key: id\n", "    key: id\n    strategy: fdw\n");
    let spec = write_spec(&dir, &format!("{yaml}throttle:\n  enabled: false\n"))?;
    let run = |args: &[&str]| {
        std::process::Command::new(schemashift_bin())
            .args(args)
            .env("MIGRATOR_PW", SECRET)
            .env("RUST_LOG", "debug")
            .stdin(std::process::Stdio::null())
            .output()
    };
    let out = run(&["run", &spec, "--until", "verify", "--json"])?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let t = connect(&cluster.dsn("new_app")).await?;
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    // The fdw path was taken, and its user mapping holds the password (so the test would
    // see it if it leaked on the way there).
    let mapped: Vec<String> = t
        .query_one("SELECT umoptions FROM pg_user_mappings LIMIT 1", &[])
        .await?
        .get(0);
    assert!(
        mapped.iter().any(|o| o == &format!("password={SECRET}")),
        "{mapped:?}"
    );
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        log.contains("CREATE SERVER") && log.contains("DO $mapping$"),
        "the server log shows our statements"
    );
    for (what, text) in [
        ("server log", log.as_str()),
        ("stdout", &stdout),
        ("stderr", &stderr),
    ] {
        for piece in [SECRET, "p a'ss", "ss\"w@rd"] {
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(piece)).collect();
            assert!(lines.is_empty(), "{what} shows the password: {lines:#?}");
        }
    }
    let out = run(&["cleanup", &spec])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop((s, t, admin));
    cluster.stop().await?;
    Ok(())
}
