//! The FDW strategy's plumbing on the target: postgres_fdw, a server for the source, a user
//! mapping with the source's credentials, and one foreign table per FDW table in the control
//! schema. Everything is created idempotently when a run starts or resumes, and dropped by
//! cleanup (the foreign tables go with the control schema, the server explicitly).

use crate::error::CoordinatorError;
use schemashift_common::control::ControlSql;
use schemashift_common::plan::{RunPlan, Transfer};
use schemashift_common::spec::Dsn;
use schemashift_common::sql::{quote_ident, quote_literal};
use tokio_postgres::config::Host;
use tokio_postgres::Client;

/// The foreign server's name for a control schema.
fn server(control_schema: &str) -> String {
    quote_ident(&format!("{control_schema} source"))
}

/// Creates what the plan's FDW tables read through, unless there.
pub async fn ensure(target: &Client, source: &Dsn, plan: &RunPlan) -> Result<(), CoordinatorError> {
    let tables: Vec<_> = plan
        .tables
        .iter()
        .filter(|t| t.transfer == Transfer::Fdw)
        .collect();
    if tables.is_empty() {
        return Ok(());
    }
    let cfg: tokio_postgres::Config = source.expose().parse().map_err(|_| {
        CoordinatorError::State(format!(
            "the source connection string ({}) cannot be read for postgres_fdw",
            source.redacted()
        ))
    })?;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let dbname = cfg.get_dbname().unwrap_or(user);
    let srv = server(&plan.control_schema);
    let control = ControlSql::new(&plan.control_schema);
    let mut sql = format!(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; \
         CREATE SERVER IF NOT EXISTS {srv} FOREIGN DATA WRAPPER postgres_fdw \
         OPTIONS (host {}, port {}, dbname {}, fetch_size '10000', application_name 'schemashift');",
        quote_literal(&host),
        quote_literal(&port.to_string()),
        quote_literal(dbname)
    );
    let mut options = vec![format!("user {}", quote_literal(user))];
    if let Some(pw) = cfg.get_password() {
        options.push(format!(
            "password {}",
            quote_literal(&String::from_utf8_lossy(pw))
        ));
    }
    sql.push_str(&format!(
        "CREATE USER MAPPING IF NOT EXISTS FOR CURRENT_USER SERVER {srv} OPTIONS ({});",
        options.join(", ")
    ));
    for t in tables {
        let cols: Vec<String> = t
            .source_columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.sql_type))
            .collect();
        sql.push_str(&format!(
            "CREATE FOREIGN TABLE IF NOT EXISTS {} ({}) SERVER {srv} \
             OPTIONS (schema_name {}, table_name {});",
            control.table(&t.foreign_table_name()),
            cols.join(", "),
            quote_literal(&t.source.schema),
            quote_literal(&t.source.name)
        ));
    }
    // The statement holds the source's password: its error text is ours, not the server's
    // echo of the statement.
    target.batch_execute(&sql).await.map_err(|e| {
        CoordinatorError::State(format!(
            "setting up postgres_fdw on the target for the fdw strategy failed: {} \
             (the target role needs to create the extension, a server and foreign tables; \
             or use strategy copy)",
            e.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| "connection lost".into())
        ))
    })?;
    tracing::info!(server = %srv, "postgres_fdw set up for the fdw strategy");
    Ok(())
}

/// Drops the source server and what depends on it (user mapping, foreign tables).
pub async fn drop(target: &Client, control_schema: &str) -> Result<(), CoordinatorError> {
    target
        .batch_execute(&format!(
            "DROP SERVER IF EXISTS {} CASCADE",
            server(control_schema)
        ))
        .await
        .map_err(|e| CoordinatorError::db("dropping the postgres_fdw server", &e))
}
