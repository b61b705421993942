//! plan: validates the spec against both catalogs (every problem listed, nothing
//! written), resolves each table's mapping, and cuts shards from sampled key quantiles.

mod catalog;
mod checks;
mod lookups;
pub mod preflight;
pub mod privileges;
mod sizing;
mod strategy;

use crate::error::CoordinatorError;
use crate::reverse::NoWayBack;
use catalog::columns;
use schemashift_common::ids::ShardId;
use schemashift_common::pg::install_helpers;
use schemashift_common::plan::LogPlan;
use schemashift_common::plan::{ColumnMap, RunPlan, SequenceMap, Shard, SourceColumn, TablePlan};
use schemashift_common::spec::Changelog;
use schemashift_common::spec::{Spec, TableSpec};
use schemashift_common::sql::{Helper, QualifiedName};
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
    /// What reverse sync (the way back after the cutover) will not do for this table.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reverse_notes: Vec<String>,
}

pub struct Planned {
    pub plan: RunPlan,
    pub shards: Vec<Shard>,
    pub analysis: Vec<TableAnalysis>,
    /// Source columns reverse sync leaves alone, or why there is none.
    pub reverse_notes: Vec<String>,
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
        if let Err(e) = schemashift_changelog::kafka::check_brokers(&k.conn).await {
            problems.push(format!(
                "changelog: cannot reach the Kafka brokers {}: {e}; check the address, or use `changelog: postgres`",
                k.conn.brokers.join(",")
            ));
        }
    }
    problems.extend(
        checks::servers(spec, source, opts.resuming)
            .await
            .map_err(db)?,
    );

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
                    reverse_notes: Vec::new(),
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
    if let Some(p) = &spec.source_publication {
        let mut names: Vec<String> = Vec::new();
        for t in &tables {
            for n in std::iter::once(&t.source).chain(t.lookups.iter().map(|l| &l.source)) {
                if !names.contains(&n.to_string()) {
                    names.push(n.to_string());
                }
            }
        }
        problems.extend(
            checks::publication_covers(source, p, &names)
                .await
                .map_err(db)?,
        );
    }
    problems.extend(
        privileges_of(spec, source, target)
            .await
            .map_err(db)?
            .iter()
            .filter(|p| p.missing())
            .map(privileges::Privilege::problem),
    );
    if !problems.is_empty() {
        return Err(CoordinatorError::Plan(problems));
    }
    let plan = RunPlan {
        helpers,
        tables,
        partitions: opts.workers.max(1) as u32,
        control_schema: spec.control_schema.clone(),
        // Set with the run id when the run is created (the topic is named after it).
        changelog: LogPlan::Postgres,
        low_priority: spec.throttle.enabled && spec.throttle.low_priority,
        replay_batch: spec.replay.batch,
        publication: spec.source_publication.clone(),
        spec_print: Some(schemashift_common::spec_print::SpecPrint::of(spec)),
    };
    // The way back is checked now, not at the cutover: a column reverse sync could not
    // write is a spec error while `cutover.reverse` is on.
    let reverse_notes = match crate::reverse::plan(spec, &plan, source, target).await? {
        Ok((_, notes)) => notes,
        Err(NoWayBack::Unfillable(lines)) if spec.cutover.reverse => {
            return Err(CoordinatorError::Plan(lines));
        }
        Err(why) => vec![format!("no reverse sync after the cutover: {why}")],
    };
    for note in &reverse_notes {
        tracing::info!(note = %note, "plan");
    }
    for a in analysis.iter_mut() {
        let mine = format!("table {}:", a.source);
        a.reverse_notes = reverse_notes
            .iter()
            .filter(|n| n.starts_with(&mine) || !n.starts_with("table "))
            .cloned()
            .collect();
    }
    Ok(Planned {
        plan,
        shards,
        analysis,
        reverse_notes,
    })
}

/// The rights the spec's run needs on both servers, and whether the roles have them.
pub async fn privileges_of(
    spec: &Spec,
    source: &Client,
    target: &Client,
) -> Result<Vec<privileges::Privilege>, tokio_postgres::Error> {
    let parse = |n: &String| QualifiedName::parse(n).ok();
    let src: Vec<QualifiedName> = spec
        .tables
        .iter()
        .filter_map(|t| parse(&t.source))
        .collect();
    let tgt: Vec<QualifiedName> = spec
        .tables
        .iter()
        .filter_map(|t| parse(&t.target))
        .collect();
    let mut lookups: Vec<QualifiedName> = Vec::new();
    for l in spec.tables.iter().flat_map(|t| &t.lookups) {
        if let Some(n) = parse(&l.table).filter(|n| !src.contains(n) && !lookups.contains(n)) {
            lookups.push(n);
        }
    }
    let tables = privileges::Tables {
        source: &src,
        lookups: &lookups,
        target: &tgt,
    };
    privileges::check(spec, source, target, &tables).await
}

/// One table's plan from the checks of `checks`, in order; None when a check found a
/// problem (added to `problems`).
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
    let (key, found) = checks::source_key(source, &at, &src_name, &src_cols, &key_names).await?;
    problems.extend(found);
    let (cols, found) = checks::mapped_columns(t, &at, &tgt_name, &tgt_cols, helpers, &src_names);
    problems.extend(found);
    let (target_key, found) =
        checks::target_key(target, &at, &tgt_name, &key, &cols, opts.resuming).await?;
    problems.extend(found);
    if problems.len() > start {
        return Ok(None);
    }
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
    problems.extend(
        checks::expressions_evaluate(source, target, index, t, &src_name, &src_cols, &column_maps)
            .await,
    );
    if !opts.resuming {
        problems.extend(checks::target_empty(target, &at, &tgt_name).await?);
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
