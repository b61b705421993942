//! The slot side of capture: publication and slot creation and removal, and the source's
//! WAL positions that rounds and catch-ups measure against.

use crate::error::CoordinatorError;
use schemashift_common::ids::Lsn;
use schemashift_common::plan::RunPlan;
use schemashift_common::sql::quote_ident;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

const PUBLICATION_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)";
const SLOT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)";

/// Whether the catalog row `sql` looks for by `name` is there.
async fn exists(
    client: &Client,
    sql: &str,
    name: &str,
    context: &str,
) -> Result<bool, CoordinatorError> {
    Ok(client
        .query_one(sql, &[&name])
        .await
        .map_err(db(context))?
        .get(0))
}

/// Creates the publication and the slot when missing; returns the slot's consistent point.
/// Slot creation waits for running transactions; if it takes long, the blocking
/// backends are reported instead of waiting silently.
pub async fn ensure_slot(
    source: &Client,
    plan: &RunPlan,
    name: &str,
) -> Result<(), CoordinatorError> {
    // An administrator's publication (checked by the planner) is used as it is.
    let has_pub = plan.publication.is_some()
        || exists(source, PUBLICATION_EXISTS, name, "checking publication").await?;
    if !has_pub {
        // Lookup tables of merges too: their changes refresh the merged rows.
        let mut names: Vec<String> = Vec::new();
        for t in &plan.tables {
            for n in std::iter::once(&t.source).chain(t.lookups.iter().map(|l| &l.source)) {
                if !names.contains(&n.to_string()) {
                    names.push(n.to_string());
                }
            }
        }
        let tables = names.join(", ");
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {tables}",
                quote_ident(name)
            ))
            .await
            .map_err(db("creating publication"))?;
        tracing::info!(publication = name, "publication created");
    }
    let has_slot = exists(source, SLOT_EXISTS, name, "checking slot").await?;
    if has_slot {
        return Ok(());
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&name];
    let create = source.query_one(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        &params,
    );
    tokio::pin!(create);
    let started = Instant::now();
    loop {
        tokio::select! {
            r = &mut create => {
                let lsn: String = r.map_err(db("creating replication slot"))?.get(0);
                tracing::info!(slot = name, consistent_point = %lsn, "replication slot created");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                tracing::warn!(
                    slot = name, waited_s = started.elapsed().as_secs(),
                    "slot creation waits for running transactions on the source; see pg_stat_activity \
                     rows with backend_xid set and an old xact_start (commit or cancel them)"
                );
            }
        }
    }
}

/// Which WAL position of the source to read.
#[derive(Clone, Copy, Debug)]
pub enum WalPosition {
    /// End of WAL inserted so far: covers every commit made, flushed or not
    /// (asynchronous commits are visible before their WAL is flushed).
    Insert,
    /// End of WAL flushed to disk: logical decoding returns nothing past it.
    Flush,
}

pub async fn wal_lsn(
    source: &impl tokio_postgres::GenericClient,
    which: WalPosition,
) -> Result<Lsn, CoordinatorError> {
    let sql = match which {
        WalPosition::Insert => "SELECT pg_current_wal_insert_lsn()::text",
        WalPosition::Flush => "SELECT pg_current_wal_flush_lsn()::text",
    };
    let lsn: String = source
        .query_one(sql, &[])
        .await
        .map_err(db("reading source WAL position"))?
        .get(0);
    lsn.parse()
        .map_err(|e: schemashift_common::ids::LsnParseError| {
            CoordinatorError::Capture(e.to_string())
        })
}

/// Flushes the source's WAL up to now: a synchronous commit flushes everything before
/// it. Without this, asynchronous commits wait for the WAL writer (up to
/// `wal_writer_delay`) before they can be decoded. A commit is only flushed if its
/// transaction wrote WAL besides the commit record, hence the (transactional, so never
/// decoded without pgoutput's `messages`) logical message; it needs no table.
pub async fn flush_wal(source: &Client) -> Result<(), CoordinatorError> {
    source
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); \
             SELECT pg_logical_emit_message(true, 'schemashift', ''); COMMIT",
        )
        .await
        .map_err(db("flushing source WAL"))
}

/// Drops the slot and publication; says whether anything was there.
pub async fn drop_slot(source: &Client, name: &str) -> Result<(bool, bool), CoordinatorError> {
    source
        .query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&name],
        )
        .await
        .map_err(db("stopping the slot's reader"))?;
    // pg_terminate_backend only signals: the reader (or a stream its run just closed)
    // releases the slot when its backend exits, a few milliseconds later.
    let drop_sql =
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let dropped_slot = loop {
        match source.query(drop_sql, &[&name]).await {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            r => break r.map_err(db("dropping the slot"))?.len() == 1,
        }
    };
    let had_pub = exists(source, PUBLICATION_EXISTS, name, "checking publication").await?;
    source
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(db("dropping the publication"))?;
    Ok((dropped_slot, had_pub))
}
