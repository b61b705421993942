//! `schemashift load SPEC|DSN`: the built-in application load on the users scenario,
//! on its own: reads by key, inserts, updates (some of TOASTed rows) and deletes at a set
//! rate, with latency percentiles per operation and failures counted.

use crate::load::{start_load, LatencyHistogram, LoadOptions, LoadStats};
use schemashift_common::spec::Spec;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub seconds: f64,
    pub ops_per_second: f64,
    pub failed: u64,
    pub longest_write_wait_ms: f64,
    pub operations: Vec<OpReport>,
}

fn op(name: &'static str, count: u64, h: &LatencyHistogram) -> OpReport {
    let ms = |us: u64| us as f64 / 1000.0;
    OpReport {
        op: name,
        count,
        p50_ms: ms(h.p50()),
        p95_ms: ms(h.p95()),
        p99_ms: ms(h.p99()),
        max_ms: ms(h.max()),
    }
}

pub fn report(stats: &LoadStats, seconds: f64) -> LoadReport {
    LoadReport {
        seconds,
        ops_per_second: (stats.ops() + stats.reads) as f64 / seconds.max(0.001),
        failed: stats.failed,
        longest_write_wait_ms: stats.max_write_wait.as_secs_f64() * 1000.0,
        operations: vec![
            op("read", stats.reads, &stats.read_us),
            op("insert", stats.inserts, &stats.insert_us),
            op("update", stats.updates, &stats.update_us),
            op("delete", stats.deletes, &stats.delete_us),
        ],
    }
}

/// The source DSN of a spec file, or the argument itself as a DSN.
fn dsn_of(arg: &str) -> Result<String, String> {
    if Path::new(arg).is_file() {
        return Spec::load(Path::new(arg))
            .map(|s| s.source.expose().to_owned())
            .map_err(|e| e.to_string());
    }
    Ok(arg.to_owned())
}

pub async fn load(arg: &str, rate: u32, reads: u8, seconds: Option<u64>, json: bool) -> i32 {
    let dsn = match dsn_of(arg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let opts = LoadOptions {
        rate_per_sec: rate,
        read_pct: reads,
        ..LoadOptions::default()
    };
    let handle = match start_load(dsn, opts).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "error: cannot start the load: {}",
                e.downcast_ref::<tokio_postgres::Error>()
                    .map_or_else(|| format!("{e:#}"), schemashift_common::pg::describe)
            );
            return 2;
        }
    };
    let t0 = std::time::Instant::now();
    match seconds {
        Some(s) => {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    let stats = handle.stop().await;
    let r = report(&stats, t0.elapsed().as_secs_f64());
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        eprintln!(
            "load: {:.0} ops/s for {:.1} s, {} failed, longest write wait {:.0} ms",
            r.ops_per_second, r.seconds, r.failed, r.longest_write_wait_ms
        );
        for o in &r.operations {
            eprintln!(
                "  {:<6} {:>8}  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                o.op, o.count, o.p50_ms, o.p95_ms, o.p99_ms, o.max_ms
            );
        }
    }
    i32::from(r.failed > 0)
}
