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

/// The tansu binary (a Kafka-protocol broker): `$SCHEMASHIFT_TANSU`, then PATH, then
/// `~/.cargo/bin` (where `cargo install` puts it).
pub fn tansu_bin() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("SCHEMASHIFT_TANSU") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
}
