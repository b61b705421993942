//! Newtype ids, so a shard id is never passed where a lease epoch is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! int_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

int_id!(
    /// One id-range shard of one table, unique within a run.
    ShardId
);
int_id!(
    /// The fencing token of a lease: bumped every time a shard is leased, so a
    /// completion from an expired lease can be told apart and rejected.
    LeaseEpoch
);
int_id!(
    /// Position in the embedded change log (its `seq` column).
    ChangeSeq
);

/// A run of one spec against one control schema; names the slot and publication.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub String);

impl RunId {
    pub fn generate() -> Self {
        use rand::Rng;
        let n: u64 = rand::thread_rng().gen();
        RunId(format!("{n:016x}"))
    }
    /// Slot and publication name on the source; lowercase hex keeps it a valid identifier.
    pub fn slot_name(&self) -> String {
        format!("schemashift_{}", self.0)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PostgreSQL WAL position.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not an LSN: {0:?} (expected like 0/16B3748)")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| LsnParseError(s.to_owned()))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| LsnParseError(s.to_owned()))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| LsnParseError(s.to_owned()))?;
        Ok(Lsn((hi << 32) | lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for s in ["0/0", "0/16B3748", "1A/FF00AA01"] {
            let lsn: Lsn = s.parse().expect("valid lsn");
            assert_eq!(lsn.to_string(), s);
        }
        assert!("16B3748".parse::<Lsn>().is_err());
    }
}
