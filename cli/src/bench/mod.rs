//! `schemashift bench`: schemashift side by side with its peers (raw binary COPY pipes,
//! postgres_fdw, pgcopydb, native logical replication) on one pair of throwaway clusters,
//! in one run, on this machine. It measures and reports; it never judges timings.

mod ours;
mod peers;

pub use peers::Machine;

use anyhow::Context;
use schemashift_common::cluster::{bin_dir, Cluster, ClusterOptions};
use schemashift_common::scenario::{load_users, SOURCE_DDL, TARGET_DDL};
use schemashift_common::sql::quote_ident;
use serde::Serialize;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use tokio_postgres::{Client, NoTls};

/// The source database on the source cluster.
const SOURCE_DB: &str = "app";

/// How the target's three secondary name indexes were handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Indexes {
    /// Present during the copy, maintained row by row.
    InPlace,
    /// Built after the copy; the build is in the time.
    Rebuilt,
    /// Absent and never built: the copy alone.
    Excluded,
}

impl Indexes {
    fn label(self) -> &'static str {
        match self {
            Indexes::InPlace => "in place",
            Indexes::Rebuilt => "rebuilt",
            Indexes::Excluded => "excluded",
        }
    }
}

/// The family of a result; raw pipes are the baseline of the ratios.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    RawPipe,
    Fdw,
    Pgcopydb,
    LogicalReplication,
    SchemashiftBackfill,
    SchemashiftCapture,
    SchemashiftReplay,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurement {
    pub kind: Kind,
    pub method: String,
    pub parallelism: usize,
    /// None for change capture, which maps nothing.
    pub transformed: Option<bool>,
    /// None for change capture and replay, which copy no table.
    pub indexes: Option<Indexes>,
    /// Rows in the target afterwards, or changes captured / applied (see `unit`).
    pub count: u64,
    pub unit: &'static str,
    /// The measured time; for schemashift backfill its backfill phase.
    pub seconds: f64,
    /// Including the method's own setup (plan and slot, schema copy, FDW setup).
    pub wall_seconds: f64,
    pub per_second: f64,
    /// Source table bytes (heap + TOAST) over `seconds`: one numerator for all methods.
    pub mb_per_second: Option<f64>,
    /// rows/s over the raw pipe's with the same parallelism and index handling.
    pub vs_raw_same_parallelism: Option<f64>,
    pub vs_fastest_raw: Option<f64>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub command: String,
    pub date: String,
    pub source_rows: u64,
    pub source_table_bytes: i64,
    pub workers: usize,
    pub machine: Machine,
    pub results: Vec<Measurement>,
    /// Methods skipped or failed, and why.
    pub notes: Vec<String>,
    /// VmHWM of this process after the schemashift backfills (workers run in-process).
    pub peak_rss_mib: Option<f64>,
    pub total_seconds: f64,
    /// 1-minute load average at the start and the end: other work on the machine skews
    /// every number.
    pub load_average: (Option<f64>, Option<f64>),
}

/// What a method gives back: its measurements, or why it did not run here.
pub(crate) enum Outcome {
    Measured(Vec<Measurement>),
    Skipped(String),
}

#[derive(Default)]
pub(crate) struct Collected {
    pub results: Vec<Measurement>,
    pub notes: Vec<String>,
    pub failed: bool,
}

/// The two clusters and what every method needs to know about the source.
pub(crate) struct Bench {
    pub src: Cluster,
    pub tgt: Cluster,
    pub rows: u64,
    pub bytes: i64,
    pub min_id: i64,
    pub max_id: i64,
    pub workers: usize,
    pub psql: PathBuf,
    next_db: AtomicU32,
}

pub(crate) async fn client(dsn: &str) -> anyhow::Result<Client> {
    let (c, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .context("connecting to a bench cluster")?;
    tokio::spawn(conn);
    Ok(c)
}

/// The target table without its three secondary indexes, and those indexes.
pub(crate) fn target_table_and_indexes() -> (String, Vec<String>) {
    let (idx, table): (Vec<&str>, Vec<&str>) = TARGET_DDL
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .partition(|s| s.starts_with("CREATE INDEX"));
    (
        table.join(";\n"),
        idx.into_iter().map(String::from).collect(),
    )
}

/// 1, 2 and `workers`, each once, ascending.
pub(crate) fn parallelisms(workers: usize) -> Vec<usize> {
    let mut v = vec![1, 2, workers];
    v.sort_unstable();
    v.dedup();
    v
}

impl Bench {
    pub fn source_dsn(&self) -> String {
        self.src.dsn(SOURCE_DB)
    }

    async fn fresh_target(&self, label: &str, ddl: &str) -> anyhow::Result<String> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let db = format!("bench_{n:02}_{label}");
        client(&self.tgt.dsn("postgres"))
            .await?
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db)))
            .await
            .with_context(|| format!("creating target database {db}"))?;
        if !ddl.is_empty() {
            client(&self.tgt.dsn(&db)).await?.batch_execute(ddl).await?;
        }
        Ok(db)
    }

    async fn drop_target(&self, db: &str) -> anyhow::Result<()> {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(db));
        client(&self.tgt.dsn("postgres"))
            .await?
            .batch_execute(&sql)
            .await
            .with_context(|| format!("dropping target database {db}"))
    }

    /// Rows in the target table; a copy that lost or doubled rows is an error, not a result.
    pub async fn check_rows(&self, db: &str) -> anyhow::Result<u64> {
        let n: i64 = client(&self.tgt.dsn(db))
            .await?
            .query_one("SELECT count(*) FROM public.users", &[])
            .await?
            .get(0);
        anyhow::ensure!(
            n as u64 == self.rows,
            "the target has {n} rows, the source {}",
            self.rows
        );
        Ok(n as u64)
    }

    /// Writes out dirty buffers on both clusters so no method pays for the previous one's.
    async fn settle(&self) -> anyhow::Result<()> {
        for c in [&self.src, &self.tgt] {
            let c = client(&c.dsn("postgres")).await?;
            c.batch_execute("CHECKPOINT").await?;
        }
        Ok(())
    }

    /// A copy result, to be [`timed`](Bench::timed).
    pub fn copied(&self, kind: Kind, method: &str, par: usize, indexes: Indexes) -> Measurement {
        Measurement {
            kind,
            method: method.to_string(),
            parallelism: par,
            transformed: Some(!matches!(kind, Kind::Pgcopydb | Kind::LogicalReplication)),
            indexes: Some(indexes),
            unit: "rows",
            ..Measurement::default()
        }
    }

    /// Sets count and times, and the rates derived from them.
    pub fn timed(&self, mut m: Measurement, count: u64, seconds: f64, wall: f64) -> Measurement {
        let secs = seconds.max(1e-6);
        m.count = count;
        m.seconds = seconds;
        m.wall_seconds = wall;
        m.per_second = count as f64 / secs;
        if m.unit == "rows" {
            m.mb_per_second = Some(self.bytes as f64 / 1_048_576.0 / secs);
        }
        m
    }

    /// Runs one method on a fresh target database (created with `ddl`), dropped after.
    pub async fn measure<F, Fut>(&self, out: &mut Collected, label: &str, ddl: &str, f: F)
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = anyhow::Result<Outcome>>,
    {
        tracing::info!(method = label, "measuring");
        let r = async {
            self.settle().await?;
            let db = self.fresh_target(label, ddl).await?;
            let r = f(db.clone()).await;
            let dropped = self.drop_target(&db).await;
            let r = r?;
            dropped?;
            Ok::<_, anyhow::Error>(r)
        }
        .await;
        match r {
            Ok(Outcome::Measured(m)) => out.results.extend(m),
            Ok(Outcome::Skipped(why)) => {
                tracing::info!(method = label, reason = %why, "method skipped");
                out.notes.push(why);
            }
            Err(e) => {
                tracing::warn!(method = label, error = %format!("{e:#}"), "method failed");
                out.notes.push(format!("{label}: failed: {e:#}"));
                out.failed = true;
            }
        }
    }
}

/// `schemashift bench`: prints the report (and writes it to `out` as markdown). Exit
/// code 1 when the setup or any method failed; skipped peers are not failures.
pub async fn bench(rows: u64, workers: usize, json: bool, out: Option<PathBuf>) -> i32 {
    let (report, failed) = match bench_inner(rows, workers.max(1)).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode JSON: {e}"),
        }
    } else {
        eprintln!("{}", text(&report));
    }
    if let Some(path) = out {
        if let Err(e) = write_markdown(&path, &report) {
            eprintln!("error: {e:#}");
            return 1;
        }
        eprintln!("wrote {}", path.display());
    }
    i32::from(failed)
}

async fn bench_inner(rows: u64, workers: usize) -> anyhow::Result<(BenchReport, bool)> {
    let t0 = Instant::now();
    let load_before = load_average();
    let psql = bin_dir()?.join("psql");
    tracing::info!("starting source and target clusters");
    let (src, tgt) = tokio::try_join!(
        Cluster::start(ClusterOptions::default()),
        Cluster::start(ClusterOptions::default())
    )
    .context("starting the bench's PostgreSQL clusters")?;
    client(&src.dsn("postgres"))
        .await?
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(SOURCE_DB)))
        .await?;
    let source = client(&src.dsn(SOURCE_DB)).await?;
    source.batch_execute(SOURCE_DDL).await?;
    tracing::info!(rows, "loading the users scenario");
    load_users(&source, rows).await.context("loading users")?;
    peers::create_split_functions(&source).await?;
    // Sets hint bits and the visibility map now, so that the first method to read the
    // table does not pay for writing them.
    source
        .batch_execute("VACUUM (FREEZE, ANALYZE) public.users")
        .await?;
    let r = source
        .query_one(
            "SELECT count(*), pg_table_size('public.users'), min(id), max(id), \
             to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC' FROM public.users",
            &[],
        )
        .await?;
    let b = Bench {
        rows: r.get::<_, i64>(0) as u64,
        bytes: r.get(1),
        min_id: r.get::<_, Option<i64>>(2).unwrap_or(1),
        max_id: r.get::<_, Option<i64>>(3).unwrap_or(0),
        workers,
        psql,
        src,
        tgt,
        next_db: AtomicU32::new(1),
    };
    let date: String = r.get(4);
    let machine = peers::machine(&b, &source).await?;
    drop(source);

    let mut c = Collected::default();
    peers::run_all(&b, &mut c).await;
    let peak_rss_mib = ours::run_all(&b, &mut c).await;
    peers::ratios(&mut c.results);
    let report = BenchReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date,
        source_rows: b.rows,
        source_table_bytes: b.bytes,
        workers,
        machine,
        results: c.results,
        notes: c.notes,
        peak_rss_mib,
        total_seconds: t0.elapsed().as_secs_f64(),
        load_average: (load_before, load_average()),
    };
    let Bench { src, tgt, .. } = b;
    let (s, t) = tokio::join!(src.stop(), tgt.stop());
    if let Err(e) = s.and(t) {
        tracing::warn!(error = %e, "could not stop a bench cluster");
    }
    Ok((report, c.failed))
}

/// The 1-minute load average of the machine.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// 1234567 → "1,234,567".
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Column titles; columns 0, 2 and 3 are text (left-aligned), the others numbers.
const HEADER: &str = "method|par.|transformed|indexes|rows|s|wall s|rows/s|MB/s\
    |× raw pipe same par. & indexes|× fastest raw pipe";

fn cells(m: &Measurement) -> Vec<String> {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    let ch = if m.unit == "rows" { "" } else { " ch." };
    vec![
        m.method.clone(),
        m.parallelism.to_string(),
        m.transformed
            .map_or("-", |t| if t { "yes" } else { "no" })
            .into(),
        m.indexes.map_or("-", Indexes::label).into(),
        format!("{}{ch}", grouped(m.count)),
        format!("{:.1}", m.seconds),
        format!("{:.1}", m.wall_seconds),
        grouped(m.per_second.round() as u64),
        opt(m.mb_per_second, 1),
        opt(m.vs_raw_same_parallelism, 2),
        opt(m.vs_fastest_raw, 2),
    ]
}

/// The results as a markdown table padded to aligned columns, so that it reads as
/// plain text on a terminal too.
fn table(r: &BenchReport) -> Vec<String> {
    let mut rows: Vec<Vec<String>> = vec![HEADER.split('|').map(String::from).collect()];
    rows.extend(r.results.iter().map(cells));
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|c| c[i].chars().count()).max().unwrap_or(0))
        .collect();
    let text = |i: usize| matches!(i, 0 | 2 | 3);
    let line = |c: &[String]| {
        let padded = c.iter().zip(&widths).enumerate().map(|(i, (s, &w))| {
            if text(i) {
                format!("{s:<w$}")
            } else {
                format!("{s:>w$}")
            }
        });
        format!("| {} |", padded.collect::<Vec<_>>().join(" | "))
    };
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            if text(i) {
                "-".repeat(w)
            } else {
                format!("{}:", "-".repeat(w - 1))
            }
        })
        .collect();
    let mut out = vec![line(&rows[0]), line(&rule)];
    out.extend(rows[1..].iter().map(|c| line(c)));
    out
}

fn machine_lines(r: &BenchReport) -> Vec<String> {
    let mut v = r.machine.describe();
    v.push(format!(
        "source: public.users, {} rows, {:.1} MB (pg_table_size: heap + TOAST); --workers {}",
        grouped(r.source_rows),
        r.source_table_bytes as f64 / 1_048_576.0,
        r.workers
    ));
    v
}

fn footer_lines(r: &BenchReport) -> Vec<String> {
    let load = |l: Option<f64>| l.map_or("unknown".to_string(), |l| format!("{l:.2}"));
    let mut v = vec![format!(
        "peak memory of this process after the schemashift backfills (VmHWM): {}; bench wall \
         time {:.0} s; load average (1 min) {} at the start, {} at the end",
        r.peak_rss_mib
            .map_or("unknown".into(), |m| format!("{m:.0} MiB")),
        r.total_seconds,
        load(r.load_average.0),
        load(r.load_average.1),
    )];
    v.extend(r.results.iter().filter_map(|m| {
        let note = m.note.as_ref()?;
        let idx = m.indexes.map_or("-", Indexes::label);
        Some(format!(
            "{} (par. {}, indexes {idx}): {note}",
            m.method, m.parallelism
        ))
    }));
    v.extend(r.notes.iter().cloned());
    v
}

/// The human report: machine, the table, notes.
fn text(r: &BenchReport) -> String {
    let mut out = machine_lines(r);
    out.push(String::new());
    out.extend(table(r));
    out.push(String::new());
    out.extend(footer_lines(r));
    out.join("\n")
}

fn markdown(r: &BenchReport) -> String {
    let mut md = format!(
        "# Benchmarks\n\nGenerated by `schemashift bench` on {}, with\n\n```sh\n{}\n```\n\n\
         Every method runs once, in the same process run, against the same source table, \
         each into a fresh empty target database on the same target cluster; the numbers \
         describe this machine on that day, not a promise.\n\n## Machine\n\n",
        r.date, r.command
    );
    for l in machine_lines(r) {
        md.push_str(&format!("- {l}\n"));
    }
    md.push_str("\n## Results\n\n");
    for l in table(r) {
        md.push_str(&l);
        md.push('\n');
    }
    md.push_str(
        "\nMB/s is the source table's size (heap + TOAST) over the time, the same numerator \
         for every method. Ratios compare rows/s with the raw pipe of the same parallelism \
         and index handling, and with the fastest raw-pipe variant (pgcopydb and logical \
         replication build only the source's two indexes). In the capture and \
         replay rows, counts and rates are of changes (ch.).\n\n",
    );
    for l in footer_lines(r) {
        md.push_str(&format!("- {l}\n"));
    }
    md.push_str("\n## How each method was run\n\n");
    md.push_str(peers::HOW);
    md.push_str(ours::HOW);
    md
}

fn write_markdown(path: &Path, report: &BenchReport) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, markdown(report)).with_context(|| format!("writing {}", path.display()))
}
