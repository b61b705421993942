use schemashift_common::pg::PgError;
use schemashift_common::spec::SpecError;
use schemashift_worker::WorkerError;

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
        transient: bool,
    },
    #[error("capture: {0}")]
    Capture(String),
    #[error("the replication slot is in use by another process (is another coordinator running for this spec?): {0}")]
    SlotBusy(String),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("change log: {0}")]
    ChangeLog(#[from] schemashift_worker::kafka::KafkaLogError),
    #[error("cutover aborted, source writable again: {0}")]
    CutoverAborted(String),
    #[error("{0}")]
    State(String),
    #[error("gRPC server: {0}")]
    Serve(String),
    /// The listen address is unusable (bad input, before anything was written).
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("interrupted")]
    Interrupted,
}

impl CoordinatorError {
    pub fn db(context: impl Into<String>, e: &tokio_postgres::Error) -> Self {
        CoordinatorError::Db {
            context: context.into(),
            reason: schemashift_common::pg::describe(e),
            transient: schemashift_common::pg::is_transient(e),
        }
    }

    /// Exit code of the CLI: 2 for bad input found before any write, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CoordinatorError::Spec(_)
            | CoordinatorError::Plan(_)
            | CoordinatorError::Connect(_)
            | CoordinatorError::Listen { .. } => 2,
            _ => 1,
        }
    }
}
