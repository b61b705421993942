//! A decoded row change, as it sits in the change log (postgres table or Kafka).

use crate::ids::Lsn;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A lookup table changed: re-read the row with key `old_key` from the source.
    Refresh,
}

impl Op {
    pub fn code(self) -> i8 {
        match self {
            Op::Insert => b'I' as i8,
            Op::Update => b'U' as i8,
            Op::Delete => b'D' as i8,
            Op::Refresh => b'R' as i8,
        }
    }
    pub fn from_code(c: i8) -> Option<Op> {
        match c as u8 {
            b'I' => Some(Op::Insert),
            b'U' => Some(Op::Update),
            b'D' => Some(Op::Delete),
            b'R' => Some(Op::Refresh),
            _ => None,
        }
    }
}

/// One row change of a migrated table. Values are PostgreSQL text forms in source
/// attribute order; `None` is SQL NULL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub table: u32,
    pub op: Op,
    /// Commit LSN of the source transaction.
    pub lsn: Lsn,
    /// Source transaction id.
    #[serde(default)]
    pub xid: u32,
    /// Position of the change within its transaction: (lsn, ordinal) orders all changes
    /// and tells a re-sent duplicate from a new change.
    #[serde(default)]
    pub ordinal: u32,
    /// Key of the row before the change when it differs from the new key (deletes,
    /// key-changing updates); source key column order.
    pub old_key: Option<Vec<String>>,
    /// The new row (insert/update); empty for deletes.
    pub values: Vec<Option<String>>,
    /// Attribute positions pgoutput marked as unchanged TOAST: not sent, not to be written.
    pub unchanged: Vec<u16>,
}

impl Change {
    /// The key the change applies to after it happened (the old key for deletes). A key
    /// column pgoutput withheld as unchanged TOAST comes from the old key, which PostgreSQL
    /// logs whenever the key has out-of-line values.
    pub fn key(&self, key_index: &[usize]) -> Option<Vec<String>> {
        match self.op {
            Op::Delete | Op::Refresh => self.old_key.clone(),
            Op::Insert | Op::Update => key_index
                .iter()
                .enumerate()
                .map(|(j, &i)| {
                    let withheld = self.unchanged.contains(&(i as u16));
                    match self.values.get(i).cloned().flatten() {
                        Some(v) if !withheld => Some(v),
                        _ if withheld => self.old_key.as_ref().and_then(|o| o.get(j).cloned()),
                        _ => None,
                    }
                })
                .collect(),
        }
    }

    /// Whether this is an UPDATE that moved the row to another key.
    pub fn changes_key(&self, key_index: &[usize]) -> bool {
        match (self.op, &self.old_key) {
            (Op::Update, Some(old)) => self.key(key_index).is_some_and(|new| *old != new),
            _ => false,
        }
    }

    /// Splits an UPDATE that changed the row's key into what each key sees: a delete of
    /// the old key, and the new row, or (when pgoutput withheld unchanged out-of-line
    /// values, which then exist only in the old row) a refresh of the new key from the
    /// source. Each key's changes then stay in that key's partition, in order; a move
    /// never writes a partial row to a key that may not exist. Anything else is returned
    /// as it is.
    pub fn split_move(self, key_index: &[usize]) -> (Option<Change>, Change) {
        if !self.changes_key(key_index) {
            return (None, self);
        }
        let Some(new) = self.key(key_index) else {
            return (None, self);
        };
        let delete = Change {
            op: Op::Delete,
            values: Vec::new(),
            unchanged: Vec::new(),
            ..self.clone()
        };
        let arrive = if self.unchanged.is_empty() {
            Change {
                op: Op::Insert,
                old_key: None,
                ..self
            }
        } else {
            Change {
                op: Op::Refresh,
                old_key: Some(new),
                values: Vec::new(),
                unchanged: Vec::new(),
                ..self
            }
        };
        (Some(delete), arrive)
    }
}

/// Partition of a key: one key's changes always land in one partition, in order.
pub fn partition_of(table: u32, key: &[String], partitions: u32) -> u32 {
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&table.to_le_bytes());
    for k in key {
        eat(k.as_bytes());
        eat(&[0]);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_always_maps_to_one_partition() {
        let k = vec!["42".to_string()];
        let p = partition_of(0, &k, 8);
        for _ in 0..10 {
            assert_eq!(partition_of(0, &k, 8), p);
        }
        let spread: std::collections::HashSet<u32> = (0..1000)
            .map(|i| partition_of(0, &[i.to_string()], 8))
            .collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(partition_of(3, &k, 1), 0);
    }

    fn update(old: &str, vals: &[Option<&str>], unchanged: &[u16]) -> Change {
        Change {
            table: 0,
            op: Op::Update,
            lsn: Lsn(7),
            xid: 1,
            ordinal: 3,
            old_key: Some(vec![old.to_owned()]),
            values: vals.iter().map(|v| v.map(str::to_owned)).collect(),
            unchanged: unchanged.to_vec(),
        }
    }

    #[test]
    fn key_change_with_withheld_value_becomes_delete_and_refresh() {
        let (del, arrive) = update("1", &[Some("2"), None], &[1]).split_move(&[0]);
        let del = del.expect("the old key is deleted");
        assert_eq!((del.op, del.old_key), (Op::Delete, Some(vec!["1".into()])));
        assert_eq!(arrive.op, Op::Refresh);
        assert_eq!(arrive.old_key, Some(vec!["2".to_owned()]));
        assert!(arrive.values.is_empty() && arrive.unchanged.is_empty());
    }

    #[test]
    fn key_change_with_every_value_becomes_delete_and_insert() {
        let (del, arrive) = update("1", &[Some("2"), Some("x")], &[]).split_move(&[0]);
        assert_eq!(del.map(|d| d.op), Some(Op::Delete));
        assert_eq!((arrive.op, arrive.old_key.clone()), (Op::Insert, None));
        assert_eq!(arrive.key(&[0]), Some(vec!["2".to_owned()]));
    }

    #[test]
    fn update_keeping_its_key_is_not_split() {
        let (del, same) = update("1", &[Some("1"), None], &[1]).split_move(&[0]);
        assert!(del.is_none());
        assert_eq!(same.op, Op::Update);
        // A withheld key column is the old key's value.
        let (del, same) = update("1", &[None, Some("x")], &[0]).split_move(&[0]);
        assert!(del.is_none());
        assert_eq!(same.key(&[0]), Some(vec!["1".to_owned()]));
    }
}
