//! Two servers set up as managed services are: TLS only (`hostssl`, plain text rejected),
//! scram passwords, and a migration role with exactly the grants of docs/privileges.md on
//! each side (no superuser, no ownership on the source, an administrator's publication).
//! The users scenario goes end to end under write load with `sslmode=verify-full`: run,
//! cutover, writes on the target, rollback; the target's password comes from a `.pgpass`
//! file, the source's from `${ENV}`. Then a role authenticated by client certificate
//! (`cert`) migrates through every connection kind, the replication stream included, and
//! a coordinator with two workers migrates over the same servers with mutual TLS on gRPC.

use schemashift_common::pg::connect;
use schemashift_common::spec::Dsn;
use schemashift_lab::cluster::{Cluster, ClusterOptions};
use schemashift_lab::load::{start_load, LoadOptions};
use schemashift_lab::scenario::{load_users, users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::certs::{make_ca_and_server_cert, make_client_cert};
use schemashift_tests::{schemashift_bin, table_diff, Proc};
use std::path::Path;
use std::time::Duration;

async fn managed_cluster(certs: &Path) -> anyhow::Result<Cluster> {
    let file = |n: &str| std::fs::read(certs.join(n));
    Ok(Cluster::start(ClusterOptions {
        extra_conf: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), "'server.crt'".into()),
            ("ssl_key_file".into(), "'server.key'".into()),
            ("ssl_ca_file".into(), "'root.crt'".into()),
        ],
        files: vec![
            ("server.crt".into(), file("good-server.crt")?),
            ("server.key".into(), file("good-server.key")?),
            ("root.crt".into(), file("good-ca.crt")?),
        ],
        // The fixture's superuser for its own setup; the migration roles by password or
        // certificate; nothing in plain text over TCP.
        hba: Some(
            "local all all trust\n\
             hostssl all postgres 127.0.0.1/32 trust\n\
             hostssl all migrator 127.0.0.1/32 scram-sha-256\n\
             hostssl replication migrator 127.0.0.1/32 scram-sha-256\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl replication certuser 127.0.0.1/32 cert\n\
             hostnossl all all 0.0.0.0/0 reject\n\
             hostnossl replication all 0.0.0.0/0 reject\n"
                .into(),
        ),
        ..ClusterOptions::default()
    })
    .await?)
}

/// The fixture's own superuser session, over TLS.
async fn admin(c: &Cluster, db: &str, tls: &str) -> anyhow::Result<tokio_postgres::Client> {
    let dsn = format!("postgres://postgres@localhost:{}/{db}?{tls}", c.port());
    Ok(connect(&Dsn::new(dsn), "fixture").await?)
}

/// The source role of docs/privileges.md: no ownership, the administrator's publication.
fn source_grants(role: &str) -> String {
    format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON users TO {role}; \
         GRANT SELECT, UPDATE ON SEQUENCE users_id_seq TO {role}; \
         GRANT CREATE ON DATABASE app TO {role};"
    )
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<std::process::Output> {
    let mut cmd = std::process::Command::new(schemashift_bin());
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(sql, &[]).await?.get(0))
}

#[tokio::test]
async fn managed_style_servers_migrate_and_roll_back_with_least_privilege_roles_over_tls(
) -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    make_ca_and_server_cert(certs.path(), "good")?;
    make_client_cert(certs.path(), "good", "certuser")?;
    let (src, tgt) =
        tokio::try_join!(managed_cluster(certs.path()), managed_cluster(certs.path()))?;
    let ca = certs.path().join("good-ca.crt");
    let tls = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let (src_pw, tgt_pw) = ("src p@ss/'w\"ord", "tgt-secret-9");

    admin(&src, "postgres", &tls)
        .await?
        .batch_execute("CREATE DATABASE app")
        .await?;
    let s = admin(&src, "app", &tls).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 6_000).await?;
    s.batch_execute(&format!(
        "CREATE ROLE migrator LOGIN REPLICATION PASSWORD {pw}; CREATE ROLE certuser LOGIN REPLICATION; \
         {} {} CREATE PUBLICATION admin_pub FOR TABLE users",
        source_grants("migrator"),
        source_grants("certuser"),
        pw = schemashift_common::sql::quote_literal(src_pw),
    ))
    .await?;
    let admin_t = admin(&tgt, "postgres", &tls).await?;
    admin_t
        .batch_execute(&format!(
            "CREATE ROLE migrator LOGIN REPLICATION PASSWORD {}",
            schemashift_common::sql::quote_literal(tgt_pw)
        ))
        .await?;
    for db in ["app", "app_cert", "app_dist"] {
        admin_t
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        admin_t
            .batch_execute(&format!("GRANT CREATE ON DATABASE {db} TO migrator"))
            .await?;
        admin(&tgt, db, &tls)
            .await?
            .batch_execute(&format!(
                "{TARGET_DDL}; ALTER TABLE users OWNER TO migrator; \
                 GRANT CREATE ON SCHEMA public TO migrator"
            ))
            .await?;
    }
    let t = admin(&tgt, "app", &tls).await?;

    // The target's password from a .pgpass file, the source's from the environment.
    let dir = tempfile::tempdir()?;
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!("localhost:{}:*:migrator:{tgt_pw}\n", tgt.port()),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600))?;
    }
    let pgpass = pgpass.to_string_lossy().into_owned();
    let envs = [("SRC_PW", src_pw), ("PGPASSFILE", pgpass.as_str())];
    let source = format!(
        "postgres://migrator:${{SRC_PW}}@localhost:{}/app?{tls}",
        src.port()
    );
    let target = |db: &str| {
        format!(
            "host=localhost port={} dbname={db} user=migrator sslmode=verify-full sslrootcert={}",
            tgt.port(),
            ca.display()
        )
    };
    let yaml = format!(
        "{}source_publication: admin_pub\nthrottle:\n  enabled: false\n",
        users_spec_yaml(&source, &target("app"), 2, Some(1_000))
    );
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, &yaml)?;
    let spec = spec.to_string_lossy().into_owned();

    // Every right is there (the origin functions are optional and not granted).
    let out = run(&["plan", &spec, "--json"], &envs)?;
    ok(&out, "plan");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let missing = schemashift_tests::absent_privileges(&plan, None);
    assert!(
        missing
            .iter()
            .all(|m| *m == "EXECUTE on the replication origin functions"),
        "{missing:?}"
    );

    let load = start_load(
        format!("postgres://postgres@localhost:{}/app?{tls}", src.port()),
        LoadOptions {
            rate_per_sec: 200,
            ..LoadOptions::default()
        },
    )
    .await?;
    let out = run(&["run", &spec, "--until", "verify"], &envs);
    let stats = load.stop().await;
    ok(&out?, "run");
    assert_eq!(stats.failed, 0);
    ok(&run(&["cutover", &spec], &envs)?, "cutover");
    t.batch_execute(
        "UPDATE users SET bio = 'after the switch' WHERE id % 9 = 0; \
         DELETE FROM users WHERE id % 97 = 0; \
         INSERT INTO users (email, first_name, last_name) \
         SELECT 'new' || i || '@example.com', 'New', 'User' FROM generate_series(1, 20) i",
    )
    .await?;
    ok(&run(&["rollback", &spec], &envs)?, "rollback");
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    ok(&run(&["cleanup", &spec], &envs)?, "cleanup");
    assert_eq!(
        count(
            &s,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'admin_pub'"
        )
        .await?,
        1,
        "the administrator's publication stays"
    );

    // A role authenticated by its client certificate, for sessions and the replication
    // stream alike (the target stays the password role).
    let cert = |f: &str| certs.path().join(f).display().to_string();
    let source = format!(
        "postgres://certuser@localhost:{}/app?{tls}&sslcert={}&sslkey={}",
        src.port(),
        cert("certuser.crt"),
        cert("certuser.key")
    );
    let yaml = format!(
        "{}source_publication: admin_pub\nthrottle:\n  enabled: false\n",
        users_spec_yaml(&source, &target("app_cert"), 2, Some(1_000))
    );
    let spec = dir.path().join("cert.yaml");
    std::fs::write(&spec, &yaml)?;
    let spec = spec.to_string_lossy().into_owned();
    ok(
        &run(&["run", &spec, "--until", "backfill"], &envs)?,
        "cert run",
    );
    s.batch_execute("UPDATE users SET bio = 'seen by the cert role' WHERE id % 5 = 0")
        .await?;
    ok(
        &run(&["run", &spec, "--until", "verify"], &envs)?,
        "cert verify",
    );
    let t2 = admin(&tgt, "app_cert", &tls).await?;
    assert_eq!(table_diff(&s, &t2).await?, (0, 0, 0));
    ok(&run(&["cleanup", &spec], &envs)?, "cert cleanup");

    // Distributed over the same servers: a coordinator and two workers, mutual TLS on gRPC
    // (workers prove themselves with a certificate, no token).
    make_ca_and_server_cert(certs.path(), "grpc")?;
    make_client_cert(certs.path(), "grpc", "worker")?;
    let source = format!(
        "postgres://migrator:${{SRC_PW}}@localhost:{}/app?{tls}",
        src.port()
    );
    let yaml = format!(
        "{}source_publication: admin_pub\nthrottle:\n  enabled: false\n",
        users_spec_yaml(&source, &target("app_dist"), 2, Some(1_000))
    );
    let spec = dir.path().join("dist.yaml");
    std::fs::write(&spec, &yaml)?;
    let spec = spec.to_string_lossy().into_owned();
    let port = schemashift_tests::free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let url = format!("https://localhost:{port}");
    let (srv_crt, srv_key, grpc_ca) = (
        cert("grpc-server.crt"),
        cert("grpc-server.key"),
        cert("grpc-ca.crt"),
    );
    let (w_crt, w_key) = (cert("worker.crt"), cert("worker.key"));
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &schemashift_tests::coordinator_args(
            &spec,
            &listen,
            "verify",
            &[
                "--tls-cert",
                &srv_crt,
                "--tls-key",
                &srv_key,
                "--tls-client-ca",
                &grpc_ca,
            ],
        ),
        &envs,
    )?;
    // The target's password comes from the workers' own .pgpass too.
    let mut workers = schemashift_tests::spawn_workers_with(
        dir.path(),
        &url,
        &["w1", "w2"],
        &[
            "--tls-ca",
            &grpc_ca,
            "--tls-cert",
            &w_crt,
            "--tls-key",
            &w_key,
        ],
        &envs,
    )?;
    let status = coord.wait(Duration::from_secs(180)).await?;
    assert!(status.success(), "coordinator: {}", coord.stderr_tail());
    for w in &mut workers {
        let st = w.wait(Duration::from_secs(30)).await?;
        assert!(st.success(), "{}: {}", w.name, w.stderr_tail());
    }
    let t3 = admin(&tgt, "app_dist", &tls).await?;
    assert_eq!(table_diff(&s, &t3).await?, (0, 0, 0));
    ok(&run(&["cleanup", &spec], &envs)?, "distributed cleanup");

    for c in [&s, &t] {
        assert_eq!(
            count(c, "SELECT count(*) FROM pg_replication_slots").await?,
            0,
            "no slot left"
        );
    }
    drop((s, t, t2, t3, admin_t));
    src.stop().await?;
    tgt.stop().await?;
    Ok(())
}
