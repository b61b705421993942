//! The worker loop: register, lease a shard, copy it, report; repeat until the
//! coordinator says the phase is over. Connections are re-established with bounded
//! exponential backoff when they drop.

use crate::backfill::{copy_shard, CopyProgress};
use crate::WorkerError;
use backon::{ExponentialBuilder, Retryable};
use schemashift_common::control::ControlSql;
use schemashift_common::pg::{connect, install_helpers};
use schemashift_common::service::{CoordinatorService, Registration, Work};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::Instrument;

#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerStats {
    pub shards: u64,
    pub rows: u64,
    pub bytes: u64,
    pub retries: u64,
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(10)
        .with_jitter()
}

async fn sessions(reg: &Registration) -> Result<(Client, Client), WorkerError> {
    let open = || async {
        let source = connect(&reg.source, "source").await?;
        install_helpers(&source, &reg.plan.helpers, "source").await?;
        let target = connect(&reg.target, "target").await?;
        Ok::<_, WorkerError>((source, target))
    };
    open.retry(backoff())
        .when(WorkerError::is_transient)
        .notify(
            |e, d| tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "reconnecting"),
        )
        .await
}

/// Runs one backfill worker until the coordinator has no more shards or shutdown.
pub async fn run_backfill<S: CoordinatorService>(
    svc: Arc<S>,
    id: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<WorkerStats, WorkerError> {
    let reg = (|| svc.register(&id))
        .retry(backoff())
        .when(|e| e.is_transient())
        .await
        .map_err(|e| WorkerError::Coordinator(format!("worker {id} cannot register: {e}")))?;
    let control = ControlSql::new(&reg.plan.control_schema);
    let (mut source, mut target) = sessions(&reg).await?;
    let mut stats = WorkerStats::default();
    loop {
        if *shutdown.borrow() {
            return Ok(stats);
        }
        let work = match svc.lease(&id).await {
            Ok(w) => w,
            Err(e) if e.is_transient() => {
                stats.retries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(WorkerError::Coordinator(format!("worker {id}: {e}"))),
        };
        let (shard, epoch) = match work {
            Work::Backfill { shard, epoch } => (shard, epoch),
            Work::Wait(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            Work::Done => return Ok(stats),
        };
        let Some(table) = reg.plan.table(shard.table) else {
            return Err(WorkerError::Coordinator(format!(
                "shard {} names unknown table {}",
                shard.id, shard.table
            )));
        };
        let span = tracing::info_span!("shard", worker = %id, table = %table.describe(), shard = %shard.id,
            range = %shard.range, epoch = epoch.0, rows = tracing::field::Empty, bytes = tracing::field::Empty);
        let progress = Arc::new(CopyProgress::default());
        // Heartbeats keep the lease while the copy runs; a lost lease is caught by the
        // fenced commit, so the heartbeat only needs to try.
        let beat = {
            let (svc, id, progress) = (svc.clone(), id.clone(), progress.clone());
            let every = reg.lease_ttl / 3;
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let rows = progress.messages.load(Ordering::Relaxed);
                        if let Ok(false) = svc.heartbeat(&id, shard.id, epoch, rows).await {
                            tracing::warn!("lease lost while copying");
                        }
                    }
                }
                .instrument(span.clone()),
            )
        };
        let result = copy_shard(
            &source,
            &mut target,
            &control,
            table,
            &shard,
            epoch,
            progress,
        )
        .instrument(span.clone())
        .await;
        beat.abort();
        match result {
            Ok(out) => {
                span.record("rows", out.rows);
                span.record("bytes", out.bytes);
                span.in_scope(|| {
                    tracing::info!(rows = out.rows, bytes = out.bytes, "shard copied")
                });
                stats.shards += 1;
                stats.rows += out.rows;
                stats.bytes += out.bytes;
                let _ = svc
                    .completed(&id, shard.id, epoch, out.rows, out.bytes)
                    .await;
            }
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "shard failed"));
                let _ = svc.failed(&id, shard.id, epoch, e.to_string()).await;
                if matches!(e, WorkerError::LeaseLost { .. }) {
                    continue;
                }
                if !e.is_transient() {
                    return Err(e);
                }
                stats.retries += 1;
                if source.is_closed() || target.is_closed() {
                    (source, target) = sessions(&reg).await?;
                }
            }
        }
    }
}
