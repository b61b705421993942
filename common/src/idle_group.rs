//! A CPU cgroup of the idle scheduling class for the migration's bulk work on this host.
//!
//! Nice 19 only ranks tasks against each other: a woken application backend still waits for
//! a running nice-19 copy to be preempted, and the scheduler places it as if the CPU were
//! busy. A group with `cpu.idle = 1` (Linux 5.15+, cgroup v1 and v2) is preempted at once by
//! any normal task that wakes, and a CPU running only idle-class work counts as idle when the
//! scheduler places a woken task. Tasks in a cgroup other than the root leave their
//! autogroup, so this replaces the autogroup nice as well.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The group's directory name under the CPU controller's mount.
const GROUP: &str = "schemashift-bulk";

/// Moves a process (or, with `thread`, one thread) into the idle group. False, leaving it
/// where it was, when there is no writable CPU controller with `cpu.idle` on this host.
pub fn join(id: i32, thread: bool) -> bool {
    let Some(dir) = group() else {
        return false;
    };
    // cgroup v1 moves single threads through `tasks`; v2 needs a threaded group for that,
    // so there a thread is not moved.
    let file = match (thread, dir.join("tasks").exists()) {
        (false, _) => "cgroup.procs",
        (true, true) => "tasks",
        (true, false) => return false,
    };
    match std::fs::write(dir.join(file), id.to_string()) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "task not moved into the idle cpu group");
            false
        }
    }
}

/// Turns the group's idle class on or off: off when yielding did not help the source (the
/// slowdown was not ours), so our bulk work gets a normal task's share again. False when
/// there is no group.
pub fn set_idle(idle: bool) -> bool {
    let Some(dir) = group() else {
        return false;
    };
    match std::fs::write(dir.join("cpu.idle"), if idle { "1" } else { "0" }) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "idle cpu group not changed");
            false
        }
    }
}

/// The group, created once per process; None when it cannot be made idle.
pub fn group() -> Option<&'static Path> {
    static GROUP_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    GROUP_DIR
        .get_or_init(|| {
            let found = cpu_controller_roots()
                .into_iter()
                .find_map(|root| make_idle(&root.join(GROUP)));
            if found.is_none() {
                tracing::debug!("no idle cpu group on this host; nice only");
            }
            found
        })
        .as_deref()
}

fn make_idle(dir: &Path) -> Option<PathBuf> {
    if let Err(e) = std::fs::create_dir(dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return None;
        }
    }
    std::fs::write(dir.join("cpu.idle"), "1").ok()?;
    Some(dir.to_path_buf())
}

/// Mount points of the CPU controller: a cgroup v1 hierarchy with the `cpu` option, or the
/// cgroup v2 hierarchy when it offers `cpu` to its children.
fn cpu_controller_roots() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts.lines().filter_map(cpu_root).collect()
}

fn cpu_root(line: &str) -> Option<PathBuf> {
    let mut f = line.split_whitespace();
    let (_, dir, fstype, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
    let dir = PathBuf::from(dir);
    let v1 = fstype == "cgroup" && opts.split(',').any(|o| o == "cpu");
    let v2 = fstype == "cgroup2"
        && std::fs::read_to_string(dir.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
    (v1 || v2).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::cpu_root;

    #[test]
    fn finds_the_cpu_controller_of_cgroup_v1_mounts_only() {
        let v1 = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0";
        assert_eq!(cpu_root(v1).as_deref(), Some("/sys/fs/cgroup/cpu".as_ref()));
        let both = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0";
        assert!(cpu_root(both).is_some());
        let acct = "cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0";
        assert_eq!(cpu_root(acct), None);
        assert_eq!(cpu_root("proc /proc proc rw 0 0"), None);
    }
}
