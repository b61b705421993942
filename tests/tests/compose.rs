//! docker-compose.yml cannot run here (no Docker engine), so this checks what it relies on:
//! every schemashift command in it parses with our CLI, ports and host names line up across
//! services, the spec it mounts is valid against real databases built from its SQL files.

use clap::Parser;
use schemashift::cli::Cli;
use schemashift_common::spec::{Changelog, Spec};
use schemashift_lab::scenario::{SOURCE_DDL, SPLIT_FUNCTIONS, TARGET_DDL};
use schemashift_tests::{connect, schemashift, write_spec, TestEnv};
use serde_norway::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compose() -> anyhow::Result<Value> {
    Ok(serde_norway::from_str(&std::fs::read_to_string(
        root().join("docker-compose.yml"),
    )?)?)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    &c["services"][name]
}

fn env_of<'a>(c: &'a Value, svc: &str, var: &str) -> Option<&'a str> {
    service(c, svc)["environment"][var].as_str()
}

/// The host-side `mount` target of a bind volume `./host:mount[:ro]`, as a repo path.
fn mounted(c: &Value, svc: &str, mount: &str) -> Option<PathBuf> {
    strings(&service(c, svc)["volumes"])
        .into_iter()
        .find_map(|v| {
            let mut parts = v.split(':');
            let (host, inside) = (parts.next()?, parts.next()?);
            (inside == mount).then(|| root().join(host))
        })
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[test]
fn compose_commands_parse_and_ports_line_up() -> anyhow::Result<()> {
    let c = compose()?;
    for s in [
        "source",
        "target",
        "kafka",
        "jaeger",
        "coordinator",
        "worker",
    ] {
        assert!(!service(&c, s).is_null(), "service {s} is defined");
    }
    assert!(
        strings(&service(&c, "source")["command"]).contains(&"wal_level=logical".to_owned()),
        "the source runs with wal_level=logical"
    );
    let coord = strings(&service(&c, "coordinator")["command"]);
    let worker = strings(&service(&c, "worker")["command"]);
    for cmd in [&coord, &worker] {
        let argv = std::iter::once("schemashift".to_owned()).chain(cmd.iter().cloned());
        Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{cmd:?}: {e}"))?;
    }
    let listen = flag(&coord, "--listen").unwrap_or_default();
    let port = listen.rsplit(':').next().unwrap_or_default();
    assert_eq!(
        flag(&worker, "--coordinator"),
        Some(format!("https://coordinator:{port}").as_str()),
        "workers dial the port the coordinator listens on, over TLS"
    );
    // Listening on every interface: TLS and the token, or the coordinator refuses to start.
    let certs = mounted(&c, "coordinator", "/certs").expect("the certificates are mounted");
    assert_eq!(mounted(&c, "worker", "/certs"), Some(certs.clone()));
    assert_eq!(flag(&coord, "--tls-cert"), Some("/certs/coordinator.pem"));
    assert_eq!(flag(&coord, "--tls-key"), Some("/certs/coordinator.key"));
    assert_eq!(flag(&worker, "--tls-ca"), Some("/certs/ca.pem"));
    // What deploy/make-certs.sh makes is what those flags name, and it verifies for the
    // host name the workers dial.
    let dir = tempfile::tempdir()?;
    let made = std::process::Command::new(root().join("deploy/make-certs.sh"))
        .arg(dir.path())
        .output()?;
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let verified = std::process::Command::new("openssl")
        .args(["verify", "-verify_hostname", "coordinator", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("coordinator.pem"))
        .output()?;
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(dir.path().join("coordinator.key").exists());
    assert!(strings(&service(&c, "coordinator")["ports"]).contains(&format!("{port}:{port}")));
    assert_eq!(
        service(&c, "worker")["deploy"]["replicas"].as_u64(),
        Some(3)
    );
    for svc in ["coordinator", "worker"] {
        assert_eq!(
            env_of(&c, svc, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("http://jaeger:4317")
        );
        assert!(
            env_of(&c, svc, "SCHEMASHIFT_TOKEN").is_some(),
            "{svc} gets the token"
        );
    }
    assert!(strings(&service(&c, "jaeger")["ports"]).contains(&"4317:4317".to_owned()));
    assert_eq!(
        env_of(&c, "kafka", "KAFKA_ADVERTISED_LISTENERS"),
        Some("PLAINTEXT://kafka:9092")
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile"))?;
    assert!(
        dockerfile.contains("--bin schemashift")
            && dockerfile.contains("ENTRYPOINT [\"schemashift\"]")
    );
    Ok(())
}

#[tokio::test]
async fn compose_spec_and_sql_are_valid_against_real_databases() -> anyhow::Result<()> {
    let c = compose()?;
    let coord = strings(&service(&c, "coordinator")["command"]);
    let spec_inside = coord.get(1).cloned().unwrap_or_default();
    let spec_path = mounted(&c, "coordinator", &spec_inside).expect("the spec is mounted");
    let text = std::fs::read_to_string(&spec_path)?;
    let spec = Spec::parse(&text.replace("${PGPASSWORD}", "pw"))?;
    assert_eq!(
        spec.source.expose(),
        "postgres://postgres:pw@source:5432/app"
    );
    assert_eq!(
        spec.target.expose(),
        "postgres://postgres:pw@target:5432/app_v2"
    );
    assert!(
        matches!(spec.changelog(), Ok(Changelog::Kafka(k)) if k.conn.brokers == ["kafka:9092"])
    );
    let trimmed: Vec<String> = spec.functions.iter().map(|f| f.trim().to_owned()).collect();
    assert_eq!(trimmed, SPLIT_FUNCTIONS.map(|f| f.trim().to_owned()));

    let source_sql = std::fs::read_to_string(
        mounted(&c, "source", "/docker-entrypoint-initdb.d/10-source.sql").expect("source init"),
    )?;
    let target_sql = std::fs::read_to_string(
        mounted(&c, "target", "/docker-entrypoint-initdb.d/10-target.sql").expect("target init"),
    )?;
    assert!(source_sql.contains(SOURCE_DDL) && target_sql.contains(TARGET_DDL));

    // The same spec, pointed at real databases built from the compose SQL, plans cleanly.
    let env = TestEnv::new("compose_spec").await?;
    connect(&env.source_dsn)
        .await?
        .batch_execute(&source_sql)
        .await?;
    connect(&env.target_dsn)
        .await?
        .batch_execute(&target_sql)
        .await?;
    let local = text
        .replace(
            "postgres://postgres:${PGPASSWORD}@source:5432/app",
            &env.source_dsn,
        )
        .replace(
            "postgres://postgres:${PGPASSWORD}@target:5432/app_v2",
            &env.target_dsn,
        )
        .replace("changelog: kafka://kafka:9092", "changelog: postgres");
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &local)?;
    let out = schemashift(&["plan", &spec])?;
    assert!(
        out.status.success(),
        "plan: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.drop_all().await
}
