//! Fleet rows: a fleet of 8 members of `rows / 8` each against the one pair of `rows`, with
//! the same workers, each run the way a user runs it (`schemashift run … --until backfill`,
//! a child process of this binary, planning included); and `schemashift plan` over a fleet of
//! 100 small members on one cluster.

use super::{client, Bench, Collected, Indexes, Kind, Measurement};
use crate::scenario::{load_users, users_spec_yaml, yaml_scalar, SOURCE_DDL, TARGET_DDL};
use anyhow::Context;
use schemashift_common::sql::quote_ident;
use std::path::Path;

/// Members of the fleet row, and of the planning row.
const MEMBERS: u64 = 8;
const SMALL_MEMBERS: usize = 100;
const SMALL_ROWS: u64 = 1_000;

pub(super) const HOW: &str = "\
- **schemashift fleet**: `schemashift run FLEET --until backfill --workers W` (a child process; \
planning, slots and capture start included) over 8 members of rows/8 users each (8 source \
databases on the source cluster, 8 targets on the target cluster), beside `schemashift run PAIR \
--until backfill --workers W` over the one pair of all the rows; the time is the command's \
wall time, the overhead the fleet's time over the pair's. *plan*: `schemashift plan FLEET` \
over 100 members of 1,000 rows each on the same two clusters.
";

pub(super) async fn run_all(b: &Bench, c: &mut Collected) {
    if let Err(e) = rows(b, c).await {
        c.notes.push(format!("fleet rows: failed: {e:#}"));
        c.failed = true;
    }
    if let Err(e) = planning(b, c).await {
        c.notes.push(format!("fleet planning row: failed: {e:#}"));
        c.failed = true;
    }
}

/// Runs this binary with `args`; its stderr is the error when it fails.
async fn schemashift(args: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let out = tokio::process::Command::new(exe)
        .arg("--quiet")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running schemashift")?;
    anyhow::ensure!(
        out.status.success(),
        "schemashift {} exited {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `n` source databases holding `rows` users each, made from one loaded template.
async fn sources(b: &Bench, prefix: &str, n: usize, rows: u64) -> anyhow::Result<Vec<String>> {
    let admin = client(&b.src.dsn("postgres")).await?;
    let template = format!("{prefix}_template");
    admin
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&template)))
        .await?;
    {
        let t = client(&b.src.dsn(&template)).await?;
        t.batch_execute(SOURCE_DDL).await?;
        load_users(&t, rows).await.context("loading users")?;
        t.batch_execute("VACUUM (FREEZE, ANALYZE) public.users")
            .await?;
    }
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{prefix}_src_{i:03}");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_ident(&name),
                quote_ident(&template)
            ))
            .await
            .with_context(|| format!("creating {name}"))?;
        names.push(name);
    }
    admin
        .batch_execute(&format!("DROP DATABASE {}", quote_ident(&template)))
        .await?;
    Ok(names)
}

async fn targets(b: &Bench, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let admin = client(&b.tgt.dsn("postgres")).await?;
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{prefix}_tgt_{i:03}");
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await?;
        client(&b.tgt.dsn(&name))
            .await?
            .batch_execute(TARGET_DDL)
            .await?;
        names.push(name);
    }
    Ok(names)
}

/// The pair spec of the scenario with `members` in place of its source and target.
fn fleet_yaml(b: &Bench, pairs: &[(String, String)]) -> String {
    let body = users_spec_yaml("-", "-", b.workers, None);
    let mut y = String::from("members:\n");
    for (i, (s, t)) in pairs.iter().enumerate() {
        y.push_str(&format!("  - name: m{i:03}\n"));
        y.push_str(&format!("    source: {}\n", yaml_scalar(&b.src.dsn(s))));
        y.push_str(&format!("    target: {}\n", yaml_scalar(&b.tgt.dsn(t))));
    }
    for line in body.lines().skip(2) {
        y.push_str(line);
        y.push('\n');
    }
    y.push_str(UNTHROTTLED);
    y
}

/// Nothing to protect here (no application runs), as in the other rows. With the throttle
/// on, members on one server hold on each other's load (their probes see it as the
/// source slowing down), so the fleet row would measure the throttle, not the fleet.
const UNTHROTTLED: &str = "throttle:\n  enabled: false\n";

async fn count(dsn: &str) -> anyhow::Result<u64> {
    let n: i64 = client(dsn)
        .await?
        .query_one("SELECT count(*) FROM public.users", &[])
        .await?
        .get(0);
    Ok(n as u64)
}

/// Cleans the runs up (their slots keep the source databases from being dropped), then
/// drops every database of the row.
async fn drop_all(spec: &Path, src: &[String], tgt: &[String], b: &Bench) -> anyhow::Result<()> {
    let spec = spec.to_string_lossy().into_owned();
    schemashift(&["cleanup", &spec]).await?;
    drop_databases(b, src, tgt).await
}

async fn drop_databases(b: &Bench, src: &[String], tgt: &[String]) -> anyhow::Result<()> {
    for (cluster, dbs) in [(&b.src, src), (&b.tgt, tgt)] {
        let admin = client(&cluster.dsn("postgres")).await?;
        for db in dbs {
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(db)
                ))
                .await?;
        }
    }
    Ok(())
}

fn row(b: &Bench, method: &str, unit: &'static str) -> Measurement {
    let mut m = b.copied(Kind::SchemashiftFleet, method, b.workers, Indexes::InPlace);
    m.unit = unit;
    m
}

async fn rows(b: &Bench, c: &mut Collected) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let per = b.rows / MEMBERS;
    tracing::info!(members = MEMBERS, rows = per, "loading the fleet");
    let src = sources(b, "fleet", MEMBERS as usize, per).await?;
    let tgt = targets(b, "fleet", MEMBERS as usize + 1).await?;
    let pairs: Vec<(String, String)> = src.iter().cloned().zip(tgt.iter().cloned()).collect();
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(&fleet, fleet_yaml(b, &pairs))?;
    let pair_tgt = &tgt[MEMBERS as usize];
    let pair = dir.path().join("pair.yaml");
    std::fs::write(
        &pair,
        users_spec_yaml(&b.source_dsn(), &b.tgt.dsn(pair_tgt), b.workers, None) + UNTHROTTLED,
    )?;
    let workers = b.workers.to_string();
    let mut secs = Vec::new();
    for (label, spec, total) in [
        ("schemashift run (one pair)", &pair, b.rows),
        ("schemashift run (fleet of 8)", &fleet, per * MEMBERS),
    ] {
        b.settle().await?;
        let path = spec.to_string_lossy().into_owned();
        let span = b.span().await;
        schemashift(&["run", &path, "--until", "backfill", "--workers", &workers]).await?;
        let spent = b.spent(&span).await;
        let copied = if spec == &pair {
            count(&b.tgt.dsn(pair_tgt)).await?
        } else {
            let mut n = 0;
            for t in &tgt[..MEMBERS as usize] {
                n += count(&b.tgt.dsn(t)).await?;
            }
            n
        };
        anyhow::ensure!(copied == total, "{label}: {copied} rows copied of {total}");
        let m = row(b, label, "rows");
        c.results
            .push(b.timed(m, total, (spent.seconds, spent.seconds), spent.cpu));
        secs.push(spent.seconds);
    }
    let overhead = secs[1] / secs[0].max(1e-6) - 1.0;
    c.notes.push(format!(
        "fleet overhead: {} members of {per} rows took {:.2} s, one pair of {} rows {:.2} s \
         (same {} workers): {:+.1}%",
        MEMBERS,
        secs[1],
        b.rows,
        secs[0],
        b.workers,
        overhead * 100.0
    ));
    drop_all(&fleet, &src, &tgt[..MEMBERS as usize], b).await?;
    drop_all(&pair, &[], std::slice::from_ref(pair_tgt), b).await
}

async fn planning(b: &Bench, c: &mut Collected) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    tracing::info!(members = SMALL_MEMBERS, "creating the small fleet");
    let src = sources(b, "small", SMALL_MEMBERS, SMALL_ROWS).await?;
    let tgt = targets(b, "small", SMALL_MEMBERS).await?;
    let pairs: Vec<(String, String)> = src.iter().cloned().zip(tgt.iter().cloned()).collect();
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(&fleet, fleet_yaml(b, &pairs))?;
    let path = fleet.to_string_lossy().into_owned();
    let span = b.span().await;
    schemashift(&["plan", &path]).await?;
    let spent = b.spent(&span).await;
    let mut m = row(b, "schemashift plan (100 members)", "members");
    m.indexes = None;
    m.note = Some(format!("{SMALL_ROWS} rows a member; nothing written"));
    let mut m = b.timed(
        m,
        SMALL_MEMBERS as u64,
        (spent.seconds, spent.seconds),
        spent.cpu,
    );
    // CPU per million members says nothing; the time is the row's point.
    m.cpu_s_per_million = None;
    c.results.push(m);
    // `plan` writes nothing, so there is no run to clean up.
    drop_databases(b, &src, &tgt).await
}
