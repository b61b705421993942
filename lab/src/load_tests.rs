use super::*;
use crate::cluster::test_cluster;
use crate::scenario::{load_users, SOURCE_DDL};

/// Polls the load until `done` holds (bounded, so a stuck load fails the test).
async fn wait_until(handle: &LoadHandle, done: impl Fn(&LoadStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&handle.stats()) {
        assert!(
            Instant::now() < deadline,
            "load made no progress: {:?}",
            handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no load session is left; backends exit a moment after their client closes.
async fn wait_for_no_sessions(client: &tokio_postgres::Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sessions: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&LOAD_APPLICATION_NAME],
            )
            .await
            .expect("activity")
            .get(0);
        if sessions == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "load sessions remain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn load_writes_at_its_rate_without_failures() {
    let (cluster, client) = test_cluster().await;
    client.batch_execute(SOURCE_DDL).await.expect("ddl");
    load_users(&client, 2_000).await.expect("users");
    let opts = LoadOptions {
        rate_per_sec: 200,
        insert_pct: 50,
        update_pct: 40,
        delete_pct: 10,
        read_pct: 20,
        toast_update_pct: 50,
    };
    let started = Instant::now();
    let handle = start_load(cluster.dsn("postgres"), opts)
        .await
        .expect("start load");
    wait_until(&handle, |s| s.ops() >= 200).await;
    let elapsed = started.elapsed();
    let stats = handle.stop().await;
    // 200 ops at 200/s cannot finish much faster than a second: the pacing works.
    assert!(
        elapsed >= Duration::from_millis(900),
        "too fast: {elapsed:?}"
    );
    assert!(
        stats.inserts > 0 && stats.updates > 0 && stats.deletes > 0,
        "{stats:?}"
    );
    assert!(stats.toast_updates > 0, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.latencies_us.count(), stats.ops());
    assert!(
        stats.reads > 0,
        "reads by key are part of the mix: {stats:?}"
    );
    assert_eq!(stats.read_us.count(), stats.reads);
    assert_eq!(
        stats.insert_us.count() + stats.update_us.count() + stats.delete_us.count(),
        stats.ops(),
        "every write is in its operation's histogram"
    );
    assert!(stats.p50() <= stats.p95() && stats.p95() <= stats.p99());
    assert!(stats.p99() <= stats.max_write_wait);
    // Every successful insert took one sequence value (deletes may remove inserted rows, so
    // counting rows would not be exact).
    let last: i64 = client
        .query_one("SELECT last_value FROM public.users_id_seq", &[])
        .await
        .expect("sequence")
        .get(0);
    assert_eq!(last as u64, 2_000 + stats.inserts);
    // Nothing runs after stop.
    wait_for_no_sessions(&client).await;
    let later: i64 = client
        .query_one("SELECT last_value FROM public.users_id_seq", &[])
        .await
        .expect("sequence")
        .get(0);
    assert_eq!(later, last, "no inserts after stop");
    drop(client);
    cluster.stop().await.expect("stop");
}

#[tokio::test]
async fn load_reconnects_after_losing_its_connection() {
    let (cluster, client) = test_cluster().await;
    client.batch_execute(SOURCE_DDL).await.expect("ddl");
    load_users(&client, 500).await.expect("users");
    let (ext_tx, ext_rx) = watch::channel(false);
    let opts = LoadOptions {
        rate_per_sec: 300,
        ..LoadOptions::default()
    };
    let handle = start_load_with_shutdown(cluster.dsn("postgres"), opts, Some(ext_rx))
        .await
        .expect("start load");
    wait_until(&handle, |s| s.ops() >= 20).await;
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&LOAD_APPLICATION_NAME],
        )
        .await
        .expect("terminate");
    wait_until(&handle, |s| s.reconnects >= 1).await;
    let before = handle.stats().ops();
    wait_until(&handle, |s| s.ops() >= before + 20).await;
    // The operation in flight fails, unless the session died just after it answered
    // (then the closed client is noticed before the next operation).
    assert!(handle.stats().failed <= 2, "{:?}", handle.stats());
    // The external shutdown signal alone ends the workers: their sessions go away.
    ext_tx.send(true).expect("signal");
    wait_for_no_sessions(&client).await;
    let stats = handle.stop().await;
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert!(
        stats.failed <= 2,
        "only operations in flight fail: {stats:?}"
    );
    drop(client);
    cluster.stop().await.expect("stop");
}
