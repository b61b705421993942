//! The resolved plan of a run: what the planner learned from both catalogs, in a form
//! that is persisted in the control schema (so a resumed run uses the same shards) and
//! handed to workers.

use crate::ids::ShardId;
use crate::sql::{ident_list, quote_ident, range_predicate, Helper, KeyCol, QualifiedName};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ColumnMap {
    pub target: String,
    /// `format_type` of the target column; expressions are cast to it.
    pub target_type: String,
    /// SQL over the source row, helper calls qualified with `pg_temp`.
    pub expr: String,
    /// Source columns the expression reads.
    pub deps: Vec<String>,
    /// The source column copied as is, when the expression is a bare column reference.
    #[serde(default)]
    pub bare_column: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceColumn {
    pub name: String,
    pub sql_type: String,
}

/// A sequence owned by a target column that must move past the source's value at cutover.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SequenceMap {
    pub source_sequence: String,
    pub target_sequence: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TablePlan {
    pub index: u32,
    pub source: QualifiedName,
    pub target: QualifiedName,
    /// Key columns as named in the source, with source types.
    pub key: Vec<KeyCol>,
    /// The same key as named in the target (columns that copy the source key as is).
    pub target_key: Vec<KeyCol>,
    pub columns: Vec<ColumnMap>,
    /// All source columns in attribute order, as pgoutput sends them.
    pub source_columns: Vec<SourceColumn>,
    pub sequences: Vec<SequenceMap>,
    pub estimated_rows: u64,
    pub estimated_bytes: u64,
    pub shard_rows: u64,
    /// Lookup tables (a merge): when present, replay refreshes whole target rows from
    /// the source by key instead of mapping captured values on the target.
    #[serde(default)]
    pub lookups: Vec<LookupPlan>,
    /// How shards move: binary COPY streams, or one `INSERT … SELECT` on the target from a
    /// postgres_fdw foreign table of the source.
    #[serde(default)]
    pub transfer: Transfer,
}

/// A table's backfill strategy as planned (`auto` resolves to one of these at plan time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transfer {
    #[default]
    Copy,
    Fdw,
}

impl Transfer {
    pub fn as_str(self) -> &'static str {
        match self {
            Transfer::Copy => "copy",
            Transfer::Fdw => "fdw",
        }
    }
}

/// A lookup table of a merge: its changes become refreshes of the driving table's keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LookupPlan {
    pub source: QualifiedName,
    /// Positions, in the lookup table's attribute order, of the columns holding the key.
    pub key_index: Vec<usize>,
    /// All its columns in attribute order, as pgoutput sends them.
    pub columns: Vec<String>,
}

impl TablePlan {
    /// Replay re-reads rows from the source (the mapping reads other tables).
    pub fn refreshes(&self) -> bool {
        !self.lookups.is_empty()
    }

    /// The mapped rows of these keys, read from the source.
    pub fn copy_out_keys_sql(&self, keys: &[Vec<String>]) -> String {
        format!(
            "COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT (FORMAT binary)",
            self.source_select_list(),
            self.source_from(),
            crate::sql::keys_in(&self.key, keys)
        )
    }

    /// The FROM list of a mapped read of the source (after `ONLY`): the table, and the
    /// computed expressions in a LATERAL subquery that `OFFSET 0` keeps from being flattened.
    /// PostgreSQL can then memoize it, evaluating a split once per distinct input instead of
    /// once per row when inputs repeat (names do: 5x less source CPU on the scenario); with
    /// distinct inputs the plan is a plain nested loop, costing what inline expressions do.
    pub fn source_from(&self) -> String {
        self.mapped_from(&self.source.to_string())
    }

    /// [`Self::source_from`] over another relation with the source's columns (`rel` is a
    /// FROM item its columns resolve against, e.g. `ft AS src`).
    fn mapped_from(&self, rel: &str) -> String {
        let computed: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.bare_column.is_none())
            .map(|(i, c)| format!("({})::{} AS {}", c.expr, c.target_type, mapped_alias(i)))
            .collect();
        if computed.is_empty() {
            return rel.to_owned();
        }
        format!(
            "{rel} CROSS JOIN LATERAL (SELECT {} OFFSET 0) AS {MAPPED}",
            computed.join(", ")
        )
    }

    /// The mapped row in target column order, over [`Self::source_from`].
    pub fn source_select_list(&self) -> String {
        self.mapped_select_over(&self.source.to_string())
    }

    /// The mapped row over [`Self::mapped_from`]; `rel_ref` names its relation.
    fn mapped_select_over(&self, rel_ref: &str) -> String {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, c)| match &c.bare_column {
                Some(col) => format!("({rel_ref}.{})::{}", quote_ident(col), c.target_type),
                None => format!("{MAPPED}.{}", mapped_alias(i)),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Name of this table's postgres_fdw foreign table in the control schema (unquoted).
    pub fn foreign_table_name(&self) -> String {
        format!("source {}", self.index)
    }

    /// A shard by the FDW strategy: one statement on the target, mapping evaluated there on
    /// rows `foreign_table` (quoted, qualified) fetches from the source.
    pub fn fdw_insert_sql(&self, foreign_table: &str, shard: &ShardRange) -> String {
        self.fdw_insert_sql_into(&self.target.to_string(), foreign_table, shard, None)
    }

    /// [`Self::fdw_insert_sql`] into another table with the target's columns, optionally
    /// only the first `limit` rows (for measuring the strategies).
    pub fn fdw_insert_sql_into(
        &self,
        rel: &str,
        foreign_table: &str,
        shard: &ShardRange,
        limit: Option<u64>,
    ) -> String {
        let from = format!("{foreign_table} AS {FDW_SOURCE}");
        format!(
            "INSERT INTO {rel} ({}) SELECT {} FROM {} WHERE {}{}",
            ident_list(&self.target_column_names()),
            self.mapped_select_over(FDW_SOURCE),
            self.mapped_from(&from),
            range_predicate(&self.key, shard.lo.as_deref(), shard.hi.as_deref()),
            limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default()
        )
    }

    /// Evaluates one mapped column over a shard's source rows (`count` reads every value):
    /// it fails when that column's expression raises somewhere in the range.
    pub fn column_probe_sql(&self, column: &ColumnMap, shard: &ShardRange) -> String {
        format!(
            "SELECT count(({})::{}) FROM ONLY {} WHERE {}",
            column.expr,
            column.target_type,
            self.source,
            range_predicate(&self.key, shard.lo.as_deref(), shard.hi.as_deref())
        )
    }

    pub fn target_column_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.target.clone()).collect()
    }

    /// `(expr)::type` list over the source row, in target column order.
    pub fn mapped_select_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("({})::{}", c.expr, c.target_type))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn source_key_index(&self) -> Vec<usize> {
        self.key
            .iter()
            .filter_map(|k| self.source_columns.iter().position(|c| c.name == k.name))
            .collect()
    }

    /// The source side of a shard, already mapped and cast: what lands in the target.
    pub fn copy_out_sql(&self, shard: &ShardRange) -> String {
        self.copy_out_sql_with(shard, None)
    }

    pub fn copy_in_sql(&self) -> String {
        self.copy_in_sql_into(&self.target.to_string())
    }

    /// [`Self::copy_in_sql`] into another table with the target's columns.
    pub fn copy_in_sql_into(&self, rel: &str) -> String {
        format!(
            "COPY {rel} ({}) FROM STDIN (FORMAT binary)",
            ident_list(&self.target_column_names())
        )
    }

    /// The first `limit` rows of a shard's COPY, for measuring the strategies.
    pub fn copy_out_sql_limited(&self, shard: &ShardRange, limit: u64) -> String {
        self.copy_out_sql_with(shard, Some(limit))
    }

    fn copy_out_sql_with(&self, shard: &ShardRange, limit: Option<u64>) -> String {
        format!(
            "COPY (SELECT {} FROM ONLY {} WHERE {}{}) TO STDOUT (FORMAT binary)",
            self.source_select_list(),
            self.source_from(),
            range_predicate(&self.key, shard.lo.as_deref(), shard.hi.as_deref()),
            limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default()
        )
    }

    /// Row hash of the mapped source row over [`Self::source_from`]; equal to
    /// [`Self::target_row_hash`] when the rows are equal.
    pub fn source_row_hash(&self) -> String {
        format!(
            "hashtextextended(ROW({})::text, 0)",
            self.source_select_list()
        )
    }

    pub fn target_row_hash(&self) -> String {
        format!(
            "hashtextextended(ROW({})::text, 0)",
            ident_list(&self.target_column_names())
        )
    }

    /// Predicate on the target key for the same range as on the source key.
    pub fn target_range_predicate(&self, shard: &ShardRange) -> String {
        range_predicate(&self.target_key, shard.lo.as_deref(), shard.hi.as_deref())
    }

    pub fn source_range_predicate(&self, shard: &ShardRange) -> String {
        range_predicate(&self.key, shard.lo.as_deref(), shard.hi.as_deref())
    }

    pub fn describe(&self) -> String {
        format!("{} -> {}", self.source, self.target)
    }

    pub fn key_names(&self) -> String {
        self.key
            .iter()
            .map(|k| quote_ident(&k.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Alias of the LATERAL subquery of computed expressions in source reads.
const MAPPED: &str = "schemashift_mapped";
const FDW_SOURCE: &str = "schemashift_source";

/// Output name of computed column `i`: quoted, with a space, so an unqualified source column
/// name in a predicate can never be ambiguous with it.
fn mapped_alias(i: usize) -> String {
    format!("\"schemashift m{i}\"")
}

/// A key range `[lo, hi)` of one table; `None` is open. Bounds are key values as text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub lo: Option<Vec<String>>,
    pub hi: Option<Vec<String>>,
}

impl std::fmt::Display for ShardRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |b: &Option<Vec<String>>, open: &str| match b {
            Some(v) => v.join(","),
            None => open.to_owned(),
        };
        write!(
            f,
            "[{}, {})",
            show(&self.lo, "-inf"),
            show(&self.hi, "+inf")
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Shard {
    pub id: ShardId,
    pub table: u32,
    pub range: ShardRange,
    pub estimated_rows: u64,
}

/// Everything a worker needs besides connection strings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunPlan {
    pub helpers: Vec<Helper>,
    pub tables: Vec<TablePlan>,
    pub partitions: u32,
    pub control_schema: String,
    #[serde(default)]
    pub changelog: LogPlan,
    /// Bulk sessions lower their server process's CPU priority when it is on this host.
    #[serde(default)]
    pub low_priority: bool,
    /// Changes per replay transaction (spec `replay.batch`).
    #[serde(default = "default_replay_batch")]
    pub replay_batch: u32,
    /// The spec's `source_publication`; None: the run's own, named after its slot.
    #[serde(default)]
    pub publication: Option<String>,
    /// Per-table fingerprints of the spec the run was planned from (none for runs made
    /// before they were recorded): a stopped table may be re-planned under a fixed spec.
    #[serde(default)]
    pub spec_print: Option<crate::spec_print::SpecPrint>,
}

impl RunPlan {
    /// The publication capture streams: an administrator's, or the run's own.
    pub fn publication_for<'a>(&'a self, slot: &'a str) -> &'a str {
        self.publication.as_deref().unwrap_or(slot)
    }
}

fn default_replay_batch() -> u32 {
    5_000
}

/// Where this run's change log lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogPlan {
    /// The `changes` table of the control schema (in the target database).
    #[default]
    Postgres,
    /// One Kafka topic with `partitions` partitions.
    Kafka {
        #[serde(flatten)]
        conn: crate::kafka_conn::KafkaConn,
        topic: String,
        replication_factor: i32,
    },
}

impl RunPlan {
    pub fn replay_batch(&self) -> i64 {
        i64::from(self.replay_batch.max(1))
    }

    pub fn table(&self, index: u32) -> Option<&TablePlan> {
        self.tables.iter().find(|t| t.index == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> TablePlan {
        let col = |target: &str, expr: &str, bare: Option<&str>| ColumnMap {
            target: target.into(),
            target_type: "text".into(),
            expr: expr.into(),
            deps: vec!["full_name".into()],
            bare_column: bare.map(Into::into),
        };
        TablePlan {
            index: 3,
            source: QualifiedName::parse("public.users").expect("name"),
            target: QualifiedName::parse("new.users").expect("name"),
            key: vec![KeyCol {
                name: "id".into(),
                sql_type: "bigint".into(),
            }],
            target_key: vec![KeyCol {
                name: "id".into(),
                sql_type: "bigint".into(),
            }],
            columns: vec![
                col("id", "id", Some("id")),
                col("first_name", "pg_temp.split_first(full_name)", None),
            ],
            source_columns: Vec::new(),
            sequences: Vec::new(),
            estimated_rows: 0,
            estimated_bytes: 0,
            shard_rows: 1,
            lookups: Vec::new(),
            transfer: Transfer::Fdw,
        }
    }

    #[test]
    fn fdw_insert_reads_the_foreign_table_under_one_alias_and_maps_in_a_lateral() {
        let t = users();
        let range = ShardRange {
            lo: Some(vec!["10".into()]),
            hi: Some(vec!["20".into()]),
        };
        let sql = t.fdw_insert_sql("\"ctl\".\"source 3\"", &range);
        assert!(sql.starts_with("INSERT INTO \"new\".\"users\" (\"id\", \"first_name\") SELECT "));
        assert!(sql.contains("FROM \"ctl\".\"source 3\" AS schemashift_source CROSS JOIN LATERAL"));
        assert!(sql.contains("(schemashift_source.\"id\")::text"), "{sql}");
        assert!(
            !sql.contains("\"public\".\"users\""),
            "the source table is not read directly: {sql}"
        );
        assert!(!sql.contains("LIMIT"));
        let probe = t.fdw_insert_sql_into("pg_temp.p", "\"ctl\".\"source 3\"", &range, Some(5));
        assert!(probe.starts_with("INSERT INTO pg_temp.p ") && probe.ends_with(" LIMIT 5"));
        assert_eq!(t.foreign_table_name(), "source 3");
    }

    #[test]
    fn copy_sql_targets_the_given_table_and_limits_the_sample() {
        let t = users();
        let range = ShardRange { lo: None, hi: None };
        assert_eq!(
            t.copy_in_sql(),
            "COPY \"new\".\"users\" (\"id\", \"first_name\") FROM STDIN (FORMAT binary)"
        );
        assert!(t
            .copy_in_sql_into("pg_temp.p")
            .starts_with("COPY pg_temp.p ("));
        let out = t.copy_out_sql_limited(&range, 7);
        assert!(
            out.contains("FROM ONLY \"public\".\"users\" CROSS JOIN LATERAL")
                && out.contains(" LIMIT 7) TO STDOUT"),
            "{out}"
        );
    }
}
