//! Observability against real receivers: an OTLP trace receiver (a tonic server of the
//! OTLP trace service) for a distributed run, `status --json` from another process while a
//! run goes, and the Prometheus endpoint compared with the run's report.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{
    connect, free_port, local_listen, schemashift, spawn_workers, users_env, write_spec, Proc,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Ok(mut g) = self.got.lock() {
            g.push(r.into_inner());
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A received span, flattened: service, trace id, name, attributes as text.
#[derive(Debug)]
struct Span {
    service: String,
    trace: Vec<u8>,
    name: String,
    attrs: BTreeMap<String, String>,
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn spans(got: &[ExportTraceServiceRequest]) -> Vec<Span> {
    let mut out = Vec::new();
    for req in got {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(text)
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        trace: s.trace_id.clone(),
                        name: s.name.clone(),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(a)))
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn distributed_run_is_one_trace_with_a_span_per_shard_and_no_password() -> anyhow::Result<()>
{
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env = users_env("otel_trace", 12_000).await?;
    let dir = tempfile::tempdir()?;
    // The test role's DSNs carry its password (md5 auth).
    let password = schemashift_tests::TEST_PASSWORD;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(2_000)),
    )?;
    let (listen, url) = local_listen()?;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &schemashift_tests::coordinator_args(&spec, &listen, "verify", &[]),
        &otel,
    )?;
    let mut workers = spawn_workers(dir.path(), &url, &["t0", "t1"], &otel)?;
    assert!(
        coord.wait(LIMIT).await?.success(),
        "{}",
        coord.stderr_tail()
    );
    for w in workers.iter_mut() {
        assert!(
            w.wait(Duration::from_secs(30)).await?.success(),
            "{}",
            w.stderr_tail()
        );
    }
    // Both processes flushed their spans before exiting.
    let got = receiver.got.lock().map(|g| g.clone()).unwrap_or_default();
    server.abort();
    let all = spans(&got);
    let services: BTreeSet<&str> = all.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.contains("schemashift-coordinator") && services.contains("schemashift-worker"),
        "{services:?}"
    );
    let run = all
        .iter()
        .find(|s| s.name == "run" && s.service == "schemashift-coordinator")
        .expect("the coordinator's run span");
    let shard_spans: Vec<&Span> = all.iter().filter(|s| s.name == "shard").collect();
    let t = connect(&env.target_dsn).await?;
    let shards: i64 = t
        .query_one("SELECT count(*) FROM schemashift.shards", &[])
        .await?
        .get(0);
    assert_eq!(shard_spans.len() as i64, shards, "a span per shard");
    for s in &shard_spans {
        assert_eq!(s.trace, run.trace, "shard spans belong to the run's trace");
        assert_eq!(s.service, "schemashift-worker");
        assert!(s.attrs.contains_key("run_id") && s.attrs.contains_key("range"));
    }
    let rows: i64 = shard_spans
        .iter()
        .filter_map(|s| s.attrs.get("rows")?.parse::<i64>().ok())
        .sum();
    assert_eq!(rows, 12_000, "the shard spans' rows add up to the table");
    assert!(
        all.iter().any(|s| s.name == "rpc"
            && s.service == "schemashift-coordinator"
            && s.trace == run.trace),
        "the coordinator's handler spans continue the workers' trace (traceparent over gRPC)"
    );
    for s in &all {
        for (k, v) in &s.attrs {
            assert!(
                !v.contains(password),
                "password in span {} attribute {k}",
                s.name
            );
        }
    }
    assert!(!coord.stderr().contains(password) && !workers[0].stderr().contains(password));
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn status_json_from_another_process_shows_the_backfill_moving() -> anyhow::Result<()> {
    let env = users_env("status_moving", 150_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, Some(5_000)),
    )?;
    let mut run = Proc::spawn(
        dir.path(),
        "run",
        &["run", &spec, "--until", "backfill"],
        &[],
    )?;
    let mut seen: Vec<i64> = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    // Read status until two different non-zero progress values were seen mid-run.
    while seen.iter().collect::<BTreeSet<_>>().len() < 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no progress seen: {seen:?}"
        );
        let out = schemashift(&["status", &spec, "--json"])?;
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let rows = st["shards"]["rows_done"].as_i64().unwrap_or(0);
        if rows > 0 && rows < 150_000 {
            seen.push(rows);
        }
        if rows >= 150_000 {
            break;
        }
    }
    assert!(run.wait(LIMIT).await?.success(), "{}", run.stderr_tail());
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen.iter().collect::<BTreeSet<_>>().len() >= 2,
        "progress moves forward while the run goes: {seen:?}"
    );
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

/// name{labels} → value, from Prometheus text; fails on a malformed sample line.
fn parse_prometheus(body: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow::anyhow!("bad sample line {line:?}"))?;
        let ok_name = name.split('{').next().is_some_and(|n| {
            !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        anyhow::ensure!(ok_name, "bad metric name in {line:?}");
        out.insert(name.to_owned(), value.parse::<f64>()?);
    }
    Ok(out)
}

/// The status line and body of `GET path`.
async fn get(addr: &str, path: &str) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

async fn scrape(addr: &str) -> Option<String> {
    let (status, body) = get(addr, "/metrics").await?;
    status.starts_with("HTTP/1.1 200").then_some(body)
}

#[tokio::test]
async fn metrics_endpoint_parses_as_prometheus_and_matches_the_report() -> anyhow::Result<()> {
    let env = users_env("metrics", 20_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(2_500)),
    )?;
    let report_dir = dir.path().join("report");
    let rd = report_dir.to_string_lossy().into_owned();
    let out = schemashift(&[
        "run", &spec, "--until", "backfill", "--json", "--report", &rd,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report_dir.join("report.json"))?)?;
    assert_eq!(
        saved["rows_copied"], report["rows_copied"],
        "report.json is the report"
    );
    let md = std::fs::read_to_string(report_dir.join("report.md"))?;
    assert!(md.contains("| rows copied | 20000 in "), "{md}");
    // A coordinator with no workers holds the run still while we scrape it.
    let addr = format!("127.0.0.1:{}", free_port()?);
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut coord = Proc::spawn(
        dir.path(),
        "coordinator",
        &[
            "coordinator",
            &spec,
            "--listen",
            &listen,
            "--metrics-listen",
            &addr,
        ],
        &[],
    )?;
    let deadline = tokio::time::Instant::now() + LIMIT;
    // The coordinator moves the run from backfill (done) to replay and, with nothing to
    // replay, on to verify, where it waits for workers that never come.
    let mut last = None;
    let body = loop {
        if let Some(b) = scrape(&addr).await {
            if b.contains("schemashift_phase{phase=\"replay\"} 1")
                || b.contains("schemashift_phase{phase=\"verify\"} 1")
            {
                break b;
            }
            last = Some(b);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "metrics never answered with the run past the backfill; last answer: {last:?}; coordinator: {}",
            coord.stderr_tail()
        );
        tokio::task::yield_now().await;
    };
    let other = get(&addr, "/").await.map(|(status, _)| status);
    assert_eq!(other.as_deref(), Some("HTTP/1.1 404 Not Found"));
    coord.kill9().await?;
    let m = parse_prometheus(&body)?;
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    assert_eq!(
        get("schemashift_rows_copied_total"),
        report["rows_copied"].as_f64().unwrap_or(-1.0)
    );
    assert_eq!(
        get("schemashift_bytes_copied_total"),
        report["bytes_copied"].as_f64().unwrap_or(-1.0)
    );
    assert_eq!(
        get("schemashift_shards{state=\"done\"}"),
        report["shards"].as_f64().unwrap_or(-1.0)
    );
    assert_eq!(get("schemashift_shards{state=\"pending\"}"), 0.0);
    assert_eq!(
        get("schemashift_phase{phase=\"replay\"}") + get("schemashift_phase{phase=\"verify\"}"),
        1.0,
        "past the backfill, held for want of workers"
    );
    for k in [
        "schemashift_slot_lag_bytes",
        "schemashift_replay_lag_changes",
        "schemashift_freeze_ms",
        "schemashift_errors_total{kind=\"shard\"}",
    ] {
        assert!(m.contains_key(k), "{k} is exported");
    }
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}
