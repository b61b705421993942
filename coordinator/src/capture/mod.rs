//! capture: a publication and a pgoutput slot on the source, created before any shard is
//! read; decoded transactions are appended to the change log together with the capture
//! position (one target transaction), and only then is the slot advanced. After a crash
//! between the two, transactions at or below the saved position are skipped.

pub mod pgoutput;
mod relations;
mod sink;

use backon::BackoffBuilder;
use relations::Relations;
use sink::Sink;

use crate::control::Store;
use crate::error::CoordinatorError;
use pgoutput::Message;
use schemashift_common::change::{Change, Op};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::Lsn;
use schemashift_common::plan::RunPlan;
use schemashift_common::sql::quote_ident;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

/// Decoded messages per peek; the server stops at the next transaction end after it.
const PEEK_LIMIT: i32 = 20_000;
/// How long a slot held by another reader (a killed process's backend) is waited for.
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(30);

fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

/// Creates the publication and the slot when missing; returns the slot's consistent point.
/// Slot creation waits for running transactions; if it takes long, the blocking
/// backends are reported instead of waiting silently.
pub async fn ensure_slot(
    source: &Client,
    plan: &RunPlan,
    name: &str,
) -> Result<(), CoordinatorError> {
    let has_pub: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(db("checking publication"))?
        .get(0);
    if !has_pub {
        // Lookup tables of merges too: their changes refresh the merged rows.
        let mut names: Vec<String> = Vec::new();
        for t in &plan.tables {
            for n in std::iter::once(&t.source).chain(t.lookups.iter().map(|l| &l.source)) {
                if !names.contains(&n.to_string()) {
                    names.push(n.to_string());
                }
            }
        }
        let tables = names.join(", ");
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {tables}",
                quote_ident(name)
            ))
            .await
            .map_err(db("creating publication"))?;
        tracing::info!(publication = name, "publication created");
    }
    let has_slot: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&name],
        )
        .await
        .map_err(db("checking slot"))?
        .get(0);
    if has_slot {
        return Ok(());
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&name];
    let create = source.query_one(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        &params,
    );
    tokio::pin!(create);
    let started = Instant::now();
    loop {
        tokio::select! {
            r = &mut create => {
                let lsn: String = r.map_err(db("creating replication slot"))?.get(0);
                tracing::info!(slot = name, consistent_point = %lsn, "replication slot created");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                tracing::warn!(
                    slot = name, waited_s = started.elapsed().as_secs(),
                    "slot creation waits for running transactions on the source; see pg_stat_activity \
                     rows with backend_xid set and an old xact_start (commit or cancel them)"
                );
            }
        }
    }
}

/// Which WAL position of the source to read.
#[derive(Clone, Copy, Debug)]
pub enum WalPosition {
    /// End of WAL inserted so far: covers every commit made, flushed or not
    /// (asynchronous commits are visible before their WAL is flushed).
    Insert,
    /// End of WAL flushed to disk: logical decoding returns nothing past it.
    Flush,
}

pub async fn wal_lsn(
    source: &impl tokio_postgres::GenericClient,
    which: WalPosition,
) -> Result<Lsn, CoordinatorError> {
    let sql = match which {
        WalPosition::Insert => "SELECT pg_current_wal_insert_lsn()::text",
        WalPosition::Flush => "SELECT pg_current_wal_flush_lsn()::text",
    };
    let lsn: String = source
        .query_one(sql, &[])
        .await
        .map_err(db("reading source WAL position"))?
        .get(0);
    lsn.parse()
        .map_err(|e: schemashift_common::ids::LsnParseError| {
            CoordinatorError::Capture(e.to_string())
        })
}

/// Flushes the source's WAL up to now: a synchronous commit flushes everything before
/// it. Without this, asynchronous commits wait for the WAL writer before they can be
/// decoded. Costs one empty transaction (an xid, no table writes).
pub async fn flush_wal(source: &Client) -> Result<(), CoordinatorError> {
    source
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT",
        )
        .await
        .map_err(db("flushing source WAL"))
}

/// Where capture stands, for replay, lag and cutover.
#[derive(Clone, Copy, Debug)]
pub struct CaptureProgress {
    /// Every source commit up to this WAL position is in the change log.
    pub caught_up_to: Lsn,
    /// When `caught_up_to` was the source's current WAL position.
    pub caught_up_at: Instant,
    pub changes: u64,
}

pub struct Capture {
    source: Client,
    target: Client,
    plan: Arc<RunPlan>,
    control: ControlSql,
    slot: String,
    position: Lsn,
    relations: Relations,
    changes: u64,
    sink: Sink,
}

impl Capture {
    pub async fn open(
        source: Client,
        target: Client,
        plan: Arc<RunPlan>,
        slot: String,
    ) -> Result<Self, CoordinatorError> {
        let control = ControlSql::new(&plan.control_schema);
        let sink = Sink::for_plan(&plan)?;
        let relations = Relations::new(plan.clone());
        let position = Store::new(&plan.control_schema)
            .capture_position(&target)
            .await?
            .unwrap_or_default();
        Ok(Capture {
            source,
            target,
            plan,
            control,
            slot,
            position,
            relations,
            changes: 0,
            sink,
        })
    }

    /// One peek → append → advance round. Returns the number of transactions taken and
    /// whether the peek was cut short (more is waiting).
    pub async fn round(&mut self) -> Result<(usize, bool, Lsn), CoordinatorError> {
        // Decoding stops at the flushed end of WAL: only that much can be claimed.
        let head = wal_lsn(&self.source, WalPosition::Flush).await?;
        let rows = self
            .source
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, 'proto_version', '1', 'publication_names', $3)",
                // Our names are lower-case hex: safe as the identifier list pgoutput parses.
                &[&self.slot, &PEEK_LIMIT, &self.slot],
            )
            .await
            .map_err(|e| {
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) {
                    CoordinatorError::SlotBusy(schemashift_common::pg::describe(&e))
                } else {
                    CoordinatorError::db("decoding changes from the slot", &e)
                }
            })?;
        let cut_short = rows.len() >= PEEK_LIMIT as usize;
        let mut pending: Vec<(u32, Change)> = Vec::new();
        let mut tx_changes: Vec<(u32, Change)> = Vec::new();
        let mut tx_lsn = Lsn(0);
        let mut tx_xid = 0u32;
        let mut ours = false;
        let mut last_end = self.position;
        let mut txs = 0;
        for r in &rows {
            let data: &[u8] = r.get(0);
            let msg =
                pgoutput::decode(data).map_err(|e| CoordinatorError::Capture(e.to_string()))?;
            let changes = match msg {
                Message::Begin { final_lsn, xid } => {
                    tx_changes.clear();
                    ours = false;
                    tx_lsn = final_lsn;
                    tx_xid = xid;
                    Vec::new()
                }
                Message::Relation(rel) => {
                    self.relations.learn(&rel)?;
                    Vec::new()
                }
                Message::Insert { rel, new } => {
                    self.relations
                        .changes(rel, tx_lsn, Op::Insert, None, Some(&new))?
                }
                Message::Update { rel, old, new } => {
                    self.relations
                        .changes(rel, tx_lsn, Op::Update, old.as_ref(), Some(&new))?
                }
                Message::Delete { rel, old } => {
                    self.relations
                        .changes(rel, tx_lsn, Op::Delete, Some(&old), None)?
                }
                Message::Truncate { rels } => {
                    if let Some(t) = rels
                        .iter()
                        .find_map(|r| self.relations.tables_of(*r).next())
                        .and_then(|info| self.plan.table(info.table))
                    {
                        return Err(CoordinatorError::Capture(format!(
                            "table {} was truncated on the source during the run; its rows cannot be replayed. \
                             Roll back and start the migration again",
                            t.source
                        )));
                    }
                    Vec::new()
                }
                Message::Commit { end_lsn, .. } => {
                    // Already in the change log from before a crash: skip, do not duplicate.
                    if end_lsn > self.position {
                        if ours {
                            // Written by our own replay in the other direction: an echo.
                            tx_changes.clear();
                        }
                        pending.append(&mut tx_changes);
                        last_end = end_lsn;
                        txs += 1;
                    }
                    tx_changes.clear();
                    Vec::new()
                }
                Message::Origin { name, .. } => {
                    ours = name.starts_with(schemashift_common::pg::ORIGIN_PREFIX);
                    Vec::new()
                }
                Message::Ignored => Vec::new(),
            };
            for (part, mut c) in changes {
                c.xid = tx_xid;
                c.ordinal = tx_changes.len() as u32;
                tx_changes.push((part, c));
            }
        }
        if last_end > self.position {
            self.sink
                .write(&mut self.target, &self.control, &pending, last_end)
                .await?;
            self.position = last_end;
        }
        if self.position > Lsn(0) {
            // Only after the change log committed: the slot may now release this WAL.
            self.source
                .query(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                    &[&self.slot, &self.position.to_string()],
                )
                .await
                .map_err(db("advancing the slot"))?;
        }
        self.changes += pending.len() as u64;
        Ok((txs, cut_short, head))
    }

    /// Runs rounds until shutdown; publishes progress after each round. Idle rounds are
    /// `poll` apart unless `wake` is notified.
    pub async fn run(
        mut self,
        progress: watch::Sender<CaptureProgress>,
        mut shutdown: watch::Receiver<bool>,
        poll: Duration,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<(), CoordinatorError> {
        let mut busy_since: Option<Instant> = None;
        let backoff = || {
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
                .with_jitter()
                .build()
        };
        let mut kafka_backoff = backoff();
        loop {
            let started = Instant::now();
            let (_txs, cut_short, head) = match self.round().await {
                Ok(r) => r,
                // A killed coordinator's backend keeps the slot until its query ends.
                Err(CoordinatorError::SlotBusy(why))
                    if busy_since.get_or_insert(started).elapsed() < SLOT_BUSY_WAIT =>
                {
                    tracing::info!(reason = %why, "slot busy, waiting for its previous reader to end");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                // Kafka slow or down: the slot keeps the WAL; try again, backing off.
                Err(CoordinatorError::ChangeLog(e)) if e.is_transient() => {
                    let wait = kafka_backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "change log unavailable; the slot holds the WAL, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            };
            busy_since = None;
            kafka_backoff = backoff();
            if !cut_short {
                progress.send_replace(CaptureProgress {
                    caught_up_to: head,
                    caught_up_at: started,
                    changes: self.changes,
                });
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            if !cut_short {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    // A catch-up waits on the next round: start it now.
                    _ = wake.notified() => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    }
}

/// Drops the slot and publication; says whether anything was there.
pub async fn drop_slot(source: &Client, name: &str) -> Result<(bool, bool), CoordinatorError> {
    source
        .query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&name],
        )
        .await
        .map_err(db("stopping the slot's reader"))?;
    let dropped_slot = source
        .query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&name])
        .await
        .map_err(db("dropping the slot"))?
        .len()
        == 1;
    let had_pub: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(db("checking publication"))?
        .get(0);
    source
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(db("dropping the publication"))?;
    Ok((dropped_slot, had_pub))
}
