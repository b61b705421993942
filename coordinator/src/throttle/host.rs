//! The host's CPU, when the source runs on this host: how busy it is, and how much of that
//! is our own work (this process and the backends in the idle group), so a slowdown the
//! throttle cannot fix by holding is told from one it can.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One reading of the host since the previous one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Reading {
    /// Busy fraction of all cores.
    pub busy: f64,
    /// The fraction of all cores our own work used (None when it cannot be read).
    pub ours: Option<f64>,
}

/// Host CPU and our share of it, read together.
#[derive(Debug, Default)]
pub(super) struct Host {
    cpu: HostCpu,
    ours: OurCpu,
}

impl Host {
    /// Starts counting; the first reading comes from the next call.
    pub fn new() -> Self {
        let mut h = Host::default();
        h.sample();
        h
    }

    /// The host since the previous call (None on the first call or without /proc).
    pub fn sample(&mut self) -> Option<Reading> {
        let ours = self.ours.sample();
        let (busy, total) = self.cpu.sample()?;
        Some(Reading {
            busy,
            ours: ours.map(|t| (t as f64 / total as f64).min(1.0)),
        })
    }
}

/// The host's CPU counters from /proc/stat: busy and total jiffies since the last reading.
#[derive(Debug, Default)]
struct HostCpu {
    last: Option<(u64, u64)>,
}

impl HostCpu {
    /// The busy fraction and the jiffies of all cores since the previous call (None on the
    /// first call or without /proc).
    fn sample(&mut self) -> Option<(f64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let now = parse_cpu_line(text.lines().next()?)?;
        let prev = self.last.replace(now)?;
        let total = now.1.checked_sub(prev.1).filter(|t| *t > 0)?;
        Some((now.0.saturating_sub(prev.0) as f64 / total as f64, total))
    }
}

/// `(busy, total)` jiffies of the aggregate `cpu` line: idle and iowait are not busy.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user/nice).
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// Copies allowed next, from the host's busy fraction: one fewer than run now while over
/// the limit (never below one: a copy alone cannot saturate a multi-core host, and zero
/// would never finish); one more only when all allowed ones run and the estimate of another's
/// share (all load counted as the copies', so an over-estimate) still fits.
/// A reading taken while copies were held says nothing about what they cost: no growth.
pub(super) fn next_allowed(
    allowed: usize,
    running: usize,
    busy: f64,
    max: f64,
    held: bool,
) -> usize {
    if busy > max {
        return allowed.min(running).saturating_sub(1).max(1);
    }
    let per_copy = busy / running.max(1) as f64;
    if !held && running >= allowed && busy + per_copy <= max {
        allowed.saturating_add(1)
    } else {
        allowed
    }
}

/// CPU time of our own work: this process, and each task in the idle group (our bulk
/// backends on either server, when local). Counted per task so one that exits between two
/// readings does not make the sum go back.
#[derive(Debug, Default)]
struct OurCpu {
    last: Option<HashMap<i32, u64>>,
}

impl OurCpu {
    /// Clock ticks used since the previous call (None on the first call, or without the
    /// group: then backends' work cannot be told from anyone else's).
    fn sample(&mut self) -> Option<u64> {
        let group = schemashift_common::idle_group::group()?;
        let me = std::process::id() as i32;
        let mut now = HashMap::new();
        now.insert(0, task_ticks(&format!("/proc/{me}/stat"))?);
        let listed = std::fs::read_to_string(group.join("tasks"))
            .or_else(|_| std::fs::read_to_string(group.join("cgroup.procs")))
            .ok()?;
        for id in listed.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // Our own threads (the demo puts some in the group) are in the process total.
            if std::path::Path::new(&format!("/proc/{me}/task/{id}")).exists() {
                continue;
            }
            if let Some(t) = task_ticks(&format!("/proc/{id}/task/{id}/stat")) {
                now.insert(id, t);
            }
        }
        let prev = self.last.replace(now.clone())?;
        Some(
            now.iter()
                .map(|(id, t)| t.saturating_sub(prev.get(id).copied().unwrap_or(0)))
                .sum(),
        )
    }
}

fn task_ticks(path: &str) -> Option<u64> {
    parse_task_ticks(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime of a `/proc/.../stat` line (the fields after the parenthesised name).
fn parse_task_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// How long the host must stay saturated, with our own work taking little of it, before the
/// slowdown counts as not ours. Short, because the CPU readings say whose it is.
pub(super) const OTHERS_AFTER: Duration = Duration::from_secs(2);
/// Our work below this share of all cores is too little to be what slows the source.
pub(super) const OURS_SMALL: f64 = 0.1;

/// A host kept saturated by others: busier than [`SATURATED`] with our own work a small part
/// of it, throughout [`OTHERS_AFTER`]. Holding copies cannot help the source then, and the
/// idle CPU class would give our copies nothing.
#[derive(Debug, Default)]
pub(super) struct Others {
    since: Option<Instant>,
}

/// A host this busy leaves nothing to the idle CPU class.
pub(super) const SATURATED: f64 = 0.95;

impl Others {
    /// True once others kept the host saturated through the whole time; never without a
    /// reading of our own share.
    pub fn busy_with_others(&mut self, r: Reading) -> bool {
        let others = r.busy >= SATURATED && r.ours.is_some_and(|o| o < OURS_SMALL);
        self.since = if others {
            self.since.or(Some(Instant::now()))
        } else {
            None
        };
        self.since.is_some_and(|t| t.elapsed() >= OTHERS_AFTER)
    }

    pub fn reset(&mut self) {
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line_counts_idle_and_iowait_as_not_busy() {
        let line = "cpu  100 50 30 800 20 0 0 0 0 0";
        assert_eq!(parse_cpu_line(line), Some((180, 1000)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu  x"), None);
    }

    #[test]
    fn busy_host_runs_fewer_copies_but_never_none() {
        assert_eq!(next_allowed(4, 4, 0.95, 0.7, false), 3);
        // Shrinks from what runs, not from a limit nobody uses.
        assert_eq!(next_allowed(usize::MAX, 2, 0.95, 0.7, false), 1);
        assert_eq!(next_allowed(1, 1, 0.99, 0.7, false), 1);
    }

    #[test]
    fn another_copy_starts_only_when_its_share_fits() {
        // One copy takes half of a 2-core host: a second would not fit under 70%.
        assert_eq!(next_allowed(1, 1, 0.55, 0.7, false), 1);
        // Four copies on a big host take 40%: a fifth fits.
        assert_eq!(next_allowed(4, 4, 0.40, 0.7, false), 5);
        // Not every allowed copy runs (the backfill is ending): no growth.
        assert_eq!(next_allowed(4, 2, 0.20, 0.7, false), 4);
        // Copies were held during the reading: it shows the host without them.
        assert_eq!(next_allowed(1, 1, 0.12, 0.7, true), 1);
    }

    #[test]
    fn task_stat_gives_user_plus_system_ticks_whatever_the_name() {
        // The name may hold spaces and parentheses: fields count from the last ')'.
        let stat = "4242 (postgres: a (b) c) S 1 4242 4242 0 -1 4194560 10 0 0 0 170 30 0 0 20 0";
        assert_eq!(parse_task_ticks(stat), Some(200));
        assert_eq!(parse_task_ticks("4242 (x) S 1"), None);
    }

    fn reading(busy: f64, ours: Option<f64>) -> Reading {
        Reading { busy, ours }
    }

    #[test]
    fn a_saturated_host_counts_as_others_only_while_our_share_is_small() {
        let mut o = Others::default();
        // Our copies are what keeps the host busy: not others.
        assert!(!o.busy_with_others(reading(0.99, Some(0.6))));
        assert!(o.since.is_none());
        // Our share unknown (no group): this rule says nothing.
        assert!(!o.busy_with_others(reading(0.99, None)));
        // Busy but not saturated: the idle class still gets something.
        assert!(!o.busy_with_others(reading(0.8, Some(0.01))));
        assert!(o.since.is_none());
        // Saturated, ours small: it starts counting and fires after OTHERS_AFTER.
        assert!(!o.busy_with_others(reading(0.99, Some(0.02))));
        o.since = Some(Instant::now() - OTHERS_AFTER);
        assert!(o.busy_with_others(reading(0.98, Some(0.03))));
        // One reading below saturation starts over.
        assert!(!o.busy_with_others(reading(0.5, Some(0.03))));
        assert!(o.since.is_none());
    }

    #[test]
    fn our_own_cpu_is_read_on_this_host() {
        let mut h = Host::new();
        // Burn a little CPU so the next reading has something to count.
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let r = h.sample().expect("a reading on Linux");
        assert!((0.0..=1.0).contains(&r.busy), "{r:?}");
        // With the idle group, our own process is counted: the loop above used CPU.
        if let Some(o) = r.ours {
            assert!(o > 0.0 && o <= 1.0, "{r:?}");
        }
    }
}
