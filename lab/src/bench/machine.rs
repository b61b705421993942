//! What the report says about the machine, its PostgreSQL and the peers' tools.

use super::peers::on_path;
use super::Bench;
use crate::cluster::ClusterOptions;
use serde::Serialize;
use tokio::process::Command;
use tokio_postgres::Client;

/// Server settings the report quotes: the clusters' own plus what bulk loads depend on.
const SETTINGS: &str = "wal_level fsync synchronous_commit full_page_writes shared_buffers \
    max_wal_size work_mem maintenance_work_mem max_parallel_maintenance_workers max_worker_processes";

async fn version(program: &std::path::Path) -> Option<String> {
    let out = Command::new(program).arg("--version").output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// What the report says about this machine, its PostgreSQL and the peers' tools.
pub(super) async fn machine(b: &Bench, source: &Client) -> anyhow::Result<Machine> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let cpu = field(&read("/proc/cpuinfo"), "model name").unwrap_or_else(|| "unknown".into());
    let mem_kib: f64 = field(&read("/proc/meminfo"), "MemTotal")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let opts = ClusterOptions::default();
    let mut names: Vec<String> = SETTINGS.split_whitespace().map(String::from).collect();
    names.extend(opts.extra_conf.iter().map(|(k, _)| k.clone()));
    let rows = source
        .query(
            "SELECT n, current_setting(n) FROM unnest($1::text[]) WITH ORDINALITY AS s(n, i) \
             ORDER BY i",
            &[&names],
        )
        .await?;
    let postgres: String = source.query_one("SHOW server_version", &[]).await?.get(0);
    let pgcopydb = match on_path("pgcopydb") {
        Some(p) => version(&p).await,
        None => None,
    };
    Ok(Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        memory_gib: mem_kib / 1_048_576.0,
        postgres,
        psql: version(&b.psql).await.unwrap_or_else(|| "unknown".into()),
        pgcopydb,
        settings: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub postgres: String,
    pub psql: String,
    pub pgcopydb: Option<String>,
    /// Settings of `ClusterOptions::default()` clusters, as the server reports them.
    pub settings: Vec<(String, String)>,
}

impl Machine {
    /// Lines for the report's machine section.
    pub(super) fn describe(&self) -> Vec<String> {
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        vec![
            format!(
                "machine: {} cores ({}), {:.1} GiB memory",
                self.nproc, self.cpu, self.memory_gib
            ),
            format!(
                "PostgreSQL {} (clients: {}; pgcopydb: {})",
                self.postgres,
                self.psql,
                self.pgcopydb.as_deref().unwrap_or("not installed")
            ),
            format!(
                "clusters (ClusterOptions::default()): {}",
                settings.join(", ")
            ),
        ]
    }
}
