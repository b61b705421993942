//! schemashift itself: the backfill at several worker counts, and capture and replay of
//! a mixed change workload through the Postgres change log and (with tansu) Kafka.

use super::native::CopyIndexes;
use super::{
    cpu::{peak_rss_mib, Spent},
    parallelisms, target_table_with_keys, Bench, Collected, Indexes, Kind, Measurement, Outcome,
};
use crate::scenario::{users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use anyhow::Context;
use schemashift_changelog::replay::PartitionReplayer;
use schemashift_changelog::ChangeLog;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{LeaseEpoch, Lsn};
use schemashift_common::pg::{connect, install_helpers};
use schemashift_common::service::PartitionLease;
use schemashift_common::spec::{Spec, Strategy};
use schemashift_coordinator::capture::{flush_wal, Capture};
use schemashift_coordinator::control::Store;
use schemashift_coordinator::ops::cleanup;
use schemashift_coordinator::run::{run, RunOptions, RunReport, Until};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_postgres::Client;

/// Changes per workload transaction: a few large transactions, as a batch job makes.
const WORKLOAD_TX: u64 = 25_000;
/// Changes per replay step.
const REPLAY_BATCH: i64 = 5_000;
/// Replay that applies nothing for this long while changes are missing has failed.
const REPLAY_STALL: Duration = Duration::from_secs(60);
/// How schemashift was measured, for the markdown report.
pub(super) const HOW: &str = "\
- **schemashift backfill**: `run --until backfill` in this process (embedded workers); the \
time is the backfill phase of the run report, wall adds planning, slot creation and capture \
start. *in place*: the target has its indexes when the run starts; when the run drops them \
for the load (the key's and unique ones included) and builds them after it (recorded in its \
control schema), the row says *rebuilt* and the time includes the build. *excluded*: the \
target has no name indexes (its key and email indexes are dropped and rebuilt as above). \
These rows use `strategy: auto`, which measures copy and fdw on a 20,000-row sample at the \
start (wall, not time) and keeps the faster; the note says what it measured. *fdw*: \
`strategy: fdw` forced, one `INSERT … SELECT` per shard from a postgres_fdw foreign table. \
*TLS*: the same run with `ssl = on` on both servers (a self-signed certificate) and \
`sslmode=require` in both connection strings, so every session is encrypted (copies, the \
replication stream, the control sessions); compared with the raw pipe over TLS.
- **schemashift capture / replay / catch-up**: after a backfill with as many workers as \
the row's parallelism (which sets the change log's partitions), a mixed change workload on \
the source (about 40% inserts, 45% updates of full_name and bio of random existing users, 15% \
deletes of random existing users, in transactions of up to 25,000 changes; the row counts \
the changes made); capture alone (`Capture::round` until the source's WAL position), then \
one `PartitionReplayer` per partition, each on its own sessions, applying the change log in \
batches of 5,000, all at once. *catch-up* is capture and replay one after the other (their \
times and CPU added), the same work the native row times; a run overlaps the two. Rows \
count changes.
- **native logical replication catch-up**: a subscription to the untransformed table, \
synced, disabled while the same kind of backlog is written, then enabled and timed until \
its slot confirms the source's end of WAL. *the new schema's 5 indexes*: the same into a \
copy that also has the three name indexes as expression indexes over the split functions, \
so each change costs the same index work as in the new schema.
- **decoding limit**: `pg_recvlogical` with pgoutput draining the same backlog to \
/dev/null.
";
/// Worker name of the bench's own replayer in the control schema.
const REPLAYER: &str = "bench-replayer";

pub(super) async fn run_all(b: &Bench, c: &mut Collected) -> Option<f64> {
    for w in parallelisms(b.workers) {
        let label = format!("schemashift_{w}_in_place");
        b.measure(c, &label, TARGET_DDL, |db| {
            backfill(b, db, w, Indexes::InPlace, Strategy::Auto)
        })
        .await;
    }
    let table_only = target_table_with_keys();
    let label = format!("schemashift_{}_excluded", b.workers);
    b.measure(c, &label, &table_only, |db| {
        backfill(b, db, b.workers, Indexes::Excluded, Strategy::Auto)
    })
    .await;
    if b.tls_ready {
        let label = format!("schemashift_{}_in_place_tls", b.workers);
        super::tls::rows(b, c, &label, TARGET_DDL, |db| {
            backfill_with(b, db, b.workers, Indexes::InPlace, Strategy::Auto, true)
        })
        .await;
    }
    let label = format!("schemashift_{}_fdw", b.workers);
    b.measure(c, &label, TARGET_DDL, |db| {
        backfill(b, db, b.workers, Indexes::InPlace, Strategy::Fdw)
    })
    .await;
    peak_rss_mib()
}

/// The like-for-like rows: the target keeps only the source's two indexes (built after the
/// load), as pgcopydb's copy has; `auto` as a user runs it, then copy forced (no
/// measurement of the strategies at the start).
pub(super) async fn like_for_like(b: &Bench, c: &mut Collected) {
    let table_only = target_table_with_keys();
    for strategy in [Strategy::Auto, Strategy::Copy] {
        let label = format!("schemashift_{}_excluded_{strategy:?}", b.workers);
        b.measure(c, &label, &table_only, |db| {
            backfill(b, db, b.workers, Indexes::Excluded, strategy)
        })
        .await;
    }
}

/// Capture and replay of `changes` changes (each count in turn), through the PostgreSQL
/// table log and, with tansu, Kafka. The workload writes to the source, so this runs after
/// every copy of the pristine table.
pub(super) async fn run_changes(b: &Bench, c: &mut Collected, changes: &[u64]) {
    for &n in changes {
        // The references first: the same kind of backlog into an untransformed copy, and
        // decoded to nowhere.
        for (label, indexes) in [
            ("native_catch_up", CopyIndexes::Source),
            ("native_catch_up_5_indexes", CopyIndexes::SameAsNew),
        ] {
            b.measure(c, &format!("{label}_{n}"), SOURCE_DDL, |db| {
                super::native::native_catch_up(b, db, n, indexes)
            })
            .await;
        }
        b.measure(c, &format!("decoding_limit_{n}"), "", |db| {
            super::native::decoding_limit(b, db, n)
        })
        .await;
        for workers in [1, 2, 4] {
            b.measure(
                c,
                &format!("replay_postgres_{n}_{workers}"),
                TARGET_DDL,
                |db| replay(b, db, None, n, workers),
            )
            .await;
        }
    }
    match Tansu::start().await {
        Ok(Some(broker)) => {
            let url = broker.changelog();
            for &n in changes {
                b.measure(c, &format!("replay_kafka_{n}"), TARGET_DDL, |db| {
                    replay(b, db, Some(url.clone()), n, 1)
                })
                .await;
            }
            broker.stop().await;
        }
        Ok(None) => c.notes.push(
            "kafka replay skipped: tansu not found on PATH or in ~/.cargo/bin \
             (cargo install tansu --locked --features dynostore)"
                .into(),
        ),
        Err(e) => {
            c.notes
                .push(format!("kafka replay: tansu did not start: {e:#}"));
            c.failed = true;
        }
    }
}

fn spec(b: &Bench, db: &str, workers: usize, changelog: Option<&str>) -> anyhow::Result<Spec> {
    spec_with(b, db, workers, changelog, false)
}

fn spec_with(
    b: &Bench,
    db: &str,
    workers: usize,
    changelog: Option<&str>,
    tls: bool,
) -> anyhow::Result<Spec> {
    let wrap = |dsn: String| if tls { super::tls::require(&dsn) } else { dsn };
    let mut yaml = users_spec_yaml(&wrap(b.source_dsn()), &wrap(b.tgt.dsn(db)), workers, None);
    if let Some(url) = changelog {
        yaml = format!("changelog: {url}\n{yaml}");
    }
    let mut spec = Spec::parse(&yaml)?;
    // Nothing to protect here (no application runs): the peers are not throttled either.
    spec.throttle.enabled = false;
    Ok(spec)
}

async fn run_backfill(b: &Bench, spec: &Spec, workers: usize) -> anyhow::Result<RunReport> {
    // Kept until the run returns: a dropped sender would wake every wait on it at once.
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    let opts = RunOptions {
        workers: Some(workers),
        until: Until::Backfill,
        ..RunOptions::new(b.host.local.clone())
    };
    run(spec, opts, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("schemashift run: {e}"))
}

/// Drops slot, publication and control state; the run's result matters more than this.
async fn cleaned<T>(spec: &Spec, r: anyhow::Result<T>) -> anyhow::Result<T> {
    let c = cleanup(spec).await;
    let v = r?;
    c.map_err(|e| anyhow::anyhow!("schemashift cleanup: {e}"))?;
    Ok(v)
}

async fn backfill(
    b: &Bench,
    db: String,
    workers: usize,
    indexes: Indexes,
    strategy: Strategy,
) -> anyhow::Result<Outcome> {
    backfill_with(b, db, workers, indexes, strategy, false).await
}

async fn backfill_with(
    b: &Bench,
    db: String,
    workers: usize,
    indexes: Indexes,
    strategy: Strategy,
    tls: bool,
) -> anyhow::Result<Outcome> {
    let mut spec = spec_with(b, &db, workers, None, tls)?;
    for t in &mut spec.tables {
        t.strategy = strategy;
    }
    let span = b.span().await;
    let r = run_backfill(b, &spec, workers).await;
    let spent = b.spent(&span).await;
    let r = match r {
        Ok(report) => dropped_indexes(&spec).await.map(|n| (report, n)),
        Err(e) => Err(e),
    };
    let (report, dropped) = cleaned(&spec, r).await?;
    // Versions that drop the secondary indexes for the load build them inside the
    // backfill phase: the row must say so.
    let indexes = if dropped > 0 && indexes == Indexes::InPlace {
        Indexes::Rebuilt
    } else {
        indexes
    };
    let count = b.check_rows(&db).await?;
    let method = match (strategy, tls) {
        (Strategy::Fdw, _) => "schemashift backfill, fdw",
        (Strategy::Auto, false) => "schemashift backfill",
        (Strategy::Copy, false) => "schemashift backfill, copy",
        (Strategy::Auto | Strategy::Copy, true) => "schemashift backfill, TLS",
    };
    let mut m = b.copied(Kind::SchemashiftBackfill, method, workers, indexes);
    m.tls = tls;
    m.peak_rss_mib = spent.peak_rss_mib;
    // What `auto` measured at the start and kept.
    let chosen = report.tables.first().map(|t| match &t.measured_rows_per_s {
        Some(s) => format!(
            "; strategy {} (auto measured copy {:.0} and fdw {:.0} rows/s)",
            t.strategy, s.copy, s.fdw
        ),
        None => format!("; strategy {}", t.strategy),
    });
    m.note = Some(match dropped {
        0 => format!("{} shards{}", report.shards, chosen.unwrap_or_default()),
        n => format!(
            "{} shards; {n} indexes dropped for the load and built after it by schemashift{}",
            report.shards,
            chosen.unwrap_or_default()
        ),
    });
    Ok(Outcome::Measured(vec![b.timed(
        m,
        count,
        (report.backfill_seconds, spent.seconds),
        spent.cpu,
    )]))
}

/// How many target indexes the run dropped for its load (recorded in the control schema
/// by versions that do; 0 for those that keep them in place).
async fn dropped_indexes(spec: &Spec) -> anyhow::Result<i64> {
    let target = connect(&spec.target, "target").await?;
    let table = ControlSql::new(&spec.control_schema).table("indexes");
    let exists: bool = target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let sql = format!("SELECT count(*) FROM {table}");
    Ok(target.query_one(&sql, &[]).await?.get(0))
}

async fn replay(
    b: &Bench,
    db: String,
    kafka: Option<String>,
    changes: u64,
    workers: usize,
) -> anyhow::Result<Outcome> {
    // As many change-log partitions as workers, each replayed by its own worker.
    let spec = spec(b, &db, workers, kafka.as_deref())?;
    let log = if kafka.is_some() {
        "kafka log, tansu"
    } else {
        "postgres log"
    };
    let r = capture_and_replay(b, &spec, log, changes, workers).await;
    Ok(Outcome::Measured(cleaned(&spec, r).await?))
}

/// A capture or replay result: no table copied, counts of changes.
fn change_rate(
    b: &Bench,
    (kind, parallelism): (Kind, usize),
    method: String,
    count: u64,
    spent: Spent,
) -> Measurement {
    let m = Measurement {
        kind,
        method,
        parallelism,
        // Replay applies the mapping; capture only decodes.
        transformed: (kind == Kind::SchemashiftReplay).then_some(true),
        unit: "changes",
        peak_rss_mib: spent.peak_rss_mib,
        ..Measurement::default()
    };
    b.timed(m, count, (spent.seconds, spent.seconds), spent.cpu)
}

async fn capture_and_replay(
    b: &Bench,
    spec: &Spec,
    log: &str,
    total: u64,
    workers: usize,
) -> anyhow::Result<Vec<Measurement>> {
    // The run's worker count sets its change-log partitions.
    run_backfill(b, spec, workers).await?;
    let source = connect(&spec.source, "source").await?;
    tracing::info!(changes = total, "running the change workload on the source");
    let changes = workload(&source, total).await?;
    let end: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let end: Lsn = end.parse()?;
    flush_wal(&source).await?;

    let target = connect(&spec.target, "target").await?;
    let store = Store::new(&spec.control_schema);
    let state = store
        .load(&target)
        .await?
        .context("no control state after the backfill")?;
    let plan = Arc::new(state.plan);
    let capture_target = connect(&spec.target, "target").await?;
    let mut capture = Capture::open(
        source,
        spec.source.clone(),
        capture_target,
        spec.target.clone(),
        plan.clone(),
        state.slot,
    )
    .await?;
    let span = b.span().await;
    loop {
        let (_, cut_short, head) = capture.round().await?;
        if !cut_short && head >= end {
            break;
        }
    }
    let captured = b.spent(&span).await;
    drop(capture);

    // The run's embedded workers may have leased the partitions when its backfill ended.
    store.release_leases_of(&target, "embedded-").await?;
    let parts = plan.partitions;
    // Where each partition's log ends (complete: capture ended before replay begins).
    let heads = ChangeLog::of(&plan.changelog, &store.sql)
        .head(&target)
        .await?;
    let leases = target
        .query(
            &store.sql.lease_partitions(),
            &[&REPLAYER, &3600.0f64, &(parts as i64)],
        )
        .await?;
    anyhow::ensure!(
        leases.len() == parts as usize,
        "leased {} of {parts} change-log partitions",
        leases.len()
    );
    // One session pair per partition, as one worker per partition would have.
    let mut replayers = Vec::new();
    for lease in &leases {
        let (part, epoch): (i32, i64) = (lease.get(0), lease.get(1));
        let lease = PartitionLease {
            part: part as u32,
            epoch: LeaseEpoch(epoch),
        };
        let end = heads.get(&(part as u32)).copied().unwrap_or(0);
        let session = connect(&spec.target, "target").await?;
        install_helpers(&session, &plan.helpers, "target").await?;
        let replayer = PartitionReplayer::open(&session, plan.clone(), lease).await?;
        // Only merges read the source during replay; the users split does not.
        let source = connect(&spec.source, "source").await?;
        replayers.push((replayer, session, source, end));
    }
    drop(target);
    let span = b.span().await;
    let applied: Vec<u64> = futures_util::future::try_join_all(
        replayers
            .iter_mut()
            .map(|(r, target, source, end)| replay_all(r, target, source, *end)),
    )
    .await?;
    let applied: u64 = applied.iter().sum();
    anyhow::ensure!(
        applied >= changes,
        "replay applied {applied} of {changes} changes"
    );
    let replayed = b.spent(&span).await;
    // The whole catch-up, as the native row measures it: capture and then replay of the
    // same backlog, one after the other (a run overlaps them; this is the upper bound).
    let caught_up = captured.then(&replayed);
    Ok(vec![
        change_rate(
            b,
            (Kind::SchemashiftCapture, 1),
            format!("schemashift capture ({log})"),
            changes,
            captured,
        ),
        change_rate(
            b,
            (Kind::SchemashiftReplay, workers),
            format!("schemashift replay ({log})"),
            applied,
            replayed,
        ),
        change_rate(
            b,
            (Kind::SchemashiftReplay, workers),
            format!("schemashift catch-up ({log}, capture + replay)"),
            applied,
            caught_up,
        ),
    ])
}

/// Steps until the partition's position reaches `end`, the end of its part of the log
/// (complete: capture ended before replay began).
async fn replay_all(
    r: &mut PartitionReplayer,
    target: &mut Client,
    source: &Client,
    end: i64,
) -> anyhow::Result<u64> {
    let mut applied = 0u64;
    let mut last_progress = Instant::now();
    while r.position().0 < end {
        let n = r.step(target, source, REPLAY_BATCH).await?;
        if n > 0 {
            applied += n as u64;
            last_progress = Instant::now();
            continue;
        }
        anyhow::ensure!(
            last_progress.elapsed() < REPLAY_STALL,
            "replay reached {} of {end} and then nothing for {REPLAY_STALL:?}",
            r.position().0
        );
        // A Kafka consumer may still be connecting; do not spin on it.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(applied)
}

/// About `total` changes on the source, all in SQL: 40% inserts of new users, 45%
/// updates of full_name and bio of random existing users, 15% deletes, in
/// transactions of at most [`WORKLOAD_TX`] changes. Returns the rows changed.
pub(super) async fn workload(source: &Client, total: u64) -> anyhow::Result<u64> {
    let inserts = total * 40 / 100;
    let updates = total * 45 / 100;
    let deletes = total - inserts - updates;
    let max_id: i64 = source
        .query_one("SELECT coalesce(max(id), 0) FROM public.users", &[])
        .await?
        .get(0);
    let name = crate::scenario::name_mix_sql();
    let insert = source
        .prepare(&format!(
            "INSERT INTO public.users (id, email, full_name, bio) \
             SELECT i, 'bench' || i || '@example.com', {name}, 'Bench user ' || i \
             FROM (SELECT i, random() AS r FROM generate_series($1::bigint, $2::bigint) AS i) AS s"
        ))
        .await?;
    // Random ids among the existing ones (not this workload's inserts), found by index:
    // sorting the whole table by random() per statement would dominate at 10M changes.
    // Ids drawn twice or deleted earlier change nothing and are not counted.
    let update = source
        .prepare(&format!(
            "UPDATE public.users u SET full_name = {name}, bio = 'Updated ' || md5(random()::text), \
             updated_at = now() \
             FROM (SELECT DISTINCT ON (id) id, random() AS r FROM \
                   (SELECT (1 + floor(random() * $1::bigint))::bigint AS id \
                    FROM generate_series(1, $2::bigint)) AS d) AS s WHERE u.id = s.id"
        ))
        .await?;
    let delete = source
        .prepare(
            "DELETE FROM public.users WHERE id IN (SELECT (1 + floor(random() * $1::bigint))::bigint \
             FROM generate_series(1, $2::bigint))",
        )
        .await?;
    let chunks = |n: u64| {
        (0..n.div_ceil(WORKLOAD_TX))
            .map(move |i| (i * WORKLOAD_TX, WORKLOAD_TX.min(n - i * WORKLOAD_TX)))
    };
    let mut changed = 0;
    for (offset, n) in chunks(inserts) {
        let lo = max_id + 1 + offset as i64;
        changed += source
            .execute(&insert, &[&lo, &(lo + n as i64 - 1)])
            .await?;
    }
    for (_, n) in chunks(updates) {
        changed += source.execute(&update, &[&max_id, &(n as i64)]).await?;
    }
    for (_, n) in chunks(deletes) {
        changed += source.execute(&delete, &[&max_id, &(n as i64)]).await?;
    }
    Ok(changed)
}

/// A Kafka-protocol broker with in-memory storage, started like the tests start it.
pub(super) struct Tansu {
    child: Child,
    port: u16,
}

/// tansu on PATH, then in ~/.cargo/bin (where `cargo install` puts it).
fn tansu_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
}

impl Tansu {
    pub async fn start() -> anyhow::Result<Option<Tansu>> {
        let Some(bin) = tansu_bin() else {
            return Ok(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for tansu")?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting tansu")?;
        let broker = Tansu { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tansu did not listen on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(port, "tansu started");
        Ok(Some(broker))
    }

    pub fn changelog(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        if let Err(e) = self.child.kill().await {
            tracing::warn!(error = %e, "could not stop tansu");
        }
    }
}
