use schemashift_common::ids::ShardId;
use schemashift_common::pg::{describe, is_transient, PgError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] PgError),
    #[error("table {table}, shard {shard} {range}: {reason}")]
    Shard {
        table: String,
        shard: ShardId,
        range: String,
        reason: String,
        transient: bool,
    },
    #[error(
        "table {table}, shard {shard}: lease lost (another worker owns it now); rows rolled back"
    )]
    LeaseLost { table: String, shard: ShardId },
    #[error(
        "replay of partition {part}: lease lost (another worker applies it now); batch rolled back"
    )]
    PartitionLost { part: u32 },
    #[error("replay of partition {part}, table {table}: {reason}")]
    Replay {
        part: u32,
        table: String,
        reason: String,
        transient: bool,
    },
    #[error("verify of table {table}: {reason}")]
    Verify { table: String, reason: String },
    #[error("change log: {0}")]
    ChangeLog(String),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaLogError),
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The coordinator does not let this worker in (token); retrying cannot help.
    #[error("{0}")]
    Refused(String),
}

impl WorkerError {
    /// The one place that decides whether a failed piece of work is retried.
    pub fn is_transient(&self) -> bool {
        match self {
            WorkerError::Connect(_) => true,
            WorkerError::Shard { transient, .. } | WorkerError::Replay { transient, .. } => {
                *transient
            }
            WorkerError::LeaseLost { .. } | WorkerError::PartitionLost { .. } => false,
            WorkerError::Kafka(e) => e.is_transient(),
            WorkerError::Verify { .. }
            | WorkerError::ChangeLog(_)
            | WorkerError::Coordinator(_)
            | WorkerError::Refused(_) => false,
        }
    }
}

pub(crate) fn pg_reason(e: &tokio_postgres::Error) -> (String, bool) {
    (describe(e), is_transient(e))
}
