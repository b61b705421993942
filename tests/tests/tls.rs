//! PostgreSQL as managed services deploy it: `ssl = on` with a certificate signed by a CA
//! the test creates, and `pg_hba.conf` accepting TLS connections only. Every connection
//! the run opens (sessions, the replication stream, the fdw probe) goes over TLS with
//! `sslmode=verify-full`; a wrong CA fails before anything is written.

use schemashift_common::pg::connect;
use schemashift_common::spec::Dsn;
use schemashift_lab::cluster::{Cluster, ClusterOptions};
use schemashift_lab::scenario::{load_users, users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::certs::make_ca_and_server_cert;
use schemashift_tests::{schemashift, table_diff, write_spec};
use std::path::Path;

async fn tls_cluster(dir: &Path) -> anyhow::Result<Cluster> {
    Ok(Cluster::start(ClusterOptions {
        extra_conf: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), "'server.crt'".into()),
            ("ssl_key_file".into(), "'server.key'".into()),
        ],
        files: vec![
            (
                "server.crt".into(),
                std::fs::read(dir.join("good-server.crt"))?,
            ),
            (
                "server.key".into(),
                std::fs::read(dir.join("good-server.key"))?,
            ),
        ],
        // TLS only over TCP, as managed services; the local socket stays for pg_ctl.
        hba: Some(
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl replication all 127.0.0.1/32 trust\n"
                .into(),
        ),
        ..ClusterOptions::default()
    })
    .await?)
}

/// The migration role's DSN (no superuser; owner of `app`).
fn dsn(c: &Cluster, db: &str, params: &str) -> String {
    format!("postgres://migrator@localhost:{}/{db}?{params}", c.port())
}

/// The fixture's superuser, for its own setup.
fn admin_dsn(c: &Cluster, params: &str) -> String {
    format!(
        "postgres://postgres@localhost:{}/postgres?{params}",
        c.port()
    )
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn tls_only_servers_migrate_with_verify_full_and_a_wrong_ca_writes_nothing(
) -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    make_ca_and_server_cert(certs.path(), "good")?;
    make_ca_and_server_cert(certs.path(), "other")?;
    let (src, tgt) = tokio::try_join!(tls_cluster(certs.path()), tls_cluster(certs.path()))?;
    let good = format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.path().join("good-ca.crt").display()
    );
    for (c, side) in [(&src, "source"), (&tgt, "target")] {
        let admin = connect(&Dsn::new(admin_dsn(c, &good)), side).await?;
        schemashift_tests::migrator_and_app(&admin).await?;
    }
    let s = connect(&Dsn::new(dsn(&src, "app", &good)), "source").await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 5_000).await?;
    let t = connect(&Dsn::new(dsn(&tgt, "app", &good)), "target").await?;
    t.batch_execute(TARGET_DDL).await?;
    // Our own sessions really are encrypted.
    let ssl: bool = s
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    assert!(ssl);

    let dir = tempfile::tempdir()?;
    // Plain text is refused by the server: exit 2, the host named, nothing written.
    let plain = write_spec(
        &dir,
        &users_spec_yaml(
            &dsn(&src, "app", "sslmode=disable"),
            &dsn(&tgt, "app", "sslmode=disable"),
            2,
            Some(1_000),
        ),
    )?;
    let out = schemashift(&["plan", &plain])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("localhost"), "{}", stderr(&out));

    // A CA that did not sign the server's certificate: refused the same way.
    let wrong = format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.path().join("other-ca.crt").display()
    );
    let spec_wrong = dir.path().join("wrong.yaml");
    std::fs::write(
        &spec_wrong,
        users_spec_yaml(
            &dsn(&src, "app", &wrong),
            &dsn(&tgt, "app", &wrong),
            2,
            Some(1_000),
        ),
    )?;
    let out = schemashift(&["run", &spec_wrong.to_string_lossy(), "--until", "backfill"])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("localhost") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    let slots: i64 = s
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    let schemas: i64 = t
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'schemashift'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!((slots, schemas), (0, 0), "nothing written on either side");

    // verify-full with the right CA: every connection of the run over TLS.
    let spec = dir.path().join("good.yaml");
    std::fs::write(
        &spec,
        users_spec_yaml(
            &dsn(&src, "app", &good),
            &dsn(&tgt, "app", &good),
            2,
            Some(1_000),
        ),
    )?;
    let spec = spec.to_string_lossy().into_owned();
    s.batch_execute("UPDATE users SET bio = 'before' WHERE id % 10 = 0")
        .await?;
    let out = schemashift(&["run", &spec, "--until", "backfill"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    // Changes after the backfill reach the target through the TLS replication stream.
    s.batch_execute("UPDATE users SET bio = 'after the backfill' WHERE id % 7 = 0")
        .await?;
    let out = schemashift(&["run", &spec, "--until", "verify", "--json"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["verify"]["differing"], serde_json::json!([]));
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    let out = schemashift(&["cleanup", &spec])?;
    assert!(out.status.success(), "{}", stderr(&out));
    drop((s, t));
    src.stop().await?;
    tgt.stop().await?;
    Ok(())
}
