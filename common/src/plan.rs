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
            self.mapped_select_list(),
            self.source,
            crate::sql::keys_in(&self.key, keys)
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
        format!(
            "COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT (FORMAT binary)",
            self.mapped_select_list(),
            self.source,
            range_predicate(&self.key, shard.lo.as_deref(), shard.hi.as_deref())
        )
    }

    pub fn copy_in_sql(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            self.target,
            ident_list(&self.target_column_names())
        )
    }

    /// Row hash of the mapped source row; equal to [`Self::target_row_hash`] when equal.
    pub fn source_row_hash(&self) -> String {
        format!(
            "hashtextextended(ROW({})::text, 0)",
            self.mapped_select_list()
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
        brokers: Vec<String>,
        topic: String,
        replication_factor: i32,
    },
}

impl RunPlan {
    pub fn table(&self, index: u32) -> Option<&TablePlan> {
        self.tables.iter().find(|t| t.index == index)
    }
}
