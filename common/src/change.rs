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
    /// The key the change applies to after it happened (the old key for deletes).
    pub fn key(&self, key_index: &[usize]) -> Option<Vec<String>> {
        match self.op {
            Op::Delete | Op::Refresh => self.old_key.clone(),
            Op::Insert | Op::Update => key_index
                .iter()
                .map(|&i| self.values.get(i).cloned().flatten())
                .collect(),
        }
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
}
