use crate::kafka::KafkaLogError;
use schemashift_common::pg::describe;
use schemashift_common::retry::{classify_pg, Class, Classify};

/// What can go wrong reading the change log or applying it.
#[derive(Debug, thiserror::Error)]
pub enum ChangeLogError {
    #[error(transparent)]
    Kafka(#[from] KafkaLogError),
    /// An entry that is not one of ours: retrying cannot help.
    #[error("change log: {0}")]
    Corrupt(String),
    #[error("change log, {context}: {reason}")]
    Db {
        context: String,
        reason: String,
        class: Class,
    },
    #[error("replay of partition {part}, table {table}: {reason}")]
    Replay {
        part: u32,
        table: String,
        reason: String,
        class: Class,
    },
    #[error(
        "replay of partition {part}: lease lost (another worker applies it now); batch rolled back"
    )]
    PartitionLost { part: u32 },
}

impl ChangeLogError {
    pub fn db(context: impl Into<String>, e: &tokio_postgres::Error) -> Self {
        ChangeLogError::Db {
            context: context.into(),
            reason: describe(e),
            class: classify_pg(e),
        }
    }
}

impl Classify for ChangeLogError {
    fn class(&self) -> Class {
        match self {
            ChangeLogError::Kafka(e) => e.class(),
            ChangeLogError::Corrupt(_) => Class::Permanent,
            ChangeLogError::Db { class, .. } | ChangeLogError::Replay { class, .. } => *class,
            ChangeLogError::PartitionLost { .. } => Class::Fenced,
        }
    }
}

pub(crate) fn replay_err(part: u32, table: &str, e: &tokio_postgres::Error) -> ChangeLogError {
    ChangeLogError::Replay {
        part,
        table: table.to_owned(),
        reason: describe(e),
        class: classify_pg(e),
    }
}
