//! schemashift coordinator: owns the plan and the run's state machine.
//! plan → shard → capture → (workers: backfill, replay, verify) → cutover → reverse.
//! It never depends on the worker crate: embedded mode gets its workers from the binary
//! through [`run::LocalWorker`].
pub mod backfill;
pub mod capture;
pub mod constraints;
pub mod control;
pub mod cutover;
pub mod distributed;
pub mod error;
pub mod fdw;
pub mod grpc;
pub mod history;
pub mod indexes;
pub mod lease_gate;
pub mod metrics;
pub mod ops;
pub mod pause;
pub mod phases;
pub mod plan;
pub mod replay;
pub mod reverse;
pub mod run;
pub mod service;
pub mod shard;
pub mod stopped;
pub mod supervise;
pub mod throttle;
pub mod verify;

pub use error::CoordinatorError;

/// Test hook: `SCHEMASHIFT_FAILPOINT=<name>` makes the process abort right there, like a
/// crash at the worst moment.
pub(crate) fn failpoint(name: &str) {
    if std::env::var("SCHEMASHIFT_FAILPOINT").is_ok_and(|v| v == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}
