//! The pure step of replay: one table's changes of a batch, in log order, collapsed to one
//! final action per key. Applying the actions of distinct keys in any order gives what
//! applying every change in turn gives (a unique constraint other than the key aside,
//! which the caller handles by applying in order).
//!
//! The traps, each handled here and property-tested against a change-by-change model:
//! an UPDATE that changed the key is a delete of the old key and the new row at the new
//! key ([`Change::split_move`]); a value pgoutput withheld as unchanged out-of-line is
//! taken from an earlier full row of the batch, else left as it is on the target, else,
//! when a target column needs it together with values that did change (or the new key
//! has no row to keep it in), the row is read again from the source (`Refresh`).

use schemashift_common::change::{Change, Op};
use schemashift_common::ids::ChangeSeq;
use std::collections::{BTreeSet, HashMap};

/// What one key ends up as after the changes of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Delete,
    Upsert(Vec<Option<String>>),
    /// Values with the positions that were not sent (unchanged TOAST): an UPDATE of the
    /// target columns that do not read them.
    Partial(Vec<Option<String>>, BTreeSet<u16>),
    /// The row as the source has it now (later changes of the key follow in the log).
    Refresh,
}

/// One key's final action, with the position of its last change.
pub(crate) type Entry = (Vec<String>, ChangeSeq, Action);

/// Collapses `changes` (one table, log order). `needs_row(missing)` says whether a partial
/// update missing these positions cannot be applied from what the target has (a target
/// column reads a missing value together with a sent one). Entries come out in the order
/// of their last change.
pub(crate) fn collapse<'a>(
    changes: impl IntoIterator<Item = (ChangeSeq, &'a Change)>,
    key_idx: &[usize],
    needs_row: impl Fn(&BTreeSet<u16>) -> bool,
) -> Vec<Entry> {
    let mut last: HashMap<Vec<String>, (ChangeSeq, Action)> = HashMap::new();
    for (seq, change) in changes {
        // Only a key change is copied (to split it); every other change is read in place.
        let (left, arrived);
        let parts = if change.changes_key(key_idx) {
            (left, arrived) = change.clone().split_move(key_idx);
            (left.as_ref(), &arrived)
        } else {
            (None, change)
        };
        for c in parts.0.into_iter().chain([parts.1]) {
            let Some(key) = c.key(key_idx) else { continue };
            let action = match c.op {
                Op::Delete => Action::Delete,
                Op::Refresh => Action::Refresh,
                Op::Insert | Op::Update => next_action(c, &key, key_idx, last.get(&key)),
            };
            last.insert(key, (seq, action));
        }
    }
    let mut entries: Vec<Entry> = last
        .into_iter()
        .map(|(k, (seq, a))| {
            let a = match a {
                Action::Partial(_, missing) if needs_row(&missing) => Action::Refresh,
                a => a,
            };
            (k, seq, a)
        })
        .collect();
    entries.sort_by_key(|(_, seq, _)| *seq);
    entries
}

/// An insert or update of `key` after what the batch already did to it.
fn next_action(
    c: &Change,
    key: &[String],
    key_idx: &[usize],
    prev: Option<&(ChangeSeq, Action)>,
) -> Action {
    let mut vals = c.values.clone();
    let mut missing: BTreeSet<u16> = c.unchanged.iter().copied().collect();
    // The key is known even when its own value was withheld.
    for (k, &i) in key.iter().zip(key_idx) {
        if let Some(v) = vals.get_mut(i) {
            *v = Some(k.clone());
        }
        missing.remove(&(i as u16));
    }
    if missing.is_empty() {
        return Action::Upsert(vals);
    }
    match prev.map(|(_, a)| a) {
        Some(Action::Upsert(p)) => {
            for &i in &missing {
                vals[i as usize] = p[i as usize].clone();
            }
            Action::Upsert(vals)
        }
        Some(Action::Partial(p, prev_missing)) => {
            missing.retain(|i| {
                if prev_missing.contains(i) {
                    true
                } else {
                    vals[*i as usize] = p[*i as usize].clone();
                    false
                }
            });
            if missing.is_empty() {
                Action::Upsert(vals)
            } else {
                Action::Partial(vals, missing)
            }
        }
        // Read after this change happened: the source's row already has what it withheld.
        Some(Action::Refresh) => Action::Refresh,
        Some(Action::Delete) | None => Action::Partial(vals, missing),
    }
}

#[cfg(test)]
#[path = "collapse_tests.rs"]
mod tests;
