//! Latency histogram of the write load, on `hdrhistogram` (3 significant digits).

use hdrhistogram::Histogram;

/// Latencies in microseconds, up to an hour (longer ones count as an hour).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    h: Histogram<u64>,
    /// The largest value recorded, exact (the histogram rounds to its precision).
    max: u64,
}

const HIGHEST_US: u64 = 3_600_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        // Bounds and precision are constants that hdrhistogram accepts.
        #[allow(clippy::expect_used)]
        let h = Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds");
        LatencyHistogram { h, max: 0 }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, micros: u64) {
        self.h.saturating_record(micros.max(1));
        self.max = self.max.max(micros);
    }

    /// What was recorded after `earlier` (a snapshot of this same histogram); the max is
    /// the whole histogram's, an upper bound.
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        let mut h = self.h.clone();
        if h.subtract(&earlier.h).is_err() {
            // Not a snapshot of this histogram: the whole of it is the honest answer.
            h = self.h.clone();
        }
        LatencyHistogram { h, max: self.max }
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The latency (µs) below which a share `q` (0..=1) of the recorded ones lie; 0 if empty.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.h.is_empty() {
            return 0;
        }
        self.h
            .value_at_quantile(q.clamp(0.0, 1.0))
            .min(self.max.max(1))
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
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() / want as f64 <= 0.01;
        assert!(close(h.p50(), 5_000), "p50 {}", h.p50());
        assert!(close(h.p95(), 9_500), "p95 {}", h.p95());
        assert!(close(h.p99(), 9_900), "p99 {}", h.p99());
        assert_eq!(h.max(), 10_000);
        assert_eq!(h.count(), 10_000);
        assert_eq!(LatencyHistogram::default().p99(), 0);
        let mut long = LatencyHistogram::default();
        long.record(u64::MAX);
        assert!(long.p50() >= HIGHEST_US, "{}", long.p50());
    }

    #[test]
    fn since_counts_only_what_came_after_the_snapshot() {
        let mut h = LatencyHistogram::default();
        for _ in 0..1_000 {
            h.record(100);
        }
        let before = h.clone();
        for _ in 0..1_000 {
            h.record(50_000);
        }
        let after = h.since(&before);
        assert_eq!(after.count(), 1_000);
        assert!(after.p50() >= 49_000, "{}", after.p50());
    }
}
