//! Target indexes during the backfill: maintaining a B-tree row by row costs about twice
//! what building it once costs (measured on the scenario: the email unique index alone took
//! 4.5 CPU-seconds per million rows during COPY, 2 to build after). So the run records and
//! drops the migrated target tables' indexes when it starts, primary keys and unique
//! constraints included, and builds them again, in parallel. Shards do not need the key's
//! index: a shard's rows and its done mark commit in one transaction fenced by the lease
//! epoch, so a shard lands once.
//!
//! Unique indexes (constraints or not) are built when the last shard is copied, before
//! replay writes anything: replay's upserts need the key's, and a duplicate the new schema
//! forbids should stop the run then, not after the catch-up. The others wait until replay
//! has caught up with the changes made during the backfill: each change would otherwise
//! add an entry to every one of them (on the scenario, replay spends 10–12.5 target
//! CPU-seconds per million changes without the three name indexes, 20–23 with them;
//! docs/benchmarks-native.md), while one build afterwards costs about what it would
//! have cost before (it reads the rows replay added too).

use crate::constraints::{constraint_exists, db, pending_rows, restored_sql};
use crate::control::Store;
use crate::error::CoordinatorError;
use schemashift_common::plan::RunPlan;
use schemashift_common::sql::quote_ident;
use tokio_postgres::{Client, Transaction};
use tracing::Instrument;

/// Inside the run's creating transaction (after the foreign keys of the migrated tables are
/// dropped): records and drops the indexes of the migrated target tables. Kept in place:
/// indexes a foreign key of another table references, the replica identity index,
/// exclusion and deferrable constraints, and constraint indexes of partitioned tables.
pub async fn record_and_drop(
    tx: &Transaction<'_>,
    store: &Store,
    plan: &RunPlan,
) -> Result<usize, CoordinatorError> {
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(db("reading indexes"))?;
    let mut n = 0;
    for t in &plan.tables {
        let rows = tx
            .query(
                "SELECT i.indrelid::regclass::text, c.relname::text, pg_get_indexdef(i.indexrelid), \
                   n.nspname::text, k.contype::text, \
                   (SELECT coalesce(sum(CASE WHEN a.attnum IS NULL THEN 2 \
                                             WHEN a.attcollation <> 0 THEN 3 ELSE 1 END), 1)::int \
                    FROM unnest(i.indkey::int2[]) AS key(n) \
                    LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = key.n) \
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_class r ON r.oid = i.indrelid \
                 LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid AND k.conrelid = i.indrelid \
                   AND k.contype IN ('p', 'u', 'x') \
                 WHERE i.indrelid = to_regclass($1) AND NOT i.indisreplident \
                   AND (k.oid IS NULL OR (k.contype IN ('p', 'u') AND NOT k.condeferrable \
                                          AND r.relkind = 'r')) \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint f \
                                   WHERE f.contype = 'f' AND f.conindid = i.indexrelid) \
                 ORDER BY c.relname",
                &[&t.target.to_string()],
            )
            .await
            .map_err(db("reading indexes"))?;
        for r in &rows {
            let (table, name, def, schema): (String, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let (constraint, cost): (Option<String>, i32) = (r.get(4), r.get(5));
            tx.execute(
                &format!(
                    "INSERT INTO {} (table_name, name, definition, constraint_type, sort_cost) \
                     VALUES ($1, $2, $3, $4, $5)",
                    store.sql.table("indexes")
                ),
                &[&table, &name, &def, &constraint, &cost],
            )
            .await
            .map_err(db("recording indexes"))?;
            // regclass text is already quoted as needed.
            let drop = match constraint {
                Some(_) => format!("ALTER TABLE {table} DROP CONSTRAINT {}", quote_ident(&name)),
                None => format!("DROP INDEX {}.{}", quote_ident(&schema), quote_ident(&name)),
            };
            tx.batch_execute(&drop)
                .await
                .map_err(db("dropping indexes for the backfill"))?;
            tracing::info!(table = %table, index = %name, "index dropped for the backfill");
            n += 1;
        }
    }
    tx.batch_execute("RESET search_path")
        .await
        .map_err(db("reading indexes"))?;
    Ok(n)
}

/// Which recorded indexes a build puts back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexSet {
    /// Unique ones (primary keys and unique constraints included): before replay.
    Unique,
    /// All of them: once replay has caught up, and by `cleanup`.
    All,
}

/// How a build runs.
pub struct BuildOptions<'a> {
    pub set: IndexSet,
    /// Sessions building at once.
    pub parallel: usize,
    pub low_priority: bool,
    pub gate: Option<schemashift_common::fleet::MemberGate>,
    /// Tables whose indexes wait (stopped tables: copied again when they resume).
    pub skip_tables: &'a [String],
}

/// One recorded index not put back yet.
struct Pending {
    table: String,
    name: String,
    definition: String,
    /// `p` or `u`: the constraint it backed.
    constraint: Option<String>,
    sort_cost: i32,
}

impl Pending {
    fn unique(&self) -> bool {
        self.constraint.is_some() || self.definition.starts_with("CREATE UNIQUE INDEX ")
    }
}

/// Builds the recorded indexes of `opts.set` not built yet, `parallel` at a time (each on
/// its own session; builds of one table run together), then puts their primary key and
/// unique constraints back on the built indexes (`ADD CONSTRAINT ... USING INDEX`: no
/// second scan). Returns how many indexes.
pub async fn rebuild(
    target_dsn: &schemashift_common::spec::Dsn,
    target: &Client,
    store: &Store,
    opts: BuildOptions<'_>,
) -> Result<usize, CoordinatorError> {
    let BuildOptions {
        set,
        parallel,
        low_priority,
        gate,
        skip_tables,
    } = opts;
    let mut builds = pending(target, store).await?;
    if set == IndexSet::Unique {
        builds.retain(Pending::unique);
    }
    retain_unskipped(target, &mut builds, skip_tables).await?;
    // Sessions pop from the end: the costliest builds start first (longest job first), so
    // the last one to finish is a cheap one.
    builds.sort_by_key(|p| p.sort_cost);
    let built = builds.len();
    let constraints: Vec<(String, String, Option<String>)> = builds
        .iter()
        .filter(|p| p.constraint.is_some())
        .map(|p| (p.table.clone(), p.name.clone(), p.constraint.clone()))
        .collect();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(builds));
    let mut tasks = tokio::task::JoinSet::new();
    let sessions = parallel.max(1).min(built);
    for _ in 0..sessions {
        let session = schemashift_common::pg::connect(target_dsn, "target").await?;
        if low_priority {
            // Parallel maintenance workers are background workers of their own, which
            // would keep the normal priority: the build runs in the reniced backend alone.
            if schemashift_common::pg::lower_priority(&session).await {
                session
                    .batch_execute("SET max_parallel_maintenance_workers = 0")
                    .await
                    .map_err(db("configuring an index build session"))?;
            }
        }
        let (queue, done_sql) = (queue.clone(), restored_sql(store, "indexes"));
        let gate = gate.clone();
        tasks.spawn(async move {
            loop {
                // A fleet's per-server limit counts builds too; the pass is taken before
                // popping, so a waiting session leaves the build to a session that got in.
                let _pass = match &gate {
                    Some(g) => Some(g.build().await),
                    None => None,
                };
                let Some(p) = queue.lock().await.pop() else {
                    return Ok::<_, CoordinatorError>(());
                };
                let t0 = std::time::Instant::now();
                // A crash after the build and before the mark leaves the index there.
                let def = p
                    .definition
                    .replacen("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1)
                    .replacen("CREATE UNIQUE INDEX ", "CREATE UNIQUE INDEX IF NOT EXISTS ", 1);
                session.batch_execute(&def).await.map_err(db(&format!(
                    "building index {} on {} (it is recorded in the control schema; \
                     `schemashift cleanup` builds it again)",
                    p.name, p.table
                )))?;
                // A constraint's index is marked once the constraint is back.
                if p.constraint.is_none() {
                    session
                        .execute(&done_sql, &[&p.table, &p.name])
                        .await
                        .map_err(db("recording rebuilt indexes"))?;
                }
                tracing::info!(table = %p.table, index = %p.name, seconds = t0.elapsed().as_secs_f64(), "index built");
            }
        }.instrument(tracing::Span::current()));
    }
    while let Some(j) = tasks.join_next().await {
        j.map_err(|e| CoordinatorError::State(format!("index build task panicked: {e}")))??;
    }
    // After every build: attaching takes an ACCESS EXCLUSIVE lock, which would queue behind
    // (and then hold up) builds still running on the same table.
    crate::failpoint("indexes-built-constraints-not-attached");
    for (table, name, kind) in constraints {
        attach_constraint(target, store, &table, &name, kind.as_deref()).await?;
    }
    Ok(built)
}

/// Puts a primary key or unique constraint back on its rebuilt index, unless a run that
/// crashed right after did so already, and marks the index restored.
async fn attach_constraint(
    target: &Client,
    store: &Store,
    table: &str,
    name: &str,
    kind: Option<&str>,
) -> Result<(), CoordinatorError> {
    let present = constraint_exists(target, table, name).await?;
    if !present {
        let what = match kind {
            Some("p") => "PRIMARY KEY",
            _ => "UNIQUE",
        };
        let q = quote_ident(name);
        target
            .batch_execute(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT {q} {what} USING INDEX {q}"
            ))
            .await
            .map_err(db(&format!("putting back constraint {name} on {table}")))?;
        tracing::info!(table = %table, constraint = %name, "constraint put back on its rebuilt index");
    }
    target
        .execute(&restored_sql(store, "indexes"), &[&table, &name])
        .await
        .map_err(db("recording rebuilt indexes"))?;
    Ok(())
}

/// Whether recorded indexes that are not unique wait to be built, on tables other than
/// `skip_tables`.
pub async fn deferred_pending(
    target: &Client,
    store: &Store,
    skip_tables: &[String],
) -> Result<bool, CoordinatorError> {
    let mut deferred = pending(target, store).await?;
    deferred.retain(|p| !p.unique());
    retain_unskipped(target, &mut deferred, skip_tables).await?;
    Ok(!deferred.is_empty())
}

/// Drops the builds of `skip_tables` from `builds`.
async fn retain_unskipped(
    target: &Client,
    builds: &mut Vec<Pending>,
    skip_tables: &[String],
) -> Result<(), CoordinatorError> {
    if skip_tables.is_empty() || builds.is_empty() {
        return Ok(());
    }
    // Recorded names are regclass text: compare as relations, not as spellings.
    let names: Vec<String> = builds.iter().map(|p| p.table.clone()).collect();
    let skip: std::collections::HashSet<String> = target
        .query(
            "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) = ANY \
             (SELECT to_regclass(s) FROM unnest($2::text[]) AS s)",
            &[&names, &skip_tables],
        )
        .await
        .map_err(db("reading indexes"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    builds.retain(|p| !skip.contains(&p.table));
    Ok(())
}

/// Recorded indexes not put back yet, as `index on table`.
pub async fn to_build(target: &Client, store: &Store) -> Result<Vec<String>, CoordinatorError> {
    Ok(pending(target, store)
        .await?
        .iter()
        .map(|p| format!("{} on {}", p.name, p.table))
        .collect())
}

/// Recorded indexes not put back yet.
async fn pending(target: &Client, store: &Store) -> Result<Vec<Pending>, CoordinatorError> {
    Ok(pending_rows(
        target,
        store,
        "indexes",
        "table_name, name, definition, constraint_type, sort_cost",
    )
    .await?
    .iter()
    .map(|r| Pending {
        table: r.get(0),
        name: r.get(1),
        definition: r.get(2),
        constraint: r.get(3),
        sort_cost: r.get(4),
    })
    .collect())
}
