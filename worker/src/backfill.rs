//! Backfill: one shard = one binary COPY stream from the source's mapped SELECT straight
//! into the target's COPY FROM (or, by the FDW strategy, one `INSERT … SELECT` from the
//! source's foreign table), inside one target transaction that also marks the shard done
//! (fenced by lease epoch). Rows are never decoded in Rust.

use crate::WorkerError;
use futures_util::{SinkExt, StreamExt};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::LeaseEpoch;
use schemashift_common::pg::describe;
use schemashift_common::plan::{Shard, TablePlan, Transfer};
use schemashift_common::retry::classify_pg;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_postgres::Client;

#[derive(Clone, Copy, Debug, Default)]
pub struct ShardOutcome {
    pub rows: u64,
    pub bytes: u64,
}

/// Live counters a heartbeat reads while the copy runs.
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
}

/// What the heartbeat task shares with a running copy: counters out, pauses in.
pub struct CopyPacing {
    pub progress: Arc<CopyProgress>,
    /// True while the coordinator holds copies back (throttling).
    pub hold: tokio::sync::watch::Receiver<bool>,
}

pub async fn copy_shard(
    source: &Client,
    target: &mut Client,
    control: &ControlSql,
    table: &TablePlan,
    shard: &Shard,
    epoch: LeaseEpoch,
    pacing: CopyPacing,
) -> Result<ShardOutcome, WorkerError> {
    let CopyPacing { progress, mut hold } = pacing;
    let fail = shard_err(table, shard);
    let tx = target.transaction().await.map_err(fail)?;
    if table.transfer == Transfer::Fdw {
        // One statement: the target fetches the range through the foreign table and maps
        // it; a hold applies between shards only.
        let sql = table.fdw_insert_sql(&control.table(&table.foreign_table_name()), &shard.range);
        let rows = tx.execute(&sql, &[]).await.map_err(fail)?;
        return finish(tx, control, table, shard, epoch, rows, 0).await;
    }
    let sink = tx.copy_in(&table.copy_in_sql()).await.map_err(fail)?;
    futures_util::pin_mut!(sink);
    let stream = source
        .copy_out(&table.copy_out_sql(&shard.range))
        .await
        .map_err(fail)?;
    futures_util::pin_mut!(stream);
    let mut bytes = 0u64;
    let mut batch = schemashift_common::pg::CopyBatch::new();
    loop {
        // Throttled: stop pulling rows; both servers' copy backends then sit idle on the
        // socket (the transactions stay open) until the coordinator releases the hold.
        // `has_changed` is one atomic load: nothing is locked per row unless it changed.
        if hold.has_changed().unwrap_or(false) && *hold.borrow_and_update() {
            // A closed channel (heartbeat task gone) releases the hold.
            let _ = hold.wait_for(|held| !*held).await;
        }
        let Some(chunk) = stream.next().await else {
            break;
        };
        let chunk = chunk.map_err(fail)?;
        bytes += chunk.len() as u64;
        progress
            .bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        progress.messages.fetch_add(1, Ordering::Relaxed);
        if let Some(full) = batch.push(&chunk) {
            sink.feed(full).await.map_err(fail)?;
        }
    }
    if let Some(rest) = batch.rest() {
        sink.feed(rest).await.map_err(fail)?;
    }
    let rows = sink.as_mut().finish().await.map_err(fail)?;
    finish(tx, control, table, shard, epoch, rows, bytes).await
}

/// A database error as this shard's failure (transient or not, as the error says).
fn shard_err<'a>(
    table: &'a TablePlan,
    shard: &'a Shard,
) -> impl Fn(tokio_postgres::Error) -> WorkerError + Copy + 'a {
    move |e| WorkerError::Shard {
        table: table.describe(),
        shard: shard.id,
        range: shard.range.to_string(),
        reason: describe(&e),
        class: classify_pg(&e),
    }
}

/// Marks the shard done in the transaction that holds its rows (fenced by the lease epoch)
/// and commits both.
async fn finish(
    tx: tokio_postgres::Transaction<'_>,
    control: &ControlSql,
    table: &TablePlan,
    shard: &Shard,
    epoch: LeaseEpoch,
    rows: u64,
    bytes: u64,
) -> Result<ShardOutcome, WorkerError> {
    let fail = shard_err(table, shard);
    let marked = tx
        .execute(
            &control.complete_shard(),
            &[&shard.id.0, &epoch.0, &(rows as i64), &(bytes as i64)],
        )
        .await
        .map_err(fail)?;
    if marked != 1 {
        // Dropping the transaction rolls the shard's rows back.
        return Err(WorkerError::LeaseLost {
            table: table.describe(),
            shard: shard.id,
        });
    }
    tx.commit().await.map_err(fail)?;
    Ok(ShardOutcome { rows, bytes })
}
