//! The coordinator as workers see it: a trait without transport. Embedded mode calls
//! an in-process implementation; the gRPC adapter will implement the same trait.

use crate::ids::{LeaseEpoch, ShardId};
use crate::plan::{RunPlan, Shard};
use crate::spec::Dsn;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Worth retrying: the coordinator or its database is briefly unreachable.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The request was refused (bad token, lost lease, finished run).
    #[error("coordinator refused: {0}")]
    Rejected(String),
}

impl ServiceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ServiceError::Unavailable(_))
    }
}

#[derive(Clone, Debug)]
pub struct Registration {
    pub source: Dsn,
    pub target: Dsn,
    pub plan: RunPlan,
    pub lease_ttl: Duration,
}

#[derive(Clone, Debug)]
pub enum Work {
    Backfill {
        shard: Shard,
        epoch: LeaseEpoch,
    },
    /// Nothing to hand out now; ask again after this long.
    Wait(Duration),
    /// The phase is over: stop asking.
    Done,
}

pub trait CoordinatorService: Send + Sync + 'static {
    fn register(
        &self,
        worker: &str,
    ) -> impl Future<Output = Result<Registration, ServiceError>> + Send;
    fn lease(&self, worker: &str) -> impl Future<Output = Result<Work, ServiceError>> + Send;
    /// Extends a lease; `false` means it is lost and the work must be abandoned.
    fn heartbeat(
        &self,
        worker: &str,
        shard: ShardId,
        epoch: LeaseEpoch,
        rows: u64,
    ) -> impl Future<Output = Result<bool, ServiceError>> + Send;
    /// Reported after the shard's transaction committed (the commit itself is fenced).
    fn completed(
        &self,
        worker: &str,
        shard: ShardId,
        epoch: LeaseEpoch,
        rows: u64,
        bytes: u64,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;
    fn failed(
        &self,
        worker: &str,
        shard: ShardId,
        epoch: LeaseEpoch,
        reason: String,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;
}
