//! The change path's references: PostgreSQL's own logical replication catching up a backlog
//! into an untransformed copy, and the decoding limit (pgoutput decoded by the server and
//! thrown away by `pg_recvlogical`), beside schemashift's capture and replay of the same
//! kind of backlog (`changes::run_changes`).

use super::changes::workload;
use super::peers::{drop_subscription, published, sync, sync_worker_gone, workers_gone};
use super::{client, Bench, Kind, Measurement, Outcome, SOURCE_DB};
use crate::cluster::bin_dir;
use anyhow::Context;
use schemashift_common::sql::{quote_ident, quote_literal};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const POLL: Duration = Duration::from_millis(20);
const LIMIT: Duration = Duration::from_secs(3600);

fn change_measurement(kind: Kind, method: &str, note: &str) -> Measurement {
    Measurement {
        kind,
        method: method.into(),
        parallelism: 1,
        transformed: Some(false),
        unit: "changes",
        note: Some(note.into()),
        ..Measurement::default()
    }
}

/// Waits until the slot `slot` on the source has confirmed `end`.
async fn confirmed(source: &Client, slot: &str, end: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let done: bool = source
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &end],
            )
            .await?
            .get(0);
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < LIMIT,
            "slot {slot} not at {end} after {LIMIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The indexes of the subscription's copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CopyIndexes {
    /// The source's two (key, email).
    Source,
    /// The source's two and the new schema's three name indexes, as expression indexes
    /// over the split functions: the same index work per change as the new schema.
    SameAsNew,
}

/// The new schema's name indexes over the untransformed table.
const NAME_EXPRESSION_INDEXES: [&str; 3] = [
    "CREATE INDEX users_first_name_expr ON public.users (split_first(full_name))",
    "CREATE INDEX users_last_name_expr ON public.users (split_last(full_name))",
    "CREATE INDEX users_first_last_expr ON public.users \
     (split_first(full_name), split_last(full_name))",
];

/// A subscription to an untransformed copy: synced, disabled while `changes` changes are
/// written, then enabled and timed until its slot confirms the source's end of WAL.
pub(super) async fn native_catch_up(
    b: &Bench,
    db: String,
    changes: u64,
    indexes: CopyIndexes,
) -> anyhow::Result<Outcome> {
    let (source, target, name) = published(b, &db).await?;
    let measured = async {
        sync(b, &target, &db).await?;
        sync_worker_gone(&target, &db).await?;
        if indexes == CopyIndexes::SameAsNew {
            // Built after the initial copy, outside the clock.
            for sql in crate::scenario::SPLIT_FUNCTIONS
                .iter()
                .chain(&NAME_EXPRESSION_INDEXES)
            {
                target.batch_execute(sql).await?;
            }
        }
        target
            .batch_execute(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
            .await?;
        // The apply worker leaves a moment after DISABLE; until then it would apply part
        // of the backlog before the clock starts.
        workers_gone(&target, &db, "pid IS NOT NULL", "apply").await?;
        let start: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let made = workload(&source, changes).await?;
        let end: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let untouched: bool = source
            .query_one(
                "SELECT confirmed_flush_lsn <= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&db, &start],
            )
            .await?
            .get(0);
        anyhow::ensure!(
            untouched,
            "the subscription applied part of the backlog before the clock"
        );
        let span = b.span().await;
        let t0 = Instant::now();
        target
            .batch_execute(&format!("ALTER SUBSCRIPTION {name} ENABLE"))
            .await?;
        confirmed(&source, &db, &end).await?;
        let secs = t0.elapsed().as_secs_f64();
        let spent = b.spent(&span).await;
        // A reference that lost changes would be no reference: both tables must match.
        let sum = "SELECT count(*)::text || '/' || coalesce(sum(hashtext(u::text)), 0)::text \
                   FROM public.users u";
        let (s, t): (String, String) = (
            source.query_one(sum, &[]).await?.get(0),
            target.query_one(sum, &[]).await?.get(0),
        );
        anyhow::ensure!(
            s == t,
            "the subscription's copy differs: source {s}, target {t}"
        );
        let (method, note) = match indexes {
            CopyIndexes::Source => (
                "native logical replication catch-up",
                "a subscription into an untransformed copy (the source's two indexes), enabled \
                 after the backlog was written; timed until its slot confirmed the end of WAL",
            ),
            CopyIndexes::SameAsNew => (
                "native catch-up, the new schema's 5 indexes",
                "the same, into an untransformed copy that also has the new schema's three name \
                 indexes as expression indexes over the split functions (like for like with \
                 schemashift's replay, which maintains five indexes per change)",
            ),
        };
        let m = change_measurement(Kind::NativeCatchUp, method, note);
        anyhow::Ok(b.timed(m, made, (secs, secs), spent.cpu))
    }
    .await;
    // Whatever happened.
    let dropped = drop_subscription(&source, &target, &name).await;
    let m = measured?;
    dropped.context("dropping the subscription and publication")?;
    Ok(Outcome::Measured(vec![m]))
}

/// The decoding limit: a pgoutput slot made before `changes` changes are written, then
/// `pg_recvlogical --endpos` drains it to /dev/null (its CPU is the client column, the
/// walsender's the source's).
pub(super) async fn decoding_limit(b: &Bench, db: String, changes: u64) -> anyhow::Result<Outcome> {
    let source = client(&b.source_dsn()).await?;
    let slot = db.clone();
    let publication = quote_ident(&db);
    // Two statements: a slot cannot be made in a transaction that wrote.
    source
        .batch_execute(&format!(
            "CREATE PUBLICATION {publication} FOR TABLE public.users"
        ))
        .await
        .context("creating the publication")?;
    source
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
            quote_literal(&slot)
        ))
        .await
        .context("creating the slot")?;
    let measured = async {
        let made = workload(&source, changes).await?;
        let end: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let bin = bin_dir()?.join("pg_recvlogical");
        let span = b.span().await;
        let t0 = Instant::now();
        let out = tokio::process::Command::new(&bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &b.src.port().to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", SOURCE_DB, "--slot", &slot, "--start", "--no-loop"])
            .args(["--endpos", &end, "-f", "/dev/null"])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                &format!("publication_names={db}"),
            ])
            .output()
            .await
            .with_context(|| format!("running {}", bin.display()))?;
        let secs = t0.elapsed().as_secs_f64();
        let spent = b.spent(&span).await;
        anyhow::ensure!(
            out.status.success(),
            "pg_recvlogical: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = change_measurement(
            Kind::DecodingLimit,
            "decoding limit (pg_recvlogical, pgoutput)",
            "the server decodes the backlog with pgoutput, the client throws it away",
        );
        anyhow::Ok(b.timed(m, made, (secs, secs), spent.cpu))
    }
    .await;
    let dropped = source
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot({}); DROP PUBLICATION IF EXISTS {publication}",
            quote_literal(&slot)
        ))
        .await;
    let m = measured?;
    dropped.context("dropping the slot and publication")?;
    Ok(Outcome::Measured(vec![m]))
}
