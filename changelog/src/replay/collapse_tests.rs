//! Collapsing against a change-by-change model: random histories of a source table
//! (inserts, updates that change the key or not, with and without an unchanged
//! out-of-line value, deletes, keys reused), logged as pgoutput logs them, routed to
//! partitions as capture routes them, replayed in batches of random sizes with the
//! partitions interleaved at random. The target must end equal to the mapped source.

use super::*;
use proptest::prelude::*;
use schemashift_common::change::partition_of;
use schemashift_common::ids::Lsn;
use std::collections::BTreeMap;

/// Source columns: 0 key, 1 `a`, 2 `note` (out of line when long), 3 `b`.
type SrcRow = [Option<String>; 4];
const NOTE: u16 = 2;
const KEY_IDX: [usize; 1] = [0];

/// Target columns: key, a, note, and with `mixed` a column reading note and b together.
fn map_row(r: &SrcRow, mixed: bool) -> Vec<Option<String>> {
    let mut t = vec![r[0].clone(), r[1].clone(), r[2].clone()];
    if mixed {
        t.push(Some(format!("{:?}|{:?}", r[2], r[3])));
    }
    t
}

/// Which source columns each target column reads.
fn deps(mixed: bool) -> Vec<Vec<u16>> {
    let mut d = vec![vec![0], vec![1], vec![2]];
    if mixed {
        d.push(vec![2, 3]);
    }
    d
}

fn needs_row(mixed: bool) -> impl Fn(&BTreeSet<u16>) -> bool {
    move |m: &BTreeSet<u16>| {
        deps(mixed).iter().any(|d| {
            let hit = d.iter().filter(|c| m.contains(c)).count();
            hit > 0 && hit < d.len()
        })
    }
}

#[derive(Clone, Debug)]
enum Step {
    Insert {
        key: u8,
        long: bool,
    },
    /// `new_key`: move the row there when that key is free; `note`: set a new note.
    Update {
        pick: u8,
        new_key: Option<u8>,
        note: Option<bool>,
    },
    Delete {
        pick: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..12, any::<bool>()).prop_map(|(key, long)| Step::Insert { key, long }),
        (
            any::<u8>(),
            proptest::option::of(0u8..12),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(pick, new_key, note)| Step::Update {
                pick,
                new_key,
                note
            }),
        any::<u8>().prop_map(|pick| Step::Delete { pick }),
    ]
}

fn note(long: bool, n: usize) -> Option<String> {
    Some(if long {
        format!("long-{n}-{}", "x".repeat(40))
    } else {
        format!("short-{n}")
    })
}

fn is_long(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|s| s.starts_with("long"))
}

type Source = BTreeMap<String, SrcRow>;

/// Runs the steps on a model source; returns the log (as capture writes it: key changes
/// already split; a change's LSN is its step's number) and the source after each step
/// (index 0: before the first).
fn history(initial: u8, steps: &[Step]) -> (Vec<Change>, Vec<Source>) {
    let mut src: BTreeMap<String, SrcRow> = BTreeMap::new();
    for k in 0..initial {
        let key = k.to_string();
        src.insert(
            key.clone(),
            [
                Some(key),
                Some("0".into()),
                note(k % 2 == 0, 0),
                Some("b".into()),
            ],
        );
    }
    let mut states = vec![src.clone()];
    let mut log = Vec::new();
    let mut n = 0usize;
    for s in steps {
        if n > 0 {
            states.push(src.clone());
        }
        n += 1;
        let change = |op, old_key, values: Vec<Option<String>>, unchanged| Change {
            table: 0,
            op,
            lsn: Lsn(n as u64),
            xid: 0,
            ordinal: 0,
            old_key,
            values,
            unchanged,
        };
        let picked = |pick: u8| src.keys().nth(pick as usize % src.len().max(1)).cloned();
        match *s {
            Step::Insert { key, long } => {
                let key = key.to_string();
                if src.contains_key(&key) {
                    continue;
                }
                let row = [
                    Some(key.clone()),
                    Some(n.to_string()),
                    note(long, n),
                    Some(format!("b{n}")),
                ];
                log.push(change(Op::Insert, None, row.to_vec(), vec![]));
                src.insert(key, row);
            }
            Step::Update {
                pick,
                new_key,
                note: set_note,
            } => {
                let Some(old) = picked(pick) else { continue };
                let mut row = src.remove(&old).expect("picked from the map");
                let new = match new_key.map(|k| k.to_string()) {
                    Some(k) if !src.contains_key(&k) => k,
                    _ => old.clone(),
                };
                row[0] = Some(new.clone());
                row[1] = Some(n.to_string());
                row[3] = Some(format!("b{n}"));
                let mut unchanged = vec![];
                match set_note {
                    Some(long) => row[2] = note(long, n),
                    // pgoutput withholds an untouched out-of-line value.
                    None if is_long(&row[2]) => unchanged.push(NOTE),
                    None => {}
                }
                let mut values = row.to_vec();
                for &i in &unchanged {
                    values[i as usize] = None;
                }
                let old_key = (new != old).then(|| vec![old.clone()]);
                log.push(change(Op::Update, old_key, values, unchanged));
                src.insert(new, row);
            }
            Step::Delete { pick } => {
                let Some(old) = picked(pick) else { continue };
                src.remove(&old);
                log.push(change(Op::Delete, Some(vec![old]), vec![], vec![]));
            }
        }
    }
    let log = log
        .into_iter()
        .flat_map(|c| {
            let (left, arrived) = c.split_move(&KEY_IDX);
            left.into_iter().chain([arrived])
        })
        .collect();
    states.push(src);
    (log, states)
}

/// The target as our SQL leaves it, over mapped rows.
fn apply(
    target: &mut BTreeMap<String, Vec<Option<String>>>,
    entries: Vec<Entry>,
    source_now: &BTreeMap<String, SrcRow>,
    mixed: bool,
) {
    let deps = deps(mixed);
    for (key, _, action) in entries {
        let k = key[0].clone();
        match action {
            Action::Delete => {
                target.remove(&k);
            }
            Action::Upsert(v) => {
                let row: SrcRow = [v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone()];
                target.insert(k, map_row(&row, mixed));
            }
            Action::Partial(v, missing) => {
                let Some(t) = target.get_mut(&k) else {
                    continue;
                };
                let row: SrcRow = [v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone()];
                let mapped = map_row(&row, mixed);
                for (i, d) in deps.iter().enumerate() {
                    if d.iter().all(|c| !missing.contains(c)) {
                        t[i] = mapped[i].clone();
                    }
                }
            }
            Action::Refresh => match source_now.get(&k) {
                Some(r) => {
                    target.insert(k, map_row(r, mixed));
                }
                None => {
                    target.remove(&k);
                }
            },
        }
    }
}

const CASES: u32 = 2_000;

/// Runs `check` on `CASES` generated inputs and says how many passed (a failure panics
/// with the shrunk input).
fn run_cases<S: Strategy>(
    name: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    });
    if let Err(e) = runner.run(&strategy, check) {
        panic!("{name}: {e}");
    }
    eprintln!("{name}: {CASES} cases passed");
}

/// Capture runs behind the source and replay behind capture, by random amounts; a
/// refresh reads the source as it is at that moment.
#[test]
fn collapsed_partitions_in_any_interleaving_end_equal_to_the_mapped_source() {
    let strategy = (
        0u8..8,
        proptest::collection::vec(step(), 0..40),
        1u32..4,
        proptest::collection::vec((0u32..4, 1usize..6, 0usize..3, 0usize..3), 1..60),
        any::<bool>(),
    );
    run_cases(
        "partitions interleaved",
        strategy,
        |(initial, steps, partitions, events, mixed)| {
            let (log, states) = history(initial, &steps);
            let last = states.len() - 1;
            let mut parts: Vec<Vec<(ChangeSeq, Change)>> = vec![Vec::new(); partitions as usize];
            for (seq, c) in log.into_iter().enumerate() {
                let key = c.key(&KEY_IDX).expect("every change has a key");
                parts[partition_of(0, &key, partitions) as usize].push((ChangeSeq(seq as i64), c));
            }
            let mut target: BTreeMap<String, Vec<Option<String>>> = states[0]
                .iter()
                .map(|(k, r)| (k.clone(), map_row(r, mixed)))
                .collect();
            let mut pos = vec![0usize; partitions as usize];
            let mut now = 0usize;
            // Random interleaving, then everything left (a catch-up drains every partition).
            let drain = (0..partitions).map(|p| (p, usize::MAX, last, 0));
            for (p, size, advance, lag) in events
                .into_iter()
                .map(|(p, s, a, l)| (p % partitions, s, a, l))
                .chain(drain)
            {
                now = now.saturating_add(advance).min(last);
                let captured = now.saturating_sub(lag) as u64;
                let p = p as usize;
                let visible = parts[p][pos[p]..]
                    .iter()
                    .take_while(|(_, c)| c.lsn.0 <= captured)
                    .count();
                let end = pos[p] + visible.min(size);
                let batch = &parts[p][pos[p]..end];
                pos[p] = end;
                let entries = collapse(
                    batch.iter().map(|(s, c)| (*s, c)),
                    &KEY_IDX,
                    needs_row(mixed),
                );
                apply(&mut target, entries, &states[now], mixed);
            }
            let want: BTreeMap<String, Vec<Option<String>>> = states[last]
                .iter()
                .map(|(k, r)| (k.clone(), map_row(r, mixed)))
                .collect();
            prop_assert_eq!(target, want);
            Ok(())
        },
    );
}

/// One partition collapsed in batches ends where applying each change in turn ends: the
/// collapse itself loses nothing.
#[test]
fn collapsed_batches_equal_change_by_change_replay() {
    let strategy = (0u8..8, proptest::collection::vec(step(), 0..40), 1usize..8);
    run_cases(
        "batches against one by one",
        strategy,
        |(initial, steps, size)| {
            let (log, states) = history(initial, &steps);
            let (before, after) = (&states[0], &states[states.len() - 1]);
            let seqd: Vec<(ChangeSeq, Change)> = log
                .into_iter()
                .enumerate()
                .map(|(s, c)| (ChangeSeq(s as i64), c))
                .collect();
            let start: BTreeMap<String, Vec<Option<String>>> = before
                .iter()
                .map(|(k, r)| (k.clone(), map_row(r, false)))
                .collect();
            let mut batched = start.clone();
            let mut one_by_one = start;
            for chunk in seqd.chunks(size) {
                let e = collapse(
                    chunk.iter().map(|(s, c)| (*s, c)),
                    &KEY_IDX,
                    needs_row(false),
                );
                apply(&mut batched, e, after, false);
            }
            for one in &seqd {
                let e = collapse([(one.0, &one.1)], &KEY_IDX, needs_row(false));
                apply(&mut one_by_one, e, after, false);
            }
            prop_assert_eq!(&batched, &one_by_one);
            let want: BTreeMap<String, Vec<Option<String>>> = after
                .iter()
                .map(|(k, r)| (k.clone(), map_row(r, false)))
                .collect();
            prop_assert_eq!(batched, want);
            Ok(())
        },
    );
}

#[test]
fn key_change_then_more_changes_in_one_batch_keep_their_order() {
    let row = |k: &str, a: &str| vec![Some(k.to_owned()), Some(a.to_owned()), None, None];
    let c = |op, old: Option<&str>, values: Vec<Option<String>>, unchanged: Vec<u16>| Change {
        table: 0,
        op,
        lsn: Lsn(1),
        xid: 0,
        ordinal: 0,
        old_key: old.map(|o| vec![o.to_owned()]),
        values,
        unchanged,
    };
    // A→B with the note withheld, B updated, B→A again, then A deleted and B re-inserted.
    let log = [
        c(Op::Update, Some("A"), row("B", "1"), vec![NOTE]),
        c(Op::Update, None, row("B", "2"), vec![NOTE]),
        c(Op::Update, Some("B"), row("A", "3"), vec![NOTE]),
        c(Op::Delete, Some("A"), vec![], vec![]),
        c(Op::Insert, None, row("B", "4"), vec![]),
    ];
    let e = collapse(
        log.iter()
            .enumerate()
            .map(|(i, c)| (ChangeSeq(i as i64), c)),
        &KEY_IDX,
        needs_row(false),
    );
    let got: Vec<(String, Action)> = e.into_iter().map(|(k, _, a)| (k[0].clone(), a)).collect();
    assert_eq!(
        got,
        vec![
            ("A".to_owned(), Action::Delete),
            ("B".to_owned(), Action::Upsert(row("B", "4"))),
        ]
    );
}
