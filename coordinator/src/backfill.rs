//! Backfill, as the coordinator sees it: workers (in this process or remote) lease the
//! shards; this waits until every shard is done, logging progress, and stops a table
//! whose shard keeps failing (the others go on; see [`crate::stopped`]).

use crate::control::Phase;
use crate::error::CoordinatorError;
use crate::run::RunCtx;
use crate::service::Stage;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A shard that failed this often stops its table; a replay partition or verify range,
/// the run.
pub const MAX_ATTEMPTS: i32 = 5;

/// Drives the backfill phase of a run to its end.
pub struct Backfill<'a> {
    run: &'a mut RunCtx,
}

impl<'a> Backfill<'a> {
    pub fn new(run: &'a mut RunCtx) -> Self {
        Backfill { run }
    }

    /// Waits for every shard, rebuilds the dropped indexes, moves the run to replay.
    pub async fn drive(self, shutdown: &watch::Receiver<bool>) -> Result<(), CoordinatorError> {
        let t0 = Instant::now();
        let mut shutdown = shutdown.clone();
        self.run.svc.set_stage(Stage::Backfill);
        let mut last_log = Instant::now();
        loop {
            self.run.reopen_closed().await?;
            let run = &mut *self.run;
            let stopped = crate::stopped::stop_failing(
                &run.source,
                &mut run.target,
                &run.store,
                &run.plan,
                MAX_ATTEMPTS,
            )
            .await?;
            if !stopped.is_empty() {
                self.run.svc.changed.notify_one();
            }
            let c = self.run.store.shard_counts(&self.run.target).await?;
            if c.pending + c.leased == 0 {
                break;
            }
            if last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                let secs = t0.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    done = c.done,
                    leased = c.leased,
                    pending = c.pending,
                    rows = c.rows_done,
                    rows_per_s = (c.rows_done as f64 / secs) as u64,
                    "backfill progress"
                );
            }
            if let Some(e) = self.run.local_failure().await {
                return Err(e);
            }
            if let Some(e) = self.run.background_failure() {
                return Err(e);
            }
            if *shutdown.borrow() {
                return Err(CoordinatorError::Interrupted);
            }
            tokio::select! {
                _ = self.run.svc.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
        }
        // Unique indexes dropped for the load (the key's included) are built once now,
        // before replay writes; the others after its first catch-up (crate::indexes).
        let stopped = stopped_targets(self.run).await?;
        let built = build_indexes(self.run, crate::indexes::IndexSet::Unique, &stopped).await?;
        if built > 0 {
            tracing::info!(indexes = built, "indexes rebuilt");
        }
        let c = self.run.store.shard_counts(&self.run.target).await?;
        self.run.report.shards = c.done;
        self.run.report.rows_copied = c.rows_done;
        self.run.report.bytes_copied = c.bytes_done;
        self.run.report.backfill_seconds = t0.elapsed().as_secs_f64();
        self.run.report.rows_per_second =
            c.rows_done as f64 / self.run.report.backfill_seconds.max(0.001);
        self.run
            .store
            .set_phase(&self.run.target, Phase::Replay)
            .await?;
        self.run.svc.set_stage(Stage::Replay);
        Ok(())
    }
}

/// Target tables of the run's stopped tables: their indexes wait, as they are copied again
/// when they resume.
pub(crate) async fn stopped_targets(run: &RunCtx) -> Result<Vec<String>, CoordinatorError> {
    Ok(crate::stopped::list(&run.target, &run.store.sql, &run.plan)
        .await?
        .iter()
        .filter_map(|s| run.plan.table(s.table_index))
        .map(|t| t.target.to_string())
        .collect())
}

/// Builds the run's recorded indexes of `set` not built yet (but those of `stopped`, see
/// [`stopped_targets`]): as many at once as there are workers (at least two: one worker's
/// run still has the target's cores for this), within the host CPU limit.
pub(crate) async fn build_indexes(
    run: &RunCtx,
    set: crate::indexes::IndexSet,
    stopped: &[String],
) -> Result<usize, CoordinatorError> {
    crate::indexes::rebuild(
        &run.spec.target,
        &run.target,
        &run.store,
        crate::indexes::BuildOptions {
            set,
            parallel: run.workers.max(2).min(run.svc.throttle().allowed()),
            low_priority: run.plan.low_priority,
            gate: run.gate.clone(),
            skip_tables: stopped,
        },
    )
    .await
}
