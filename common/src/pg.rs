//! PostgreSQL sessions: connect with the shared session settings and install the spec's
//! helper functions into `pg_temp`. Retry decisions come from [`crate::retry`].

use crate::retry::{classify_pg, Class, Classify};
use crate::spec::Dsn;
use crate::sql::{Helper, SESSION_SETUP};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to the {role} database {at}: {reason}")]
    Connect {
        role: &'static str,
        at: String,
        reason: String,
        class: Class,
    },
    #[error("helper function {name} cannot be created on the {role} database: {reason}")]
    Helper {
        role: &'static str,
        name: String,
        reason: String,
        class: Class,
    },
}

impl Classify for PgError {
    fn class(&self) -> Class {
        match self {
            PgError::Connect { class, .. } | PgError::Helper { class, .. } => *class,
        }
    }
}

/// Runs a session's connection until it ends.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %describe(&e), "connection ended");
    }
}

/// The one way to open a PostgreSQL session: a connection string read as libpq reads it
/// (`crate::conninfo`) and TLS as its `sslmode` says (`crate::tls`).
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Shows nothing of the connection string (it holds the password).
impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Reads the connection string; an unusable one (or TLS files) is said here.
    pub fn new(dsn: &str) -> Result<Connector, String> {
        let info = crate::conninfo::parse(dsn)?;
        let tls = crate::tls::client_config(&info.tls)?;
        Ok(Connector {
            config: info.config,
            tls,
        })
    }

    pub fn application_name(mut self, name: &str) -> Self {
        self.config.application_name(name);
        self
    }

    /// Opens a session and drives its connection in the background (in `span`).
    pub async fn open(&self, span: tracing::Span) -> Result<Client, tokio_postgres::Error> {
        Ok(match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(drive(connection).instrument(span));
                client
            }
            Some(tls) => {
                let (client, connection) = self
                    .config
                    .connect(crate::tls::MakeRustls(tls.clone()))
                    .await?;
                tokio::spawn(drive(connection).instrument(span));
                client
            }
        })
    }
}

/// Connects (TLS as `sslmode` says), spawns the connection task, and applies
/// [`SESSION_SETUP`].
pub async fn connect(dsn: &Dsn, role: &'static str) -> Result<Client, PgError> {
    let err = |e: tokio_postgres::Error| PgError::Connect {
        role,
        at: dsn.redacted(),
        reason: describe(&e),
        class: classify_pg(&e),
    };
    let connector = Connector::new(dsn.expose()).map_err(|reason| PgError::Connect {
        role,
        at: dsn.redacted(),
        reason,
        class: Class::Permanent,
    })?;
    let span = tracing::debug_span!("pg_connection", role, at = %dsn.redacted());
    let client = connector.open(span).await.map_err(err)?;
    client.batch_execute(SESSION_SETUP).await.map_err(err)?;
    Ok(client)
}

/// Streams one COPY's output into another COPY's input as it comes (no row decoded);
/// returns the rows the input took.
/// Whether a table exists (`name` as `to_regclass` reads it: quoted where needed). Control
/// tables added by later versions are read as absent, not as an error, in older runs.
pub async fn table_exists(
    client: &impl tokio_postgres::GenericClient,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await?
        .get(0))
}

pub async fn pipe_copy(
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    stream: tokio_postgres::CopyOutStream,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::{SinkExt, StreamExt};
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut batch = CopyBatch::new();
    while let Some(chunk) = stream.next().await {
        if let Some(full) = batch.push(&chunk?) {
            sink.feed(full).await?;
        }
    }
    if let Some(rest) = batch.rest() {
        sink.feed(rest).await?;
    }
    sink.as_mut().finish().await
}

/// Rows of a `COPY … TO STDOUT` arrive one message each; tokio-postgres sends sink items
/// under 4 kB in 4 kB messages handed one by one to its connection task, so a row at a
/// time costs a hand-off and a socket write per dozen rows. Gathered to 64 kB they go as
/// one message (COPY data may be cut anywhere): a third less CPU in this process.
pub struct CopyBatch {
    buf: bytes::BytesMut,
}

impl CopyBatch {
    pub const SIZE: usize = 64 * 1024;

    pub fn new() -> CopyBatch {
        CopyBatch {
            buf: bytes::BytesMut::with_capacity(Self::SIZE),
        }
    }

    /// Adds a chunk; a batch that reached [`Self::SIZE`] comes back to be sent.
    pub fn push(&mut self, chunk: &[u8]) -> Option<bytes::Bytes> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() < Self::SIZE {
            return None;
        }
        let full = self.buf.split().freeze();
        self.buf.reserve(Self::SIZE);
        Some(full)
    }

    /// What is gathered and not sent yet (before finishing the COPY).
    pub fn rest(&mut self) -> Option<bytes::Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

impl Default for CopyBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether this PostgreSQL installation ships the extension (installed or not).
pub async fn extension_available(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1)",
            &[&name],
        )
        .await?
        .get(0))
}

/// Creates the helpers as session-temporary functions: nothing stays behind.
pub async fn install_helpers(
    client: &Client,
    helpers: &[Helper],
    role: &'static str,
) -> Result<(), PgError> {
    for h in helpers {
        match client.batch_execute(&h.create_sql).await {
            // Already created in this session (pg_temp lives as long as the session).
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_FUNCTION) => continue,
            r => r,
        }
        .map_err(|e| PgError::Helper {
            role,
            name: h.name.clone(),
            reason: describe(&e),
            class: classify_pg(&e),
        })?;
    }
    Ok(())
}

/// Replication origins of our own replay sessions start with this: capture skips their
/// transactions, so forward and reverse sync never echo each other's writes.
pub const ORIGIN_PREFIX: &str = "schemashift_";

/// Tags this session's transactions with a replication origin, when the role may (it
/// needs superuser or the origin functions granted on PostgreSQL 15). Returns whether it
/// did. An origin serves one session at a time on PostgreSQL 15, so each session takes the
/// first of `schemashift_<name>_0`, `_1`, … not in use (made when missing): every replay
/// session of every run on the cluster is marked, and there are never more origins than
/// sessions that ran at once.
pub async fn mark_origin(client: &Client, name: &str) -> bool {
    for i in 0..ORIGIN_SLOTS {
        let origin = format!("{ORIGIN_PREFIX}{name}_{i}");
        let created = client
            .query_one(
                "SELECT CASE WHEN pg_replication_origin_oid($1) IS NULL \
                 THEN pg_replication_origin_create($1) END",
                &[&origin],
            )
            .await;
        match created {
            // Another session created it at the same moment: fine.
            Err(e) if e.code() != Some(&SqlState::UNIQUE_VIOLATION) => {
                tracing::debug!(origin = %origin, error = %describe(&e), "replication origin not created");
                return false;
            }
            _ => {}
        }
        match client
            .query_one(
                "SELECT pg_replication_origin_session_setup($1)::text",
                &[&origin],
            )
            .await
        {
            Ok(_) => return true,
            // Held by another session: the next one.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => continue,
            Err(e) => {
                tracing::debug!(origin = %origin, error = %describe(&e), "replication origin not set");
                return false;
            }
        }
    }
    tracing::debug!(name, "every replication origin of ours is in use");
    false
}

/// Origins tried per kind before giving up (sessions replaying at once on one cluster).
const ORIGIN_SLOTS: usize = 64;

/// Lowers the CPU priority of this session's server process to nice 19 when it runs on
/// this host, so the application's backends preempt our bulk work (a cheap throttle that
/// costs the migration only idle CPU). A no-op, returning false, for remote servers, other
/// PID namespaces or without permission (raising another user's nice needs CAP_SYS_NICE).
pub async fn lower_priority(client: &Client) -> bool {
    match backend_identity(client).await {
        Some((pid, user, db)) => renice_backend(pid, &user, &db),
        None => false,
    }
}

/// Whether this session's server process runs on this host (found in /proc under our
/// user and database), so the host's CPU readings describe the database's.
pub async fn backend_is_local(client: &Client) -> bool {
    match backend_identity(client).await {
        Some((pid, user, db)) => local_backend(pid, &user, &db).is_some(),
        None => false,
    }
}

async fn backend_identity(client: &Client) -> Option<(i32, String, String)> {
    let row = match client
        .query_one(
            "SELECT pg_backend_pid(), current_user::text, current_database()::text",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %describe(&e), "backend process not identified");
            return None;
        }
    };
    Some((row.get(0), row.get(1), row.get(2)))
}

/// The local process of a backend, only if its process title shows our user and database:
/// a PID from another host or namespace must not hit an unrelated local process.
fn local_backend(pid: i32, user: &str, db: &str) -> Option<rustix::process::Pid> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let title = String::from_utf8_lossy(&cmdline);
    let ours = title.starts_with("postgres: ") && title.contains(&format!(" {user} {db} "));
    rustix::process::Pid::from_raw(pid).filter(|_| ours)
}

/// Renices a backend found in /proc, only if its process title shows our user and database:
/// a PID from another host or namespace must not hit an unrelated local process.
pub fn renice_backend(pid: i32, user: &str, db: &str) -> bool {
    let Some(pid) = local_backend(pid, user, db) else {
        return false;
    };
    if let Err(e) = rustix::process::setpriority_process(Some(pid), 19) {
        tracing::debug!(error = %e, "backend priority not lowered");
        return false;
    }
    if crate::idle_group::join(pid.as_raw_nonzero().get(), false) {
        return true;
    }
    // With autogroup scheduling, nice only ranks tasks inside one session's group, and every
    // backend is a session of its own (setsid at fork): the group's nice is what counts.
    let group = format!("/proc/{}/autogroup", pid.as_raw_nonzero());
    if std::path::Path::new(&group).exists() && session_leader(pid.as_raw_nonzero().get()) {
        if let Err(e) = std::fs::write(&group, "19") {
            tracing::debug!(error = %e, "backend autogroup priority not lowered");
        }
    }
    true
}

/// Lowers every thread of this process to nice 19 except those whose name starts with
/// `keep` (the demo's application runtime). Threads started later inherit their creator's
/// priority. Linux applies setpriority to single threads; returns how many were lowered.
pub fn lower_own_threads(keep: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut lowered = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(keep) {
            continue;
        }
        let tid = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(tid) = tid {
            if rustix::process::setpriority_process(Some(tid), 19).is_ok() {
                crate::idle_group::join(tid.as_raw_nonzero().get(), true);
                lowered += 1;
            }
        }
    }
    lowered
}

/// Whether the process leads its own session (so its autogroup holds only it).
fn session_leader(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the parenthesised command: state, ppid, pgrp, session.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(3))
        .and_then(|s| s.parse::<i32>().ok())
        == Some(pid)
}

/// The server's message (with detail and hint) rather than tokio-postgres' "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_owned();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// A long-lived session that is opened again, through the retry policy, when it closed
/// (a server restart, a killed backend); callers get the live one.
pub struct Session {
    dsn: Dsn,
    role: &'static str,
    client: tokio::sync::RwLock<std::sync::Arc<Client>>,
}

impl Session {
    pub fn new(client: Client, dsn: Dsn, role: &'static str) -> Self {
        Session {
            dsn,
            role,
            client: tokio::sync::RwLock::new(std::sync::Arc::new(client)),
        }
    }

    /// The session, reopened first if it closed.
    pub async fn get(&self) -> Result<std::sync::Arc<Client>, PgError> {
        let current = self.client.read().await.clone();
        if !current.is_closed() {
            return Ok(current);
        }
        let mut slot = self.client.write().await;
        if slot.is_closed() {
            let (dsn, role) = (&self.dsn, self.role);
            let fresh = crate::retry::retry(
                "reopening a session",
                crate::retry::Backoff::Database,
                || connect(dsn, role),
            )
            .await?;
            tracing::info!(role, "session reopened");
            *slot = std::sync::Arc::new(fresh);
        }
        Ok(slot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::CopyBatch;

    #[test]
    fn copy_batches_carry_every_byte_in_order_in_batches_of_at_least_64_kb() {
        let rows: Vec<Vec<u8>> = (0..5_000u32)
            .map(|i| vec![(i % 251) as u8; 1 + (i as usize * 7) % 400])
            .collect();
        let mut batch = CopyBatch::new();
        let mut sent: Vec<bytes::Bytes> = rows.iter().filter_map(|r| batch.push(r)).collect();
        assert!(sent.iter().all(|b| b.len() >= CopyBatch::SIZE));
        sent.extend(batch.rest());
        assert!(batch.rest().is_none(), "the rest is sent once");
        let got: Vec<u8> = sent.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(got, rows.concat());
        assert!(sent.len() < rows.len() / 100, "{} batches", sent.len());
    }
}
