//! The shard planner: pure. Given a sorted sample of keys (as the database orders them)
//! it cuts the key space at sample quantiles into contiguous half-open ranges whose
//! first and last ends are open, so every key — including ones inserted later — falls
//! in exactly one shard, whatever the id distribution.

use schemashift_common::plan::ShardRange;

/// `sorted_sample` must be in key order (duplicates allowed); `estimated_rows` is the
/// table's size; returns ranges of about `shard_rows` rows each.
pub fn plan_ranges(
    sorted_sample: &[Vec<String>],
    estimated_rows: u64,
    shard_rows: u64,
) -> Vec<ShardRange> {
    let wanted = estimated_rows.div_ceil(shard_rows.max(1)).max(1) as usize;
    let n = wanted.min(sorted_sample.len() + 1).max(1);
    let mut bounds: Vec<&Vec<String>> = Vec::with_capacity(n);
    for i in 1..n {
        let b = &sorted_sample[i * sorted_sample.len() / n];
        // Equal bounds would make an empty shard; the sample is sorted, so compare with the last.
        if bounds.last().is_none_or(|last| *last != b) {
            bounds.push(b);
        }
    }
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut lo: Option<Vec<String>> = None;
    for b in bounds {
        out.push(ShardRange {
            lo: lo.clone(),
            hi: Some(b.clone()),
        });
        lo = Some(b.clone());
    }
    out.push(ShardRange { lo, hi: None });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn as_key(v: i64) -> Vec<String> {
        vec![v.to_string()]
    }

    fn contains(r: &ShardRange, k: i64) -> bool {
        let num =
            |b: &Option<Vec<String>>| b.as_ref().map(|v| v[0].parse::<i64>().expect("int bound"));
        num(&r.lo).is_none_or(|lo| k >= lo) && num(&r.hi).is_none_or(|hi| k < hi)
    }

    proptest! {
        #[test]
        fn every_key_is_in_exactly_one_shard(
            mut sample in proptest::collection::vec(-1_000_000_000_000i64..1_000_000_000_000, 0..400),
            rows in 0u64..5_000_000,
            shard_rows in 1u64..1_000_000,
            probes in proptest::collection::vec(any::<i64>(), 50),
        ) {
            sample.sort();
            let keys: Vec<_> = sample.iter().map(|&v| as_key(v)).collect();
            let ranges = plan_ranges(&keys, rows, shard_rows);
            prop_assert!(ranges.first().expect("one range").lo.is_none());
            prop_assert!(ranges.last().expect("one range").hi.is_none());
            for w in ranges.windows(2) {
                prop_assert_eq!(&w[0].hi, &w[1].lo, "ranges must be contiguous");
            }
            for k in probes.iter().chain(sample.iter()) {
                prop_assert_eq!(ranges.iter().filter(|r| contains(r, *k)).count(), 1);
            }
            // The same plan twice.
            prop_assert_eq!(&ranges, &plan_ranges(&keys, rows, shard_rows));
        }
    }

    #[test]
    fn sparse_skewed_ids_still_give_balanced_shards() {
        // Half the rows near 1e6, half near 1e12: equal-width ranges would put everything
        // in two shards; quantiles split both clusters.
        let mut sample: Vec<i64> = (0..500).map(|i| 1_000_000 + i * 7).collect();
        sample.extend((0..500).map(|i| 1_000_000_000_000 + i * 13));
        let keys: Vec<_> = sample.iter().map(|&v| as_key(v)).collect();
        let ranges = plan_ranges(&keys, 1_000_000, 100_000);
        assert_eq!(ranges.len(), 10);
        for r in &ranges {
            let n = sample.iter().filter(|&&k| contains(r, k)).count();
            assert!(
                (90..=110).contains(&n),
                "shard {r} has {n} of 1000 sampled keys"
            );
        }
    }

    #[test]
    fn tiny_table_gets_one_open_shard() {
        let ranges = plan_ranges(&[], 0, 1000);
        assert_eq!(ranges, vec![ShardRange { lo: None, hi: None }]);
    }
}
