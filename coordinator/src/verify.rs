//! Verify: every shard range compared on both sides (count and hash sum, bisected down
//! to keys where they differ), then differing keys re-checked after replay caught up,
//! because writes during the compare cause transient differences.

use crate::backfill::MAX_ATTEMPTS;
use crate::error::CoordinatorError;
use crate::replay::CatchUp;
use crate::run::RunCtx;
use crate::service::Stage;
use schemashift_common::verify::{recheck_keys, KeyDiff};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifySummary {
    pub source_rows: i64,
    pub target_rows: i64,
    pub ranges: usize,
    pub differing: Vec<KeyDiff>,
    pub seconds: f64,
}

/// Drives the verify phase: range compares by the workers, then re-checks.
pub struct Verify<'a> {
    run: &'a mut RunCtx,
}

impl<'a> Verify<'a> {
    pub fn new(run: &'a mut RunCtx) -> Self {
        Verify { run }
    }

    /// Compares every shard range; then re-checks differing keys after replay caught up
    /// (writes during the compare cause transient differences).
    pub async fn drive(self) -> Result<VerifySummary, CoordinatorError> {
        let t0 = Instant::now();
        let shards = self.run.store.shards(&self.run.target).await?;
        // Workers compare the ranges; replay pauses meanwhile and catches up after.
        self.run
            .svc
            .start_verify(shards.into_iter().map(|(s, _, _)| s).collect());
        self.run.svc.set_stage(Stage::Verify);
        let mut last_log = Instant::now();
        let checks = loop {
            match self.run.svc.verify_results(MAX_ATTEMPTS as u32) {
                Ok(Some(c)) => break c,
                Ok(None) => {}
                Err(why) => return Err(CoordinatorError::State(why)),
            }
            if let Some(e) = self.run.local_failure().await {
                return Err(e);
            }
            if let Some(e) = self.run.background_failure() {
                return Err(e);
            }
            if last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                let (done, total) = self.run.svc.verify_progress();
                tracing::info!(done, total, "verify progress");
            }
            tokio::select! {
                _ = self.run.svc.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        self.run.svc.set_stage(Stage::Replay);
        let mut summary = VerifySummary::default();
        let mut diffs: Vec<(u32, KeyDiff)> = Vec::new();
        for (t, c) in checks {
            summary.ranges += 1;
            summary.source_rows += c.source_rows;
            summary.target_rows += c.target_rows;
            diffs.extend(c.diffs.into_iter().map(|d| (t, d)));
        }
        for round in 0..10 {
            if diffs.is_empty() {
                break;
            }
            tracing::info!(
                round,
                differing = diffs.len(),
                "re-checking differing keys after catch-up"
            );
            CatchUp::new(self.run).now(None).await?;
            let keys: Vec<(u32, Vec<String>)> =
                diffs.into_iter().map(|(t, d)| (t, d.key)).collect();
            diffs = recheck(self.run, &keys).await?;
        }
        summary.differing = diffs.into_iter().map(|(_, d)| d).collect();
        summary.seconds = t0.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Compares just these keys (table index, key) on both sides.
pub(crate) async fn recheck(
    run: &RunCtx,
    keys: &[(u32, Vec<String>)],
) -> Result<Vec<(u32, KeyDiff)>, CoordinatorError> {
    let mut by_table: BTreeMap<u32, Vec<Vec<String>>> = BTreeMap::new();
    for (t, k) in keys {
        by_table.entry(*t).or_default().push(k.clone());
    }
    let mut out = Vec::new();
    for (t, keys) in by_table {
        let Some(table) = run.plan.table(t) else {
            continue;
        };
        out.extend(
            recheck_keys(&run.source, &run.target, table, &keys)
                .await?
                .into_iter()
                .map(|d| (t, d)),
        );
    }
    Ok(out)
}
