//! What a measured span costs: its time, the CPU time spent on each side (the source
//! cluster, the target cluster, and the client: this process with its embedded workers,
//! plus the processes it waited for: `sh`, `psql`, `pgcopydb`), and this process's peak
//! memory. On a host where both servers share the cores, the CPU sum is what limits every
//! method, so the report gives it per million rows.

use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The start of a measured span.
pub struct Span {
    started: Instant,
    cpu: CpuMark,
}

/// What a span cost.
pub struct Spent {
    pub seconds: f64,
    pub cpu: CpuUse,
    /// This process's peak resident set over the span.
    pub peak_rss_mib: Option<f64>,
}

impl Span {
    pub async fn start(source_data: &Path, target_data: &Path) -> Span {
        reset_peak_rss();
        Span {
            started: Instant::now(),
            cpu: CpuMark::read(source_data, target_data).await,
        }
    }

    pub async fn end(&self, source_data: &Path, target_data: &Path) -> Spent {
        let seconds = self.started.elapsed().as_secs_f64();
        Spent {
            seconds,
            cpu: CpuMark::read(source_data, target_data)
                .await
                .since(&self.cpu),
            peak_rss_mib: peak_rss_mib(),
        }
    }
}

impl Spent {
    /// This span followed by `next`: times and CPU added, the higher peak.
    pub fn then(&self, next: &Spent) -> Spent {
        Spent {
            seconds: self.seconds + next.seconds,
            cpu: CpuUse {
                source: self.cpu.source + next.cpu.source,
                target: self.cpu.target + next.cpu.target,
                client: self.cpu.client + next.cpu.client,
            },
            peak_rss_mib: match (self.peak_rss_mib, next.peak_rss_mib) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// CPU seconds by side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CpuUse {
    pub source: f64,
    pub target: f64,
    pub client: f64,
}

impl CpuUse {
    pub fn total(&self) -> f64 {
        self.source + self.target + self.client
    }

    /// Seconds per million of `count` (rows or changes).
    pub fn per_million(&self, count: u64) -> CpuUse {
        let m = (count as f64 / 1e6).max(1e-9);
        CpuUse {
            source: self.source / m,
            target: self.target / m,
            client: self.client / m,
        }
    }
}

/// A reading to subtract from a later one.
#[derive(Clone, Copy, Debug)]
struct CpuMark(CpuUse);

impl CpuMark {
    /// Reads both clusters and this process. An exited child shows no CPU time until the
    /// postmaster reaps it (adding it to its own cutime), so a reading waits a little for
    /// the clusters' zombies to go rather than miss their time.
    async fn read(source_data: &Path, target_data: &Path) -> CpuMark {
        let mut tries = 0;
        loop {
            let (source, s_zombies) = cluster_seconds(source_data);
            let (target, t_zombies) = cluster_seconds(target_data);
            tries += 1;
            if !(s_zombies || t_zombies) || tries >= 200 {
                return CpuMark(CpuUse {
                    source,
                    target,
                    client: process_seconds("self", true),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn since(&self, earlier: &CpuMark) -> CpuUse {
        CpuUse {
            source: self.0.source - earlier.0.source,
            target: self.0.target - earlier.0.target,
            client: self.0.client - earlier.0.client,
        }
    }
}

/// Starts the peak resident set (`VmHWM`) over from the current one (Linux 4.0+).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::debug!(error = %e, "peak memory not reset");
    }
}

/// Peak resident set of this process (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: f64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// The postmaster's own time, its reaped children's (exited backends and workers, counted
/// in its cutime/cstime) and its live children's; and whether any child is a zombie. A
/// child reaped while /proc is scanned would be in neither (several sessions ending
/// together lost a whole 10M-row copy's source CPU once), so the scan is repeated until
/// the postmaster's children's time did not move during it.
fn cluster_seconds(data_dir: &Path) -> (f64, bool) {
    let Some(pm) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
    else {
        return (0.0, false);
    };
    let reaped = || {
        let stat = std::fs::read_to_string(format!("/proc/{pm}/stat")).unwrap_or_default();
        stat_seconds(&stat, true) - stat_seconds(&stat, false)
    };
    let mut tries = 0;
    loop {
        let before = reaped();
        let total = process_seconds(&pm, true);
        let (live, zombies) = live_children(&pm);
        tries += 1;
        if reaped() == before || tries >= 100 {
            return (total + live, zombies);
        }
    }
}

/// CPU seconds of the live children of `pm`, and whether any is a zombie.
fn live_children(pm: &str) -> (f64, bool) {
    let (mut total, mut zombies) = (0.0, false);
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (0.0, false);
    };
    for p in procs.flatten() {
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        let Some(f) = stat_fields(&stat) else {
            continue;
        };
        if f.get(1).copied() == Some(pm) {
            zombies |= f.first().copied() == Some("Z");
            total += stat_seconds(&stat, true);
        }
    }
    (total, zombies)
}

/// utime + stime (and with `children`, cutime + cstime) of /proc/PID/stat, in seconds.
fn process_seconds(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_seconds(&stat, children)
}

fn stat_seconds(stat: &str, children: bool) -> f64 {
    let Some(f) = stat_fields(stat) else {
        return 0.0;
    };
    // After the name: state ppid … utime(11) stime(12) cutime(13) cstime(14), 0-based.
    let take = if children { 11..15 } else { 11..13 };
    let ticks: u64 = take
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// The fields after the parenthesised command name (which may itself hold spaces).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_read_after_a_name_with_spaces() {
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let stat = "42 (postgres: a b) S 7 42 42 0 -1 4194560 1 2 3 4 100 50 30 20 20 0 1";
        assert_eq!(stat_fields(stat).map(|f| f[1]), Some("7"));
        assert_eq!(stat_seconds(stat, false), 150.0 / hz);
        assert_eq!(stat_seconds(stat, true), 200.0 / hz);
        assert_eq!(stat_seconds("garbage", true), 0.0);
    }

    #[test]
    fn this_process_burns_measurable_cpu() {
        let before = process_seconds("self", false);
        let mut x = 0u64;
        let t = std::time::Instant::now();
        // Spins until the kernel has charged at least one tick (bounded, should it never).
        while process_seconds("self", false) <= before && t.elapsed().as_secs() < 30 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        assert!(process_seconds("self", false) > before);
    }
}
