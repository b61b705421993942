//! Latency histogram of the write load.

/// Latencies in microseconds, in log-linear buckets (about 3% precision, fixed 15 KB).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const EXACT: u64 = 64;
const SUB_BITS: u32 = 5;
const BUCKETS: usize = 64 + (64 - 6) * (1 << SUB_BITS);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl LatencyHistogram {
    fn index(v: u64) -> usize {
        if v < EXACT {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        (EXACT + u64::from(exp - 6) * (1 << SUB_BITS) + sub) as usize
    }

    /// Largest value that falls into bucket `idx`.
    fn upper(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < EXACT {
            return idx;
        }
        let exp = 6 + (idx - EXACT) / (1 << SUB_BITS);
        let sub = (idx - EXACT) % (1 << SUB_BITS);
        let width = 1u64 << (exp - u64::from(SUB_BITS));
        ((1 << SUB_BITS) + sub) * width + (width - 1)
    }

    pub fn record(&mut self, micros: u64) {
        self.counts[Self::index(micros)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    /// What was recorded after `earlier` (a snapshot of this same histogram); the max is
    /// the whole histogram's, an upper bound.
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            total: self.total.saturating_sub(earlier.total),
            max: self.max,
        }
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The latency (µs) below which a share `q` (0..=1) of the recorded ones lie; 0 if empty.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(idx).min(self.max);
            }
        }
        self.max
    }

    pub fn p50(&self) -> u64 {
        self.percentile(0.50)
    }

    pub fn p95(&self) -> u64 {
        self.percentile(0.95)
    }

    pub fn p99(&self) -> u64 {
        self.percentile(0.99)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_close() {
        let mut h = LatencyHistogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() / want as f64 <= 0.04;
        assert!(close(h.p50(), 5_000), "p50 {}", h.p50());
        assert!(close(h.p95(), 9_500), "p95 {}", h.p95());
        assert!(close(h.p99(), 9_900), "p99 {}", h.p99());
        assert_eq!(h.max(), 10_000);
        assert_eq!(h.count(), 10_000);
        let mut one = LatencyHistogram::default();
        one.record(u64::MAX);
        assert_eq!(one.p50(), u64::MAX);
        assert_eq!(LatencyHistogram::default().p99(), 0);
        for v in [0, 1, 63, 64, 65, 127, 128, 1 << 20, u64::MAX] {
            let idx = LatencyHistogram::index(v);
            assert!(idx < BUCKETS);
            assert!(LatencyHistogram::upper(idx) >= v, "upper bound of {v}");
        }
    }
}
