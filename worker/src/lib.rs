//! schemashift worker: stateless; leases work from the coordinator and does it.
//! Backfill copies shards, replay applies the change log, verify compares ranges.
pub mod backfill;
pub mod error;
pub mod grpc;
pub mod kafka;
mod refresh;
pub mod replay;
pub mod runner;
pub mod verify;

pub use error::WorkerError;
