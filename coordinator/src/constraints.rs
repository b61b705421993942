//! Foreign keys between target tables: shards and replay partitions commit in any order,
//! so a child row may land before its parent. The run records and drops the foreign keys
//! of the migrated target tables when it starts, and puts them back after the cutover
//! (`NOT VALID`, then `VALIDATE`, which does not block writes) or at cleanup.

use crate::control::Store;
use crate::error::CoordinatorError;
use schemashift_common::plan::RunPlan;
use schemashift_common::sql::quote_ident;
use tokio_postgres::{Client, Transaction};

pub(crate) fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
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

/// Puts back every recorded foreign key not restored yet; returns how many. A key whose
/// validation fails is left NOT VALID and reported.
pub async fn restore(target: &Client, store: &Store) -> Result<usize, CoordinatorError> {
    let rows = pending(target, store).await?;
    for (table, name, def) in &rows {
        let name_q = quote_ident(name);
        let present = constraint_exists(target, table, name).await?;
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
            .execute(&restored_sql(store, "constraints"), &[&table, &name])
            .await
            .map_err(db("recording restored foreign keys"))?;
        tracing::info!(table = %table, constraint = %name, "foreign key restored and validated");
    }
    Ok(rows.len())
}

/// Recorded (table, name, definition) of foreign keys not put back yet.
async fn pending(
    target: &Client,
    store: &Store,
) -> Result<Vec<(String, String, String)>, CoordinatorError> {
    Ok(
        pending_rows(target, store, "constraints", "table_name, name, definition")
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
    )
}

/// `columns` of the recorded rows of `kind` ("constraints" or "indexes") not put back yet,
/// in name order; none when the control schema has no such table.
pub(crate) async fn pending_rows(
    target: &Client,
    store: &Store,
    kind: &str,
    columns: &str,
) -> Result<Vec<tokio_postgres::Row>, CoordinatorError> {
    if !store.has_table(target, kind).await? {
        return Ok(Vec::new());
    }
    target
        .query(
            &format!(
                "SELECT {columns} FROM {} WHERE NOT restored ORDER BY table_name, name",
                store.sql.table(kind)
            ),
            &[],
        )
        .await
        .map_err(db("reading the control schema"))
}

/// Marks one recorded row of `kind` put back: `$1` table, `$2` name.
pub(crate) fn restored_sql(store: &Store, kind: &str) -> String {
    format!(
        "UPDATE {} SET restored = true WHERE table_name = $1 AND name = $2",
        store.sql.table(kind)
    )
}

/// Whether `table` (regclass text) has a constraint of this name.
pub(crate) async fn constraint_exists(
    target: &Client,
    table: &str,
    name: &str,
) -> Result<bool, CoordinatorError> {
    Ok(target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $2)",
            &[&table, &name],
        )
        .await
        .map_err(db("reading constraints"))?
        .get(0))
}
