//! A table's size, its shard size, and its shards: cut at quantiles of a sample of its key.

use crate::shard::plan_ranges;
use schemashift_common::plan::ShardRange;
use schemashift_common::sql::{key_order, key_text_select, KeyCol, QualifiedName};
use tokio_postgres::Client;

pub(super) struct Sizing {
    pub est_rows: u64,
    pub est_bytes: u64,
    pub shard_rows: u64,
    pub ranges: Vec<ShardRange>,
}

/// Up to this many heap pages (8 MB of 8 kB pages) a table is counted exactly: cheap, and
/// small tables are where an estimate is most often off.
const COUNT_UP_TO_PAGES: i64 = 1024;

/// The table's rows from its statistics, the way PostgreSQL's planner scales them: rows per
/// page when last analyzed, times the pages it has now (so a table loaded after its last
/// ANALYZE is not taken for empty). `None`: count it (small, or never analyzed).
fn estimate(reltuples: f64, relpages: i64, pages_now: i64) -> Option<u64> {
    if pages_now <= COUNT_UP_TO_PAGES || reltuples <= 0.0 || relpages <= 0 {
        return None;
    }
    Some((reltuples / relpages as f64 * pages_now as f64).round() as u64)
}

/// Estimates the table (counting it exactly when small or never analyzed), sizes its
/// shards (about eight per worker unless the spec says), and cuts the key space.
pub(super) async fn size_and_cut(
    source: &Client,
    src_name: &QualifiedName,
    key: &[KeyCol],
    shard_rows: Option<u64>,
    workers: usize,
) -> Result<Sizing, tokio_postgres::Error> {
    let row = source
        .query_one(
            "SELECT c.reltuples::float8, c.relpages::bigint, \
             (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint, \
             pg_table_size(c.oid) FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&src_name.to_string()],
        )
        .await?;
    let est_bytes = row.get::<_, i64>(3) as u64;
    let est_rows = match estimate(row.get(0), row.get(1), row.get(2)) {
        Some(n) => n,
        None => source
            .query_one(&format!("SELECT count(*) FROM ONLY {src_name}"), &[])
            .await?
            .get::<_, i64>(0) as u64,
    };
    let shard_rows = shard_rows
        .unwrap_or_else(|| (est_rows / (workers.max(1) as u64 * 8)).clamp(10_000, 250_000));
    let wanted = est_rows.div_ceil(shard_rows).max(1);
    let target_samples = (wanted * 64).clamp(1, 100_000);
    let sample_sql = if est_rows <= target_samples * 4 {
        format!(
            "SELECT {} FROM ONLY {src_name} ORDER BY {}",
            key_text_select(key),
            key_order(key)
        )
    } else {
        let pct = (100.0 * target_samples as f64 / est_rows as f64).clamp(0.0001, 100.0);
        // Row-level sampling gives even quantiles; past 20M rows block sampling keeps it cheap.
        let method = if est_rows <= 20_000_000 {
            "BERNOULLI"
        } else {
            "SYSTEM"
        };
        format!(
            "SELECT {} FROM ONLY {src_name} TABLESAMPLE {method} ({pct:.6}) REPEATABLE (7) ORDER BY {}",
            key_text_select(key),
            key_order(key)
        )
    };
    let sample: Vec<Vec<String>> = source
        .query(&sample_sql, &[])
        .await?
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
        .collect();
    Ok(Sizing {
        est_rows,
        est_bytes,
        shard_rows,
        ranges: plan_ranges(&sample, est_rows, shard_rows),
    })
}

#[cfg(test)]
mod tests {
    use super::estimate;

    #[test]
    fn small_or_never_analyzed_tables_are_counted() {
        assert_eq!(estimate(5_000.0, 100, 100), None, "small: count");
        assert_eq!(estimate(-1.0, 0, 50_000), None, "never analyzed");
        assert_eq!(
            estimate(0.0, 0, 50_000),
            None,
            "analyzed empty, loaded since"
        );
    }

    #[test]
    fn a_table_grown_since_its_last_analyze_is_scaled_by_its_pages_now() {
        assert_eq!(estimate(125_000.0, 4_000, 4_000), Some(125_000));
        assert_eq!(estimate(125_000.0, 4_000, 8_000), Some(250_000));
    }
}
