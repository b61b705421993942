//! The ratio columns: each copy row against its reference rows of the same run.

use super::{Indexes, Kind, Measurement};

/// Fills the ratio columns of the copy results. Rates: against the raw pipe with the same
/// parallelism and index handling (else indexes in place), and against the fastest. CPU,
/// for schemashift's backfill: with the name indexes excluded against pgcopydb (the same
/// two indexes), with all five against the raw pipe's lowest with five. A run that repeats
/// methods in rounds compares each row with the nearest such row before it.
pub(super) fn fill(results: &mut [Measurement]) {
    let raw: Vec<(usize, usize, Option<Indexes>, bool, f64)> = results
        .iter()
        .enumerate()
        .filter(|(_, m)| m.kind == Kind::RawPipe)
        .map(|(i, m)| (i, m.parallelism, m.indexes, m.tls, m.per_second))
        .collect();
    let fastest = raw.iter().filter(|r| !r.3).map(|r| r.4).fold(0.0, f64::max);
    let cpu = |m: &Measurement| m.cpu_s_per_million.map(|c| c.total());
    let five = |m: &Measurement| matches!(m.indexes, Some(Indexes::InPlace | Indexes::Rebuilt));
    let pgcopydb: Vec<(usize, f64)> = results
        .iter()
        .enumerate()
        .filter(|(_, m)| m.kind == Kind::Pgcopydb)
        .filter_map(|(i, m)| Some((i, cpu(m)?)))
        .collect();
    let raw_five_cpu: Vec<(usize, f64)> = results
        .iter()
        .enumerate()
        .filter(|(_, m)| m.kind == Kind::RawPipe && !m.tls && five(m))
        .filter_map(|(i, m)| Some((i, cpu(m)?)))
        .collect();
    // The nearest before `i`, else the first.
    fn nearest<T: Copy>(v: &[(usize, T)], i: usize) -> Option<T> {
        v.iter()
            .rev()
            .find(|(j, _)| *j < i)
            .or(v.first())
            .map(|x| x.1)
    }
    for (i, m) in results.iter_mut().enumerate() {
        if m.unit != "rows" {
            continue;
        }
        // A TLS row against the raw pipe with TLS, a plain one against the plain pipe.
        let like = |idx: Option<Indexes>| {
            let same: Vec<(usize, f64)> = raw
                .iter()
                .filter(|r| r.1 == m.parallelism && r.2 == idx && r.3 == m.tls)
                .map(|r| (r.0, r.4))
                .collect();
            nearest(&same, i)
        };
        let same = like(m.indexes)
            .or_else(|| like(Some(Indexes::InPlace)))
            .filter(|s| *s > 0.0);
        m.vs_raw_same_parallelism = same.map(|s| m.per_second / s);
        m.vs_fastest_raw = (fastest > 0.0).then(|| m.per_second / fastest);
        if m.kind != Kind::SchemashiftBackfill || m.tls {
            continue;
        }
        let reference = match m.indexes {
            Some(Indexes::Excluded) => nearest(&pgcopydb, i),
            // The raw pipe's best: its lowest CPU with five indexes, in place or rebuilt.
            Some(Indexes::InPlace | Indexes::Rebuilt) => raw_five_cpu
                .iter()
                .map(|r| r.1)
                .fold(None, |a: Option<f64>, c| Some(a.map_or(c, |a| a.min(c)))),
            None => None,
        };
        m.cpu_vs_reference = match (cpu(m), reference) {
            (Some(c), Some(r)) if r > 0.0 => Some(c / r),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::cpu::CpuUse;

    fn row(kind: Kind, par: usize, idx: Indexes, per_second: f64, cpu: f64) -> Measurement {
        Measurement {
            kind,
            parallelism: par,
            indexes: Some(idx),
            unit: "rows",
            per_second,
            cpu_s_per_million: Some(CpuUse {
                source: cpu,
                target: 0.0,
                client: 0.0,
            }),
            ..Measurement::default()
        }
    }

    #[test]
    fn rows_of_rounds_compare_with_the_nearest_reference_before_them() {
        use Indexes::{Excluded, Rebuilt};
        let mut rows = vec![
            row(Kind::RawPipe, 1, Rebuilt, 100.0, 10.0),
            row(Kind::SchemashiftBackfill, 1, Rebuilt, 110.0, 11.0),
            row(Kind::RawPipe, 1, Rebuilt, 200.0, 8.0),
            row(Kind::SchemashiftBackfill, 1, Rebuilt, 150.0, 12.0),
            row(Kind::Pgcopydb, 4, Rebuilt, 300.0, 6.0),
            row(Kind::SchemashiftBackfill, 4, Excluded, 330.0, 5.4),
            row(Kind::Pgcopydb, 4, Rebuilt, 250.0, 9.0),
            row(Kind::SchemashiftBackfill, 4, Excluded, 300.0, 7.2),
        ];
        fill(&mut rows);
        let r = |i: usize| {
            (
                rows[i].vs_raw_same_parallelism.map(|v| (v * 100.0).round()),
                rows[i].cpu_vs_reference.map(|v| (v * 100.0).round()),
            )
        };
        // Each backfill against the raw pipe just before it; CPU against the raw pipe's
        // lowest with five indexes (8.0), whichever round it came from.
        assert_eq!(r(1), (Some(110.0), Some(138.0)));
        assert_eq!(r(3), (Some(75.0), Some(150.0)));
        // Two indexes: against the pgcopydb row of its own round.
        assert_eq!(r(5).1, Some(90.0));
        assert_eq!(r(7).1, Some(80.0));
        // References get no CPU ratio of their own.
        assert_eq!(r(0).1, None);
        assert_eq!(r(4).1, None);
    }
}
