//! schemashift's backfill: at several worker counts, with the name indexes excluded, over
//! TLS, by fdw; and the runs, spec and cleanup the change rows (`changes`) reuse.

use super::{target_table_with_keys, Bench, Collected, Indexes, Kind, Outcome};
use crate::scenario::{users_spec_yaml, TARGET_DDL};
use schemashift_common::control::ControlSql;
use schemashift_common::pg::connect;
use schemashift_common::spec::{Spec, Strategy};
use schemashift_coordinator::ops::cleanup;
use schemashift_coordinator::run::{run, RunOptions, RunReport, Until};

/// How schemashift was measured, for the markdown report.
pub(super) const HOW: &str = "\
- **schemashift backfill**: `run --until backfill` in this process (embedded workers); the \
time is the backfill phase of the run report, wall adds planning, slot creation and capture \
start. *in place*: the target has its indexes when the run starts; when the run drops them \
for the load (the key's and unique ones included) and builds them after it (recorded in its \
control schema), the row says *rebuilt* and the time includes the build. *excluded*: the \
target has no name indexes (its key and email indexes are dropped and rebuilt as above). \
These rows use `strategy: auto`, which measures copy and fdw on a 20,000-row sample at the \
start (wall, not time) and keeps the faster; the note says what it measured. *copy*: \
`strategy: copy` forced (no measurement). *fdw*: \
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
batches of 5,000, all at once. *catch-up, capture then replay*: the two one after the \
other (their times and CPU added). *catch-up, capture and replay at once*: a second backfill \
and backlog of the same size, then capture and the partitions' replayers started together, \
as a run catches up (replay follows the log while capture appends to it), timed until every \
partition applied its part of the whole backlog: the same work the native row times, which \
also decodes and applies at once. Rows count changes.
- **native logical replication catch-up**: a subscription to the untransformed table, \
synced, disabled while the same kind of backlog is written, then enabled and timed until \
its slot confirms the source's end of WAL. *the new schema's 5 indexes*: the same into a \
copy that also has the three name indexes as expression indexes over the split functions, \
so each change costs the same index work as in the new schema.
- **decoding limit**: `pg_recvlogical` with pgoutput draining the same backlog to \
/dev/null.
";

/// `w` workers into the new schema (its five indexes dropped for the load, built after).
pub(super) async fn backfill_at(b: &Bench, c: &mut Collected, w: usize) {
    b.measure(c, &format!("schemashift_{w}_in_place"), TARGET_DDL, |db| {
        backfill(b, db, w, Indexes::InPlace, Strategy::Auto)
    })
    .await;
}

/// With the name indexes excluded: the key and email indexes only, as pgcopydb builds.
pub(super) async fn excluded(b: &Bench, c: &mut Collected) {
    let table_only = target_table_with_keys();
    let label = format!("schemashift_{}_excluded", b.workers);
    b.measure(c, &label, &table_only, |db| {
        backfill(b, db, b.workers, Indexes::Excluded, Strategy::Auto)
    })
    .await;
}

pub(super) async fn tls(b: &Bench, c: &mut Collected) {
    let label = format!("schemashift_{}_in_place_tls", b.workers);
    super::tls::rows(b, c, &label, TARGET_DDL, |db| {
        backfill_with(b, db, b.workers, Indexes::InPlace, Strategy::Auto, true)
    })
    .await;
}

pub(super) async fn fdw(b: &Bench, c: &mut Collected) {
    let label = format!("schemashift_{}_fdw", b.workers);
    b.measure(c, &label, TARGET_DDL, |db| {
        backfill(b, db, b.workers, Indexes::InPlace, Strategy::Fdw)
    })
    .await;
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

/// One worker with the new schema's five indexes (dropped for the load, built after it).
pub(super) async fn one_worker(b: &Bench, c: &mut Collected) {
    b.measure(c, "schemashift_1_in_place", TARGET_DDL, |db| {
        backfill(b, db, 1, Indexes::InPlace, Strategy::Auto)
    })
    .await;
}

pub(super) fn spec(
    b: &Bench,
    db: &str,
    workers: usize,
    changelog: Option<&str>,
) -> anyhow::Result<Spec> {
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

pub(super) async fn run_backfill(
    b: &Bench,
    spec: &Spec,
    workers: usize,
) -> anyhow::Result<RunReport> {
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
pub(super) async fn cleaned<T>(spec: &Spec, r: anyhow::Result<T>) -> anyhow::Result<T> {
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
