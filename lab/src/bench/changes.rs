//! The change path: capture and replay of a mixed change workload through the PostgreSQL
//! table log and (with tansu) Kafka, one after the other (each one's own rate and CPU) and
//! at once, as a run does them (the catch-up to compare with native logical replication).

use super::native::CopyIndexes;
use super::ours::{cleaned, run_backfill, spec};
use super::tansu::Tansu;
use super::{cpu::Spent, Bench, Collected, Kind, Measurement, Outcome};
use crate::scenario::{SOURCE_DDL, TARGET_DDL};
use anyhow::Context;
use schemashift_changelog::replay::PartitionReplayer;
use schemashift_changelog::ChangeLog;
use schemashift_common::ids::{LeaseEpoch, Lsn};
use schemashift_common::pg::{connect, install_helpers};
use schemashift_common::plan::RunPlan;
use schemashift_common::service::PartitionLease;
use schemashift_common::spec::Spec;
use schemashift_coordinator::capture::{flush_wal, Capture};
use schemashift_coordinator::control::Store;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Changes per workload transaction: a few large transactions, as a batch job makes.
const WORKLOAD_TX: u64 = 25_000;
/// Changes per replay step.
const REPLAY_BATCH: i64 = 5_000;
/// Replay that applies nothing for this long while changes are missing has failed.
const REPLAY_STALL: Duration = Duration::from_secs(60);
/// Worker name of the bench's own replayer in the control schema.
const REPLAYER: &str = "bench-replayer";
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
                |db| replay(b, db, None, n, workers, Order::OneThenOther),
            )
            .await;
        }
        for (label, order) in [
            ("replay_deferred_postgres", Order::IndexesAfter),
            ("catch_up_postgres", Order::AtOnce),
        ] {
            for workers in [1, 2] {
                b.measure(c, &format!("{label}_{n}_{workers}"), TARGET_DDL, |db| {
                    replay(b, db, None, n, workers, order)
                })
                .await;
            }
        }
    }
    match Tansu::start().await {
        Ok(Some(broker)) => {
            let url = broker.changelog();
            for &n in changes {
                b.measure(c, &format!("replay_kafka_{n}"), TARGET_DDL, |db| {
                    replay(b, db, Some(url.clone()), n, 1, Order::OneThenOther)
                })
                .await;
                b.measure(c, &format!("catch_up_kafka_{n}"), TARGET_DDL, |db| {
                    replay(b, db, Some(url.clone()), n, 1, Order::AtOnce)
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

/// How a catch-up's capture and replay are run.
#[derive(Clone, Copy)]
enum Order {
    /// Capture of the whole backlog, then replay of it: each one's own rate and CPU.
    OneThenOther,
    /// Capture, then replay into the target without its indexes that are not unique,
    /// then their build: how a run catches up with the changes made during its backfill.
    IndexesAfter,
    /// Both at once, as a run catches up: timed from the start of capture until every
    /// partition applied the whole backlog.
    AtOnce,
}

async fn replay(
    b: &Bench,
    db: String,
    kafka: Option<String>,
    changes: u64,
    workers: usize,
    order: Order,
) -> anyhow::Result<Outcome> {
    // As many change-log partitions as workers, each replayed by its own worker.
    let spec = spec(b, &db, workers, kafka.as_deref())?;
    let log = if kafka.is_some() {
        "kafka log, tansu"
    } else {
        "postgres log"
    };
    let r = match order {
        Order::OneThenOther => capture_and_replay(b, &spec, log, changes, workers, false).await,
        Order::IndexesAfter => capture_and_replay(b, &spec, log, changes, workers, true).await,
        Order::AtOnce => overlapped(b, &spec, log, changes, workers).await,
    };
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

/// What a catch-up starts from: the backfill done, a backlog of changes on the source up
/// to `end`, capture opened at the slot and one leased replayer per partition.
struct Backlog {
    changes: u64,
    end: Lsn,
    heads: LogHeads,
    capture: Capture,
    replayers: Vec<Replayer>,
}

/// Reads where each partition's part of the change log ends.
struct LogHeads {
    plan: Arc<RunPlan>,
    store: Store,
    target: Client,
}

impl LogHeads {
    async fn read(&self) -> anyhow::Result<BTreeMap<u32, i64>> {
        Ok(ChangeLog::of(&self.plan.changelog, &self.store.sql)
            .head(&self.target)
            .await?)
    }
}

/// A partition's replayer with its own target and source sessions.
struct Replayer {
    part: u32,
    r: PartitionReplayer,
    target: Client,
    source: Client,
}

async fn backlog(
    b: &Bench,
    spec: &Spec,
    total: u64,
    workers: usize,
    defer: bool,
) -> anyhow::Result<Backlog> {
    // The run's worker count sets its change-log partitions.
    run_backfill(b, spec, workers).await?;
    if defer {
        defer_indexes(spec).await?;
    }
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
    let capture = Capture::open(
        source,
        spec.source.clone(),
        capture_target,
        spec.target.clone(),
        plan.clone(),
        state.slot,
    )
    .await?;
    // The run's embedded workers may have leased the partitions when its backfill ended.
    store.release_leases_of(&target, "embedded-").await?;
    let parts = plan.partitions;
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
        let session = connect(&spec.target, "target").await?;
        install_helpers(&session, &plan.helpers, "target").await?;
        let r = PartitionReplayer::open(&session, plan.clone(), lease).await?;
        // Only merges read the source during replay; the users split does not.
        let source = connect(&spec.source, "source").await?;
        replayers.push(Replayer {
            part: part as u32,
            r,
            target: session,
            source,
        });
    }
    Ok(Backlog {
        changes,
        end,
        heads: LogHeads {
            plan,
            store,
            target,
        },
        capture,
        replayers,
    })
}

/// The target as a run leaves it while it replays the changes made during its backfill:
/// the recorded indexes that are not unique dropped (again) and due to be built.
async fn defer_indexes(spec: &Spec) -> anyhow::Result<()> {
    let target = connect(&spec.target, "target").await?;
    let recorded = Store::new(&spec.control_schema).sql.table("indexes");
    let dropped = target
        .query(
            &format!(
                "UPDATE {recorded} r SET restored = false FROM pg_index i                  JOIN pg_class c ON c.oid = i.indexrelid                  WHERE i.indrelid = to_regclass(r.table_name) AND c.relname = r.name                    AND r.constraint_type IS NULL AND NOT i.indisunique                  RETURNING i.indexrelid::regclass::text"
            ),
            &[],
        )
        .await?;
    for r in &dropped {
        // regclass text is quoted as needed.
        target
            .batch_execute(&format!("DROP INDEX {}", r.get::<_, String>(0)))
            .await?;
    }
    Ok(())
}

/// Capture rounds until the slot passed `end` and the log holds everything before it.
async fn capture_until(capture: &mut Capture, end: Lsn) -> anyhow::Result<()> {
    loop {
        let (_, cut_short, head) = capture.round().await?;
        if !cut_short && head >= end {
            return Ok(());
        }
    }
}

/// Capture of the whole backlog, then replay of it: each one's own rate and CPU.
async fn capture_and_replay(
    b: &Bench,
    spec: &Spec,
    log: &str,
    total: u64,
    workers: usize,
    defer: bool,
) -> anyhow::Result<Vec<Measurement>> {
    let Backlog {
        changes,
        end,
        heads,
        mut capture,
        mut replayers,
    } = backlog(b, spec, total, workers, defer).await?;
    let span = b.span().await;
    capture_until(&mut capture, end).await?;
    let captured = b.spent(&span).await;
    drop(capture);
    // Where each partition's log ends (complete: capture ended before replay begins).
    let (_ends, ends_rx) = tokio::sync::watch::channel(Some(heads.read().await?));
    drop(heads);
    let span = b.span().await;
    let applied: Vec<u64> = futures_util::future::try_join_all(
        replayers.iter_mut().map(|p| follow(p, ends_rx.clone())),
    )
    .await?;
    let applied: u64 = applied.iter().sum();
    anyhow::ensure!(
        applied >= changes,
        "replay applied {applied} of {changes} changes"
    );
    let replayed = b.spent(&span).await;
    let note = if defer { ", name indexes after" } else { "" };
    // Capture and then replay of the same backlog, one after the other: the upper bound of
    // a catch-up (the overlapped row measures a run's).
    let mut caught_up = captured.then(&replayed);
    if defer {
        // The run's build of the deferred indexes, as many sessions as it would use.
        let span = b.span().await;
        let target = connect(&spec.target, "target").await?;
        let built = schemashift_coordinator::indexes::rebuild(
            &spec.target,
            &target,
            &Store::new(&spec.control_schema),
            schemashift_coordinator::indexes::BuildOptions {
                set: schemashift_coordinator::indexes::IndexSet::All,
                parallel: workers.max(2),
                low_priority: false,
                gate: None,
                skip_tables: &[],
            },
        )
        .await?;
        anyhow::ensure!(built > 0, "no deferred index was built");
        caught_up = caught_up.then(&b.spent(&span).await);
    }
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
            format!("schemashift replay ({log}{note})"),
            applied,
            replayed,
        ),
        change_rate(
            b,
            (Kind::SchemashiftReplay, workers),
            if defer {
                format!("schemashift catch-up ({log}, capture, replay, name index builds)")
            } else {
                format!("schemashift catch-up ({log}, capture then replay)")
            },
            applied,
            caught_up,
        ),
    ])
}

/// Capture and replay at once, as a run does: replay follows the log while capture
/// appends to it; done when every partition applied its part of the whole backlog.
async fn overlapped(
    b: &Bench,
    spec: &Spec,
    log: &str,
    total: u64,
    workers: usize,
) -> anyhow::Result<Vec<Measurement>> {
    let Backlog {
        changes,
        end,
        heads,
        mut capture,
        mut replayers,
    } = backlog(b, spec, total, workers, false).await?;
    let (heads_tx, heads_rx) = tokio::sync::watch::channel(None::<BTreeMap<u32, i64>>);
    let span = b.span().await;
    let capturing = async {
        capture_until(&mut capture, end).await?;
        heads_tx.send_replace(Some(heads.read().await?));
        Ok::<_, anyhow::Error>(())
    };
    let replaying = futures_util::future::try_join_all(
        replayers.iter_mut().map(|p| follow(p, heads_rx.clone())),
    );
    let ((), applied) = tokio::try_join!(capturing, replaying)?;
    let caught_up = b.spent(&span).await;
    let applied: u64 = applied.iter().sum();
    anyhow::ensure!(
        applied >= changes,
        "replay applied {applied} of {changes} changes"
    );
    Ok(vec![change_rate(
        b,
        (Kind::SchemashiftReplay, workers),
        format!("schemashift catch-up ({log}, capture and replay at once)"),
        applied,
        caught_up,
    )])
}

/// Steps while capture appends (or after it ended); stops once capture has sent where
/// each partition's log ends and this partition reached its end.
async fn follow(
    p: &mut Replayer,
    mut heads: tokio::sync::watch::Receiver<Option<BTreeMap<u32, i64>>>,
) -> anyhow::Result<u64> {
    let mut applied = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let n = p.r.step(&mut p.target, &p.source, REPLAY_BATCH).await?;
        if n > 0 {
            applied += n as u64;
            last_progress = Instant::now();
            continue;
        }
        let end = heads
            .borrow()
            .as_ref()
            .map(|h| h.get(&p.part).copied().unwrap_or(0));
        match end {
            Some(end) if p.r.position().0 >= end => return Ok(applied),
            _ => {}
        }
        anyhow::ensure!(
            last_progress.elapsed() < REPLAY_STALL,
            "replay of partition {} reached {} and then nothing for {REPLAY_STALL:?}",
            p.part,
            p.r.position().0
        );
        // Caught up with what capture wrote so far: wait for more, or for capture's end.
        tokio::select! {
            _ = heads.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
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
