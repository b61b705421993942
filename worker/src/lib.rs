//! schemashift worker: stateless; leases work from the coordinator and does it.
//! Backfill copies shards, replay applies change-log partitions (with the replayer of
//! `schemashift-changelog`), verify compares key ranges (`schemashift_common::verify`).
pub mod backfill;
pub mod error;
pub mod fleet;
pub mod grpc;
pub mod runner;

pub use error::WorkerError;
