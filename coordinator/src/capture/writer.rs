//! The change log's writer for capture: one write at a time, in order, each committing its
//! changes with the capture position. A round cut short (a backlog: more is waiting) starts
//! its write and goes back to receiving, so the log commits one batch while the stream
//! decodes the next; any other round waits for its write. `committed` is what the change
//! log holds: the only position the slot may be confirmed to or progress may claim.

use super::sink::Sink;
use crate::error::CoordinatorError;
use schemashift_common::change::Change;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::Lsn;
use schemashift_common::pg::connect;
use schemashift_common::plan::RunPlan;
use schemashift_common::spec::Dsn;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::Instrument;

/// What a write needs; owned by the write in flight, if any.
struct Parts {
    target: Client,
    sink: Sink,
}

type Flight = JoinHandle<(Parts, Result<(), CoordinatorError>)>;

pub(super) struct Writer {
    idle: Option<Parts>,
    flight: Option<(Flight, Lsn)>,
    committed: Lsn,
    control: Arc<ControlSql>,
    target_dsn: Dsn,
    plan: Arc<RunPlan>,
}

impl Writer {
    pub(super) fn new(
        target: Client,
        sink: Sink,
        control: ControlSql,
        target_dsn: Dsn,
        plan: Arc<RunPlan>,
        committed: Lsn,
    ) -> Self {
        Writer {
            idle: Some(Parts { target, sink }),
            flight: None,
            committed,
            control: Arc::new(control),
            target_dsn,
            plan,
        }
    }

    /// Every transaction committed up to here is in the change log.
    pub(super) fn committed(&self) -> Lsn {
        self.committed
    }

    /// Waits for the write in flight. On its error the change log holds what it held
    /// before it; the caller receives those changes again from `committed`.
    pub(super) async fn settle(&mut self) -> Result<(), CoordinatorError> {
        let Some((flight, end)) = self.flight.take() else {
            return Ok(());
        };
        match flight.await {
            Ok((parts, result)) => {
                self.idle = Some(parts);
                result?;
                self.committed = end;
                Ok(())
            }
            // The write panicked and took its session with it: fresh ones.
            Err(e) => {
                self.idle = Some(Parts {
                    target: connect(&self.target_dsn, "target").await?,
                    sink: Sink::for_plan(&self.plan)?,
                });
                Err(CoordinatorError::Capture(format!(
                    "appending to the change log failed: {e}"
                )))
            }
        }
    }

    async fn parts(&mut self) -> Result<&mut Parts, CoordinatorError> {
        self.settle().await?;
        self.idle
            .as_mut()
            .ok_or_else(|| CoordinatorError::Capture("change log writer lost its session".into()))
    }

    /// Appends `changes` and moves the position to `end`, now.
    pub(super) async fn write(
        &mut self,
        changes: &[(u32, Change)],
        end: Lsn,
    ) -> Result<(), CoordinatorError> {
        let control = self.control.clone();
        let parts = self.parts().await?;
        parts
            .sink
            .write(&mut parts.target, &control, changes, end)
            .await?;
        self.committed = self.committed.max(end);
        Ok(())
    }

    /// Starts appending `changes` up to `end` and returns once the previous write is done
    /// (so writes commit in order); `settle` waits for this one.
    pub(super) async fn start(
        &mut self,
        changes: Vec<(u32, Change)>,
        end: Lsn,
    ) -> Result<(), CoordinatorError> {
        self.settle().await?;
        let Some(mut parts) = self.idle.take() else {
            return Err(CoordinatorError::Capture(
                "change log writer lost its session".into(),
            ));
        };
        let control = self.control.clone();
        let flight = tokio::spawn(
            async move {
                let r = parts
                    .sink
                    .write(&mut parts.target, &control, &changes, end)
                    .await;
                if r.is_ok() {
                    // Committed; the slot is not confirmed past it yet, and the next batch
                    // is being received.
                    crate::failpoint("capture-after-pipelined-write");
                }
                (parts, r)
            }
            .instrument(tracing::debug_span!("capture_write")),
        );
        self.flight = Some((flight, end));
        Ok(())
    }

    /// The target session, after the write in flight (for reopening it when closed).
    pub(super) async fn target(&mut self) -> Result<&mut Client, CoordinatorError> {
        // A failed write leaves its session here all the same.
        let _ = self.settle().await;
        self.idle
            .as_mut()
            .map(|p| &mut p.target)
            .ok_or_else(|| CoordinatorError::Capture("change log writer lost its session".into()))
    }
}
