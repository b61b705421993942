//! Decoded tuples → changes of migrated tables. A relation is either a migrated table
//! (its changes carry the row) or a lookup table of a merge (its changes become refreshes
//! of the driving table's keys).

use super::pgoutput::{Datum, OldTuple, Relation};
use crate::error::CoordinatorError;
use schemashift_common::change::{partition_of, Change, Op};
use schemashift_common::ids::Lsn;
use schemashift_common::plan::RunPlan;
use std::collections::HashMap;
use std::sync::Arc;

/// A published relation we care about: the migrated table it feeds and where the key
/// sits in its tuples.
pub(super) struct RelInfo {
    pub table: u32,
    key_idx: Vec<usize>,
    lookup: bool,
}

pub(super) struct Relations {
    plan: Arc<RunPlan>,
    map: HashMap<u32, Vec<RelInfo>>,
}

fn key_of(t: &[Datum], idx: &[usize]) -> Option<Vec<String>> {
    idx.iter()
        .map(|&i| match t.get(i) {
            Some(Datum::Text(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

impl Relations {
    pub fn new(plan: Arc<RunPlan>) -> Self {
        Relations {
            plan,
            map: HashMap::new(),
        }
    }

    /// The migrated tables a relation feeds (empty: not ours).
    pub fn tables_of(&self, oid: u32) -> impl Iterator<Item = &RelInfo> {
        self.map.get(&oid).into_iter().flatten()
    }

    /// Learns a relation message; refuses a migrated or lookup table whose columns changed.
    pub fn learn(&mut self, rel: &Relation) -> Result<(), CoordinatorError> {
        let got: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        let mut infos = Vec::new();
        for t in &self.plan.tables {
            let is = |s: &schemashift_common::sql::QualifiedName| {
                s.schema == rel.namespace && s.name == rel.name
            };
            let check = |want: Vec<&str>, name: String| {
                if got != want {
                    return Err(CoordinatorError::Capture(format!(
                        "table {name}: its columns changed during the run (now {got:?}, planned {want:?}); \
                         DDL on a migrated table is not supported: roll back, change the spec, start again"
                    )));
                }
                Ok(())
            };
            if is(&t.source) {
                check(
                    t.source_columns.iter().map(|c| c.name.as_str()).collect(),
                    t.source.to_string(),
                )?;
                infos.push(RelInfo {
                    table: t.index,
                    key_idx: t.source_key_index(),
                    lookup: false,
                });
            }
            for l in t.lookups.iter().filter(|l| is(&l.source)) {
                check(
                    l.columns.iter().map(String::as_str).collect(),
                    l.source.to_string(),
                )?;
                infos.push(RelInfo {
                    table: t.index,
                    key_idx: l.key_index.clone(),
                    lookup: true,
                });
            }
        }
        if !infos.is_empty() {
            self.map.insert(rel.oid, infos);
        }
        Ok(())
    }

    /// The changes one decoded row change makes, each with its partition.
    pub fn changes(
        &self,
        rel: u32,
        lsn: Lsn,
        op: Op,
        old: Option<&OldTuple>,
        new: Option<&Vec<Datum>>,
    ) -> Result<Vec<(u32, Change)>, CoordinatorError> {
        let mut out = Vec::new();
        for info in self.tables_of(rel) {
            let table = info.table;
            let describe = || {
                self.plan
                    .table(table)
                    .map(|t| t.describe())
                    .unwrap_or_default()
            };
            let old_key = match old {
                Some(o) => Some(key_of(o.tuple(), &info.key_idx).ok_or_else(|| {
                    CoordinatorError::Capture(format!(
                        "table {}: a change arrived without its key",
                        describe()
                    ))
                })?),
                None => None,
            };
            let part = |k: &[String]| partition_of(table, k, self.plan.partitions);
            if info.lookup {
                // Refresh every driving key the lookup row named, before and after.
                let mut keys: Vec<Vec<String>> = old_key.into_iter().collect();
                if let Some(k) = new.and_then(|n| key_of(n, &info.key_idx)) {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                for k in keys {
                    out.push((
                        part(&k),
                        Change {
                            table,
                            op: Op::Refresh,
                            lsn,
                            xid: 0,
                            ordinal: 0,
                            old_key: Some(k),
                            values: Vec::new(),
                            unchanged: Vec::new(),
                        },
                    ));
                }
                continue;
            }
            // With REPLICA IDENTITY FULL the old row carries every value (PostgreSQL
            // inlines its out-of-line ones), so nothing the new row withholds is unknown.
            let full_old = match old {
                Some(OldTuple::Full(t)) => Some(t),
                _ => None,
            };
            let mut values = Vec::new();
            let mut unchanged = Vec::new();
            if let Some(n) = new {
                for (i, d) in n.iter().enumerate() {
                    let d = match (d, full_old.and_then(|o| o.get(i))) {
                        (Datum::Unchanged, Some(o @ (Datum::Null | Datum::Text(_)))) => o,
                        _ => d,
                    };
                    match d {
                        Datum::Null => values.push(None),
                        Datum::Text(s) => values.push(Some(s.clone())),
                        Datum::Unchanged => {
                            values.push(None);
                            unchanged.push(i as u16);
                        }
                    }
                }
            }
            let change = Change {
                table,
                op,
                lsn,
                xid: 0,
                ordinal: 0,
                old_key,
                values,
                unchanged,
            };
            // A key change becomes a delete in the old key's partition and the new row
            // (or a refresh of it) in the new key's: each key's history stays in order.
            let (left, arrived) = change.split_move(&info.key_idx);
            for c in left.into_iter().chain([arrived]) {
                let key = c.key(&info.key_idx).unwrap_or_default();
                out.push((part(&key), c));
            }
        }
        Ok(out)
    }
}
