//! The run's change log and what reads it back. Capture appends changes to one of two
//! backends (a table in the control schema, or a Kafka topic), partitioned by key so a
//! key's history stays whole and in order; [`ChangeLog`] reads either; the replayer
//! applies a partition to the target with the backfill's mapping.
pub mod error;
pub mod kafka;
mod refresh;
pub mod replay;
pub mod table;

pub use error::ChangeLogError;
pub use table::{ChangeLog, LogHead};
