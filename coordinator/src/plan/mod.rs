//! plan: validates the spec against both catalogs (every problem listed, nothing
//! written), resolves each table's mapping, and cuts shards from sampled key quantiles.

mod catalog;
mod lookups;
mod sizing;
mod strategy;

use crate::error::CoordinatorError;
use catalog::{columns, same_set, unique_keys};
use schemashift_common::ids::ShardId;
use schemashift_common::pg::{describe, install_helpers};
use schemashift_common::plan::LogPlan;
use schemashift_common::plan::{ColumnMap, RunPlan, SequenceMap, Shard, SourceColumn, TablePlan};
use schemashift_common::spec::Changelog;
use schemashift_common::spec::{Spec, TableSpec};
use schemashift_common::sql::{quote_ident, Helper, KeyCol, MappedExpr, QualifiedName};
use serde::Serialize;
use sizing::Sizing;
use tokio_postgres::Client;

#[derive(Clone, Debug, Serialize)]
pub struct TableAnalysis {
    pub source: String,
    pub target: String,
    pub rows: u64,
    pub bytes: u64,
    pub shards: usize,
    pub shard_rows: u64,
    pub strategy: String,
    pub estimated_seconds: f64,
    /// Rows/s of each strategy as `auto` measured them when the run started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_rows_per_s: Option<crate::fdw::Speeds>,
}

pub struct Planned {
    pub plan: RunPlan,
    pub shards: Vec<Shard>,
    pub analysis: Vec<TableAnalysis>,
}

pub struct PlanOptions {
    pub workers: usize,
    /// A resumed run's target is not empty; skip that check.
    pub resuming: bool,
}

pub async fn plan(
    spec: &Spec,
    source: &Client,
    target: &Client,
    opts: &PlanOptions,
) -> Result<Planned, CoordinatorError> {
    let mut problems = Vec::new();
    let db = |e: tokio_postgres::Error| CoordinatorError::db("planning", &e);

    if let Ok(Changelog::Kafka(k)) = spec.changelog() {
        if let Err(e) = schemashift_changelog::kafka::check_brokers(&k.brokers).await {
            problems.push(format!(
                "changelog: cannot reach the Kafka brokers {}: {e}; check the address, or use `changelog: postgres`",
                k.brokers.join(",")
            ));
        }
    }
    let wal_level: String = source
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(db)?
        .get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "source {}: wal_level is {wal_level}; change capture needs `wal_level = logical` \
             (ALTER SYSTEM SET wal_level = logical; then restart the server)",
            spec.source.redacted()
        ));
    }
    let row = source
        .query_one(
            "SELECT r.rolsuper OR r.rolreplication, \
             current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(db)?;
    if !row.get::<_, bool>(0) {
        problems.push(format!(
            "source {}: the connecting role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION)",
            spec.source.redacted()
        ));
    }
    if row.get::<_, i32>(1) < 1 && !opts.resuming {
        problems.push(format!(
            "source {}: no free replication slot; raise max_replication_slots or drop an unused slot",
            spec.source.redacted()
        ));
    }
    let can_create: bool = target
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if !can_create {
        problems.push(format!(
            "target {}: the role cannot CREATE in the database (needed for the control schema {})",
            spec.target.redacted(),
            quote_ident(&spec.control_schema)
        ));
    }

    let mut helpers = Vec::new();
    for (i, f) in spec.functions.iter().enumerate() {
        match Helper::parse(f) {
            Ok(h) => helpers.push(h),
            Err(e) => problems.push(format!("functions[{i}]: {e}")),
        }
    }
    for (side, client) in [("source", source), ("target", target)] {
        if let Err(e) = install_helpers(client, &helpers, side).await {
            problems.push(e.to_string());
        }
    }

    let mut tables = Vec::new();
    let mut shards = Vec::new();
    let mut analysis = Vec::new();
    for (i, t) in spec.tables.iter().enumerate() {
        match plan_table(i as u32, t, &helpers, source, target, opts, &mut problems)
            .await
            .map_err(db)?
        {
            Some((tp, ranges)) => {
                let est = tp.estimated_rows;
                let per = est / ranges.len().max(1) as u64;
                analysis.push(TableAnalysis {
                    source: tp.source.to_string(),
                    target: tp.target.to_string(),
                    rows: est,
                    bytes: tp.estimated_bytes,
                    shards: ranges.len(),
                    shard_rows: tp.shard_rows,
                    strategy: tp.transfer.as_str().into(),
                    estimated_seconds: strategy::estimated_seconds(
                        tp.transfer,
                        est,
                        opts.workers.min(ranges.len()),
                    ),
                    measured_rows_per_s: None,
                });
                for r in ranges {
                    shards.push(Shard {
                        id: ShardId(shards.len() as i64 + 1),
                        table: tp.index,
                        range: r,
                        estimated_rows: per,
                    });
                }
                tables.push(tp);
            }
            None => continue,
        }
    }
    if !problems.is_empty() {
        return Err(CoordinatorError::Plan(problems));
    }
    Ok(Planned {
        plan: RunPlan {
            helpers,
            tables,
            partitions: opts.workers.max(1) as u32,
            control_schema: spec.control_schema.clone(),
            // Set with the run id when the run is created (the topic is named after it).
            changelog: LogPlan::Postgres,
            low_priority: spec.throttle.enabled && spec.throttle.low_priority,
            replay_batch: spec.replay.batch,
        },
        shards,
        analysis,
    })
}

#[allow(clippy::too_many_arguments)]
async fn plan_table(
    index: u32,
    t: &TableSpec,
    helpers: &[Helper],
    source: &Client,
    target: &Client,
    opts: &PlanOptions,
    problems: &mut Vec<String>,
) -> Result<Option<(TablePlan, Vec<schemashift_common::plan::ShardRange>)>, tokio_postgres::Error> {
    let at = format!("table {}", t.source);
    let start = problems.len();
    let (Ok(src_name), Ok(tgt_name)) = (
        QualifiedName::parse(&t.source),
        QualifiedName::parse(&t.target),
    ) else {
        return Ok(None);
    };
    let transfer = strategy::transfer(t, target, &at, problems).await?;
    let Some(src_cols) = columns(source, &src_name).await? else {
        problems.push(format!(
            "{at}: source table {src_name} does not exist (check the name and schema)"
        ));
        return Ok(None);
    };
    let Some(tgt_cols) = columns(target, &tgt_name).await? else {
        problems.push(format!(
            "{at}: target table {tgt_name} does not exist; create it with the new schema first"
        ));
        return Ok(None);
    };
    let src_names: Vec<String> = src_cols.iter().map(|c| c.name.clone()).collect();
    let key_names: Vec<String> = t.key.columns().iter().map(|k| k.to_lowercase()).collect();
    let mut key = Vec::new();
    for k in &key_names {
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
    if key.len() == key_names.len() {
        let uniques = unique_keys(source, &src_name).await?;
        let usable = uniques.iter().any(|u| same_set(u, &key_names))
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
        let pk_is_key = uniques.first().is_some_and(|u| same_set(u, &key_names));
        if ri == "n" || (ri == "d" && !pk_is_key) {
            problems.push(format!(
                "{at}: replica identity of {src_name} does not carry the key ({}), so deletes could not be replayed; \
                 use the primary key as key or ALTER TABLE {src_name} REPLICA IDENTITY USING INDEX <unique index on the key>",
                key_names.join(", ")
            ));
        }
    }

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
        match MappedExpr::parse(expr, helpers, &src_names) {
            Ok(m) => cols.push((tc, m)),
            Err(e) => problems.push(format!("{at}: column {tcol:?}: {e}")),
        }
    }
    for c in &tgt_cols {
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
    let mut target_key = Vec::new();
    for k in &key {
        match cols.iter().find(|(_, m)| m.bare_column.as_deref() == Some(k.name.as_str())) {
            Some((tc, _)) => target_key.push(KeyCol { name: tc.name.clone(), sql_type: tc.sql_type.clone() }),
            None => problems.push(format!(
                "{at}: key column {:?} is not copied as is into any target column; add e.g. `{0}: {0}` to columns",
                k.name
            )),
        }
    }
    if target_key.len() == key.len() && !key.is_empty() {
        let tnames: Vec<String> = target_key.iter().map(|k| k.name.clone()).collect();
        if !unique_keys(target, &tgt_name)
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
    if problems.len() > start {
        return Ok(None);
    }

    // Every expression must evaluate: on the source (backfill) and over a staging row
    // of source types on the target (replay).
    let column_maps: Vec<ColumnMap> = cols
        .iter()
        .map(|(tc, m)| ColumnMap {
            target: tc.name.clone(),
            target_type: tc.sql_type.clone(),
            expr: m.sql.clone(),
            deps: m.deps.iter().cloned().collect(),
            bare_column: m.bare_column.clone().filter(|b| m.deps.contains(b)),
        })
        .collect();
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
    for c in &column_maps {
        let sel = format!("({})::{}", c.expr, c.target_type);
        if let Err(e) = source
            .query(
                &format!("SELECT {sel} FROM ONLY {src_name} LIMIT 1000"),
                &[],
            )
            .await
        {
            problems.push(format!(
                "{at}: column {:?}: expression `{}` does not evaluate on the source: {}",
                c.target,
                c.expr,
                describe(&e)
            ));
        } else if let Err(e) = if t.lookups.is_empty() {
            target
                .query(&format!("SELECT {sel} FROM {stage} LIMIT 0"), &[])
                .await
                .map(|_| ())
        } else {
            // With lookups, replay re-reads rows from the source: no target-side evaluation.
            Ok(())
        } {
            problems.push(format!(
                "{at}: column {:?}: expression `{}` does not evaluate on the target: {}",
                c.target,
                c.expr,
                describe(&e)
            ));
        }
    }
    let _ = target
        .batch_execute(&format!("DROP TABLE IF EXISTS {stage}"))
        .await;

    let privs: bool = source
        .query_one("SELECT has_table_privilege($1, 'SELECT') AND pg_has_role((SELECT relowner FROM pg_class WHERE oid = to_regclass($1)), 'USAGE')", &[&src_name.to_string()])
        .await?
        .get(0);
    if !privs {
        problems.push(format!("{at}: the source role must own {src_name} and be able to SELECT it (publication needs ownership)"));
    }
    let tprivs: bool = target
        .query_one(
            "SELECT has_table_privilege($1, 'SELECT,INSERT,UPDATE,DELETE')",
            &[&tgt_name.to_string()],
        )
        .await?
        .get(0);
    if !tprivs {
        problems.push(format!(
            "{at}: the target role needs SELECT, INSERT, UPDATE and DELETE on {tgt_name}"
        ));
    }
    if !opts.resuming {
        let non_empty: bool = target
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM ONLY {tgt_name})"),
                &[],
            )
            .await?
            .get(0);
        if non_empty {
            problems.push(format!(
                "{at}: target table {tgt_name} is not empty; schemashift fills empty tables only (TRUNCATE it or pick another target)"
            ));
        }
    }
    let lookups = lookups::plan_lookups(source, t, &at, &key, problems).await?;
    if problems.len() > start {
        return Ok(None);
    }

    let mut sequences = Vec::new();
    for (tc, m) in &cols {
        let Some(sc) = &m.bare_column else { continue };
        let s: Option<String> = source
            .query_one(
                "SELECT pg_get_serial_sequence($1, $2)",
                &[&src_name.to_string(), sc],
            )
            .await?
            .get(0);
        let d: Option<String> = target
            .query_one(
                "SELECT pg_get_serial_sequence($1, $2)",
                &[&tgt_name.to_string(), &tc.name],
            )
            .await?
            .get(0);
        if let (Some(s), Some(d)) = (s, d) {
            sequences.push(SequenceMap {
                source_sequence: s,
                target_sequence: d,
            });
        }
    }

    let Sizing {
        est_rows,
        est_bytes,
        shard_rows,
        ranges,
    } = sizing::size_and_cut(source, &src_name, &key, t.shard_rows, opts.workers).await?;
    Ok(Some((
        TablePlan {
            index,
            source: src_name,
            target: tgt_name,
            key,
            target_key,
            columns: column_maps,
            source_columns: src_cols
                .iter()
                .filter(|c| !c.generated)
                .map(|c| SourceColumn {
                    name: c.name.clone(),
                    sql_type: c.sql_type.clone(),
                })
                .collect(),
            sequences,
            estimated_rows: est_rows,
            estimated_bytes: est_bytes,
            shard_rows,
            lookups,
            transfer,
        },
        ranges,
    )))
}
