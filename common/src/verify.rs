//! Verify: per key range, each database computes a row count and an order-independent
//! checksum (sum of 64-bit hashes of the mapped row's text) — source over the mapped
//! expressions, target over the stored columns. Ranges that differ are bisected at the
//! median key until small, then compared key by key.

use crate::pg::describe;
use crate::plan::{ShardRange, TablePlan};
use crate::retry::{classify_pg, Class, Classify};
use crate::sql::{key_order, key_text_select, keys_in, KeyCol};
use std::collections::HashMap;
use tokio_postgres::Client;

/// Ranges at or below this many rows (on the bigger side) are compared key by key.
const LEAF_ROWS: i64 = 2_000;

pub use crate::service::{DiffKind, KeyDiff, RangeCheck};

struct Summary {
    rows: i64,
    sum: String,
}

/// A range or key compare that failed on one of the databases.
#[derive(Debug, thiserror::Error)]
#[error("verify of table {table}: {reason}")]
pub struct VerifyError {
    pub table: String,
    pub reason: String,
    pub class: Class,
}

impl Classify for VerifyError {
    fn class(&self) -> Class {
        self.class
    }
}

fn verr(table: &TablePlan, e: &tokio_postgres::Error) -> VerifyError {
    VerifyError {
        table: table.describe(),
        reason: describe(e),
        class: classify_pg(e),
    }
}

async fn summarize(
    client: &Client,
    hash: &str,
    from: &str,
    pred: &str,
) -> Result<Summary, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(h::numeric), 0)::text FROM \
                 (SELECT {hash} AS h FROM ONLY {from} WHERE {pred}) x"
            ),
            &[],
        )
        .await?;
    Ok(Summary {
        rows: row.get(0),
        sum: row.get(1),
    })
}

async fn key_hashes(
    client: &Client,
    key: &[KeyCol],
    hash: &str,
    from: &str,
    pred: &str,
) -> Result<HashMap<Vec<String>, i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {hash}, {} FROM ONLY {from} WHERE {pred}",
                key_text_select(key)
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let h: i64 = r.get(0);
            let k: Vec<String> = (1..r.len())
                .map(|i| r.get::<_, Option<String>>(i).unwrap_or_default())
                .collect();
            (k, h)
        })
        .collect())
}

fn compare(
    table: &TablePlan,
    src: HashMap<Vec<String>, i64>,
    mut tgt: HashMap<Vec<String>, i64>,
) -> Vec<KeyDiff> {
    let mut out = Vec::new();
    for (k, h) in src {
        match tgt.remove(&k) {
            None => out.push(KeyDiff {
                table: table.describe(),
                key: k,
                kind: DiffKind::Missing,
            }),
            Some(th) if th != h => out.push(KeyDiff {
                table: table.describe(),
                key: k,
                kind: DiffKind::Different,
            }),
            Some(_) => {}
        }
    }
    out.extend(tgt.into_keys().map(|k| KeyDiff {
        table: table.describe(),
        key: k,
        kind: DiffKind::Extra,
    }));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Compares one range; returns counts and the differing keys.
pub async fn verify_range(
    source: &Client,
    target: &Client,
    table: &TablePlan,
    range: &ShardRange,
) -> Result<RangeCheck, VerifyError> {
    let (src_hash, tgt_hash) = (table.source_row_hash(), table.target_row_hash());
    let (sf, tf) = (table.source.to_string(), table.target.to_string());
    // Hashes read the mapped row, so their FROM has the mapping subquery.
    let sm = table.source_from();
    let mut check = RangeCheck::default();
    let mut stack = vec![range.clone()];
    let mut first = true;
    while let Some(r) = stack.pop() {
        let (sp, tp) = (
            table.source_range_predicate(&r),
            table.target_range_predicate(&r),
        );
        let (s, t) = tokio::try_join!(
            summarize(source, &src_hash, &sm, &sp),
            summarize(target, &tgt_hash, &tf, &tp)
        )
        .map_err(|e| verr(table, &e))?;
        tracing::debug!(range = %r, source_rows = s.rows, target_rows = t.rows, same = s.sum == t.sum, "range compared");
        if first {
            check.source_rows = s.rows;
            check.target_rows = t.rows;
            first = false;
        }
        if s.rows == t.rows && s.sum == t.sum {
            continue;
        }
        if s.rows.max(t.rows) <= LEAF_ROWS {
            let (sk, tk) = tokio::try_join!(
                key_hashes(source, &table.key, &src_hash, &sm, &sp),
                key_hashes(target, &table.target_key, &tgt_hash, &tf, &tp)
            )
            .map_err(|e| verr(table, &e))?;
            check.diffs.extend(compare(table, sk, tk));
            continue;
        }
        // Split at the median key of the bigger side.
        let (client, key, from, pred, n) = if s.rows >= t.rows {
            (source, &table.key, &sf, &sp, s.rows)
        } else {
            (target, &table.target_key, &tf, &tp, t.rows)
        };
        let row = client
            .query_one(
                &format!(
                    "SELECT {} FROM ONLY {from} WHERE {pred} ORDER BY {} OFFSET {} LIMIT 1",
                    key_text_select(key),
                    key_order(key),
                    n / 2
                ),
                &[],
            )
            .await
            .map_err(|e| verr(table, &e))?;
        let mid: Vec<String> = (0..row.len()).map(|i| row.get::<_, String>(i)).collect();
        stack.push(ShardRange {
            lo: Some(mid.clone()),
            hi: r.hi.clone(),
        });
        stack.push(ShardRange {
            lo: r.lo.clone(),
            hi: Some(mid),
        });
    }
    Ok(check)
}

/// Compares only the given keys (after replay caught up, or inside the cutover freeze).
pub async fn recheck_keys(
    source: &Client,
    target: &Client,
    table: &TablePlan,
    keys: &[Vec<String>],
) -> Result<Vec<KeyDiff>, VerifyError> {
    let mut out = Vec::new();
    let (src_hash, tgt_hash) = (table.source_row_hash(), table.target_row_hash());
    let tf = table.target.to_string();
    // Hashes read the mapped row, so their FROM has the mapping subquery.
    let sm = table.source_from();
    for chunk in keys.chunks(500) {
        let sp = keys_in(&table.key, chunk);
        let tp = keys_in(&table.target_key, chunk);
        let (sk, tk) = tokio::try_join!(
            key_hashes(source, &table.key, &src_hash, &sm, &sp),
            key_hashes(target, &table.target_key, &tgt_hash, &tf, &tp)
        )
        .map_err(|e| verr(table, &e))?;
        out.extend(compare(table, sk, tk));
    }
    Ok(out)
}
