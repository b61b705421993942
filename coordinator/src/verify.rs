//! Verify: every shard range compared on both sides (count and hash sum, bisected down
//! to keys where they differ), then differing keys re-checked after replay caught up,
//! because writes during the compare cause transient differences. Keys that still differ
//! (hot rows change again before replay reaches them) are settled at one consistent point:
//! their source rows locked `FOR SHARE` for a moment while replay catches up to the WAL
//! position read under the locks, then compared. A key that cannot be settled in a few
//! tries is "still changing", not differing, and is re-checked inside the cutover freeze.

use crate::backfill::MAX_ATTEMPTS;
use crate::capture::{wal_lsn, WalPosition};
use crate::error::CoordinatorError;
use crate::replay::CatchUp;
use crate::run::RunCtx;
use crate::service::Stage;
use schemashift_common::pg::connect;
use schemashift_common::sql::keys_in;
use schemashift_common::verify::{recheck_keys, KeyDiff};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifySummary {
    pub source_rows: i64,
    pub target_rows: i64,
    pub ranges: usize,
    pub differing: Vec<KeyDiff>,
    /// Keys that kept changing too fast to settle; the cutover re-checks them in its freeze.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub still_changing: Vec<StillChanging>,
    /// Tables not compared because they stopped (`source -> target`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_tables: Vec<String>,
    pub seconds: f64,
}

/// A key verify could not settle (see the module doc).
#[derive(Clone, Debug, Serialize)]
pub struct StillChanging {
    pub table: u32,
    pub key: Vec<String>,
}

/// Plain re-check rounds before keys are settled under row locks.
const PLAIN_ROUNDS: usize = 3;
/// Tries to settle a key under locks before it counts as still changing.
const SETTLE_TRIES: usize = 3;
/// Longest a settle holds its row locks on the source (writers to those rows wait).
const SETTLE_HOLD: Duration = Duration::from_secs(2);

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
        let stopped =
            crate::stopped::list(&self.run.target, &self.run.store.sql, &self.run.plan).await?;
        if !stopped.is_empty() {
            let tables: Vec<&str> = stopped.iter().map(|s| s.table.as_str()).collect();
            tracing::warn!(tables = ?tables, "verify skips the stopped tables");
        }
        // Workers compare the ranges; replay pauses meanwhile and catches up after.
        self.run.svc.start_verify(
            shards
                .into_iter()
                .map(|(s, _, _)| s)
                .filter(|s| stopped.iter().all(|x| x.table_index != s.table))
                .collect(),
        );
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
        let mut summary = VerifySummary {
            skipped_tables: stopped.into_iter().map(|s| s.table).collect(),
            ..VerifySummary::default()
        };
        let mut diffs: Vec<(u32, KeyDiff)> = Vec::new();
        for (t, c) in checks {
            summary.ranges += 1;
            summary.source_rows += c.source_rows;
            summary.target_rows += c.target_rows;
            diffs.extend(c.diffs.into_iter().map(|d| (t, d)));
        }
        for round in 0..PLAIN_ROUNDS {
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
        let mut unsettled: Vec<(u32, Vec<String>)> =
            diffs.into_iter().map(|(t, d)| (t, d.key)).collect();
        let mut differing = Vec::new();
        for attempt in 0..SETTLE_TRIES {
            if unsettled.is_empty() {
                break;
            }
            tracing::info!(
                attempt,
                keys = unsettled.len(),
                "settling differing keys under row locks"
            );
            let (found, busy) = settle(self.run, &unsettled).await?;
            differing.extend(found.into_iter().map(|(_, d)| d));
            unsettled = busy;
        }
        if !unsettled.is_empty() {
            tracing::info!(
                keys = unsettled.len(),
                "keys still changing; the cutover re-checks them inside its freeze"
            );
        }
        summary.differing = differing;
        summary.still_changing = unsettled
            .into_iter()
            .map(|(table, key)| StillChanging { table, key })
            .collect();
        summary.seconds = t0.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Compares keys at one consistent point, table by table: their source rows are locked
/// `FOR SHARE` (with a short `lock_timeout`), replay catches up to the source's WAL
/// position read under the locks, and the keys are compared before the locks go. Returns
/// the keys that differ there (real differences) and those that could not be settled (a
/// lock or the catch-up took too long).
async fn settle(
    run: &mut RunCtx,
    keys: &[(u32, Vec<String>)],
) -> Result<(Vec<(u32, KeyDiff)>, Vec<(u32, Vec<String>)>), CoordinatorError> {
    let mut by_table: BTreeMap<u32, Vec<Vec<String>>> = BTreeMap::new();
    for (t, k) in keys {
        by_table.entry(*t).or_default().push(k.clone());
    }
    let (mut differing, mut busy) = (Vec::new(), Vec::new());
    let db = |what: &'static str| move |e: tokio_postgres::Error| CoordinatorError::db(what, &e);
    let mut locker = connect(&run.spec.source, "source").await?;
    for (t, keys) in by_table {
        let Some(table) = run.plan.table(t).cloned() else {
            continue;
        };
        let tx = locker
            .transaction()
            .await
            .map_err(db("starting a settle"))?;
        tx.batch_execute("SET LOCAL lock_timeout = '200ms'")
            .await
            .map_err(db("setting lock_timeout"))?;
        let locked = tx
            .batch_execute(&format!(
                "SELECT 1 FROM ONLY {} WHERE {} FOR SHARE",
                table.source,
                keys_in(&table.key, &keys)
            ))
            .await;
        if let Err(e) = locked {
            if e.code() != Some(&SqlState::LOCK_NOT_AVAILABLE) {
                return Err(CoordinatorError::db("locking rows to settle", &e));
            }
            busy.extend(keys.into_iter().map(|k| (t, k)));
            continue;
        }
        let lsn = wal_lsn(&tx, WalPosition::Insert).await?;
        let deadline = Instant::now() + SETTLE_HOLD;
        match CatchUp::new(run).to(Some(lsn), Some(deadline)).await {
            Ok(_) => {}
            Err(CoordinatorError::CutoverAborted(_)) => {
                busy.extend(keys.into_iter().map(|k| (t, k)));
                continue;
            }
            Err(e) => return Err(e),
        }
        let found = recheck_keys(&run.source, &run.target, &table, &keys).await?;
        differing.extend(found.into_iter().map(|d| (t, d)));
        // The locks go with the transaction.
        tx.commit().await.map_err(db("ending a settle"))?;
    }
    Ok((differing, busy))
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
