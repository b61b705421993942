use schemashift_changelog::ChangeLogError;
use schemashift_common::ids::ShardId;
use schemashift_common::pg::PgError;
use schemashift_common::retry::{Class, Classify};
use schemashift_common::verify::VerifyError;

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
        class: Class,
    },
    #[error(
        "table {table}, shard {shard}: lease lost (another worker owns it now); rows rolled back"
    )]
    LeaseLost { table: String, shard: ShardId },
    #[error(transparent)]
    Log(#[from] ChangeLogError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The coordinator does not let this worker in (token); retrying cannot help.
    #[error("{0}")]
    Refused(String),
}

impl Classify for WorkerError {
    fn class(&self) -> Class {
        match self {
            WorkerError::Connect(e) => e.class(),
            WorkerError::Shard { class, .. } => *class,
            WorkerError::LeaseLost { .. } => Class::Fenced,
            WorkerError::Log(e) => e.class(),
            WorkerError::Verify(e) => e.class(),
            WorkerError::Coordinator(_) | WorkerError::Refused(_) => Class::Permanent,
        }
    }
}
