//! Per-table fingerprints of a spec, recorded with the run's plan, so that a resumed run
//! can tell which tables a changed spec changes: a table that stopped (its mapping raised,
//! say) may be fixed in the spec and re-planned alone; any other change is refused.

use crate::spec::Spec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What one spec table is (source, target, key) and what it does (its column mapping).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablePrint {
    /// Source and target names and key columns, as written in the spec.
    pub identity: String,
    /// A hash of the column mapping.
    pub mapping: String,
}

/// The spec's functions and each table, in spec order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecPrint {
    pub functions: String,
    pub tables: Vec<TablePrint>,
}

/// The first 8 bytes of the SHA-256 of `parts` in order, in hex (also the spec fingerprint).
pub(crate) fn hash(parts: impl IntoIterator<Item = String>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl SpecPrint {
    pub fn of(spec: &Spec) -> SpecPrint {
        SpecPrint {
            functions: hash([spec.functions.join("\n")]),
            tables: spec
                .tables
                .iter()
                .map(|t| TablePrint {
                    identity: format!("{}|{}|{:?}", t.source, t.target, t.key.columns()),
                    mapping: hash(t.columns.iter().map(|(k, v)| format!("{k}={v};"))),
                })
                .collect(),
        }
    }

    /// The tables (by index) whose mapping differs in `now`, when every such table is in
    /// `stopped` and nothing else differs; otherwise why the change cannot be taken.
    pub fn replannable(
        &self,
        now: &SpecPrint,
        stopped: &BTreeSet<u32>,
        names: &[String],
    ) -> Result<Vec<u32>, String> {
        if self.functions != now.functions {
            return Err("its `functions` differ, and every table may use them".into());
        }
        if self.tables.len() != now.tables.len() {
            return Err(format!(
                "it has {} tables where the run has {}",
                now.tables.len(),
                self.tables.len()
            ));
        }
        let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
        let mut changed = Vec::new();
        for (i, (was, is)) in self.tables.iter().zip(&now.tables).enumerate() {
            if was.identity != is.identity {
                return Err(format!(
                    "table {}: its source, target or key differ (only a stopped table's \
                     `columns` may change)",
                    name(i)
                ));
            }
            if was.mapping == is.mapping {
                continue;
            }
            if !stopped.contains(&(i as u32)) {
                return Err(format!(
                    "table {}: its `columns` differ, and it is not stopped (it was copied \
                     under the old mapping)",
                    name(i)
                ));
            }
            changed.push(i as u32);
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(maps: &[&str]) -> SpecPrint {
        SpecPrint {
            functions: "f".into(),
            tables: maps
                .iter()
                .enumerate()
                .map(|(i, m)| TablePrint {
                    identity: format!("t{i}"),
                    mapping: (*m).into(),
                })
                .collect(),
        }
    }

    fn names() -> Vec<String> {
        vec!["public.a".into(), "public.b".into()]
    }

    #[test]
    fn a_stopped_tables_new_mapping_is_replanned_alone() {
        let stopped = BTreeSet::from([1]);
        let got = print(&["x", "y"]).replannable(&print(&["x", "y2"]), &stopped, &names());
        assert_eq!(got, Ok(vec![1]));
        // Nothing changed: nothing to re-plan.
        let same = print(&["x", "y"]).replannable(&print(&["x", "y"]), &stopped, &names());
        assert_eq!(same, Ok(vec![]));
    }

    #[test]
    fn a_change_in_a_table_that_is_not_stopped_is_refused() {
        let stopped = BTreeSet::from([1]);
        let err = print(&["x", "y"])
            .replannable(&print(&["x2", "y2"]), &stopped, &names())
            .expect_err("table a is not stopped");
        assert!(
            err.contains("public.a") && err.contains("not stopped"),
            "{err}"
        );
        let none = print(&["x", "y"]).replannable(&print(&["x", "y2"]), &BTreeSet::new(), &names());
        assert!(none.is_err());
    }

    #[test]
    fn functions_tables_and_identities_may_not_change() {
        let stopped = BTreeSet::from([0, 1]);
        let mut f = print(&["x", "y"]);
        f.functions = "g".into();
        assert!(print(&["x", "y"])
            .replannable(&f, &stopped, &names())
            .is_err_and(|e| e.contains("functions")));
        assert!(print(&["x", "y"])
            .replannable(&print(&["x"]), &stopped, &names())
            .is_err());
        let mut moved = print(&["x", "y"]);
        moved.tables[1].identity = "elsewhere".into();
        assert!(print(&["x", "y"])
            .replannable(&moved, &stopped, &names())
            .is_err_and(|e| e.contains("public.b")));
    }
}
