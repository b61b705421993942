//! A worker process against a fleet coordinator: one worker loop per member the coordinator
//! serves, all over the one connection, each naming its member on every call. The
//! coordinator decides which of them may copy (the fleet's pool and per-server limits), so
//! the loops need no gate of their own here.

use crate::grpc::GrpcCoordinator;
use crate::runner::{run_worker, WorkerStats};
use crate::WorkerError;
use schemashift_common::retry::{retry, Backoff};
use schemashift_common::service::{ServiceError, WorkerInfo};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::Instrument;

/// Runs until the coordinator says every member's run is over (or shutdown). A member
/// whose loop fails does not stop the others; the first failure is returned at the end.
pub async fn run_any(
    client: GrpcCoordinator,
    me: WorkerInfo,
    shutdown: watch::Receiver<bool>,
) -> Result<WorkerStats, WorkerError> {
    let names = retry("list fleet members", Backoff::Coordinator, || {
        client.members()
    })
    .await
    .map_err(|e| match e {
        ServiceError::Unauthenticated(_) => WorkerError::Refused(e.to_string()),
        ServiceError::Unavailable(_) | ServiceError::Rejected(_) => {
            WorkerError::Coordinator(format!("worker {} cannot list members: {e}", me.id))
        }
    })?;
    if names.is_empty() {
        return run_worker(Arc::new(client), me, shutdown, None).await;
    }
    tracing::info!(worker = %me.id, members = names.len(), "worker serving a fleet");
    let mut loops = tokio::task::JoinSet::new();
    for name in names {
        let member = client
            .for_member(&name)
            .map_err(|e| WorkerError::Coordinator(e.to_string()))?;
        let span = tracing::info_span!("member", member = %name);
        let work = run_worker(Arc::new(member), me.clone(), shutdown.clone(), None);
        loops.spawn(async move { (name, work.await) }.instrument(span));
    }
    let mut total = WorkerStats::default();
    let mut first_error = None;
    while let Some(joined) = loops.join_next().await {
        match joined {
            Ok((_, Ok(s))) => total.add(&s),
            Ok((name, Err(e))) => {
                tracing::warn!(member = %name, error = %e, "member's worker loop failed");
                first_error.get_or_insert(WorkerError::Coordinator(format!("member {name}: {e}")));
            }
            Err(e) => {
                first_error.get_or_insert(WorkerError::Coordinator(format!("worker loop: {e}")));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}
