//! The coordinator service for in-process workers (embedded mode). Lease state lives in
//! the control schema, so the same rules hold whoever calls: a lease is an epoch, and
//! a shard's commit is fenced by it.

use crate::control::Store;
use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::pg::describe;
use schemashift_common::plan::{Shard, ShardRange};
use schemashift_common::service::{CoordinatorService, Registration, ServiceError, Work};
use std::time::Duration;
use tokio_postgres::Client;

pub struct EmbeddedCoordinator {
    target: Client,
    store: Store,
    registration: Registration,
}

impl EmbeddedCoordinator {
    pub fn new(target: Client, registration: Registration) -> Self {
        let store = Store::new(&registration.plan.control_schema);
        EmbeddedCoordinator {
            target,
            store,
            registration,
        }
    }
}

fn unavailable(e: tokio_postgres::Error) -> ServiceError {
    ServiceError::Unavailable(describe(&e))
}

impl CoordinatorService for EmbeddedCoordinator {
    async fn register(&self, worker: &str) -> Result<Registration, ServiceError> {
        tracing::debug!(worker, "worker registered");
        Ok(self.registration.clone())
    }

    async fn lease(&self, worker: &str) -> Result<Work, ServiceError> {
        let ttl = self.registration.lease_ttl.as_secs_f64();
        if let Some(r) = self
            .target
            .query_opt(&self.store.sql.lease_shard(), &[&worker, &ttl])
            .await
            .map_err(unavailable)?
        {
            return Ok(Work::Backfill {
                shard: Shard {
                    id: ShardId(r.get(0)),
                    table: r.get::<_, i32>(1) as u32,
                    range: ShardRange {
                        lo: r.get(2),
                        hi: r.get(3),
                    },
                    estimated_rows: r.get::<_, i64>(4) as u64,
                },
                epoch: LeaseEpoch(r.get(5)),
            });
        }
        let c = self
            .store
            .shard_counts(&self.target)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        if c.pending + c.leased == 0 {
            Ok(Work::Done)
        } else {
            // Others hold the remaining leases; one may expire and come back.
            Ok(Work::Wait(Duration::from_millis(200)))
        }
    }

    async fn heartbeat(
        &self,
        _worker: &str,
        shard: ShardId,
        epoch: LeaseEpoch,
        _rows: u64,
    ) -> Result<bool, ServiceError> {
        let ttl = self.registration.lease_ttl.as_secs_f64();
        let n = self
            .target
            .execute(&self.store.sql.extend_lease(), &[&shard.0, &epoch.0, &ttl])
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn completed(
        &self,
        worker: &str,
        shard: ShardId,
        _epoch: LeaseEpoch,
        rows: u64,
        _bytes: u64,
    ) -> Result<(), ServiceError> {
        tracing::debug!(worker, %shard, rows, "shard reported done");
        Ok(())
    }

    async fn failed(
        &self,
        worker: &str,
        shard: ShardId,
        epoch: LeaseEpoch,
        reason: String,
    ) -> Result<(), ServiceError> {
        tracing::debug!(worker, %shard, "shard returned after failure");
        self.target
            .execute(&self.store.sql.fail_shard(), &[&shard.0, &epoch.0, &reason])
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
