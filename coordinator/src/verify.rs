//! Verify: every shard range compared on both sides (count and hash sum, bisected down
//! to keys where they differ), then differing keys re-checked after replay caught up,
//! because writes during the compare cause transient differences.

use crate::error::CoordinatorError;
use crate::run::RunCtx;
use schemashift_common::pg::{connect, install_helpers};
use schemashift_worker::verify::{recheck_keys, verify_range, KeyDiff};
use schemashift_worker::WorkerError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifySummary {
    pub source_rows: i64,
    pub target_rows: i64,
    pub ranges: usize,
    pub differing: Vec<KeyDiff>,
    pub seconds: f64,
}

impl RunCtx {
    /// Compares every shard range; then re-checks differing keys after replay caught up
    /// (writes during the compare cause transient differences).
    pub async fn verify(&mut self) -> Result<VerifySummary, CoordinatorError> {
        let t0 = Instant::now();
        let shards = self.store.shards(&self.target).await?;
        let queue = Arc::new(tokio::sync::Mutex::new(
            shards.into_iter().map(|(s, _, _)| s).collect::<Vec<_>>(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.workers {
            let source = connect(&self.spec.source, "source").await?;
            install_helpers(&source, &self.plan.helpers, "source").await?;
            let target = connect(&self.spec.target, "target").await?;
            let (queue, plan) = (queue.clone(), self.plan.clone());
            tasks.spawn(async move {
                let mut out = Vec::new();
                loop {
                    let Some(shard) = queue.lock().await.pop() else { return Ok::<_, WorkerError>(out) };
                    let Some(table) = plan.table(shard.table) else { continue };
                    let check = verify_range(&source, &target, table, &shard.range)
                        .instrument(tracing::info_span!("verify", shard = %shard.id, table = %table.describe()))
                        .await?;
                    out.push((shard.table, check));
                }
            });
        }
        let mut summary = VerifySummary::default();
        let mut diffs: Vec<(u32, KeyDiff)> = Vec::new();
        while let Some(j) = tasks.join_next().await {
            let checks =
                j.map_err(|e| CoordinatorError::State(format!("verify task panicked: {e}")))??;
            for (t, c) in checks {
                summary.ranges += 1;
                summary.source_rows += c.source_rows;
                summary.target_rows += c.target_rows;
                diffs.extend(c.diffs.into_iter().map(|d| (t, d)));
            }
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
            self.catch_up(None).await?;
            let keys: Vec<(u32, Vec<String>)> =
                diffs.into_iter().map(|(t, d)| (t, d.key)).collect();
            diffs = self.recheck(&keys).await?;
        }
        summary.differing = diffs.into_iter().map(|(_, d)| d).collect();
        summary.seconds = t0.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// Compares just these keys (table index, key) on both sides.
    pub async fn recheck(
        &self,
        keys: &[(u32, Vec<String>)],
    ) -> Result<Vec<(u32, KeyDiff)>, CoordinatorError> {
        let mut by_table: BTreeMap<u32, Vec<Vec<String>>> = BTreeMap::new();
        for (t, k) in keys {
            by_table.entry(*t).or_default().push(k.clone());
        }
        let mut out = Vec::new();
        for (t, keys) in by_table {
            let Some(table) = self.plan.table(t) else {
                continue;
            };
            out.extend(
                recheck_keys(&self.source, &self.target, table, &keys)
                    .await?
                    .into_iter()
                    .map(|d| (t, d)),
            );
        }
        Ok(out)
    }
}
