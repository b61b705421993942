//! The peers schemashift is measured against, each run the way its users run it: binary
//! COPY pipes between two psql processes, postgres_fdw, pgcopydb and native logical
//! replication.

use super::{
    client, target_table_and_indexes, Bench, Collected, Indexes, Kind, Outcome, SOURCE_DB,
};
use crate::cluster::bin_dir;
use crate::scenario::{SOURCE_DDL, SPLIT_FUNCTIONS, TARGET_DDL};
use anyhow::Context;
use schemashift_common::sql::quote_ident;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::task::JoinSet;
use tokio_postgres::Client;

/// One stream: the source evaluates the mapping, the target loads binary rows. psql
/// connections and statements come from the environment, so nothing is shell-quoted.
const PIPE: &str = "\"$PSQL\" -X -q -v ON_ERROR_STOP=1 -d \"$SRC\" -c \"$OUT_SQL\" \
    | \"$PSQL\" -X -q -v ON_ERROR_STOP=1 -d \"$TGT\" -c \"$IN_SQL\"";

const COPY_IN: &str = "COPY public.users (id, email, first_name, last_name, bio, created_at, \
    updated_at) FROM STDIN (FORMAT binary)";

/// The same mapping as the spec's, as plain SQL over the source table.
const MAPPED: &str = "id, email, split_first(full_name), split_last(full_name), bio, \
    created_at, updated_at";

/// How often logical replication's sync state is polled.
const SYNC_POLL: Duration = Duration::from_millis(20);
/// A sync slower than this is reported as a failure rather than waited for forever.
const SYNC_LIMIT: Duration = Duration::from_secs(3600);

/// The raw pipe with `k` streams, indexes in place and rebuilt after the load.
pub(super) async fn raw_at(b: &Bench, c: &mut Collected, k: usize) {
    for idx in [Indexes::InPlace, Indexes::Rebuilt] {
        let label = format!("raw_{k}_{}", idx.label().replace(' ', "_"));
        let (table_only, _, _) = target_table_and_indexes();
        let ddl = if idx == Indexes::InPlace {
            TARGET_DDL
        } else {
            &table_only
        };
        b.measure(c, &label, ddl, |db| raw_pipe(b, db, k, idx))
            .await;
    }
}

/// The raw pipe with the name indexes excluded, then pgcopydb (two indexes each).
pub(super) async fn two_indexes(b: &Bench, c: &mut Collected) {
    let (table_only, _, _) = target_table_and_indexes();
    let k = b.workers;
    b.measure(c, &format!("raw_{k}_excluded"), &table_only, |db| {
        raw_pipe(b, db, k, Indexes::Excluded)
    })
    .await;
    run_pgcopydb(b, c).await;
}

/// The raw pipe over TLS, rebuilt as schemashift's backfill does (like with like).
pub(super) async fn raw_tls(b: &Bench, c: &mut Collected) {
    let (table_only, _, _) = target_table_and_indexes();
    let k = b.workers;
    super::tls::rows(b, c, &format!("raw_{k}_rebuilt_tls"), &table_only, |db| {
        raw_pipe_with(b, db, k, Indexes::Rebuilt, true)
    })
    .await;
}

pub(super) async fn run_fdw(b: &Bench, c: &mut Collected) {
    b.measure(c, "fdw", TARGET_DDL, |db| fdw(b, db)).await;
}

pub(super) async fn run_logical(b: &Bench, c: &mut Collected) {
    b.measure(c, "logical", SOURCE_DDL, |db| logical(b, db))
        .await;
}

/// Real functions, not pg_temp ones: the peers evaluate them from plain psql sessions.
pub(super) async fn create_split_functions(c: &Client) -> anyhow::Result<()> {
    for f in SPLIT_FUNCTIONS {
        c.batch_execute(f)
            .await
            .context("creating split functions")?;
    }
    Ok(())
}

/// The last `n` lines of a process's stderr, for an error message.
fn stderr_tail(out: &Output, n: usize) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn raw_pipe(
    b: &Bench,
    db: String,
    streams: usize,
    indexes: Indexes,
) -> anyhow::Result<Outcome> {
    raw_pipe_with(b, db, streams, indexes, false).await
}

async fn raw_pipe_with(
    b: &Bench,
    db: String,
    streams: usize,
    indexes: Indexes,
    tls: bool,
) -> anyhow::Result<Outcome> {
    let wrap = |dsn: String| if tls { super::tls::require(&dsn) } else { dsn };
    // The pipe's psql sessions carry the data and use TLS in a TLS row; the index builds
    // after it are server-side work, run from our own (plain) sessions.
    let target = b.tgt.dsn(&db);
    let (pipe_target, source) = (wrap(target.clone()), wrap(b.source_dsn()));
    let span = i128::from(b.max_id) - i128::from(b.min_id) + 1;
    let bound = |i: usize| (i128::from(b.min_id) + span * i as i128 / streams as i128) as i64;
    let span = b.span().await;
    let mut pipes = JoinSet::new();
    for i in 0..streams {
        let (lo, hi) = (bound(i), bound(i + 1));
        let out_sql = format!(
            "COPY (SELECT {MAPPED} FROM public.users WHERE id >= {lo} AND id < {hi}) \
             TO STDOUT (FORMAT binary)"
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(PIPE)
            .env("PSQL", &b.psql)
            .env("SRC", &source)
            .env("TGT", &pipe_target)
            .env("OUT_SQL", out_sql)
            .env("IN_SQL", COPY_IN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        pipes.spawn(async move { cmd.output().await });
    }
    while let Some(r) = pipes.join_next().await {
        let out = r.context("pipe task")?.context("running sh")?;
        anyhow::ensure!(
            out.status.success(),
            "pipe failed ({}): {}",
            out.status,
            stderr_tail(&out, 5)
        );
    }
    if indexes != Indexes::InPlace {
        // Every index in its own session; the constraints are attached after all builds
        // (attaching locks the table exclusively).
        let (_, mut create, attach) = target_table_and_indexes();
        if indexes == Indexes::Excluded {
            create.retain(|sql| sql.starts_with("CREATE UNIQUE"));
        }
        let mut builds = JoinSet::new();
        for sql in create {
            let dsn = target.clone();
            builds.spawn(async move {
                let c = client(&dsn).await?;
                c.batch_execute(&sql).await.context("building an index")
            });
        }
        while let Some(r) = builds.join_next().await {
            r.context("index build task")??;
        }
        let c = client(&target).await?;
        for sql in attach {
            c.batch_execute(&sql)
                .await
                .context("attaching a constraint")?;
        }
    }
    let spent = b.spent(&span).await;
    let count = b.check_rows(&db).await?;
    let mut m = b.copied(
        Kind::RawPipe,
        if tls {
            "raw COPY pipe (psql to psql), TLS"
        } else {
            "raw COPY pipe (psql to psql)"
        },
        streams,
        indexes,
    );
    m.tls = tls;
    Ok(Outcome::Measured(vec![b.timed(
        m,
        count,
        (spent.seconds, spent.seconds),
        spent.cpu,
    )]))
}

async fn fdw(b: &Bench, db: String) -> anyhow::Result<Outcome> {
    let t = client(&b.tgt.dsn(&db)).await?;
    if !schemashift_common::pg::extension_available(&t, "postgres_fdw").await? {
        return Ok(Outcome::Skipped(
            "postgres_fdw not installed with this PostgreSQL (apt-get install postgresql-15)"
                .into(),
        ));
    }
    let started = Instant::now();
    // fetch_size 10000 instead of the default 100: one round trip per 100 rows would
    // measure latency, not the FDW.
    t.batch_execute(&format!(
        "CREATE EXTENSION postgres_fdw;
         CREATE SERVER src FOREIGN DATA WRAPPER postgres_fdw
             OPTIONS (host '127.0.0.1', port '{}', dbname '{SOURCE_DB}', fetch_size '10000');
         CREATE USER MAPPING FOR postgres SERVER src OPTIONS (user 'postgres');
         CREATE SCHEMA src;
         IMPORT FOREIGN SCHEMA public LIMIT TO (users) FROM SERVER src INTO src",
        b.src.port()
    ))
    .await
    .context("setting up postgres_fdw")?;
    create_split_functions(&t).await?;
    let span = b.span().await;
    t.execute(
        &format!(
            "INSERT INTO public.users (id, email, first_name, last_name, bio, created_at, \
             updated_at) SELECT {MAPPED} FROM src.users"
        ),
        &[],
    )
    .await
    .context("INSERT ... SELECT over postgres_fdw")?;
    let spent = b.spent(&span).await;
    let wall = started.elapsed().as_secs_f64();
    let count = b.check_rows(&db).await?;
    let m = b.copied(
        Kind::Fdw,
        "postgres_fdw INSERT ... SELECT",
        1,
        Indexes::InPlace,
    );
    Ok(Outcome::Measured(vec![b.timed(
        m,
        count,
        (spent.seconds, wall),
        spent.cpu,
    )]))
}

/// A program on PATH.
pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The raw pipe with `k` streams into the bare table, its five indexes built after.
pub(super) async fn run_raw_rebuilt(b: &Bench, c: &mut Collected, k: usize) {
    let (table_only, _, _) = target_table_and_indexes();
    b.measure(c, &format!("raw_{k}_rebuilt"), &table_only, |db| {
        raw_pipe(b, db, k, Indexes::Rebuilt)
    })
    .await;
}

pub(super) async fn run_pgcopydb(b: &Bench, c: &mut Collected) {
    b.measure(c, "pgcopydb", "", |db| pgcopydb(b, db)).await;
}

async fn pgcopydb(b: &Bench, db: String) -> anyhow::Result<Outcome> {
    let Some(bin) = on_path("pgcopydb") else {
        return Ok(Outcome::Skipped(
            "pgcopydb not installed (apt-get install pgcopydb)".into(),
        ));
    };
    let k = b.workers;
    let work = tempfile::Builder::new()
        .prefix("schemashift-bench-pgcopydb-")
        .tempdir()
        .context("creating pgcopydb's work directory")?;
    let mut cmd = Command::new(bin);
    cmd.arg("clone")
        .arg("--source")
        .arg(b.source_dsn())
        .arg("--target")
        .arg(b.tgt.dsn(&db))
        // pgcopydb refuses an existing directory as a leftover of a previous run.
        .arg("--dir")
        .arg(work.path().join("work"))
        .args([
            "--table-jobs",
            &k.to_string(),
            "--index-jobs",
            &k.to_string(),
        ])
        .args(["--no-owner", "--no-acl", "--skip-extensions"]);
    if k > 1 {
        // pgcopydb copies a table in ceil(pg_table_size / threshold) parts; without
        // this our single table would be one COPY whatever --table-jobs says.
        let threshold = (b.bytes.max(1) as u64).div_ceil(k as u64);
        cmd.arg("--split-tables-larger-than")
            .arg(threshold.to_string());
    }
    // Its pg_dump and pg_restore from the servers' own version.
    let mut path = vec![bin_dir()?];
    if let Some(p) = std::env::var_os("PATH") {
        path.extend(std::env::split_paths(&p));
    }
    cmd.env("PATH", std::env::join_paths(path)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let span = b.span().await;
    let out = cmd.output().await.context("running pgcopydb")?;
    let spent = b.spent(&span).await;
    anyhow::ensure!(
        out.status.success(),
        "pgcopydb clone failed ({}): {}",
        out.status,
        stderr_tail(&out, 8)
    );
    let count = b.check_rows(&db).await?;
    let mut m = b.copied(Kind::Pgcopydb, "pgcopydb clone", k, Indexes::Rebuilt);
    m.note = Some(
        "untransformed: pgcopydb cannot transform; its indexes are the source's two, \
         and the time includes schema copy and VACUUM ANALYZE"
            .into(),
    );
    Ok(Outcome::Measured(vec![b.timed(
        m,
        count,
        (spent.seconds, spent.seconds),
        spent.cpu,
    )]))
}

/// Sessions on the source and on target database `db`, and a publication of the source
/// table named after `db` (its quoted name returned).
pub(super) async fn published(b: &Bench, db: &str) -> anyhow::Result<(Client, Client, String)> {
    let source = client(&b.source_dsn()).await?;
    let target = client(&b.tgt.dsn(db)).await?;
    let name = quote_ident(db);
    source
        .batch_execute(&format!("CREATE PUBLICATION {name} FOR TABLE public.users"))
        .await
        .context("creating the publication")?;
    Ok((source, target, name))
}

async fn logical(b: &Bench, db: String) -> anyhow::Result<Outcome> {
    let (source, target, name) = published(b, &db).await?;
    let span = b.span().await;
    let synced = sync(b, &target, &db).await;
    // The table's sync worker may still be exiting: its CPU counts once it is gone.
    if synced.is_ok() {
        sync_worker_gone(&target, &db).await?;
    }
    let spent = b.spent(&span).await;
    let dropped = drop_subscription(&source, &target, &name).await;
    let secs = synced?;
    dropped.context("dropping the subscription and publication")?;
    let count = b.check_rows(&db).await?;
    let mut m = b.copied(
        Kind::LogicalReplication,
        "logical replication initial sync",
        1,
        Indexes::InPlace,
    );
    m.note = Some(
        "untransformed: a subscription copies the table as it is; indexes are the source's two"
            .into(),
    );
    Ok(Outcome::Measured(vec![b.timed(
        m,
        count,
        (secs, secs),
        spent.cpu,
    )]))
}

/// Drops the subscription (and with it its slot on the source) and the publication, both
/// named `name` (quoted).
pub(super) async fn drop_subscription(
    source: &Client,
    target: &Client,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    target
        .batch_execute(&format!("DROP SUBSCRIPTION IF EXISTS {name}"))
        .await?;
    source
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}"))
        .await
}

/// Waits until the subscription's table sync worker has left `pg_stat_subscription`.
pub(super) async fn sync_worker_gone(target: &Client, name: &str) -> anyhow::Result<()> {
    workers_gone(target, name, "relid IS NOT NULL", "table sync").await
}

/// Waits until no worker of the subscription matching `filter` (a condition on
/// `pg_stat_subscription`, ours) is left.
pub(super) async fn workers_gone(
    target: &Client,
    name: &str,
    filter: &str,
    what: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < SYNC_LIMIT {
        let n: i64 = target
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_stat_subscription WHERE subname = $1 AND {filter}"
                ),
                &[&name],
            )
            .await?
            .get(0);
        if n == 0 {
            return Ok(());
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
    anyhow::bail!("the {what} worker of {name} still runs after {SYNC_LIMIT:?}")
}

/// Creates the subscription and waits until its table is synchronized; returns seconds.
pub(super) async fn sync(b: &Bench, target: &Client, name: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {n} CONNECTION 'host=127.0.0.1 port={} user=postgres \
             dbname={SOURCE_DB}' PUBLICATION {n} WITH (copy_data = true)",
            b.src.port(),
            n = quote_ident(name)
        ))
        .await
        .context("creating the subscription")?;
    loop {
        let state: Option<String> = target
            .query_opt(
                "SELECT r.srsubstate::text FROM pg_subscription_rel r \
                 JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1",
                &[&name],
            )
            .await?
            .map(|r| r.get(0));
        // 's': copied and synchronized; 'r': the apply worker has taken over too.
        if matches!(state.as_deref(), Some("s" | "r")) {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            started.elapsed() < SYNC_LIMIT,
            "initial sync not done after {SYNC_LIMIT:?}"
        );
        tokio::time::sleep(SYNC_POLL).await;
    }
}

/// First line a program prints for `--version`, if it runs.
/// How the peers were run, for the markdown report.
pub(super) const HOW: &str = "\
- **raw COPY pipe**: `psql SOURCE -c \"COPY (SELECT id, email, split_first(full_name), \
split_last(full_name), bio, created_at, updated_at FROM public.users WHERE id >= lo AND id < hi) \
TO STDOUT (FORMAT binary)\" | psql TARGET -c \"COPY public.users (...) FROM STDIN (FORMAT binary)\"`, \
as `sh -c` pipelines, one per id range (ranges split evenly between min and max id). \
*rebuilt*: the table is created without any index (no primary key or unique constraint \
either); after the copy its five indexes are built in five parallel sessions and the key and \
email constraints attached to theirs; the build is in the time. *excluded*: the three name \
indexes are never built (the key and email ones are). This is the speed limit of any \
tool built on COPY: no bookkeeping, no retries, no change capture.
- **postgres_fdw**: `IMPORT FOREIGN SCHEMA` of the source table (server option \
`fetch_size '10000'`), the split functions created on the target, one \
`INSERT INTO public.users SELECT ... FROM src.users`; the time is the INSERT, wall adds the setup.
- **pgcopydb clone**: the source table as it is (pgcopydb cannot transform) into an empty \
database, `--table-jobs K --index-jobs K --no-owner --no-acl --skip-extensions`, with \
`--split-tables-larger-than` set so the table is copied in K parts; the time includes its \
schema dump and restore, the two source indexes and its VACUUM ANALYZE.
- **logical replication initial sync**: `CREATE SUBSCRIPTION ... WITH (copy_data = true)` to \
a publication of the untransformed table, timed until `pg_subscription_rel` says synced.
";
