use schemashift_changelog::ChangeLogError;
use schemashift_common::pg::PgError;
use schemashift_common::retry::{classify_pg, Class, Classify};
use schemashift_common::spec::SpecError;
use schemashift_common::verify::VerifyError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Bad input found by the planner before anything was written.
    #[error("the migration cannot start; nothing was written:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Plan(Vec<String>),
    #[error(transparent)]
    Connect(#[from] PgError),
    #[error("{context}: {reason}")]
    Db {
        context: String,
        reason: String,
        class: Class,
    },
    #[error("capture: {0}")]
    Capture(String),
    #[error("the replication slot is in use by another process (is another coordinator running for this spec?): {0}")]
    SlotBusy(String),
    /// An in-process worker ended with this error.
    #[error("{0}")]
    Worker(String),
    #[error(transparent)]
    ChangeLog(#[from] ChangeLogError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("cutover aborted, source writable again: {0}")]
    CutoverAborted(String),
    /// Refused before anything was frozen or switched (bad input: exit 2).
    #[error("cutover refused, nothing was frozen or switched: {0}")]
    CutoverRefused(String),
    #[error("{0}")]
    State(String),
    #[error("gRPC server: {0}")]
    Serve(String),
    /// The listen address is unusable (bad input, before anything was written).
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    /// Tables whose shards kept failing stopped; the others went on (the message names
    /// each, its key range and error, and what to fix).
    #[error("{0}")]
    TablesStopped(String),
    #[error("interrupted")]
    Interrupted,
    /// An operator command that does not apply now (nothing was changed).
    #[error("{0}")]
    Refused(String),
}

impl CoordinatorError {
    pub fn db(context: impl Into<String>, e: &tokio_postgres::Error) -> Self {
        CoordinatorError::Db {
            context: context.into(),
            reason: schemashift_common::pg::describe(e),
            class: classify_pg(e),
        }
    }

    /// Exit code of the CLI: 2 for bad input found before any write, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CoordinatorError::Spec(_)
            | CoordinatorError::Plan(_)
            | CoordinatorError::Connect(_)
            | CoordinatorError::Listen { .. }
            | CoordinatorError::CutoverRefused(_)
            | CoordinatorError::Refused(_) => 2,
            _ => 1,
        }
    }
}

impl From<schemashift_changelog::kafka::KafkaLogError> for CoordinatorError {
    fn from(e: schemashift_changelog::kafka::KafkaLogError) -> Self {
        CoordinatorError::ChangeLog(e.into())
    }
}

impl Classify for CoordinatorError {
    fn class(&self) -> Class {
        match self {
            CoordinatorError::Connect(e) => e.class(),
            CoordinatorError::Db { class, .. } => *class,
            CoordinatorError::ChangeLog(e) => e.class(),
            CoordinatorError::Verify(e) => e.class(),
            CoordinatorError::SlotBusy(_) => Class::Transient,
            CoordinatorError::Spec(_)
            | CoordinatorError::Plan(_)
            | CoordinatorError::Capture(_)
            | CoordinatorError::Worker(_)
            | CoordinatorError::CutoverAborted(_)
            | CoordinatorError::CutoverRefused(_)
            | CoordinatorError::State(_)
            | CoordinatorError::Serve(_)
            | CoordinatorError::Listen { .. }
            | CoordinatorError::Refused(_)
            | CoordinatorError::TablesStopped(_)
            | CoordinatorError::Interrupted => Class::Permanent,
        }
    }
}
