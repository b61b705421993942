//! The workers the coordinator has heard from: who is live, who was told the run is over,
//! and the status row each visit leaves in the control schema.

use super::{ControlCoordinator, DONE_GRACE_TTLS};
use schemashift_common::pg::describe;
use schemashift_common::service::{Progress, WorkerInfo};
use std::time::Instant;

pub(super) struct Seen {
    at: Instant,
    told_done: bool,
}

impl ControlCoordinator {
    /// Workers heard from within a lease TTL.
    pub(super) fn live_workers(&self) -> usize {
        let ttl = self.registration.lease_ttl;
        self.workers
            .lock()
            .map(|w| w.values().filter(|s| s.at.elapsed() < ttl).count())
            .unwrap_or(1)
            .max(1)
    }

    /// Ids of the workers heard from within a lease TTL (by this process: a lease left
    /// by a process that crashed has no live holder).
    pub fn live_worker_ids(&self) -> Vec<String> {
        let ttl = self.registration.lease_ttl;
        self.workers
            .lock()
            .map(|w| {
                w.iter()
                    .filter(|(_, s)| s.at.elapsed() < ttl)
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True once every worker heard from recently has been told the run is over. "Recently"
    /// is a few lease TTLs: a worker slowed down by a busy host still hears it, instead of
    /// retrying against a coordinator that has gone.
    pub fn all_told_done(&self) -> bool {
        let gone_after = self.registration.lease_ttl * DONE_GRACE_TTLS;
        self.workers
            .lock()
            .map(|w| {
                w.values()
                    .all(|s| s.told_done || s.at.elapsed() >= gone_after)
            })
            .unwrap_or(true)
    }

    pub(super) fn seen(&self, worker: &WorkerInfo, done: bool) {
        if let Ok(mut w) = self.workers.lock() {
            let s = w.entry(worker.id.clone()).or_insert(Seen {
                at: Instant::now(),
                told_done: false,
            });
            s.at = Instant::now();
            s.told_done = done;
        }
    }

    pub(super) async fn touch(
        &self,
        worker: &WorkerInfo,
        lease: Option<String>,
        p: Progress,
        state: &str,
    ) {
        let Ok(target) = self.target.get().await else {
            return;
        };
        let r = target
            .execute(
                &self.store.sql.touch_worker(),
                &[
                    &worker.id,
                    &worker.host,
                    &lease,
                    &(p.rows as i64),
                    &(p.changes as i64),
                    &state,
                ],
            )
            .await;
        if let Err(e) = r {
            // Status bookkeeping only; the lease itself is what matters.
            tracing::debug!(worker = %worker.id, error = %describe(&e), "worker status not saved");
        }
    }
}
