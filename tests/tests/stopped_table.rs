//! A table whose shards keep failing stops alone: a two-table run where one mapping raises
//! for 1% of the rows, under a write load. That table stops with its key range and error,
//! the other is verified, the run exits 1 naming the table and what to fix, a cutover is
//! refused; with the mapping fixed in the spec, the same `run` copies just that table
//! again and both complete, every row exactly once. Each check compares by its own SQL.

use schemashift_tests::{connect, rows_text, schemashift, write_spec, Proc, TestEnv};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

const ROWS: i64 = 20_000;

const SOURCE_DDL: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, balance int NOT NULL);
INSERT INTO accounts SELECT g, 'account ' || g, g % 1000 FROM generate_series(1, 20000) g;
CREATE TABLE payments (id bigint PRIMARY KEY, account_id bigint NOT NULL, amount int NOT NULL);
INSERT INTO payments SELECT g, g % 20000 + 1, g % 5000 FROM generate_series(1, 20000) g;";

const TARGET_DDL: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, balance numeric NOT NULL);
CREATE TABLE payments (id bigint PRIMARY KEY, account_id bigint NOT NULL, cents bigint NOT NULL);";

/// Raises (division by zero) for 1% of the rows, all in the upper half of the keys: the
/// planner's sample (the first thousand) evaluates, so the run starts, and the lower
/// shards are copied before the table stops.
const RAISING: &str =
    "CASE WHEN id % 50 = 0 AND id > 10000 THEN amount / (id - id) ELSE amount * 100 END";
const FIXED: &str = "amount * 100";

/// Both tables, `payments.cents` mapped by `cents`, `accounts.balance` by `balance`.
fn spec_yaml(env: &TestEnv, cents: &str, balance: &str) -> String {
    format!(
        "source: {}\ntarget: {}\nworkers: 2\n\
         tables:\n\
         \x20 - source: public.accounts\n    target: public.accounts\n    key: id\n    shard_rows: 2000\n\
         \x20   columns:\n      id: id\n      name: name\n      balance: \"{balance}\"\n\
         \x20 - source: public.payments\n    target: public.payments\n    key: id\n    shard_rows: 2000\n\
         \x20   columns:\n      id: id\n      account_id: account_id\n      cents: \"{cents}\"\n\
         cutover:\n  reverse: false\n\
         throttle:\n  enabled: false\n",
        env.source_dsn, env.target_dsn
    )
}

/// An application writing both tables until told to stop: inserts, updates, deletes and
/// key changes (rows moving to another shard's range). Returns how many rounds it wrote.
async fn write_load(
    dsn: String,
    mut stop: watch::Receiver<bool>,
    from: i64,
) -> anyhow::Result<i64> {
    let c = connect(&dsn).await?;
    let mut i = 0;
    while !*stop.borrow() {
        i += 1;
        let n = from + i;
        let (a, b) = ((n * 37) % ROWS + 1, (n * 53) % ROWS + 1);
        c.batch_execute(&format!(
            "INSERT INTO payments (id, account_id, amount) VALUES ({n}, {a}, {i});
             UPDATE accounts SET balance = balance + 1 WHERE id = {a};
             UPDATE payments SET amount = amount + 1 WHERE id = {b};
             UPDATE payments SET id = id + 1000000 WHERE id = {a} + 7;
             DELETE FROM payments WHERE id = {b} + 3;"
        ))
        .await?;
        // A steady rate, not a race with the run.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = stop.changed() => {}
        }
    }
    Ok(i)
}

async fn count(c: &Client, sql: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(sql, &[]).await?.get(0))
}

/// Polls until `sql` counts at least `n`, while `run` goes on.
async fn wait_for(t: &Client, sql: &str, n: i64, run: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The control schema appears once the run has planned.
        match t.query_one(sql, &[]).await {
            Ok(r) if r.get::<_, i64>(0) >= n => return Ok(()),
            Ok(_) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {}
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(
            run.is_running(),
            "run ended before `{sql}` reached {n}: {}",
            run.stderr_tail()
        );
        anyhow::ensure!(Instant::now() < deadline, "`{sql}` did not reach {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The target's rows of a table equal the mapped source's, each once.
async fn assert_same(
    env: &TestEnv,
    source_sql: &str,
    target_sql: &str,
    what: &str,
) -> anyhow::Result<()> {
    let s = rows_text(&connect(&env.source_dsn).await?, source_sql).await?;
    let t = rows_text(&connect(&env.target_dsn).await?, target_sql).await?;
    let missing: Vec<&String> = s.iter().filter(|r| !t.contains(r)).take(3).collect();
    let extra: Vec<&String> = t.iter().filter(|r| !s.contains(r)).take(3).collect();
    anyhow::ensure!(
        s == t,
        "{what}: source {} rows, target {}; first missing or different: {missing:?}; first extra: {extra:?}",
        s.len(),
        t.len()
    );
    Ok(())
}

const ACCOUNTS_SOURCE: &str = "SELECT id, name, balance::numeric FROM accounts ORDER BY id";
const ACCOUNTS_TARGET: &str = "SELECT id, name, balance FROM accounts ORDER BY id";
const PAYMENTS_SOURCE: &str =
    "SELECT id, account_id, amount::bigint * 100 FROM payments ORDER BY id";
const PAYMENTS_TARGET: &str = "SELECT id, account_id, cents FROM payments ORDER BY id";
const STOPPED: &str = "SELECT count(*) FROM schemashift.stopped_tables";
/// The stopped table as the tool names it.
const PAYMENTS: &str = r#""public"."payments" -> "public"."payments""#;

/// Runs `schemashift run SPEC --until verify` under the write load until `ready` counts
/// at least `n` on the target; the load stops there, so the run's last catch-up covers
/// every write. Returns the run's exit code and its stderr.
async fn run_under_load(
    env: &TestEnv,
    dir: &tempfile::TempDir,
    spec: &str,
    name: &str,
    ready: &str,
    n: i64,
    from: i64,
) -> anyhow::Result<(Option<i32>, String)> {
    let (stop, stopped) = watch::channel(false);
    let load = tokio::spawn(write_load(env.source_dsn.clone(), stopped, from));
    let mut run = Proc::spawn(dir.path(), name, &["run", spec, "--until", "verify"], &[])?;
    let t = connect(&env.target_dsn).await?;
    let waited = wait_for(&t, ready, n, &mut run).await;
    stop.send_replace(true);
    let rounds = load.await??;
    waited?;
    assert!(rounds > 0, "{name}: the load wrote while the run went");
    let status = run.wait(Duration::from_secs(180)).await?;
    Ok((status.code(), run.stderr()))
}

#[tokio::test]
async fn a_table_whose_mapping_raises_stops_alone_and_resumes_after_the_fix() -> anyhow::Result<()>
{
    let env = TestEnv::with_ddl("stopped_table", SOURCE_DDL, TARGET_DDL).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &spec_yaml(&env, RAISING, "balance::numeric"))?;

    // 1% of the payments raise: that table stops, the accounts go on through verify.
    let (code, err) = run_under_load(&env, &dir, &spec, "run", STOPPED, 1, 100_000).await?;
    assert_eq!(code, Some(1), "{err}");
    for said in [
        format!("table {PAYMENTS} stopped"),
        "key range [".into(),
        "division by zero".into(),
        "fix the mapping of column \"cents\"".into(),
        "run the same `schemashift run SPEC` again".into(),
    ] {
        assert!(err.contains(&said), "the run's error says {said:?}:\n{err}");
    }
    let t = connect(&env.target_dsn).await?;
    let status: serde_json::Value =
        serde_json::from_slice(&schemashift(&["status", &spec, "--json"])?.stdout)?;
    let stopped = &status["stopped_tables"][0];
    assert_eq!(stopped["table"], PAYMENTS, "{status}");
    assert_eq!(stopped["column"], "cents", "{status}");
    // Five failures; a sixth lease may have started before the stop fenced it.
    assert!(
        stopped["attempts"]
            .as_i64()
            .is_some_and(|n| (5..=6).contains(&n)),
        "{status}"
    );
    assert!(
        stopped["range"]
            .as_str()
            .is_some_and(|r| r.starts_with('[')),
        "{status}"
    );
    assert!(
        stopped["error"]
            .as_str()
            .is_some_and(|e| e.contains("division by zero")),
        "{status}"
    );
    assert_eq!(
        status["phase"], "verify",
        "not verified while a table is stopped: {status}"
    );
    assert!(
        status["shards"]["stopped"].as_i64().is_some_and(|n| n > 0),
        "{status}"
    );
    let verify = &status["report"]["verify"];
    assert_eq!(
        verify["differing"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert_eq!(verify["skipped_tables"][0], PAYMENTS, "{status}");
    assert!(
        verify["ranges"].as_i64().is_some_and(|n| n >= 10),
        "the accounts' ranges: {status}"
    );
    let copied = count(&t, "SELECT count(*) FROM payments").await?;
    assert!(
        copied > 0,
        "shards of the lower keys were copied before the stop (they go again on resume)"
    );
    // Our own compare: the accounts are all there, every write of the load included.
    assert_same(
        &env,
        ACCOUNTS_SOURCE,
        ACCOUNTS_TARGET,
        "accounts while payments are stopped",
    )
    .await?;

    let text = String::from_utf8_lossy(&schemashift(&["status", &spec])?.stderr).into_owned();
    assert!(
        text.contains("STOPPED since")
            && text.contains("to fix: fix the mapping of column \"cents\""),
        "{text}"
    );
    // No cutover while a table is stopped: refused before anything is frozen.
    let out = schemashift(&["cutover", &spec])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("cutover refused") && said.contains(PAYMENTS),
        "{said}"
    );
    // `verify` does not call a stopped table equal.
    let out = schemashift(&["verify", &spec])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("not compared: table {PAYMENTS}")),
        "{said}"
    );

    // A spec that also changes a table that did not stop is refused; nothing changes.
    let both = write_spec(&dir, &spec_yaml(&env, FIXED, "balance::numeric + 1"))?;
    let out = schemashift(&["run", &both, "--until", "verify"])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(r#""public"."accounts""#) && said.contains("not stopped"),
        "{said}"
    );
    assert_eq!(count(&t, STOPPED).await?, 1);

    // The mapping fixed in the spec: the same run copies just that table again.
    let spec = write_spec(&dir, &spec_yaml(&env, FIXED, "balance::numeric"))?;
    let done = "SELECT count(*) FROM schemashift.shards s WHERE s.state = 'done' \
                AND s.table_idx = 1 AND NOT EXISTS (SELECT 1 FROM schemashift.stopped_tables)";
    let shards = count(
        &t,
        "SELECT count(*) FROM schemashift.shards WHERE table_idx = 1",
    )
    .await?;
    let (code, err) = run_under_load(&env, &dir, &spec, "resumed", done, shards, 200_000).await?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(count(&t, STOPPED).await?, 0);
    assert_same(
        &env,
        ACCOUNTS_SOURCE,
        ACCOUNTS_TARGET,
        "accounts after the resume",
    )
    .await?;
    assert_same(
        &env,
        PAYMENTS_SOURCE,
        PAYMENTS_TARGET,
        "payments after the resume",
    )
    .await?;
    let status: serde_json::Value =
        serde_json::from_slice(&schemashift(&["status", &spec, "--json"])?.stdout)?;
    assert_eq!(status["phase"], "verified", "{status}");
    let history: serde_json::Value =
        serde_json::from_slice(&schemashift(&["history", &spec, "--json"])?.stdout)?;
    let kinds: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"table_stopped") && kinds.contains(&"table_resumed"),
        "{kinds:?}"
    );
    let out = schemashift(&["cutover", &spec])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.drop_all().await
}
