//! The run's background tasks (capture, throttle, metrics) in one supervised set. They
//! all live as long as the run: one that ends early, with an error or not, fails the run
//! with its name and reason, so nothing waits forever on a task that is gone.

use crate::error::CoordinatorError;
use std::future::Future;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

type Outcome = (&'static str, Result<(), CoordinatorError>);

pub struct Supervisor {
    tasks: JoinSet<Outcome>,
    stop: watch::Sender<bool>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            stop: watch::channel(false).0,
        }
    }
}

impl Supervisor {
    /// What a task watches to end at the run's end.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Starts a named task in `span`.
    pub fn spawn<F>(&mut self, name: &'static str, span: tracing::Span, task: F)
    where
        F: Future<Output = Result<(), CoordinatorError>> + Send + 'static,
    {
        self.tasks
            .spawn(async move { (name, task.await) }.instrument(span));
    }

    /// Why a task ended, if one did; the phase loops call it on every turn.
    pub fn failure(&mut self) -> Option<CoordinatorError> {
        let ended = self.tasks.try_join_next()?;
        Some(match ended {
            Ok((name, Err(e))) => CoordinatorError::State(format!("{name} failed: {e}")),
            Ok((name, Ok(()))) => {
                CoordinatorError::State(format!("{name} stopped before the run ended"))
            }
            Err(e) => CoordinatorError::State(format!("a background task panicked: {e}")),
        })
    }

    /// Tells every task to end and waits for them; the first error wins.
    pub async fn stop(mut self) -> Result<(), CoordinatorError> {
        self.stop.send_replace(true);
        let mut first = None;
        while let Some(ended) = self.tasks.join_next().await {
            let err = match ended {
                Ok((_, Ok(()))) => continue,
                Ok((name, Err(e))) => CoordinatorError::State(format!("{name} failed: {e}")),
                Err(e) => CoordinatorError::State(format!("a background task panicked: {e}")),
            };
            tracing::warn!(error = %err, "background task ended with an error");
            first.get_or_insert(err);
        }
        first.map_or(Ok(()), Err)
    }
}
