//! Embedded mode assembled: the coordinator runs this crate's workers in-process through
//! its `LocalWorker` seam, so neither library depends on the other.

use futures_util::future::BoxFuture;
use schemashift_common::fleet::MemberGate;
use schemashift_common::service::WorkerInfo;
use schemashift_coordinator::run::LocalWorker;
use schemashift_coordinator::service::ControlCoordinator;
use std::sync::Arc;
use tokio::sync::watch;

/// Workers as tasks of this process, calling the coordinator's service directly; a fleet
/// member's pass through the fleet's limits.
pub struct InProcess {
    pub gate: Option<MemberGate>,
}

impl LocalWorker for InProcess {
    fn run(
        &self,
        svc: Arc<ControlCoordinator>,
        me: WorkerInfo,
        stop: watch::Receiver<bool>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let gate = self.gate.clone();
        Box::pin(async move {
            schemashift_worker::runner::run_worker(svc, me, stop, gate)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn gate(&self) -> Option<MemberGate> {
        self.gate.clone()
    }
}

pub fn local() -> Arc<dyn LocalWorker> {
    Arc::new(InProcess { gate: None })
}

/// What the lab's demo and bench borrow from the binary.
#[cfg(feature = "lab")]
pub fn host() -> schemashift_lab::Host {
    schemashift_lab::Host {
        local: local(),
        progress: Arc::new(|spec| {
            let bars = crate::progress::enabled().then(|| crate::progress::start(spec));
            Box::new(move || crate::progress::finish(bars))
        }),
    }
}
