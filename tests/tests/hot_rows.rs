//! Hot rows: a few rows updated as fast as the source allows by several sessions while the
//! run verifies and cuts over. Verify settles such keys at one consistent point, so they
//! never show as differences, while a real difference is still found.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, schemashift, users_env, write_spec};
use tokio::sync::watch;
use tokio::task::JoinSet;

const HOT: &[i64] = &[3, 4, 5, 6, 7];

/// Sessions that update the hot rows back to back until told to stop; returns updates.
async fn hammer(dsn: &str, sessions: usize) -> anyhow::Result<(watch::Sender<bool>, JoinSet<u64>)> {
    let (stop, rx) = watch::channel(false);
    let mut set = JoinSet::new();
    for s in 0..sessions {
        let c = connect(dsn).await?;
        let rx = rx.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while !*rx.borrow() {
                let id = HOT[(n as usize + s) % HOT.len()];
                let r = c
                    .execute(
                        "UPDATE users SET updated_at = updated_at + interval '1 ms', \
                         full_name = 'Hot ' || md5(random()::text) WHERE id = $1",
                        &[&id],
                    )
                    .await;
                if r.is_err() {
                    // The cutover's freeze made it wait past a timeout, or it ended.
                    tokio::task::yield_now().await;
                }
                n += 1;
            }
            n
        });
    }
    Ok((stop, set))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_rows_verify_and_cut_over_clean_ten_runs_in_a_row() -> anyhow::Result<()> {
    for run in 0..10 {
        let env = users_env(&format!("hot_rows_{run}"), 3_000).await?;
        let dir = tempfile::tempdir()?;
        let yaml = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(1_000));
        let spec = write_spec(&dir, &format!("{yaml}throttle:\n  enabled: false\n"))?;
        let (stop, mut sessions) = hammer(&env.source_dsn, 4).await?;
        let out = schemashift(&["run", &spec, "--until", "verify", "--json"])?;
        assert!(out.status.success(), "run {run}: {}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(
            report["verify"]["differing"],
            serde_json::json!([]),
            "run {run}: hot rows are not differences"
        );
        let out = schemashift(&["cutover", &spec, "--json"])?;
        assert!(out.status.success(), "run {run} cutover: {}", stderr(&out));
        stop.send_replace(true);
        let mut updates = 0;
        while let Some(n) = sessions.join_next().await {
            updates += n?;
        }
        assert!(
            updates > 100,
            "run {run}: the rows were hot ({updates} updates)"
        );
        schemashift(&["cleanup", &spec])?;
        env.drop_all().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_difference_among_hot_rows_is_found_exactly() -> anyhow::Result<()> {
    let env = users_env("hot_rows_diff", 3_000).await?;
    let dir = tempfile::tempdir()?;
    let yaml = users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(1_000));
    let spec = write_spec(&dir, &format!("{yaml}throttle:\n  enabled: false\n"))?;
    let (stop, mut sessions) = hammer(&env.source_dsn, 4).await?;
    let out = schemashift(&["run", &spec, "--until", "replay"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    // A cold row goes wrong on the target behind the tool's back.
    connect(&env.target_dsn)
        .await?
        .batch_execute("UPDATE users SET email = 'tampered@example.com' WHERE id = 1500")
        .await?;
    let out = schemashift(&["verify", &spec, "--json"])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let keys: Vec<&serde_json::Value> = v["differing"]
        .as_array()
        .map(|a| a.iter().map(|d| &d["key"]).collect())
        .unwrap_or_default();
    assert_eq!(keys, vec![&serde_json::json!(["1500"])], "{v}");
    stop.send_replace(true);
    while sessions.join_next().await.is_some() {}
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}
