//! `schemashift bench` owns two throwaway clusters: stopped mid-run it must not leave them
//! running (a default SIGTERM would end the process before their owners could stop them).

use schemashift_tests::Proc;
use std::path::Path;
use std::time::{Duration, Instant};

/// Processes whose command line names a path under `dir` (the clusters' postmasters and
/// backends run with `-D DIR/data`).
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Running postmasters' data directories under `dir`.
fn postmasters_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("data/postmaster.pid").exists())
        .count()
}

/// A temporary directory with `clusters/` in it, where the bench (through `TMPDIR`) puts
/// its clusters. They run as the postgres user when the tests run as root: it must reach
/// them.
fn clusters_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let clusters = tmp.path().join("clusters");
    std::fs::create_dir(&clusters).expect("clusters dir");
    for d in [tmp.path(), clusters.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    (tmp, clusters)
}

#[tokio::test]
async fn bench_terminated_mid_run_stops_its_clusters() {
    let (tmp, clusters) = clusters_dir();
    let tmpdir = clusters.to_string_lossy().into_owned();
    let mut bench = Proc::spawn(
        tmp.path(),
        "bench",
        &["bench", "--rows", "20000", "--only", "changes"],
        &[("TMPDIR", tmpdir.as_str())],
    )
    .expect("start bench");
    // Both clusters up (and initdb long done): the bench is measuring.
    let started = Instant::now();
    while !bench.stderr().contains("measuring") {
        assert!(
            bench.is_running(),
            "bench ended before it measured: {}",
            bench.stderr_tail()
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the bench did not start measuring: {}",
            bench.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(postmasters_under(&clusters), 2, "two running clusters");
    let pid = bench.pid().expect("bench pid");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(sent.success());
    let status = bench
        .wait(Duration::from_secs(60))
        .await
        .expect("bench exits after SIGTERM");
    // An immediate stop returns once the postmaster is gone; its backends follow.
    let stopped = Instant::now();
    let mut left = processes_under(&clusters);
    while !left.is_empty() && stopped.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = processes_under(&clusters);
    }
    let described: Vec<String> = left
        .iter()
        .map(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p}: {}", String::from_utf8_lossy(&c).replace('\0', " "))
        })
        .collect();
    // Whatever the outcome, leave nothing behind for the next test.
    for p in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    assert!(
        left.is_empty(),
        "processes of the bench's clusters still running after it exited ({status}): {described:?}"
    );
    assert_eq!(status.code(), Some(130), "{}", bench.stderr_tail());
    assert!(
        bench.stderr().contains("stopping its clusters"),
        "{}",
        bench.stderr_tail()
    );
}

/// The whole bench, every section in one run as README gives it, on a small table: every
/// method measures without failing. The change rows write to the scenario's source, so the
/// fleet's pair (which copies it and checks the count) must come before them.
#[tokio::test]
async fn whole_bench_on_a_small_table_runs_every_method_without_a_failure() {
    let (tmp, clusters) = clusters_dir();
    let tmpdir = clusters.to_string_lossy().into_owned();
    let out = tmp.path().join("bench.md").to_string_lossy().into_owned();
    let mut bench = Proc::spawn(
        tmp.path(),
        "bench",
        &["bench", "--rows", "8000", "--workers", "2", "--out", &out],
        &[("TMPDIR", tmpdir.as_str())],
    )
    .expect("start bench");
    let status = bench
        .wait(Duration::from_secs(900))
        .await
        .expect("bench ends");
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(status.success(), "{}\n{report}", bench.stderr_tail());
    assert!(!report.contains(": failed"), "{report}");
    for row in [
        "schemashift backfill",
        "schemashift run (fleet of 8)",
        "schemashift capture",
    ] {
        assert!(report.contains(row), "{row} measured: {report}");
    }
}
