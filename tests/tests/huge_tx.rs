//! A routine batch job during the backfill: one transaction updating every row, and an
//! overlapping one that inserts 200K rows and rolls back. Capture streams them in
//! progress and keeps them on disk until their commit: the run completes with every row
//! right, nothing of the rolled-back one, and its memory bounded.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, table_diff, users_env, wait_shards_done, write_spec, Proc};
use std::time::Duration;

/// Rows of the table, all updated by the one big transaction; `SCHEMASHIFT_HUGE_TX_ROWS`
/// runs it at another size (the README's 1M-row figure).
fn rows() -> i64 {
    std::env::var("SCHEMASHIFT_HUGE_TX_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// VmHWM (peak resident memory) of a process, in MiB.
fn peak_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_transaction_and_a_rolled_back_one_during_backfill_lose_nothing() -> anyhow::Result<()>
{
    let rows = rows();
    let env = users_env("huge_tx", rows as u64).await?;
    let dir = tempfile::tempdir()?;
    let yaml = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(20_000));
    let spec = write_spec(&dir, &format!("{yaml}throttle:\n  enabled: false\n"))?;
    let mut run = Proc::spawn(
        dir.path(),
        "run",
        &["run", &spec, "--until", "verify", "--json"],
        &[],
    )?;
    let pid = run
        .pid()
        .ok_or_else(|| anyhow::anyhow!("run did not start"))?;
    let t = connect(&env.target_dsn).await?;
    wait_shards_done(&t, 1, &mut run).await?;
    // Held mid-backfill while the transactions run (capture goes on), so that a fast
    // backfill cannot finish the run before the huge update commits.
    schemashift_tests::schemashift_ok(&["pause", &spec])?;
    // Overlapping: B inserts 200K rows and holds them; A updates every row and commits;
    // then B rolls back.
    let b = connect(&env.source_dsn).await?;
    b.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, email, full_name, bio) \
         SELECT {rows} + 1000 + g, 'rolled.back.' || g || '@example.com', 'Never There', \
         repeat('x', 200) FROM generate_series(1, 200000) g"
    ))
    .await?;
    let a = connect(&env.source_dsn).await?;
    a.batch_execute(
        "BEGIN; UPDATE users SET updated_at = updated_at + interval '1 second', \
         full_name = full_name || ' Jr'; COMMIT",
    )
    .await?;
    b.batch_execute("ROLLBACK").await?;
    schemashift_tests::schemashift_ok(&["resume", &spec])?;
    let mut peak: f64 = 0.0;
    let status = loop {
        if let Some(p) = peak_mib(pid) {
            peak = peak.max(p);
        }
        if !run.is_running() {
            break run.wait(Duration::from_secs(5)).await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "run: {}", run.stderr_tail());
    eprintln!("huge transaction: the run's peak resident memory was {peak:.0} MiB");
    assert!(
        run.stderr()
            .contains("large transaction appended from its spill"),
        "the update was streamed in progress and spilled: {}",
        run.stderr_tail()
    );
    assert!(peak < 256.0, "capture memory bounded: peak {peak:.0} MiB");
    let report: serde_json::Value = serde_json::from_str(&run.stdout())?;
    assert_eq!(
        report["verify"]["differing"],
        serde_json::json!([]),
        "{report}"
    );
    let s = connect(&env.source_dsn).await?;
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    let ghosts: i64 = t
        .query_one(
            "SELECT count(*) FROM users WHERE email LIKE 'rolled.back.%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(ghosts, 0, "nothing of the rolled-back transaction");
    env.drop_all().await
}
