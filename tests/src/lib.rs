//! Harness of the end-to-end tests: fresh databases on the shared test clusters (or on private
//! throwaway clusters), the built `schemashift` binary, and our own source/target compare.

use std::path::PathBuf;

use anyhow::Context;
use rand::Rng;
use schemashift_lab::cluster::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};

mod broker;
pub mod certs;
mod diff;
pub mod fleet;
mod procs;

pub use broker::Broker;
pub use diff::{concat_names, split_full_name, table_diff, table_diff_report, DiffReport};
pub use procs::{
    coordinator_args, free_port, local_listen, spawn_workers, spawn_workers_with, Proc,
};

/// Env vars with base DSNs (no database) of the shared clusters `scripts/test.sh` starts: the
/// fixture's superuser, for its own setup only.
pub const SOURCE_ENV: &str = "SCHEMASHIFT_TEST_SOURCE";
pub const TARGET_ENV: &str = "SCHEMASHIFT_TEST_TARGET";

/// The role every test's DSNs use: no superuser, owner of its test databases (so of the tables
/// the tests create), `REPLICATION`, the origin functions and postgres_fdw's usage granted, as
/// docs/privileges.md lists them. By password (md5: cheap per connection), since postgres_fdw
/// refuses a non-superuser whose connection used none.
pub const TEST_ROLE: &str = "schemashift_test";
pub const TEST_PASSWORD: &str = "test-pw-7Qx";

/// `pg_hba.conf` of the test clusters: the test role by password, the fixture's superuser by
/// trust (scripts/test.sh writes the same lines).
pub const TEST_HBA: &str = "local all all trust\n\
    host all schemashift_test 127.0.0.1/32 md5\n\
    host replication schemashift_test 127.0.0.1/32 md5\n\
    host all all 127.0.0.1/32 trust\n\
    host replication all 127.0.0.1/32 trust\n";

/// A fresh source and target database for one test.
pub struct TestEnv {
    pub source_dsn: String,
    pub target_dsn: String,
    pub source_db: String,
    pub target_db: String,
    source_base: String,
    target_base: String,
    /// Private clusters when no shared ones are configured; they stop when dropped.
    clusters: Vec<Cluster>,
    cleaned: bool,
}

impl TestEnv {
    /// Creates the two databases, named after the test with a random suffix.
    pub async fn new(test_name: &str) -> anyhow::Result<TestEnv> {
        let (source_base, target_base, clusters) =
            match (std::env::var(SOURCE_ENV), std::env::var(TARGET_ENV)) {
                (Ok(s), Ok(t)) => (s, t, Vec::new()),
                _ => {
                    let opts = || ClusterOptions {
                        hba: Some(TEST_HBA.to_string()),
                        ..ClusterOptions::default()
                    };
                    let (a, b) = tokio::try_join!(Cluster::start(opts()), Cluster::start(opts()))
                        .context("start private test clusters (or run scripts/test.sh)")?;
                    let bases = (base_of(&a), base_of(&b));
                    (bases.0, bases.1, vec![a, b])
                }
            };
        let stem = db_stem(test_name);
        let suffix = format!("{:08x}", rand::thread_rng().gen::<u32>());
        // Distinct names, so source and target may even share one cluster.
        let source_db = format!("{stem}_{suffix}_s");
        let target_db = format!("{stem}_{suffix}_t");
        for (base, db) in [(&source_base, &source_db), (&target_base, &target_db)] {
            create_database(base, db).await?;
        }
        Ok(TestEnv {
            source_dsn: dsn_with_db(&as_test_role(&source_base), &source_db),
            target_dsn: dsn_with_db(&as_test_role(&target_base), &target_db),
            source_db,
            target_db,
            source_base,
            target_base,
            clusters,
            cleaned: false,
        })
    }

    /// [`TestEnv::new`] with each side's schema (and rows) created by its DDL.
    pub async fn with_ddl(
        test_name: &str,
        source_ddl: &str,
        target_ddl: &str,
    ) -> anyhow::Result<TestEnv> {
        let env = TestEnv::new(test_name).await?;
        connect(&env.source_dsn)
            .await?
            .batch_execute(source_ddl)
            .await?;
        connect(&env.target_dsn)
            .await?
            .batch_execute(target_ddl)
            .await?;
        Ok(env)
    }

    /// The fixture's superuser on the test's source database (setup only).
    pub fn source_admin_dsn(&self) -> String {
        dsn_with_db(&self.source_base, &self.source_db)
    }

    /// The fixture's superuser on the test's target database (setup only).
    pub fn target_admin_dsn(&self) -> String {
        dsn_with_db(&self.target_base, &self.target_db)
    }

    /// Superuser DSN of another database (e.g. `postgres`) on the source cluster.
    pub fn source_dsn_for(&self, db: &str) -> String {
        dsn_with_db(&self.source_base, db)
    }

    /// Superuser DSN of another database (e.g. `postgres`) on the target cluster.
    pub fn target_dsn_for(&self, db: &str) -> String {
        dsn_with_db(&self.target_base, db)
    }

    /// Drops the replication slots of our databases and the databases, then stops private
    /// clusters.
    pub async fn drop_all(mut self) -> anyhow::Result<()> {
        let result = self.drop_databases().await;
        for cluster in std::mem::take(&mut self.clusters) {
            cluster.stop().await.context("stop private test cluster")?;
        }
        result
    }

    /// Drops the slots of our databases and the databases, leaving the clusters running
    /// (idempotent; [`TestEnv::drop_all`] does it too).
    pub async fn drop_databases(&mut self) -> anyhow::Result<()> {
        self.cleaned = true;
        let mut first_err = None;
        for (base, db) in [
            (&self.source_base, &self.source_db),
            (&self.target_base, &self.target_db),
        ] {
            if let Err(e) = drop_database(base, db).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Private clusters vanish with their directories; only shared ones need cleaning.
        if self.cleaned || !self.clusters.is_empty() {
            return;
        }
        let dbs = [
            (self.source_base.clone(), self.source_db.clone()),
            (self.target_base.clone(), self.target_db.clone()),
        ];
        // A fresh thread and runtime: Drop cannot await, and may run inside a runtime.
        let cleanup = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("test env cleanup: no runtime: {e}"),
            };
            rt.block_on(async {
                for (base, db) in dbs {
                    if let Err(e) = drop_database(&base, &db).await {
                        eprintln!("test env cleanup of {db}: {e:#}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Creates the test role once per cluster and `db` owned by it, with the rights the tool needs
/// that only a superuser can hand out.
pub async fn create_database(base: &str, db: &str) -> anyhow::Result<()> {
    let admin = connect(&dsn_with_db(base, "postgres")).await?;
    // Tests create databases in parallel: a role made by another one meanwhile is fine.
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'md5'; \
             DO $$ BEGIN \
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TEST_ROLE}') THEN \
                 CREATE ROLE {TEST_ROLE} LOGIN REPLICATION PASSWORD '{TEST_PASSWORD}'; \
               END IF; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
             END $$"
        ))
        .await
        .context("create the test role")?;
    // Alone: CREATE DATABASE cannot run in the implicit transaction of a multi-statement batch.
    admin
        .batch_execute(&format!("CREATE DATABASE \"{db}\" OWNER {TEST_ROLE}"))
        .await
        .with_context(|| format!("create test database {db}"))?;
    connect(&dsn_with_db(base, db))
        .await?
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
               pg_replication_origin_session_setup(text), pg_replication_origin_oid(text) \
               TO {TEST_ROLE}; \
             CREATE EXTENSION postgres_fdw; \
             GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO {TEST_ROLE}"
        ))
        .await
        .with_context(|| format!("grant the test role its rights in {db}"))?;
    Ok(())
}

/// On a cluster of its own (through its superuser `admin`): the role `migrator` (LOGIN
/// REPLICATION, no superuser) and its database `app`.
pub async fn migrator_and_app(admin: &Client) -> anyhow::Result<()> {
    admin
        .batch_execute("CREATE ROLE migrator LOGIN REPLICATION")
        .await?;
    // Alone: CREATE DATABASE cannot run inside the batch's transaction.
    admin
        .batch_execute("CREATE DATABASE app OWNER migrator")
        .await?;
    Ok(())
}

/// A base DSN of the fixture's superuser (`postgres://postgres@host:port`) as the test role.
pub fn as_test_role(base: &str) -> String {
    match base.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{TEST_ROLE}:{TEST_PASSWORD}@{host}")
        }
        None => format!("{base} user={TEST_ROLE} password={TEST_PASSWORD}"),
    }
}

fn base_of(cluster: &Cluster) -> String {
    format!("postgres://postgres@127.0.0.1:{}", cluster.port())
}

/// A database-name stem from a test name: lowercase `[a-z0-9_]`, short enough that the whole
/// name stays under PostgreSQL's 63 bytes.
fn db_stem(test_name: &str) -> String {
    let mut stem: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if stem.is_empty() {
        stem.push_str("test");
    }
    stem
}

/// `base` with its database replaced by `db`; URL or key/value form.
pub fn dsn_with_db(base: &str, db: &str) -> String {
    match base.find("://") {
        Some(scheme_end) => {
            let (main, query) = match base.find('?') {
                Some(q) => (&base[..q], &base[q..]),
                None => (base, ""),
            };
            let host_start = scheme_end + 3;
            let path_start = main[host_start..]
                .find('/')
                .map_or(main.len(), |i| i + host_start);
            format!("{}/{db}{query}", &main[..path_start])
        }
        None => format!("{base} dbname={db}"),
    }
}

async fn drop_database(base: &str, db: &str) -> anyhow::Result<()> {
    let admin = connect(&dsn_with_db(base, "postgres")).await?;
    drop_slots(&admin, db).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .await
        .with_context(|| format!("drop test database {db}"))?;
    Ok(())
}

/// Drops the logical slots of `db`; an active slot's walsender is terminated first, and its
/// exit takes a moment, hence the bounded retry.
async fn drop_slots(admin: &Client, db: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let slots = admin
            .query(
                "SELECT slot_name::text, active_pid FROM pg_replication_slots WHERE database = $1",
                &[&db],
            )
            .await
            .context("list replication slots")?;
        if slots.is_empty() {
            return Ok(());
        }
        let mut last_err = None;
        for slot in &slots {
            let name: String = slot.get(0);
            let pid: Option<i32> = slot.get(1);
            let result = match pid {
                Some(pid) => admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map(|_| ()),
                None => admin
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .map(|_| ()),
            };
            if let Err(e) = result {
                last_err = Some(e);
            }
        }
        if std::time::Instant::now() > deadline {
            let names: Vec<String> = slots.iter().map(|r| r.get(0)).collect();
            anyhow::bail!(
                "replication slots {names:?} of {db} could not be dropped: {}",
                last_err.map_or_else(|| "still active".to_string(), |e| e.to_string())
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every row of `sql` (in its order), as text.
pub async fn rows_text(c: &Client, sql: &str) -> anyhow::Result<Vec<String>> {
    Ok(c.query(&format!("SELECT t::text FROM ({sql}) t"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Connects and spawns the connection task.
pub async fn connect(dsn: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .with_context(|| format!("connect to {dsn}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("test connection ended: {e}");
        }
    });
    Ok(client)
}

/// The `schemashift` binary of this build (target/<profile>/schemashift; test executables live
/// in target/<profile>/deps/).
pub fn schemashift_bin() -> PathBuf {
    let name = format!("schemashift{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe().expect("path of the test executable");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .collect();
    match candidates.iter().find(|p| p.is_file()) {
        Some(path) => path.clone(),
        None => panic!(
            "schemashift binary not found at {candidates:?}: run `cargo build --bin schemashift` first"
        ),
    }
}

/// Runs the `schemashift` binary with quiet logs and no stdin.
pub fn schemashift(args: &[&str]) -> anyhow::Result<std::process::Output> {
    use anyhow::Context;
    std::process::Command::new(schemashift_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .context("running schemashift")
}

/// Runs `schemashift` and fails the test, showing its stderr, unless it succeeded.
pub fn schemashift_ok(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let out = schemashift(args)?;
    anyhow::ensure!(
        out.status.success(),
        "schemashift {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Runs `schemashift args` with the failpoint `name` set: fails the test unless the
/// process aborted there (as a kill -9 would stop it).
pub fn schemashift_to_failpoint(args: &[&str], name: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(schemashift_bin())
        .args(args)
        .env("SCHEMASHIFT_FAILPOINT", name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("running schemashift")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && stderr.contains("failpoint reached"),
        "schemashift {args:?} did not stop at failpoint {name}: {stderr}"
    );
    Ok(())
}

/// Indexes the run recorded (in the control schema `schemashift`) and has not built yet.
pub async fn unrestored_index_count(t: &Client) -> anyhow::Result<i64> {
    Ok(t.query_one(
        "SELECT count(*) FROM schemashift.indexes WHERE NOT restored",
        &[],
    )
    .await?
    .get(0))
}

/// Names of the indexes on the target's `users`, sorted.
pub async fn users_index_names(t: &Client) -> anyhow::Result<Vec<String>> {
    Ok(t.query(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'users' ORDER BY 1",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// A fresh pair of databases with the users scenario: `rows` users on the source, the
/// split schema (empty) on the target.
pub async fn users_env(name: &str, rows: u64) -> anyhow::Result<TestEnv> {
    use schemashift_lab::scenario::{load_users, SOURCE_DDL, TARGET_DDL};
    let env = TestEnv::new(name).await?;
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, rows).await?;
    connect(&env.target_dsn)
        .await?
        .batch_execute(TARGET_DDL)
        .await?;
    Ok(env)
}

/// Writes a spec into `dir` and returns its path as a string for the command line.
/// `verify` (which carries over the writes that waited on the freeze and landed on the
/// source after it), then our own compare of every row: nothing missing, extra or different.
pub async fn assert_verified_no_diffs(env: &TestEnv, spec: &str) -> anyhow::Result<()> {
    schemashift_ok(&["verify", spec])?;
    let (s, t) = (
        connect(&env.source_dsn).await?,
        connect(&env.target_dsn).await?,
    );
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    Ok(())
}

pub fn write_spec(dir: &tempfile::TempDir, yaml: &str) -> anyhow::Result<String> {
    let p = dir.path().join("spec.yaml");
    std::fs::write(&p, yaml)?;
    Ok(p.to_string_lossy().into_owned())
}

/// Logical slots of this database and publications, on the source: both must be 0
/// after cleanup or a refused start.
pub async fn slot_and_publication_count(source_dsn: &str) -> anyhow::Result<(i64, i64)> {
    let row = connect(source_dsn)
        .await?
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()), \
             (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Waits until the run's control state shows `n` shards done, while `run` keeps running.
/// Whether the target holds a control schema named `schemashift` (nothing written when not).
pub async fn has_control_schema(target_dsn: &str) -> anyhow::Result<bool> {
    Ok(connect(target_dsn)
        .await?
        .query_one("SELECT to_regnamespace('schemashift') IS NOT NULL", &[])
        .await?
        .get(0))
}

/// The privileges `plan --json` reports absent (optionally on one side only).
pub fn absent_privileges<'a>(plan: &'a serde_json::Value, side: Option<&str>) -> Vec<&'a str> {
    plan["privileges"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|p| p["present"] == false && side.is_none_or(|s| p["side"] == s))
        .filter_map(|p| p["privilege"].as_str())
        .collect()
}

/// Shards done in the target's control state (0 before there is one).
pub async fn shards_done(target: &Client) -> i64 {
    target
        .query_opt(
            "SELECT count(*) FILTER (WHERE state = 'done') FROM schemashift.shards",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map_or(0, |r| r.get(0))
}

pub async fn wait_shards_done(target: &Client, n: i64, run: &mut Proc) -> anyhow::Result<()> {
    loop {
        let done = shards_done(target).await;
        if done >= n {
            return Ok(());
        }
        anyhow::ensure!(run.is_running(), "{}", run.stderr_tail());
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_with_db_replaces_only_the_database() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5501",
                "postgres://postgres@127.0.0.1:5501/x",
            ),
            (
                "postgres://postgres@127.0.0.1:5501/",
                "postgres://postgres@127.0.0.1:5501/x",
            ),
            (
                "postgres://u@h:1/app?sslmode=disable",
                "postgres://u@h:1/x?sslmode=disable",
            ),
            ("postgresql://h", "postgresql://h/x"),
            ("host=h port=1", "host=h port=1 dbname=x"),
        ];
        for (base, want) in cases {
            assert_eq!(dsn_with_db(base, "x"), want, "{base}");
        }
    }

    #[test]
    fn db_stem_is_a_safe_identifier() {
        assert_eq!(
            db_stem("Backfill::kill -9 worker"),
            "backfill__kill__9_worker"
        );
        assert_eq!(db_stem(""), "test");
        assert!(db_stem(&"x".repeat(100)).len() <= 40);
    }
}
