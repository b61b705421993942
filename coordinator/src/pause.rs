//! An operator's pause, stored with the run (the `pause` table of the control schema) so
//! that any process can set it and a restarted coordinator stays paused. While paused,
//! the coordinator hands out no shard, replay partition or verify range, and running
//! copies and replay hold at their next heartbeat, as under a throttle hold; capture goes
//! on, and the slot keeps the WAL.

use crate::control::{Phase, Store};
use crate::error::CoordinatorError;
use crate::throttle::Throttle;
use schemashift_common::control::ControlSql;
use schemashift_common::pg::connect;
use schemashift_common::spec::Spec;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::Client;

/// How often the coordinator reads the pause: a pause takes effect within this and one
/// heartbeat.
const READ_EVERY: Duration = Duration::from_millis(250);

/// Who paused the run, from where, and since when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Paused {
    /// RFC 3339, UTC.
    pub since: String,
    pub by_user: String,
    pub by_host: String,
}

impl std::fmt::Display for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "paused since {} by {}@{}",
            self.since, self.by_user, self.by_host
        )
    }
}

fn db(context: &'static str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError {
    move |e| CoordinatorError::db(context, &e)
}

/// The pause, if the run is paused (a run made before pauses existed never is).
pub async fn read(target: &Client, sql: &ControlSql) -> Result<Option<Paused>, CoordinatorError> {
    let table = sql.table("pause");
    let exists = schemashift_common::pg::table_exists(target, &table)
        .await
        .map_err(db("reading the pause"))?;
    if !exists {
        return Ok(None);
    }
    let row = target
        .query_opt(
            &format!(
                "SELECT to_char(since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                 by_user, by_host FROM {table}"
            ),
            &[],
        )
        .await
        .map_err(db("reading the pause"))?;
    Ok(row.map(|r| Paused {
        since: r.get(0),
        by_user: r.get(1),
        by_host: r.get(2),
    }))
}

/// `schemashift pause`: refused without a run, and from the cutover on (the freeze is
/// short and bounded; a pause inside it would hold the application's writes).
pub async fn pause(spec: &Spec) -> Result<Paused, CoordinatorError> {
    let target = connect(&spec.target, "target").await?;
    let store = Store::new(&spec.control_schema);
    let Some(state) = store.load(&target).await? else {
        return Err(CoordinatorError::Refused(
            "no run to pause for this spec (nothing was changed)".into(),
        ));
    };
    if state.phase >= Phase::CutOver {
        return Err(CoordinatorError::Refused(format!(
            "the run is {}: a pause applies before the cutover only (nothing was changed)",
            state.phase.as_str()
        )));
    }
    // Released when this session ends, right after.
    if !try_cutover_lock(&target, &store.sql).await? {
        return Err(CoordinatorError::Refused(
            "a cutover is under way: a pause now would hold the application's writes in its \
             freeze; nothing was changed"
                .into(),
        ));
    }
    let (user, host) = crate::history::operator();
    let table = store.sql.table("pause");
    target
        .batch_execute(&store.sql.pause_ddl())
        .await
        .map_err(db("creating the pause table"))?;
    // A second pause keeps the first one's time and operator.
    target
        .execute(
            &format!(
                "INSERT INTO {table} (by_user, by_host) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING"
            ),
            &[&user, &host],
        )
        .await
        .map_err(db("pausing the run"))?;
    let paused = read(&target, &store.sql)
        .await?
        .ok_or_else(|| CoordinatorError::State("the pause was not recorded".into()))?;
    crate::history::ensure(&target, &store.sql).await?;
    crate::history::record(
        &target,
        &store.sql,
        "pause",
        serde_json::json!({ "since": paused.since }),
        crate::history::By::Operator,
    )
    .await;
    Ok(paused)
}

/// `schemashift resume`: the pause it lifted, if there was one.
pub async fn resume(spec: &Spec) -> Result<Option<Paused>, CoordinatorError> {
    let target = connect(&spec.target, "target").await?;
    let sql = ControlSql::new(&spec.control_schema);
    let was = read(&target, &sql).await?;
    if was.is_some() {
        target
            .execute(&format!("DELETE FROM {}", sql.table("pause")), &[])
            .await
            .map_err(db("resuming the run"))?;
        crate::history::ensure(&target, &sql).await?;
        crate::history::record(
            &target,
            &sql,
            "resume",
            serde_json::json!({}),
            crate::history::By::Operator,
        )
        .await;
    }
    Ok(was)
}

/// The lock a cutover holds from its start to its end, and `pause` while it records itself,
/// so that the two exclude each other (a session-level advisory lock on the target).
pub async fn try_cutover_lock(target: &Client, sql: &ControlSql) -> Result<bool, CoordinatorError> {
    Ok(target
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1))",
            &[&cutover_lock_name(sql)],
        )
        .await
        .map_err(db("taking the cutover lock"))?
        .get(0))
}

pub async fn release_cutover_lock(target: &Client, sql: &ControlSql) {
    if let Err(e) = target
        .query_one(
            "SELECT pg_advisory_unlock(hashtext($1))",
            &[&cutover_lock_name(sql)],
        )
        .await
    {
        tracing::debug!(error = %schemashift_common::pg::describe(&e), "cutover lock not released; it goes with the session");
    }
}

fn cutover_lock_name(sql: &ControlSql) -> String {
    format!("schemashift cutover {}", sql.schema())
}

/// Reads the pause until shutdown and tells the throttle; says when it changes.
pub async fn watch(
    spec: Spec,
    throttle: Arc<Throttle>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let sql = ControlSql::new(&spec.control_schema);
    let mut target = connect(&spec.target, "target").await?;
    let mut was: Option<Paused> = None;
    loop {
        let now = match read(&target, &sql).await {
            Ok(p) => p,
            Err(e) if target.is_closed() => {
                tracing::warn!(error = %e, "pause session lost; reconnecting");
                target = connect(&spec.target, "target").await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if now != was {
            match &now {
                Some(p) => {
                    tracing::warn!(by = %format!("{}@{}", p.by_user, p.by_host), since = %p.since, "run paused: copies and replay hold, capture goes on")
                }
                None => tracing::info!("run resumed"),
            }
        }
        throttle.set_paused(now.is_some());
        was = now;
        tokio::select! {
            _ = tokio::time::sleep(READ_EVERY) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_table_alone_is_cut_from_the_control_ddl() {
        let ddl = ControlSql::new("ctl").pause_ddl();
        let ddl = ddl.trim();
        let ddl = &ddl[ddl.find("CREATE TABLE").unwrap_or(0)..];
        assert!(
            ddl.starts_with("CREATE TABLE IF NOT EXISTS \"ctl\".pause ("),
            "{ddl}"
        );
        assert!(ddl.ends_with(");"), "{ddl}");
        assert!(ddl.contains("by_host text NOT NULL"), "{ddl}");
        assert!(!ddl.contains("throttle"), "{ddl}");
    }
}
