//! capture: a publication and a pgoutput slot on the source, created before any shard is
//! read; a replication stream (START_REPLICATION, so each WAL record is decoded once) feeds
//! rounds whose complete transactions are appended to the change log together with the
//! capture position (one target transaction); only then is the slot confirmed past them.
//! After a crash between the two, transactions at or below the saved position are skipped.

pub mod pgoutput;
mod relations;
mod sink;
mod slot;
mod spill;

use backon::BackoffBuilder;
use relations::Relations;
pub use sink::position_sql as capture_position_sql;
use sink::Sink;
pub use slot::{drop_slot, ensure_slot, flush_wal, wal_lsn, WalPosition};
use spill::Spills;

use crate::control::Store;
use crate::error::CoordinatorError;
use pgoutput::Message;
use schemashift_common::change::{Change, Op};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::Lsn;
use schemashift_common::pg::connect;
use schemashift_common::plan::RunPlan;
use schemashift_common::retry::{Class, Classify};
use schemashift_common::spec::Dsn;
use schemashift_common::walstream::{WalMessage, WalStream, WalStreamError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

/// Decoded messages per round before its batch is written (bounds memory and latency).
const ROUND_MESSAGES: usize = 20_000;
/// A round that has not reached its head by then ends without claiming it.
const ROUND_TIME: Duration = Duration::from_secs(1);
/// Silence after which the server is asked where it is.
const QUIET: Duration = Duration::from_millis(10);
/// How long a slot held by another reader (a killed process's backend) is waited for.
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(30);
/// How often an idle capture saves the position it received up to (so the slot, which is
/// never confirmed past the saved position, keeps moving) and checks its slot.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A busy slot and a lost connection are waited out (the run loop retries them); the
/// rest ends capture.
fn stream_error(e: WalStreamError) -> CoordinatorError {
    match e {
        WalStreamError::SlotBusy(why) => CoordinatorError::SlotBusy(why),
        e if e.class() == Class::Transient => CoordinatorError::SlotBusy(e.to_string()),
        e => CoordinatorError::Capture(format!("replication stream: {e}")),
    }
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
    /// SQL session on the captured database: WAL positions and flushes.
    source: Client,
    /// Where the replication stream connects (the same database as `source`).
    source_dsn: Dsn,
    stream: Option<WalStream>,
    target: Client,
    target_dsn: Dsn,
    plan: Arc<RunPlan>,
    control: ControlSql,
    slot: String,
    /// Every transaction committed up to here is in the change log.
    position: Lsn,
    /// Everything before this was received: no commit of ours lies between `position`
    /// and here unless a transaction is open.
    received: Lsn,
    tx: OpenTx,
    relations: Relations,
    changes: u64,
    sink: Sink,
    /// When the position was last saved or the slot last checked.
    heartbeat: Instant,
    /// Transactions streamed while in progress, on disk until they commit.
    spills: Spills,
}

/// What one decoded message amounts to.
enum Taken {
    Nothing,
    /// A transaction committed whole; its changes are in `pending`.
    Committed(Lsn),
    /// A streamed transaction committed; its changes are in the spill.
    Streamed {
        spill: spill::Spill,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
}

/// Changes of a streamed transaction written to the change log at a time.
const STREAM_CHUNK: usize = 5_000;

/// The transaction being received; the stream may stop a round in the middle of it.
#[derive(Default)]
struct OpenTx {
    open: bool,
    lsn: Lsn,
    xid: u32,
    /// Written by our own replay in the other direction: an echo, dropped.
    ours: bool,
    changes: Vec<(u32, Change)>,
}

impl Capture {
    pub async fn open(
        source: Client,
        source_dsn: Dsn,
        target: Client,
        target_dsn: Dsn,
        plan: Arc<RunPlan>,
        slot: String,
    ) -> Result<Self, CoordinatorError> {
        if plan.low_priority {
            for c in [&source, &target] {
                schemashift_common::pg::lower_priority(c).await;
            }
        }
        let control = ControlSql::new(&plan.control_schema);
        let slot_name = slot.clone();
        let sink = Sink::for_plan(&plan)?;
        let relations = Relations::new(plan.clone());
        let saved = Store::new(&plan.control_schema)
            .capture_position(&target)
            .await?;
        // A new run starts where its slot does; from then on the slot is never confirmed
        // past the saved position, so a slot ahead of it was replaced behind our back.
        let position = match saved {
            Some(p) => p,
            None => slot_position(&source, &slot).await?.unwrap_or_default(),
        };
        Ok(Capture {
            source,
            source_dsn,
            stream: None,
            target,
            target_dsn,
            plan,
            control,
            slot,
            position,
            received: position,
            tx: OpenTx::default(),
            relations,
            changes: 0,
            spills: Spills::new(&slot_name),
            sink,
            heartbeat: Instant::now(),
        })
    }

    /// Stops the run when its slot was dropped, or re-created or advanced by someone else:
    /// changes between the saved position and the slot's would be skipped silently.
    async fn check_slot(&self) -> Result<(), CoordinatorError> {
        match slot_position(&self.source, &self.slot).await? {
            None => Err(CoordinatorError::Capture(format!(
                "replication slot {} no longer exists on the source (dropped, or lost in a \
                 failover): changes since {} may be lost; run `schemashift cleanup`, empty the \
                 target tables and start again",
                self.slot, self.position
            ))),
            Some(at) if at > self.position => Err(CoordinatorError::Capture(format!(
                "replication slot {} is at {at}, past the run's capture position {}: it was \
                 re-created or advanced outside schemashift, so the changes in between are not \
                 in the change log; run `schemashift cleanup`, empty the target tables and start \
                 again",
                self.slot, self.position
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Starts streaming from the saved position; the server resumes at the slot's
    /// confirmed position if that is later, and resends every transaction after it.
    async fn connect(&mut self) -> Result<&mut WalStream, CoordinatorError> {
        if self.stream.is_none() {
            self.check_slot().await?;
            let stream = WalStream::start(
                &self.source_dsn,
                "schemashift-capture",
                &self.slot,
                self.plan.publication_for(&self.slot),
                self.position,
            )
            .await
            .map_err(stream_error)?;
            self.tx = OpenTx::default();
            self.spills.clear();
            self.received = self.position;
            if self.plan.low_priority {
                self.lower_walsender_priority().await;
            }
            self.stream = Some(stream);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| CoordinatorError::Capture("replication stream not open".into()))
    }

    /// Sessions that closed (a server restart, a killed backend) are opened again; the
    /// position is in the control state, so nothing is lost.
    async fn reopen_sessions(&mut self) -> Result<(), CoordinatorError> {
        if self.source.is_closed() {
            self.source = connect(&self.source_dsn, "source").await?;
            tracing::info!("capture's source session reopened");
        }
        if self.target.is_closed() {
            self.target = connect(&self.target_dsn, "target").await?;
            tracing::info!("capture's target session reopened");
        }
        if self.plan.low_priority {
            for c in [&self.source, &self.target] {
                schemashift_common::pg::lower_priority(c).await;
            }
        }
        Ok(())
    }

    async fn lower_walsender_priority(&self) {
        if let Ok(r) = self
            .source
            .query_one(
                "SELECT active_pid, current_user::text, current_database()::text FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&self.slot],
            )
            .await
        {
            schemashift_common::pg::renice_backend(r.get(0), r.get(1), r.get(2));
        }
    }

    /// One receive → append → confirm round: reads the stream until everything committed
    /// up to the source's flushed WAL position at the start is received, or the server says
    /// it has sent all it can decode (the flushed end may lie inside a record), or a batch
    /// is full; appends the complete transactions to the change log in one write, then lets
    /// the slot go past them. Returns the transactions taken, whether the round was cut
    /// short (more is waiting: nothing is claimed) and the position every commit before
    /// which is now in the change log.
    pub async fn round(&mut self) -> Result<(usize, bool, Lsn), CoordinatorError> {
        let r = self.try_round().await;
        if r.is_err() {
            // Resent from the last confirmed position by the next stream.
            self.stream = None;
        }
        r
    }

    async fn try_round(&mut self) -> Result<(usize, bool, Lsn), CoordinatorError> {
        // Decoding stops at the flushed end of WAL: only that much can be claimed.
        let head = wal_lsn(&self.source, WalPosition::Flush).await?;
        self.connect().await?;
        let started = Instant::now();
        let (mut pending, mut last_end, mut txs, mut messages) =
            (Vec::new(), self.position, 0, 0usize);
        let (mut asked, mut answered, mut keepalives, mut quiet) = (false, false, 0u32, 0u32);
        let cut_short = loop {
            if !self.tx.open && (self.received >= head || answered) {
                break false;
            }
            if messages >= ROUND_MESSAGES || started.elapsed() > ROUND_TIME {
                break true;
            }
            // Never past the saved position: a slot ahead of it means someone else moved it.
            let confirmed = self.position;
            let stream = self.connect().await?;
            let msg = match tokio::time::timeout(QUIET, stream.next()).await {
                Ok(m) => m.map_err(stream_error)?,
                Err(_) => {
                    quiet += 1;
                    // Silent: ask the server where it is. Its answer covers every commit
                    // before it, even if our head lies inside a record not flushed whole.
                    let stream = self.connect().await?;
                    stream
                        .confirm(confirmed, true)
                        .await
                        .map_err(stream_error)?;
                    asked = true;
                    continue;
                }
            };
            match msg {
                WalMessage::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    keepalives += 1;
                    if !self.tx.open {
                        self.received = self.received.max(wal_end);
                        answered = asked;
                    }
                    if reply_requested {
                        let stream = self.connect().await?;
                        stream
                            .confirm(confirmed, false)
                            .await
                            .map_err(stream_error)?;
                    }
                }
                WalMessage::XLogData { data, .. } => {
                    messages += 1;
                    match self.take(&data, &mut pending)? {
                        Taken::Nothing => {}
                        Taken::Committed(end) => {
                            last_end = last_end.max(end);
                            txs += 1;
                        }
                        Taken::Streamed {
                            spill,
                            xid,
                            commit_lsn,
                            end_lsn,
                        } => {
                            // What committed before it goes first.
                            if last_end > self.position {
                                self.sink
                                    .write(&mut self.target, &self.control, &pending, last_end)
                                    .await?;
                                self.position = last_end;
                                self.changes += pending.len() as u64;
                                pending.clear();
                            }
                            self.write_streamed(spill, xid, commit_lsn, end_lsn).await?;
                            txs += 1;
                        }
                    }
                }
            }
        };
        if last_end > self.position {
            self.sink
                .write(&mut self.target, &self.control, &pending, last_end)
                .await?;
            self.position = last_end;
        } else if self.heartbeat.elapsed() >= HEARTBEAT {
            // Idle: everything received with no transaction open is in the log (nothing of
            // ours lies before it), so the position and then the slot may move up to it;
            // the slot's retained WAL stays bounded on a source that writes elsewhere.
            self.heartbeat = Instant::now();
            self.check_slot().await?;
            let idle_end = self.confirmable();
            if idle_end > self.position {
                self.sink
                    .write(&mut self.target, &self.control, &[], idle_end)
                    .await?;
                self.position = idle_end;
            }
        }
        // Only after the change log committed: the slot may now release this WAL.
        let confirmed = self.position;
        let stream = self.connect().await?;
        stream
            .confirm(confirmed, false)
            .await
            .map_err(stream_error)?;
        self.changes += pending.len() as u64;
        tracing::trace!(
            %head, received = %self.received, messages, keepalives, quiet, txs, cut_short,
            ms = started.elapsed().as_millis() as u64, "capture round"
        );
        Ok((txs, cut_short, self.received))
    }

    /// How far the position may move when no change was taken: everything received when
    /// no transaction is half read (nothing of ours lies in between).
    fn confirmable(&self) -> Lsn {
        if self.tx.open {
            self.position
        } else {
            self.position.max(self.received)
        }
    }

    /// Appends a committed streamed transaction to the change log a chunk at a time, then
    /// moves the position past it. The position stays put until the last chunk: after a
    /// crash in between the server streams the transaction again, and replay drops the
    /// copies by (commit LSN, ordinal).
    async fn write_streamed(
        &mut self,
        spill: spill::Spill,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
    ) -> Result<(), CoordinatorError> {
        let mut reader = spill.reader().map_err(CoordinatorError::Capture)?;
        let mut ordinal = 0u32;
        loop {
            let mut chunk = reader
                .next_chunk(STREAM_CHUNK)
                .map_err(CoordinatorError::Capture)?;
            if chunk.is_empty() {
                break;
            }
            for (_, c) in chunk.iter_mut() {
                c.lsn = commit_lsn;
                c.xid = xid;
                c.ordinal = ordinal;
                ordinal += 1;
            }
            self.sink
                .write(&mut self.target, &self.control, &chunk, self.position)
                .await?;
            self.changes += chunk.len() as u64;
        }
        self.sink
            .write(&mut self.target, &self.control, &[], end_lsn)
            .await?;
        self.position = end_lsn;
        tracing::info!(
            xid,
            changes = ordinal,
            "large transaction appended from its spill"
        );
        Ok(())
    }

    /// Decodes one pgoutput message into the open transaction (or a streamed one's spill);
    /// at a commit, says where its changes are.
    fn take(
        &mut self,
        data: &[u8],
        pending: &mut Vec<(u32, Change)>,
    ) -> Result<Taken, CoordinatorError> {
        let capture = |e: String| CoordinatorError::Capture(e);
        let (streamed, msg) = pgoutput::decode_in(data, self.spills.current.is_some())
            .map_err(|e| capture(e.to_string()))?;
        let tx_lsn = self.tx.lsn;
        let changes = match msg {
            Message::StreamStart { xid, .. } => {
                self.spills.start(xid).map_err(capture)?;
                return Ok(Taken::Nothing);
            }
            Message::StreamStop => {
                self.spills.stop();
                return Ok(Taken::Nothing);
            }
            Message::StreamAbort { xid, subxid } => {
                self.spills.abort(xid, subxid);
                return Ok(Taken::Nothing);
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
            } => {
                self.received = self.received.max(end_lsn);
                return Ok(match self.spills.take(xid) {
                    Some(spill) if end_lsn > self.position && !spill.ours => Taken::Streamed {
                        spill,
                        xid,
                        commit_lsn,
                        end_lsn,
                    },
                    _ => Taken::Nothing,
                });
            }
            Message::Begin { final_lsn, xid } => {
                self.tx = OpenTx {
                    open: true,
                    lsn: final_lsn,
                    xid,
                    ours: false,
                    changes: Vec::new(),
                };
                return Ok(Taken::Nothing);
            }
            Message::Relation(rel) => {
                self.relations.learn(&rel)?;
                return Ok(Taken::Nothing);
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
                return Ok(Taken::Nothing);
            }
            Message::Commit { end_lsn, .. } => {
                let tx = std::mem::take(&mut self.tx);
                self.received = self.received.max(end_lsn);
                // At or below the saved position it is in the change log from before a
                // crash: skipped, not duplicated. Our own replay's writes are echoes.
                if end_lsn <= self.position || tx.ours {
                    return Ok(Taken::Nothing);
                }
                pending.extend(tx.changes);
                return Ok(Taken::Committed(end_lsn));
            }
            Message::Origin { name, .. } => {
                if name.starts_with(schemashift_common::pg::ORIGIN_PREFIX) {
                    if self.spills.current.is_some() {
                        self.spills.mark_ours();
                    } else {
                        self.tx.ours = true;
                    }
                }
                return Ok(Taken::Nothing);
            }
            Message::Ignored => return Ok(Taken::Nothing),
        };
        if let Some(subxid) = streamed {
            // Lsn and ordinal are set at the commit, when they are known.
            for (part, c) in changes {
                self.spills.push(subxid, part, &c).map_err(capture)?;
            }
            return Ok(Taken::Nothing);
        }
        for (part, mut c) in changes {
            c.xid = self.tx.xid;
            c.ordinal = self.tx.changes.len() as u32;
            self.tx.changes.push((part, c));
        }
        Ok(Taken::Nothing)
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
                // Kafka slow or down, or the target's session lost: the slot keeps the
                // WAL; try again, backing off, with fresh sessions where they closed.
                Err(e) if e.is_transient() && !matches!(e, CoordinatorError::SlotBusy(_)) => {
                    let wait = kafka_backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "change log unavailable; the slot holds the WAL, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    if let Err(e) = self.reopen_sessions().await {
                        tracing::warn!(error = %e, "capture sessions not reopened yet");
                    }
                    continue;
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

/// Where the slot's consumer confirmed up to; None when there is no such slot.
async fn slot_position(source: &Client, slot: &str) -> Result<Option<Lsn>, CoordinatorError> {
    let row = source
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn, restart_lsn)::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| CoordinatorError::db("reading the replication slot", &e))?;
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|l| {
            l.parse::<Lsn>()
                .map_err(|e| CoordinatorError::Capture(e.to_string()))
        })
        .transpose()
}
