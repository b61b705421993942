//! The Kafka change log against a real Kafka-protocol broker (tansu) and real PostgreSQL:
//! distributed replay, a crash between Kafka's ack and the slot confirm, broker outages.

use schemashift_lab::load::{start_load, LoadOptions};
use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{
    assert_verified_no_diffs, connect, local_listen, schemashift, spawn_workers, users_env,
    write_spec, Broker, Proc, TestEnv,
};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);

fn kafka_spec(env: &TestEnv, broker: &Broker, workers: usize, shard_rows: u64) -> String {
    format!(
        "{}changelog: {}\n",
        users_spec_yaml(&env.source_dsn, &env.target_dsn, workers, Some(shard_rows)),
        broker.changelog()
    )
}

/// The run's status as JSON.
fn status(spec: &str) -> anyhow::Result<serde_json::Value> {
    let out = schemashift(&["status", spec, "--json"])?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Polls the control state until the run reaches `phase` (or later).
async fn until_phase(env: &TestEnv, phases: &[&str]) -> anyhow::Result<()> {
    let t = connect(&env.target_dsn).await?;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let p: Option<String> = t
            .query_opt(
                "SELECT phase FROM schemashift.run WHERE to_regclass('schemashift.run') IS NOT NULL",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        if p.as_deref().is_some_and(|p| phases.contains(&p)) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "never reached {phases:?}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn kafka_changelog_with_three_workers_under_write_load_has_zero_diffs() -> anyhow::Result<()>
{
    let broker = Broker::start().await?;
    let env = users_env("kafka_three_workers", 30_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &kafka_spec(&env, &broker, 3, 2_500))?;
    let (listen, url) = local_listen()?;
    let load = start_load(
        env.source_dsn.clone(),
        LoadOptions {
            rate_per_sec: 300,
            ..LoadOptions::default()
        },
    )
    .await?;
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &schemashift_tests::coordinator_args(&spec, &listen, "cutover", &[]),
        &[],
    )?;
    let mut workers = spawn_workers(dir.path(), &url, &["k0", "k1", "k2"], &[])?;
    let done = coord.wait(LIMIT).await?;
    let stats = load.stop().await;
    assert!(done.success(), "coordinator: {}", coord.stderr_tail());
    assert_eq!(stats.failed, 0, "application writes must wait, not fail");
    assert!(stats.updates > 0 && stats.deletes > 0, "{stats:?}");
    for w in workers.iter_mut() {
        assert!(
            w.wait(Duration::from_secs(30)).await?.success(),
            "{}",
            w.stderr_tail()
        );
    }
    let st = status(&spec)?;
    assert!(
        st["changelog"]
            .as_str()
            .is_some_and(|c| c.starts_with("kafka topic")),
        "{st}"
    );
    let parts = st["partitions"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        parts.len(),
        3,
        "one Kafka partition per replay partition: {st}"
    );
    assert!(
        st["changes_logged"].as_i64().unwrap_or(0) > 0,
        "changes went through Kafka: {st}"
    );
    assert_verified_no_diffs(&env, &spec).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn capture_killed_between_kafka_ack_and_slot_confirm_loses_nothing() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let env = users_env("kafka_crash_after_ack", 20_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &kafka_spec(&env, &broker, 2, 2_000))?;
    let load = start_load(
        env.source_dsn.clone(),
        LoadOptions {
            rate_per_sec: 300,
            ..LoadOptions::default()
        },
    )
    .await?;
    // Crashes right after Kafka acknowledged a batch, before the position and slot move.
    let mut crashing = Proc::spawn(
        dir.path(),
        "crashing-run",
        &["run", &spec],
        &[("SCHEMASHIFT_FAILPOINT", "capture-after-kafka-ack")],
    )?;
    let s = crashing.wait(LIMIT).await?;
    assert!(!s.success(), "the failpoint stops the run");
    assert!(
        crashing.stderr().contains("failpoint reached"),
        "{}",
        crashing.stderr_tail()
    );
    let mut resumed = Proc::spawn(
        dir.path(),
        "resumed-run",
        &["run", &spec, "--until", "cutover"],
        &[],
    )?;
    let s = resumed.wait(LIMIT).await?;
    let stats = load.stop().await;
    assert!(s.success(), "resumed run: {}", resumed.stderr_tail());
    assert_eq!(stats.failed, 0);
    // The acked batch went to Kafka twice; replay applied it once.
    let st = status(&spec)?;
    let logged = st["changes_logged"].as_i64().unwrap_or(0);
    let applied = st["changes_applied"].as_i64().unwrap_or(0);
    assert!(
        logged > applied,
        "re-sent duplicates are in Kafka ({logged} logged, {applied} applied)"
    );
    // What the topic holds up to where replay got: each change applied once, however often
    // it was sent (capture goes on after the cutover, so the heads may be further on).
    let topic = st["changelog"]
        .as_str()
        .and_then(|c| c.strip_prefix("kafka topic "))
        .unwrap_or_default()
        .to_owned();
    let replayed: std::collections::BTreeMap<u32, i64> = st["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let (head, at) = (p["head"].as_i64(), p["applied"].as_i64());
            assert!(head >= at, "the log's end is not behind replay: {p}");
            (p["partition"].as_u64().unwrap_or(0) as u32, at.unwrap_or(0))
        })
        .collect();
    let brokers = schemashift_common::kafka_conn::KafkaConn {
        brokers: vec![broker.changelog().trim_start_matches("kafka://").to_owned()],
        security: Default::default(),
    };
    let in_topic = schemashift_changelog::kafka::read_between(
        &brokers,
        &topic,
        &Default::default(),
        &replayed,
    )
    .await?;
    let mut distinct: Vec<_> = in_topic.iter().map(|c| (c.lsn, c.ordinal)).collect();
    distinct.sort();
    distinct.dedup();
    assert!(
        in_topic.len() > distinct.len(),
        "the re-sent batch is in the topic twice"
    );
    assert_eq!(distinct.len() as i64, applied, "each change applied once");
    assert_verified_no_diffs(&env, &spec).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn broker_paused_20s_during_backfill_and_replay_run_waits_and_completes() -> anyhow::Result<()>
{
    let broker = Broker::start().await?;
    let env = users_env("kafka_broker_outage", 60_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &kafka_spec(&env, &broker, 2, 5_000))?;
    let load = start_load(
        env.source_dsn.clone(),
        LoadOptions {
            rate_per_sec: 200,
            ..LoadOptions::default()
        },
    )
    .await?;
    let mut run = Proc::spawn(
        dir.path(),
        "run",
        &["run", &spec, "--until", "cutover"],
        &[],
    )?;
    let outage = Duration::from_secs(20);
    until_phase(&env, &["backfill"]).await?;
    broker.pause()?;
    tokio::time::sleep(outage).await; // the outage itself, not a wait for a condition
    broker.resume()?;
    until_phase(&env, &["replay", "verify", "verified"]).await?;
    broker.pause()?;
    tokio::time::sleep(outage).await;
    broker.resume()?;
    let s = run.wait(LIMIT).await?;
    let stats = load.stop().await;
    assert!(s.success(), "run: {}", run.stderr_tail());
    assert_eq!(stats.failed, 0);
    assert!(
        run.stderr().contains("retrying"),
        "the outage was noticed and retried: {}",
        run.stderr_tail()
    );
    assert_verified_no_diffs(&env, &spec).await?;
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

/// The URL's security options reach librdkafka: TLS against a broker that speaks plain
/// Kafka fails the plan (exit 2, nothing written), SASL without credentials in the
/// environment is refused naming the variables, and `security_protocol=plaintext` plans.
#[tokio::test]
async fn kafka_security_options_reach_the_client_and_missing_credentials_are_bad_input(
) -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let env = users_env("kafka_security", 500).await?;
    let dir = tempfile::tempdir()?;
    let base = users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(500));
    let plan = |query: &str, name: &str| -> anyhow::Result<std::process::Output> {
        let spec = dir.path().join(name);
        std::fs::write(
            &spec,
            format!("{base}changelog: {}?{query}\n", broker.changelog()),
        )?;
        Ok(
            std::process::Command::new(schemashift_tests::schemashift_bin())
                .args(["plan", &spec.to_string_lossy()])
                .env_remove(schemashift_common::kafka_conn::USERNAME_ENV)
                .env_remove(schemashift_common::kafka_conn::PASSWORD_ENV)
                .env("RUST_LOG", "warn")
                .output()?,
        )
    };
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let out = plan("security_protocol=ssl", "tls.yaml")?;
    assert_eq!(out.status.code(), Some(2), "{}", err(&out));
    assert!(
        err(&out).contains("cannot reach the Kafka brokers"),
        "{}",
        err(&out)
    );

    let out = plan(
        "security_protocol=sasl_plaintext&sasl_mechanism=SCRAM-SHA-512",
        "sasl.yaml",
    )?;
    assert_eq!(out.status.code(), Some(2), "{}", err(&out));
    for var in ["SCHEMASHIFT_KAFKA_USERNAME", "SCHEMASHIFT_KAFKA_PASSWORD"] {
        assert!(err(&out).contains(var), "names {var}: {}", err(&out));
    }

    let out = plan("security_protocol=ssl&sasl_mechanism=PLAIN", "mixed.yaml")?;
    assert_eq!(out.status.code(), Some(2), "{}", err(&out));
    assert!(
        err(&out).contains("sasl_mechanism needs security_protocol"),
        "{}",
        err(&out)
    );

    let out = plan("security_protocol=plaintext", "plain.yaml")?;
    assert!(out.status.success(), "{}", err(&out));

    assert!(
        !schemashift_tests::has_control_schema(&env.target_dsn).await?,
        "plan wrote nothing"
    );
    env.drop_all().await
}

/// The change log over TLS end to end: the broker is reached only through a TLS front whose
/// certificate our CA signed. A plaintext client and a wrong CA are refused before anything is
/// written; with the right CA, changes made after the backfill reach the target through Kafka.
#[tokio::test]
async fn kafka_changelog_over_tls_migrates_and_a_wrong_ca_or_plaintext_is_refused(
) -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    schemashift_tests::certs::make_ca_and_server_cert(certs.path(), "kafka")?;
    schemashift_tests::certs::make_ca_and_server_cert(certs.path(), "other")?;
    let broker = Broker::start_tls(certs.path(), "kafka").await?;
    let env = users_env("kafka_tls", 3_000).await?;
    let dir = tempfile::tempdir()?;
    let base = users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(1_000));
    let spec = |query: &str, name: &str| -> anyhow::Result<String> {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!("{base}changelog: {}{query}\n", broker.changelog_localhost()),
        )?;
        Ok(p.to_string_lossy().into_owned())
    };
    let ca = |name: &str| {
        certs
            .path()
            .join(format!("{name}-ca.crt"))
            .display()
            .to_string()
    };
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    for (query, name) in [
        (String::new(), "plain.yaml"),
        (
            format!("?security_protocol=ssl&ssl_ca={}", ca("other")),
            "wrong_ca.yaml",
        ),
    ] {
        let out = schemashift(&["plan", &spec(&query, name)?])?;
        assert_eq!(out.status.code(), Some(2), "{name}: {}", err(&out));
        assert!(
            err(&out).contains("cannot reach the Kafka brokers"),
            "{name}: {}",
            err(&out)
        );
        assert!(
            !schemashift_tests::has_control_schema(&env.target_dsn).await?,
            "{name}: nothing written"
        );
    }

    let good = spec(
        &format!("?security_protocol=ssl&ssl_ca={}", ca("kafka")),
        "tls.yaml",
    )?;
    let out = schemashift(&["run", &good, "--until", "backfill"])?;
    assert!(out.status.success(), "{}", err(&out));
    connect(&env.source_dsn)
        .await?
        .batch_execute(
            "UPDATE users SET bio = 'through kafka over tls' WHERE id % 3 = 0; \
             DELETE FROM users WHERE id % 11 = 0; \
             INSERT INTO users (email, full_name, bio) \
             SELECT 'tls' || i || '@example.com', 'Tee Ls', 'new' FROM generate_series(1, 50) i",
        )
        .await?;
    let out = schemashift(&["run", &good, "--until", "verify"])?;
    assert!(out.status.success(), "{}", err(&out));
    assert_verified_no_diffs(&env, &good).await?;
    env.drop_all().await
}
