//! Catch-up: waits until every source commit before a WAL position is captured into the
//! change log and applied by the workers holding the partitions (their positions are
//! read from the control schema, so in-process and remote workers count alike).

use crate::backfill::MAX_ATTEMPTS;
use crate::capture::{flush_wal, wal_lsn, WalPosition};
use crate::changelog::LogHead;
use crate::error::CoordinatorError;
use crate::run::RunCtx;
use crate::service::Stage;
use schemashift_common::ids::Lsn;
use std::time::{Duration, Instant};

impl RunCtx {
    /// Waits until every source commit before now is captured and applied; returns the
    /// change-log head it reached and how long that took (the lag).
    pub async fn catch_up(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<(LogHead, Duration), CoordinatorError> {
        self.catch_up_on(None, deadline).await
    }

    /// Like [`Self::catch_up`], but to a WAL position read elsewhere (inside a freeze).
    pub async fn catch_up_on(
        &mut self,
        lsn: Option<Lsn>,
        deadline: Option<Instant>,
    ) -> Result<(LogHead, Duration), CoordinatorError> {
        let t0 = Instant::now();
        if self.svc.stage() == Stage::Backfill {
            self.svc.set_stage(Stage::Replay);
        }
        let l = match lsn {
            Some(l) => l,
            None => wal_lsn(&self.source, WalPosition::Insert).await?,
        };
        // Make everything up to `l` decodable now rather than when the WAL writer gets to it.
        flush_wal(&self.source).await?;
        self.capture_wake.notify_one();
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "catch-up: wal flushed"
        );
        let timed_out = |d: Option<Instant>| d.is_some_and(|d| Instant::now() > d);
        loop {
            if self.capture.borrow().caught_up_to >= l {
                break;
            }
            if let Some(e) = self.background_failure() {
                return Err(e);
            }
            if timed_out(deadline) {
                return Err(CoordinatorError::CutoverAborted(
                    "capture did not catch up in time".into(),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), self.capture.changed()).await;
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "catch-up: captured");
        let want = self.log_head().await?;
        let mut polls = 0u64;
        loop {
            let have = self.store.replay_positions(&self.target).await?;
            if want
                .iter()
                .all(|(p, s)| have.get(p).is_some_and(|x| x >= s))
            {
                break;
            }
            if let Some(e) = self.local_failure().await {
                return Err(e);
            }
            if timed_out(deadline) {
                return Err(CoordinatorError::CutoverAborted(
                    "replay did not catch up in time".into(),
                ));
            }
            polls += 1;
            // Every ~2 s: look for work that keeps failing, and say what we wait for.
            if polls.is_multiple_of(400) {
                if let Some(why) = self.store.failing_work(&self.target, MAX_ATTEMPTS).await? {
                    return Err(CoordinatorError::State(format!("replay failed: {why}")));
                }
                let behind: Vec<u32> = want
                    .iter()
                    .filter(|(p, s)| have.get(p).is_none_or(|x| x < s))
                    .map(|(p, _)| *p)
                    .collect();
                tracing::info!(?behind, "waiting for workers to replay partitions");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((want, t0.elapsed()))
    }
}
