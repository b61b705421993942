//! The run's history: events kept in `<control schema>_history`, which `cleanup` does not
//! drop, so "what ran, when, who switched, how long the freeze was" can be answered after
//! the run is gone. Writing an event never fails the run: a history that cannot be written
//! is said in the log.

use crate::error::CoordinatorError;
use schemashift_common::control::ControlSql;
use schemashift_common::pg::connect;
use schemashift_common::spec::Spec;
use serde::Serialize;
use tokio_postgres::GenericClient;

/// The operating-system user and host of this process, for operator commands.
pub fn operator() -> (String, String) {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    (user, host)
}

/// Who did it: the process itself, or an operator's command (with OS user and host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Run,
    Operator,
}

/// Creates the history schema and table if missing (runs made before it existed).
pub async fn ensure(client: &impl GenericClient, sql: &ControlSql) -> Result<(), CoordinatorError> {
    client
        .batch_execute(&sql.history_ddl())
        .await
        .map_err(|e| CoordinatorError::db("creating the history table", &e))
}

/// Records one event of the run whose control schema is `sql`; a failure is logged only.
pub async fn record(
    client: &impl GenericClient,
    sql: &ControlSql,
    kind: &str,
    detail: serde_json::Value,
    by: By,
) {
    let (user, host) = match by {
        By::Operator => {
            let (u, h) = operator();
            (Some(u), Some(h))
        }
        By::Run => (None, None),
    };
    let r = client
        .execute(
            &format!(
                "INSERT INTO {} (run_id, kind, detail, by_user, by_host) \
                 SELECT run_id, $1, $2::text::jsonb, $3, $4 FROM {}",
                sql.history(),
                sql.table("run")
            ),
            &[&kind, &detail.to_string(), &user, &host],
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(event = kind, error = %schemashift_common::pg::describe(&e), "history event not recorded");
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub at: String,
    pub run_id: String,
    pub kind: String,
    pub detail: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_host: Option<String>,
}

/// `schemashift history`: every event of every run of this spec's control schema, oldest
/// first (empty when there never was a run).
pub async fn read(spec: &Spec) -> Result<Vec<Event>, CoordinatorError> {
    let target = connect(&spec.target, "target").await?;
    let sql = ControlSql::new(&spec.control_schema);
    let db = |e: tokio_postgres::Error| CoordinatorError::db("reading the history", &e);
    let exists = schemashift_common::pg::table_exists(&target, &sql.history())
        .await
        .map_err(db)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = target
        .query(
            &format!(
                "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                 run_id, kind, detail::text, by_user, by_host FROM {} ORDER BY id",
                sql.history()
            ),
            &[],
        )
        .await
        .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| Event {
            at: r.get(0),
            run_id: r.get(1),
            kind: r.get(2),
            detail: serde_json::from_str(r.get::<_, &str>(3)).unwrap_or_default(),
            by_user: r.get(4),
            by_host: r.get(5),
        })
        .collect())
}
