//! Fleets in tests: fleet specs over the shared clusters, and a sampler of what of ours
//! runs on each server at once.

use crate::{as_test_role, connect, create_database, dsn_with_db, TestEnv};
use schemashift_lab::scenario::users_spec_yaml;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Db {
    pub dsn: String,
}

/// A fresh test database on the cluster of `admin_base` (the fixture's superuser), as the
/// test role.
pub async fn fresh_db(admin_base: &str, name: &str) -> anyhow::Result<Db> {
    create_database(admin_base, name).await?;
    Ok(Db {
        dsn: dsn_with_db(&as_test_role(admin_base), name),
    })
}

/// Per cluster, the most copies reading, copies writing and index builds of ours seen at
/// once (a copy between two databases of one cluster shows one of each).
pub async fn sample(
    admin_dsns: Vec<String>,
    dbs: Vec<String>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut clients = Vec::new();
    for d in &admin_dsns {
        clients.push(connect(d).await?);
    }
    let mut worst = vec![(0i64, 0i64); clients.len()];
    let mut seen: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for (i, c) in clients.iter().enumerate() {
            let r = c
                .query_one(
                    // Backfill copies and the target's index builds (client backends only:
                    // a build's parallel workers show its query too); not the change path's
                    // own COPYs (change log, replay staging) nor the control DDL.
                    "SELECT count(*) FILTER (WHERE query LIKE 'COPY (SELECT % FROM ONLY \"public\".\"users\" %'), \
                            count(*) FILTER (WHERE query LIKE 'COPY \"public\".\"users\" (%) FROM STDIN (FORMAT binary)'), \
                            count(*) FILTER (WHERE query ~ '^CREATE (UNIQUE )?INDEX ') \
                     FROM pg_stat_activity \
                     WHERE usename = 'schemashift_test' AND state = 'active' \
                       AND backend_type = 'client backend' AND datname = ANY($1)",
                    &[&dbs],
                )
                .await?;
            let (out, inn, idx): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if (out + idx > 1 || inn + idx > 1) && seen.len() < 5 {
                let q = c
                    .query(
                        "SELECT datname || ': ' || left(query, 120) FROM pg_stat_activity \
                         WHERE usename = 'schemashift_test' AND state = 'active'",
                        &[],
                    )
                    .await?;
                seen.push(
                    q.iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>()
                        .join(" | "),
                );
            }
            worst[i].0 = worst[i].0.max(out + idx);
            worst[i].1 = worst[i].1.max(inn + idx);
        }
    }
    for q in &seen {
        eprintln!("over the limit: {q}");
    }
    Ok(worst)
}

/// The users spec without its pair, for a fleet's shared part.
pub fn shared_part(shard_rows: u64) -> String {
    users_spec_yaml("x", "y", 2, Some(shard_rows))
        .lines()
        .filter(|l| !l.starts_with("source: ") && !l.starts_with("target: "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Writes a fleet spec: `head` (members, limits) and the users split by copy.
pub fn write_fleet(head: String, shard_rows: u64) -> anyhow::Result<(tempfile::TempDir, String)> {
    let yaml = head
        + &shared_part(shard_rows).replace("    key: id\n", "    key: id\n    strategy: copy\n");
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("fleet.yaml");
    std::fs::write(&spec, yaml)?;
    let spec = spec.to_string_lossy().into_owned();
    Ok((dir, spec))
}

/// Shards done in all of these targets' control states.
pub async fn shards_done(targets: &[tokio_postgres::Client]) -> i64 {
    let mut n = 0;
    for t in targets {
        n += crate::shards_done(t).await;
    }
    n
}

/// `n` members `m0`… of `rows` users each on the shared clusters, and the spec's `members:`.
pub async fn members(tag: &str, n: usize, rows: u64) -> anyhow::Result<(Vec<TestEnv>, String)> {
    let mut envs = Vec::new();
    let mut yaml = String::from("members:\n");
    for i in 0..n {
        let env = crate::users_env(&format!("{tag}_{i}"), rows).await?;
        yaml.push_str(&format!(
            "  - name: m{i}\n    source: '{}'\n    target: '{}'\n",
            env.source_dsn, env.target_dsn
        ));
        envs.push(env);
    }
    Ok((envs, yaml))
}

/// Four members of 30,000 rows on the shared clusters, the fleet spec with `per_host`.
pub async fn four_members(
    tag: &str,
    per_host: usize,
) -> anyhow::Result<(Vec<TestEnv>, tempfile::TempDir, String)> {
    let (envs, mut yaml) = members(tag, 4, 30_000).await?;
    yaml.push_str(&format!(
        "limits:\n  per_host: {per_host}\nthrottle:\n  enabled: false\n"
    ));
    let (dir, spec) = write_fleet(yaml, 2_000)?;
    Ok((envs, dir, spec))
}
