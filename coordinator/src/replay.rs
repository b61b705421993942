//! Catch-up: waits until every source commit before a WAL position is captured into the
//! change log and applied by the workers holding the partitions (their positions are
//! read from the control schema, so in-process and remote workers count alike).

use crate::backfill::MAX_ATTEMPTS;
use crate::capture::{flush_wal, wal_lsn, WalPosition};
use crate::error::CoordinatorError;
use crate::run::RunCtx;
use crate::service::Stage;
use schemashift_changelog::LogHead;
use schemashift_common::ids::Lsn;
use std::time::{Duration, Instant};

/// Drives replay until it has applied everything captured up to a WAL position.
pub struct CatchUp<'a> {
    run: &'a mut RunCtx,
}

impl<'a> CatchUp<'a> {
    pub fn new(run: &'a mut RunCtx) -> Self {
        CatchUp { run }
    }

    /// Waits until every source commit before now is captured and applied; returns the
    /// change-log head it reached and how long that took (the lag).
    pub async fn now(
        self,
        deadline: Option<Instant>,
    ) -> Result<(LogHead, Duration), CoordinatorError> {
        self.to(None, deadline).await
    }

    /// Like [`Self::now`], but to a WAL position read elsewhere (inside a freeze).
    pub async fn to(
        self,
        lsn: Option<Lsn>,
        deadline: Option<Instant>,
    ) -> Result<(LogHead, Duration), CoordinatorError> {
        let t0 = Instant::now();
        if self.run.svc.stage() == Stage::Backfill {
            self.run.svc.set_stage(Stage::Replay);
        }
        let l = match lsn {
            Some(l) => l,
            None => wal_lsn(&self.run.source, WalPosition::Insert).await?,
        };
        // Make everything up to `l` decodable now rather than when the WAL writer gets to it.
        flush_wal(&self.run.source).await?;
        self.run.capture_wake.notify_one();
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "catch-up: wal flushed"
        );
        let timed_out = |d: Option<Instant>| d.is_some_and(|d| Instant::now() > d);
        loop {
            if self.run.capture.borrow().caught_up_to >= l {
                break;
            }
            if let Some(e) = self.run.background_failure() {
                return Err(e);
            }
            if timed_out(deadline) {
                return Err(CoordinatorError::CutoverAborted(
                    "capture did not catch up in time".into(),
                ));
            }
            let _ =
                tokio::time::timeout(Duration::from_millis(200), self.run.capture.changed()).await;
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "catch-up: captured");
        let want = self.run.log_head().await?;
        let mut polls = 0u64;
        loop {
            self.run.reopen_closed().await?;
            let have = self.run.store.replay_positions(&self.run.target).await?;
            if want
                .iter()
                .all(|(p, s)| have.get(p).is_some_and(|x| x >= s))
            {
                break;
            }
            if let Some(e) = self.run.local_failure().await {
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
                if let Some(why) = self
                    .run
                    .store
                    .failing_work(&self.run.target, MAX_ATTEMPTS)
                    .await?
                {
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
