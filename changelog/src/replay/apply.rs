//! One table's collapsed actions applied to the target: loaded into the session's staging
//! table with one COPY, then one statement per kind of action (deletes, full upserts, one
//! UPDATE per set of withheld columns), and the keys to refresh read again from the
//! source.

use super::collapse::{collapse, Action, Entry};
use super::rows::escape_copy_text;
use crate::refresh::refresh_keys;
use futures_util::SinkExt;
use schemashift_common::change::Change;
use schemashift_common::ids::ChangeSeq;
use schemashift_common::plan::TablePlan;
use schemashift_common::sql::{ident_list, quote_ident};
use std::borrow::Cow;
use std::collections::BTreeSet;
use tokio_postgres::{Client, Transaction};

pub(super) fn stage_name(table: u32) -> String {
    quote_ident(&format!("schemashift_stage_{table}"))
}

/// Whether an update missing these source positions leaves a target column that reads a
/// missing value together with a sent one: it cannot be computed from what we have.
fn needs_row(table: &TablePlan) -> impl Fn(&BTreeSet<u16>) -> bool + '_ {
    move |missing| {
        let names = missing_names(table, missing);
        table.columns.iter().any(|c| {
            let hit = c.deps.iter().filter(|d| names.contains(d.as_str())).count();
            hit > 0 && hit < c.deps.len()
        })
    }
}

fn missing_names<'a>(table: &'a TablePlan, missing: &BTreeSet<u16>) -> BTreeSet<&'a str> {
    missing
        .iter()
        .filter_map(|&i| {
            table
                .source_columns
                .get(i as usize)
                .map(|c| c.name.as_str())
        })
        .collect()
}

/// Applies one table's changes of a batch (log order) inside `tx`.
pub(super) async fn apply_table(
    tx: &Transaction<'_>,
    source: &Client,
    table: &TablePlan,
    changes: &[&(ChangeSeq, Change)],
) -> Result<(), tokio_postgres::Error> {
    let key_idx = table.source_key_index();
    let entries = collapse(
        changes.iter().map(|x| (x.0, &x.1)),
        &key_idx,
        needs_row(table),
    );
    let (refresh, staged): (Vec<Entry>, Vec<Entry>) = entries
        .into_iter()
        .partition(|(_, _, a)| *a == Action::Refresh);
    let has = |f: fn(&Action) -> bool| staged.iter().any(|(_, _, a)| f(a));
    let (deletes, upserts) = (
        has(|a| matches!(a, Action::Delete)),
        has(|a| matches!(a, Action::Upsert(_))),
    );
    let groups = stage(tx, table, &key_idx, &staged).await?;
    let stage = stage_name(table.index);
    let tkeys: Vec<String> = table.target_key.iter().map(|k| k.name.clone()).collect();
    let key_join = table
        .key
        .iter()
        .zip(&table.target_key)
        .map(|(s, t)| format!("t.{} = s.{}", quote_ident(&t.name), quote_ident(&s.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    if deletes {
        tx.execute(
            &format!(
                "DELETE FROM {} t USING {stage} s WHERE s.__grp = -1 AND {key_join}",
                table.target
            ),
            &[],
        )
        .await?;
    }
    let non_key: Vec<&String> = table
        .columns
        .iter()
        .map(|c| &c.target)
        .filter(|c| !tkeys.contains(c))
        .collect();
    let on_conflict = if non_key.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!(
            "DO UPDATE SET {}",
            non_key
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if upserts {
        tx.execute(
            &format!(
                "INSERT INTO {} ({}) SELECT {} FROM {stage} WHERE __grp = 0 ORDER BY __seq \
                 ON CONFLICT ({}) {on_conflict}",
                table.target,
                ident_list(&table.target_column_names()),
                table.mapped_select_list(),
                ident_list(&tkeys),
            ),
            &[],
        )
        .await?;
    }
    for (g, missing) in groups.iter().enumerate() {
        partial_update(tx, table, &tkeys, missing, g as i32 + 1).await?;
    }
    let keys: Vec<Vec<String>> = refresh.into_iter().map(|(k, _, _)| k).collect();
    refresh_keys(tx, source, table, &keys).await
}

/// Loads the staged actions: group -1 deletes (key only), 0 upserts, 1.. one per set of
/// withheld columns (returned, in group order).
async fn stage(
    tx: &Transaction<'_>,
    table: &TablePlan,
    key_idx: &[usize],
    entries: &[Entry],
) -> Result<Vec<BTreeSet<u16>>, tokio_postgres::Error> {
    let ncols = table.source_columns.len();
    let mut groups: Vec<BTreeSet<u16>> = Vec::new();
    let mut lines = String::new();
    for (key, seq, action) in entries {
        // Borrowed: the row's values are written out once, not copied first.
        let (grp, vals): (i32, Cow<[Option<String>]>) = match action {
            Action::Delete => {
                let mut v = vec![None; ncols];
                for (k, &i) in key.iter().zip(key_idx) {
                    v[i] = Some(k.clone());
                }
                (-1, Cow::Owned(v))
            }
            Action::Upsert(v) => (0, Cow::Borrowed(v.as_slice())),
            Action::Partial(v, missing) => {
                let g = match groups.iter().position(|m| m == missing) {
                    Some(g) => g,
                    None => {
                        groups.push(missing.clone());
                        groups.len() - 1
                    }
                };
                (g as i32 + 1, Cow::Borrowed(v.as_slice()))
            }
            Action::Refresh => continue,
        };
        lines.push_str(&seq.0.to_string());
        lines.push('\t');
        lines.push_str(&grp.to_string());
        for v in vals.iter().take(ncols) {
            lines.push('\t');
            match v {
                None => lines.push_str("\\N"),
                Some(s) => escape_copy_text(s, &mut lines),
            }
        }
        lines.push('\n');
    }
    if lines.is_empty() {
        return Ok(groups);
    }
    let sink = tx
        .copy_in(&format!(
            "COPY {} FROM STDIN (FORMAT text)",
            stage_name(table.index)
        ))
        .await?;
    futures_util::pin_mut!(sink);
    sink.feed(bytes::Bytes::from(lines)).await?;
    sink.as_mut().finish().await?;
    Ok(groups)
}

/// One UPDATE for the staged rows of group `grp`: the target columns that read none of
/// the withheld values (the others keep theirs: their inputs did not change).
async fn partial_update(
    tx: &Transaction<'_>,
    table: &TablePlan,
    tkeys: &[String],
    missing: &BTreeSet<u16>,
    grp: i32,
) -> Result<(), tokio_postgres::Error> {
    let missing_names = missing_names(table, missing);
    let settable: Vec<_> = table
        .columns
        .iter()
        .filter(|c| !tkeys.contains(&c.target))
        .filter(|c| c.deps.iter().all(|d| !missing_names.contains(d.as_str())))
        .collect();
    if settable.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = settable.iter().map(|c| c.target.clone()).collect();
    let exprs = settable
        .iter()
        .map(|c| {
            format!(
                "({})::{} AS {}",
                c.expr,
                c.target_type,
                quote_ident(&c.target)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let keys = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS __k{i}", quote_ident(&k.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let m_join = table
        .target_key
        .iter()
        .enumerate()
        .map(|(i, t)| format!("t.{} = m.__k{i}", quote_ident(&t.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let m_cols = names
        .iter()
        .map(|n| format!("m.{}", quote_ident(n)))
        .collect::<Vec<_>>()
        .join(", ");
    tx.execute(
        &format!(
            "UPDATE {} t SET ({}) = ROW({m_cols}) FROM (SELECT {exprs}, {keys} FROM {} \
             WHERE __grp = {grp}) m WHERE {m_join}",
            table.target,
            ident_list(&names),
            stage_name(table.index)
        ),
        &[],
    )
    .await?;
    Ok(())
}
