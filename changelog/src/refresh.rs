//! Replay of tables whose mapping reads other source tables (merges): the changes only
//! say which keys were touched, and the rows are read again from the source.

use crate::error::{replay_err, ChangeLogError};
use schemashift_common::change::{Change, Op};
use schemashift_common::ids::ChangeSeq;
use schemashift_common::plan::{RunPlan, TablePlan};
use std::collections::{BTreeSet, HashMap};
use tokio_postgres::{Client, Transaction};

/// Tables whose mapping reads other source tables: the target rows of every touched
/// key are replaced by the mapped rows read from the source now (a later change of
/// the same key refreshes it again, so reading the newest state is safe).
pub(crate) async fn refresh(
    tx: &Transaction<'_>,
    source: &Client,
    plan: &RunPlan,
    part: u32,
    changes: &[(ChangeSeq, Change)],
) -> Result<(), ChangeLogError> {
    // Per table: its key positions (computed once) and the distinct keys touched.
    let mut by_table: HashMap<u32, (Vec<usize>, BTreeSet<Vec<String>>)> = HashMap::new();
    for (_, c) in changes {
        let Some(t) = plan.table(c.table) else {
            continue;
        };
        let (key_idx, keys) = by_table
            .entry(c.table)
            .or_insert_with(|| (t.source_key_index(), BTreeSet::new()));
        let new_key = match c.op {
            Op::Insert | Op::Update => c.key(key_idx),
            Op::Delete | Op::Refresh => None,
        };
        keys.extend(c.old_key.iter().cloned().chain(new_key));
    }
    for (t, (_, keys)) in by_table {
        let keys: Vec<Vec<String>> = keys.into_iter().collect();
        let Some(table) = plan.table(t) else {
            continue;
        };
        refresh_keys(tx, source, table, &keys)
            .await
            .map_err(|e| replay_err(part, &table.describe(), &e))?;
    }
    Ok(())
}

/// Replaces the target rows of `keys` by the mapped rows the source has now (none where
/// the source has none).
pub(crate) async fn refresh_keys(
    tx: &Transaction<'_>,
    source: &Client,
    table: &TablePlan,
    keys: &[Vec<String>],
) -> Result<(), tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    tx.execute(
        &format!(
            "DELETE FROM ONLY {} WHERE {}",
            table.target,
            schemashift_common::sql::keys_in(&table.target_key, keys)
        ),
        &[],
    )
    .await?;
    let sink = tx.copy_in(&table.copy_in_sql()).await?;
    let rows = source.copy_out(&table.copy_out_keys_sql(keys)).await?;
    schemashift_common::pg::pipe_copy(sink, rows)
        .await
        .map(|_| ())
}
