//! Tests of the spec: parsing, validation, environment expansion, change log options.

use super::*;

const SPEC: &str = r#"
source: postgres://app:${SS_TEST_PW}@127.0.0.1:5432/app
target: postgres://app@127.0.0.1:5433/app_v2
functions:
  - |
    CREATE FUNCTION f(n text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT n $$
tables:
  - source: public.users
    target: public.users
    key: id
    columns:
      id: id
      first_name: f(full_name)
cutover:
  max_lag: 500ms
"#;

#[test]
fn env_is_expanded_and_password_never_displayed() {
    std::env::set_var("SS_TEST_PW", "s3cret");
    let spec = Spec::parse(SPEC).expect("spec parses");
    assert!(spec.source.expose().contains("s3cret"));
    assert!(!format!("{spec:?}").contains("s3cret"));
    assert_eq!(spec.source.redacted(), "127.0.0.1:5432/app");
    assert_eq!(spec.cutover.max_lag, Duration::from_millis(500));
    assert!(spec.functions[0].contains("$$ SELECT n $$"));
    assert_eq!(
        spec.tables[0].columns.keys().collect::<Vec<_>>(),
        ["id", "first_name"]
    );
}

#[test]
fn env_values_inside_a_connection_string_stay_one_value() {
    let hostile = "p@ss w/rd'\\x?&sslmode=disable";
    std::env::set_var("SS_TEST_HOSTILE_PW", hostile);
    for (source, form) in [
        (
            "postgres://app:${SS_TEST_HOSTILE_PW}@127.0.0.1:5432/app",
            "url",
        ),
        (
            "host=127.0.0.1 user=app password=${SS_TEST_HOSTILE_PW} dbname=app",
            "key=value",
        ),
        (
            "host=127.0.0.1 user=app password='${SS_TEST_HOSTILE_PW}' dbname=app",
            "quoted key=value",
        ),
    ] {
        let yaml = SPEC.replacen("postgres://app:${SS_TEST_PW}@127.0.0.1:5432/app", source, 1);
        std::env::set_var("SS_TEST_PW", "x");
        let spec = Spec::parse(&yaml).unwrap_or_else(|e| panic!("{form}: {e}"));
        let info = spec.source.conninfo().expect("parses");
        assert_eq!(
            info.config.get_password(),
            Some(hostile.as_bytes()),
            "{form}"
        );
        assert_eq!(
            info.tls.mode,
            crate::conninfo::SslMode::Prefer,
            "{form}: nothing added"
        );
    }
}

#[test]
fn missing_env_names_the_variable() {
    let err =
        Spec::parse(&SPEC.replace("SS_TEST_PW", "SS_NOT_SET_ANYWHERE")).expect_err("must fail");
    assert!(err.to_string().contains("SS_NOT_SET_ANYWHERE"), "{err}");
}

#[test]
fn a_typo_in_a_key_is_rejected_with_its_name() {
    std::env::set_var("SS_TEST_PW", "x");
    let err = Spec::parse(
        &SPEC
            .replace("shard_rows", "x")
            .replace("key: id", "key: id\n    shard_row: 5"),
    )
    .expect_err("unknown field");
    assert!(err.to_string().contains("shard_row"), "{err}");
}

#[test]
fn every_problem_is_listed() {
    std::env::set_var("SS_TEST_PW", "x");
    let bad = SPEC
        .replace("key: id", "key: []\n    shard_rows: 0")
        .replace("changelog", "x");
    let bad = format!("{bad}changelog: nats://x\n");
    let err = Spec::parse(&bad).expect_err("invalid");
    let msg = err.to_string();
    assert!(msg.contains("key"), "{msg}");
    assert!(msg.contains("shard_rows"), "{msg}");
    assert!(msg.contains("changelog"), "{msg}");
}

mod changelog {
    use super::*;

    fn spec_with(changelog: &str) -> Spec {
        let yaml = format!(
            "source: postgres://a@h/db\ntarget: postgres://a@h/db2\nchangelog: {changelog:?}\n\
             tables:\n  - source: public.t\n    target: public.t\n    key: id\n    columns:\n      id: id\n"
        );
        serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn kafka_changelog_takes_brokers_and_options() {
        let c =
            spec_with("kafka://k1:9092,k2:9092?topic_prefix=mig.&replication_factor=3").changelog();
        assert_eq!(
            c,
            Ok(Changelog::Kafka(KafkaOptions {
                conn: crate::kafka_conn::KafkaConn {
                    brokers: vec!["k1:9092".into(), "k2:9092".into()],
                    security: Default::default(),
                },
                topic_prefix: "mig.".into(),
                replication_factor: 3,
            }))
        );
        let d = spec_with("kafka://k1:9092").changelog();
        assert!(
            matches!(d, Ok(Changelog::Kafka(o)) if o.topic_prefix == "schemashift." && o.replication_factor == 1)
        );
        for bad in [
            "kafka://",
            "kafka://k1",
            "kafka://k1:9092?partitions=3",
            "kafka://k1:9092?replication_factor=0",
            "kafka://k1:9092?topic_prefix=a/b",
            "rabbitmq://x",
        ] {
            assert!(spec_with(bad).changelog().is_err(), "{bad}");
        }
    }
}
