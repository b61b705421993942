//! The planner's checks. Each reads what it needs and returns the problems it found (with
//! the table, the column and what to do), so the planner can list every problem at once
//! before anything is written.

use super::catalog::{same_set, unique_keys, Col};
use schemashift_common::pg::describe;
use schemashift_common::plan::ColumnMap;
use schemashift_common::spec::{Spec, TableSpec};
use schemashift_common::sql::{quote_ident, Helper, KeyCol, MappedExpr, QualifiedName};
use tokio_postgres::Client;

type Checked<T> = Result<T, tokio_postgres::Error>;

/// The servers: logical WAL and a free slot (the roles' rights are in `privileges`).
pub(super) async fn servers(spec: &Spec, source: &Client, resuming: bool) -> Checked<Vec<String>> {
    let mut problems = Vec::new();
    let wal_level: String = source.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "source {}: wal_level is {wal_level}; change capture needs `wal_level = logical` \
             (ALTER SYSTEM SET wal_level = logical; then restart the server)",
            spec.source.redacted()
        ));
    }
    let free: i32 = source
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int",
            &[],
        )
        .await?
        .get(0);
    if free < 1 && !resuming {
        problems.push(format!(
            "source {}: no free replication slot; raise max_replication_slots or drop an unused slot",
            spec.source.redacted()
        ));
    }
    Ok(problems)
}

/// The key on the source: its columns exist, a primary key or unique NOT NULL index
/// covers exactly them, and the replica identity carries them (or deletes could not be
/// replayed).
pub(super) async fn source_key(
    source: &Client,
    at: &str,
    src_name: &QualifiedName,
    src_cols: &[Col],
    key_names: &[String],
) -> Checked<(Vec<KeyCol>, Vec<String>)> {
    let mut problems = Vec::new();
    let mut key = Vec::new();
    for k in key_names {
        match src_cols.iter().find(|c| &c.name == k) {
            Some(c) => key.push(KeyCol {
                name: c.name.clone(),
                sql_type: c.sql_type.clone(),
            }),
            None => problems.push(format!(
                "{at}: key column {k:?} does not exist in source table {src_name}"
            )),
        }
    }
    if key.len() != key_names.len() {
        return Ok((key, problems));
    }
    let uniques = unique_keys(source, src_name).await?;
    let usable = uniques.iter().any(|u| same_set(u, key_names))
        && key
            .iter()
            .all(|k| src_cols.iter().any(|c| c.name == k.name && c.not_null));
    if !usable {
        problems.push(format!(
            "{at}: key ({}) is not a primary key or unique NOT NULL index of {src_name}; \
             add one (ALTER TABLE ... ADD PRIMARY KEY) or name key columns that have one",
            key_names.join(", ")
        ));
    }
    let ri = source
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = to_regclass($1)",
            &[&src_name.to_string()],
        )
        .await?
        .get::<_, String>(0);
    let pk_is_key = uniques.first().is_some_and(|u| same_set(u, key_names));
    if ri == "n" || (ri == "d" && !pk_is_key) {
        problems.push(format!(
            "{at}: replica identity of {src_name} does not carry the key ({}), so deletes could not be replayed; \
             use the primary key as key or ALTER TABLE {src_name} REPLICA IDENTITY USING INDEX <unique index on the key>",
            key_names.join(", ")
        ));
    }
    Ok((key, problems))
}

/// The spec's column mapping against the target table: every named column exists and is
/// not generated, every expression parses, and every NOT NULL column without a default is
/// mapped.
pub(super) fn mapped_columns<'c>(
    t: &TableSpec,
    at: &str,
    tgt_name: &QualifiedName,
    tgt_cols: &'c [Col],
    helpers: &[Helper],
    src_names: &[String],
) -> (Vec<(&'c Col, MappedExpr)>, Vec<String>) {
    let mut problems = Vec::new();
    let mut cols = Vec::new();
    for (tcol, expr) in &t.columns {
        let tcol_l = tcol.to_lowercase();
        let Some(tc) = tgt_cols
            .iter()
            .find(|c| c.name == *tcol || c.name == tcol_l)
        else {
            problems.push(format!(
                "{at}: column {tcol:?} does not exist in target table {tgt_name}"
            ));
            continue;
        };
        if tc.generated {
            problems.push(format!(
                "{at}: target column {tcol:?} is generated; remove it from columns"
            ));
            continue;
        }
        match MappedExpr::parse(expr, helpers, src_names) {
            Ok(m) => cols.push((tc, m)),
            Err(e) => problems.push(format!("{at}: column {tcol:?}: {e}")),
        }
    }
    for c in tgt_cols {
        if c.not_null
            && !c.has_default
            && !c.generated
            && !cols.iter().any(|(tc, _)| tc.name == c.name)
        {
            problems.push(format!(
                "{at}: target column {:?} is NOT NULL without a default and is not in columns; map it",
                c.name
            ));
        }
    }
    (cols, problems)
}

/// The key on the target: each key column copied as is into a target column, and a
/// primary key or unique index there on exactly those (replay upserts by it).
pub(super) async fn target_key(
    target: &Client,
    at: &str,
    tgt_name: &QualifiedName,
    key: &[KeyCol],
    cols: &[(&Col, MappedExpr)],
    resuming: bool,
) -> Checked<(Vec<KeyCol>, Vec<String>)> {
    let mut problems = Vec::new();
    let mut target_key = Vec::new();
    for k in key {
        match cols.iter().find(|(_, m)| m.bare_column.as_deref() == Some(k.name.as_str())) {
            Some((tc, _)) => target_key.push(KeyCol {
                name: tc.name.clone(),
                sql_type: tc.sql_type.clone(),
            }),
            None => problems.push(format!(
                "{at}: key column {:?} is not copied as is into any target column; add e.g. `{0}: {0}` to columns",
                k.name
            )),
        }
    }
    // A run in progress dropped the target's indexes for the load (recorded, and built again
    // before replay): the key was checked when the run was created.
    if target_key.len() == key.len() && !key.is_empty() && !resuming {
        let tnames: Vec<String> = target_key.iter().map(|k| k.name.clone()).collect();
        if !unique_keys(target, tgt_name)
            .await?
            .iter()
            .any(|u| same_set(u, &tnames))
        {
            problems.push(format!(
                "{at}: target table {tgt_name} has no primary key or unique index on ({}); replay needs one",
                tnames.join(", ")
            ));
        }
    }
    Ok((target_key, problems))
}

/// Every expression evaluates: on the source (backfill), and over a staging row of source
/// types on the target (replay), unless lookups make replay re-read rows from the source.
pub(super) async fn expressions_evaluate(
    source: &Client,
    target: &Client,
    index: u32,
    t: &TableSpec,
    src_name: &QualifiedName,
    src_cols: &[Col],
    column_maps: &[ColumnMap],
) -> Vec<String> {
    let at = format!("table {}", t.source);
    let mut problems = Vec::new();
    let stage = quote_ident(&format!("schemashift_plan_{index}"));
    let stage_cols = src_cols
        .iter()
        .map(|c| format!("{} {}", quote_ident(&c.name), c.sql_type))
        .collect::<Vec<_>>()
        .join(", ");
    if let Err(e) = target
        .batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} ({stage_cols})"
        ))
        .await
    {
        problems.push(format!(
            "{at}: the source column types must exist on the target too (replay evaluates the mapping there): {}",
            describe(&e)
        ));
    }
    for c in column_maps {
        let sel = format!("({})::{}", c.expr, c.target_type);
        let on_source = source
            .query(
                &format!("SELECT {sel} FROM ONLY {src_name} LIMIT 1000"),
                &[],
            )
            .await;
        if let Err(e) = on_source {
            problems.push(format!(
                "{at}: column {:?}: expression `{}` does not evaluate on the source: {}",
                c.target,
                c.expr,
                describe(&e)
            ));
            continue;
        }
        if !t.lookups.is_empty() {
            continue;
        }
        if let Err(e) = target
            .query(&format!("SELECT {sel} FROM {stage} LIMIT 0"), &[])
            .await
        {
            problems.push(format!(
                "{at}: column {:?}: expression `{}` does not evaluate on the target: {}",
                c.target,
                c.expr,
                describe(&e)
            ));
        }
    }
    // A temp table: gone with the session anyway.
    let _ = target
        .batch_execute(&format!("DROP TABLE IF EXISTS {stage}"))
        .await;
    problems
}

/// An administrator's publication: it exists and covers each of these source tables.
pub(super) async fn publication_covers(
    source: &Client,
    publication: &str,
    tables: &[String],
) -> Checked<Vec<String>> {
    let exists: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(vec![format!(
            "source_publication {publication:?} does not exist on the source; have an administrator \
             CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(publication),
            tables.join(", ")
        )]);
    }
    let mut problems = Vec::new();
    for t in tables {
        let covered: bool = source
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables p \
                 JOIN pg_namespace n ON n.nspname = p.schemaname \
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
                 WHERE p.pubname = $1 AND c.oid = $2::text::regclass)",
                &[&publication, t],
            )
            .await?
            .get(0);
        if !covered {
            problems.push(format!(
                "source_publication {publication:?} does not cover table {t}; have an administrator \
                 ALTER PUBLICATION {} ADD TABLE {t}",
                quote_ident(publication)
            ));
        }
    }
    Ok(problems)
}

/// A new run fills empty target tables only.
pub(super) async fn target_empty(
    target: &Client,
    at: &str,
    tgt_name: &QualifiedName,
) -> Checked<Vec<String>> {
    let non_empty: bool = target
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM ONLY {tgt_name})"),
            &[],
        )
        .await?
        .get(0);
    Ok(if non_empty {
        vec![format!(
            "{at}: target table {tgt_name} is not empty; schemashift fills empty tables only (TRUNCATE it or pick another target)"
        )]
    } else {
        Vec::new()
    })
}
