//! The coordinator as workers see it: a trait without transport. Embedded mode calls
//! the implementation in-process; distributed mode reaches the same implementation
//! through the gRPC adapter, so both run the same rules.

use crate::ids::{LeaseEpoch, ShardId};
use crate::plan::{RunPlan, Shard};
use crate::retry::{Class, Classify};
use crate::spec::Dsn;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Worth retrying: the coordinator or its database is briefly unreachable.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The request was refused (lost lease, finished run, bad request).
    #[error("coordinator refused: {0}")]
    Rejected(String),
    /// The worker is not allowed in: wrong or missing token.
    #[error("coordinator refused the worker: {0}")]
    Unauthenticated(String),
}

impl Classify for ServiceError {
    fn class(&self) -> Class {
        match self {
            ServiceError::Unavailable(_) => Class::Transient,
            ServiceError::Rejected(_) | ServiceError::Unauthenticated(_) => Class::Permanent,
        }
    }
}

/// Who is asking: a worker's stable name and where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
}

#[derive(Clone, Debug)]
pub struct Registration {
    pub run_id: String,
    pub source: Dsn,
    pub target: Dsn,
    pub plan: RunPlan,
    pub lease_ttl: Duration,
    /// The coordinator's run span: workers make their spans its children.
    pub traceparent: Option<String>,
}

/// One change-log partition held by a worker; the epoch fences its position writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionLease {
    pub part: u32,
    pub epoch: LeaseEpoch,
}

#[derive(Clone, Debug)]
pub enum Work {
    Backfill {
        shard: Shard,
        epoch: LeaseEpoch,
    },
    /// Apply these partitions of the change log until told to stop.
    Replay {
        partitions: Vec<PartitionLease>,
    },
    /// Compare this range on both sides and report with `verified`.
    Verify {
        shard: Shard,
        epoch: LeaseEpoch,
    },
    /// Nothing to hand out now; ask again after this long.
    Wait(Duration),
    /// The run is over for workers: exit.
    Done,
}

/// How a key differs between source and target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// In the source, not in the target.
    Missing,
    /// In the target, not in the source.
    Extra,
    Different,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyDiff {
    pub table: String,
    pub key: Vec<String>,
    pub kind: DiffKind,
}

/// The compare of one key range: row counts and the keys that differ.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RangeCheck {
    pub source_rows: i64,
    pub target_rows: i64,
    pub diffs: Vec<KeyDiff>,
}

/// The lease a heartbeat or failure report is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseRef {
    Shard { shard: ShardId, epoch: LeaseEpoch },
    Partitions(Vec<PartitionLease>),
}

/// A worker's running totals since it started (rows copied, changes applied).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub rows: u64,
    pub bytes: u64,
    pub changes: u64,
}

/// The coordinator's answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    /// The lease was extended.
    Keep,
    /// Someone else owns it now: abandon the work (its commit would be refused anyway).
    Lost,
    /// The lease is still valid but the phase is over: finish the current step and ask again.
    Stop,
    /// The lease was extended, but the source is throttled: pause the copy until a later
    /// heartbeat answers `Keep`.
    Hold,
}

pub trait CoordinatorService: Send + Sync + 'static {
    fn register(
        &self,
        worker: &WorkerInfo,
    ) -> impl Future<Output = Result<Registration, ServiceError>> + Send;
    fn lease(
        &self,
        worker: &WorkerInfo,
        progress: Progress,
    ) -> impl Future<Output = Result<Work, ServiceError>> + Send;
    fn heartbeat(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        progress: Progress,
    ) -> impl Future<Output = Result<Beat, ServiceError>> + Send;
    /// Reported after the shard's transaction committed (the commit itself is fenced).
    fn completed(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        rows: u64,
        bytes: u64,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;
    /// The result of a verify lease: the compare, or why it could not be made.
    fn verified(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        result: Result<RangeCheck, String>,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;
    /// Gives a lease back so another attempt can take it; an empty reason means the
    /// worker simply stopped (no failure counted).
    fn failed(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        reason: String,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;
}
