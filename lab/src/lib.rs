//! The lab: throwaway PostgreSQL clusters, the users scenario, the load generator, and the
//! `demo`, `bench` and `load` commands built on them. Tests use it too; no product crate
//! does, and the binary builds without it (`--no-default-features`).
pub mod bench;
pub mod cluster;
pub mod demo;
pub mod load;
pub mod load_cmd;
pub mod scenario;

use schemashift_common::spec::Spec;
use schemashift_coordinator::run::LocalWorker;
use std::sync::Arc;

/// Shows a run's progress until the returned function is called.
pub type Progress = dyn Fn(&Spec) -> Box<dyn FnOnce() + Send> + Send + Sync;

/// What the binary lends the lab: its in-process workers and its progress display.
#[derive(Clone)]
pub struct Host {
    pub local: Arc<dyn LocalWorker>,
    pub progress: Arc<Progress>,
}
