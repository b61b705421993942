//! Foreign keys between target tables: shards and replay partitions commit in any order,
//! so a child row may land before its parent. The run records and drops the foreign keys
//! of the migrated target tables when it starts, and puts them back after the cutover
//! (`NOT VALID`, then `VALIDATE`, which does not block writes) or at cleanup.

use crate::control::Store;
use crate::error::CoordinatorError;
use schemashift_common::plan::RunPlan;
use schemashift_common::sql::quote_ident;
use tokio_postgres::{Client, Transaction};

fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

/// Inside the run's creating transaction: records and drops the foreign keys declared
/// on the migrated target tables. Returns how many.
pub async fn record_and_drop(
    tx: &Transaction<'_>,
    store: &Store,
    plan: &RunPlan,
) -> Result<usize, CoordinatorError> {
    let tables: Vec<String> = plan.tables.iter().map(|t| t.target.to_string()).collect();
    // Fully qualified definitions, whatever the session's search_path.
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(db("reading foreign keys"))?;
    let rows = tx
        .query(
            "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE contype = 'f' AND conrelid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)",
            &[&tables],
        )
        .await
        .map_err(db("reading foreign keys"))?;
    for r in &rows {
        let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        tx.execute(
            &format!(
                "INSERT INTO {} (table_name, name, definition) VALUES ($1, $2, $3)",
                store.sql.table("constraints")
            ),
            &[&table, &name, &def],
        )
        .await
        .map_err(db("recording foreign keys"))?;
        // regclass text is already quoted as needed.
        tx.batch_execute(&format!(
            "ALTER TABLE {table} DROP CONSTRAINT {}",
            quote_ident(&name)
        ))
        .await
        .map_err(db("dropping foreign keys for the load"))?;
        tracing::info!(table = %table, constraint = %name, "foreign key dropped for the load");
    }
    tx.batch_execute("RESET search_path")
        .await
        .map_err(db("reading foreign keys"))?;
    Ok(rows.len())
}

/// Inside the run's creating transaction: records and drops the secondary indexes of the
/// migrated target tables that back no constraint and are not the key's index.
pub async fn record_and_drop_indexes(
    tx: &Transaction<'_>,
    store: &Store,
    plan: &RunPlan,
) -> Result<usize, CoordinatorError> {
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(db("reading indexes"))?;
    let mut n = 0;
    for t in &plan.tables {
        let key: Vec<String> = t.target_key.iter().map(|k| k.name.clone()).collect();
        let rows = tx
            .query(
                "SELECT i.indrelid::regclass::text, c.relname::text, pg_get_indexdef(i.indexrelid), \
                   n.nspname::text, (SELECT array_agg(a.attname::text ORDER BY a.attname) \
                     FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) \
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE i.indrelid = to_regclass($1) AND NOT i.indisprimary \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
                &[&t.target.to_string()],
            )
            .await
            .map_err(db("reading indexes"))?;
        for r in &rows {
            let (table, name, def, schema): (String, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let mut cols: Vec<String> = r.get::<_, Option<Vec<String>>>(4).unwrap_or_default();
            let mut k = key.clone();
            cols.sort();
            k.sort();
            if cols == k {
                continue; // replay's upserts need the key's unique index
            }
            tx.execute(
                &format!(
                    "INSERT INTO {} (table_name, name, definition) VALUES ($1, $2, $3)",
                    store.sql.table("indexes")
                ),
                &[&table, &name, &def],
            )
            .await
            .map_err(db("recording indexes"))?;
            tx.batch_execute(&format!(
                "DROP INDEX {}.{}",
                quote_ident(&schema),
                quote_ident(&name)
            ))
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

/// Builds every recorded index not built yet, `parallel` at a time (each on its own
/// session; builds of one table can run together). Returns how many.
pub async fn rebuild_indexes(
    target_dsn: &schemashift_common::spec::Dsn,
    target: &Client,
    store: &Store,
    parallel: usize,
    low_priority: bool,
) -> Result<usize, CoordinatorError> {
    let todo = pending(target, store, "indexes").await?;
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(todo.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1).min(todo.len()) {
        let session = schemashift_common::pg::connect(target_dsn, "target").await?;
        if low_priority {
            schemashift_common::pg::lower_priority(&session).await;
        }
        let (queue, done_sql) = (
            queue.clone(),
            format!(
                "UPDATE {} SET restored = true WHERE table_name = $1 AND name = $2",
                store.sql.table("indexes")
            ),
        );
        tasks.spawn(async move {
            loop {
                let Some((table, name, def)) = queue.lock().await.pop() else {
                    return Ok::<_, CoordinatorError>(());
                };
                let t0 = std::time::Instant::now();
                // A crash after the build and before the mark leaves the index there.
                let def = def.replacen("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1)
                    .replacen("CREATE UNIQUE INDEX ", "CREATE UNIQUE INDEX IF NOT EXISTS ", 1);
                session
                    .batch_execute(&def)
                    .await
                    .map_err(db(&format!("building index {name} on {table}")))?;
                session
                    .execute(&done_sql, &[&table, &name])
                    .await
                    .map_err(db("recording rebuilt indexes"))?;
                tracing::info!(table = %table, index = %name, seconds = t0.elapsed().as_secs_f64(), "index built");
            }
        });
    }
    while let Some(j) = tasks.join_next().await {
        j.map_err(|e| CoordinatorError::State(format!("index build task panicked: {e}")))??;
    }
    Ok(todo.len())
}

/// Puts back every recorded foreign key not restored yet; returns how many. A key whose
/// validation fails is left NOT VALID and reported.
pub async fn restore(target: &Client, store: &Store) -> Result<usize, CoordinatorError> {
    let rows = pending(target, store, "constraints").await?;
    for (table, name, def) in &rows {
        let name_q = quote_ident(name);
        let present: bool = target
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $2)",
                &[&table, &name],
            )
            .await
            .map_err(db("reading foreign keys"))?
            .get(0);
        if !present {
            target
                .batch_execute(&format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {name_q} {def} NOT VALID"
                ))
                .await
                .map_err(db(&format!("restoring foreign key {name} on {table}")))?;
        }
        target
            .batch_execute(&format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name_q}"))
            .await
            .map_err(db(&format!(
                "validating foreign key {name} on {table} (it is back as NOT VALID)"
            )))?;
        target
            .execute(
                &format!(
                    "UPDATE {} SET restored = true WHERE table_name = $1 AND name = $2",
                    store.sql.table("constraints")
                ),
                &[&table, &name],
            )
            .await
            .map_err(db("recording restored foreign keys"))?;
        tracing::info!(table = %table, constraint = %name, "foreign key restored and validated");
    }
    Ok(rows.len())
}

/// Recorded (table, name, definition) of `kind` ("constraints" or "indexes") not put
/// back yet; none when the control schema has no such table.
async fn pending(
    target: &Client,
    store: &Store,
    kind: &str,
) -> Result<Vec<(String, String, String)>, CoordinatorError> {
    let table = store.sql.table(kind);
    let exists: bool = target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(db("reading the control schema"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(target
        .query(
            &format!(
                "SELECT table_name, name, definition FROM {table} WHERE NOT restored ORDER BY table_name, name"
            ),
            &[],
        )
        .await
        .map_err(db("reading the control schema"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
