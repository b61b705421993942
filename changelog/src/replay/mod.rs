//! Replay: applies one change-log partition to the target with the same mapping as the
//! backfill, in batches. Per batch, each key's changes collapse to one final action
//! (delete, full upsert, or partial update when pgoutput withheld unchanged TOAST
//! values), loaded into a staging table with one COPY and applied with one statement per
//! action kind; the partition position is saved in the same transaction.

use crate::error::{replay_err, ChangeLogError};
use crate::kafka::PartitionReader;
use schemashift_common::change::Change;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{ChangeSeq, LeaseEpoch, Lsn};
use schemashift_common::plan::{LogPlan, RunPlan};
use schemashift_common::retry::Class;
use schemashift_common::service::PartitionLease;
use schemashift_common::sql::quote_ident;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

/// Where a partition's changes are read from.
enum Source {
    Table,
    Kafka(PartitionReader),
}

pub struct PartitionReplayer {
    part: u32,
    epoch: LeaseEpoch,
    pos: ChangeSeq,
    /// The last change applied, by (commit LSN, ordinal): Kafka may hold re-sent
    /// duplicates after it, which are skipped.
    last: (Lsn, u32),
    source: Source,
    plan: Arc<RunPlan>,
    control: ControlSql,
    /// A batch another partition's rows conflict with (a unique value not yet released
    /// there), kept to try again, with the end of what was read and since when.
    held: Option<Held>,
    /// Tables that stopped alone (read when the lease is taken: tables stop during the
    /// backfill, before partitions are leased): their changes are passed over, and the
    /// table is copied whole again when it resumes.
    stopped: std::collections::HashSet<u32>,
}

struct Held {
    last: ChangeSeq,
    batch: Vec<(ChangeSeq, Change)>,
    since: Instant,
    tried: Instant,
}

/// How often a held batch is tried again (each try stages and rolls back the batch).
const HELD_RETRY: Duration = Duration::from_millis(100);

/// Why a batch did not apply, as far as waiting for other partitions can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conflict {
    No,
    /// A unique constraint other than the key refused a row.
    Unique,
    /// Another partition's transaction waits on this one's rows and this one on its
    /// (a unique value moving between them); PostgreSQL aborted this one.
    Deadlock,
}

fn conflict_of(e: &tokio_postgres::Error) -> Conflict {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Conflict::Unique,
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Conflict::Deadlock,
        _ => Conflict::No,
    }
}

/// How long a batch may wait for other partitions to release a unique value.
const HELD_LIMIT: Duration = Duration::from_secs(60);

impl PartitionReplayer {
    /// Reads the partition's position and creates the session's staging tables.
    pub async fn open(
        target: &Client,
        plan: Arc<RunPlan>,
        lease: PartitionLease,
    ) -> Result<Self, ChangeLogError> {
        let part = lease.part;
        let control = ControlSql::new(&plan.control_schema);
        let fail = |e: tokio_postgres::Error| replay_err(part, "-", &e);
        let row = target
            .query_one(&control.replay_position(), &[&(part as i32)])
            .await
            .map_err(fail)?;
        let pos = ChangeSeq(row.get(0));
        let last = match (
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<i32>>(2),
        ) {
            (Some(l), Some(o)) => (
                l.parse::<Lsn>()
                    .map_err(|e| ChangeLogError::Corrupt(e.to_string()))?,
                o.max(0) as u32,
            ),
            _ => (Lsn(0), 0),
        };
        let source = match &plan.changelog {
            LogPlan::Postgres => Source::Table,
            LogPlan::Kafka {
                conn: brokers,
                topic,
                ..
            } => Source::Kafka(PartitionReader::open(
                brokers,
                topic,
                part,
                pos.0,
                &format!("schemashift-replay-{part}"),
            )?),
        };
        let has_stopped =
            schemashift_common::pg::table_exists(target, &control.table("stopped_tables"))
                .await
                .map_err(fail)?;
        let stopped: std::collections::HashSet<u32> = if has_stopped {
            target
                .query(&control.stopped_table_indexes(), &[])
                .await
                .map_err(fail)?
                .iter()
                .map(|r| r.get::<_, i32>(0) as u32)
                .collect()
        } else {
            Default::default()
        };
        if !stopped.is_empty() {
            tracing::info!(part, stopped = ?stopped, "replay passes over the changes of stopped tables");
        }
        for t in &plan.tables {
            let cols = t
                .source_columns
                .iter()
                .map(|c| format!("{} {}", quote_ident(&c.name), c.sql_type))
                .collect::<Vec<_>>()
                .join(", ");
            target
                .batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (__seq bigint, __grp int, {cols}) ON COMMIT DELETE ROWS",
                    stage_name(t.index)
                ))
                .await
                .map_err(fail)?;
        }
        Ok(PartitionReplayer {
            part,
            epoch: lease.epoch,
            pos,
            last,
            source,
            plan,
            control,
            held: None,
            stopped,
        })
    }

    pub fn position(&self) -> ChangeSeq {
        self.pos
    }

    /// Reads the next changes with their positions (empty: nothing new).
    async fn fetch(
        &mut self,
        target: &Client,
        max: i64,
    ) -> Result<Vec<(ChangeSeq, Change)>, ChangeLogError> {
        let part = self.part;
        match &mut self.source {
            Source::Table => {
                let rows = target
                    .query(
                        &self.control.read_changes(),
                        &[&(part as i32), &self.pos.0, &max],
                    )
                    .await
                    .map_err(|e| replay_err(part, "-", &e))?;
                rows.iter()
                    .map(|r| row_to_change(r).map_err(ChangeLogError::Corrupt))
                    .collect()
            }
            Source::Kafka(reader) => Ok(reader
                .read(max as usize, std::time::Duration::from_millis(20))
                .await?),
        }
    }

    /// Drops copies of changes already seen. Capture re-sends to Kafka what it produced
    /// but had not confirmed before a crash; the table log is written in one transaction
    /// with the capture position, but a second writer (a coordinator that lost its slot
    /// and was not stopped) would still append copies. A partition's changes come in
    /// (commit LSN, ordinal) order, so anything not after the latest seen is a copy,
    /// whether applied before or earlier in this batch.
    fn fresh(&self, mut batch: Vec<(ChangeSeq, Change)>) -> Vec<(ChangeSeq, Change)> {
        let mut latest = self.last;
        batch.retain(|(_, c)| {
            let fresh = (c.lsn, c.ordinal) > latest;
            latest = latest.max((c.lsn, c.ordinal));
            fresh
        });
        batch
    }

    /// Applies up to `max` changes; returns how many were applied (0: caught up, or
    /// waiting for another partition).
    /// `source` serves tables whose mapping reads other tables (merges): their rows are
    /// re-read from it by key.
    pub async fn step(
        &mut self,
        target: &mut Client,
        source: &Client,
        max: i64,
    ) -> Result<usize, ChangeLogError> {
        let part = self.part;
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.tried.elapsed() < HELD_RETRY)
        {
            return Ok(0);
        }
        let (last, batch, held_since) = match self.held.take() {
            Some(h) => (h.last, h.batch, Some(h.since)),
            None => {
                let fetched = self.fetch(target, max).await?;
                let Some(last) = fetched.last().map(|(s, _)| *s) else {
                    return Ok(0);
                };
                let mut fresh = self.fresh(fetched);
                fresh.retain(|(_, c)| !self.stopped.contains(&c.table));
                (last, fresh, None)
            }
        };
        let mut tx = target
            .transaction()
            .await
            .map_err(|e| replay_err(part, "-", &e))?;
        let (refresh, mut batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(_, c)| self.plan.table(c.table).is_some_and(|t| t.refreshes()));
        crate::refresh::refresh(&tx, source, &self.plan, self.part, &refresh).await?;
        let applied = self.apply(&mut tx, source, &batch).await?;
        // With several partitions, a change may take a unique value that a row of another
        // partition still holds on the target (a key change moves its row's unique values
        // to the new key's partition while the old key's partition has not deleted it
        // yet). What comes before it commits; it and the rest wait for the others.
        let (last, rest) = if applied < batch.len() {
            let rest = batch.split_off(applied);
            let since = match (applied, held_since) {
                (0, Some(since)) => since,
                _ => Instant::now(),
            };
            if since.elapsed() > HELD_LIMIT {
                return Err(ChangeLogError::Replay {
                    part,
                    table: "-".into(),
                    reason: format!(
                        "a change has conflicted for {} s with rows of other partitions (a unique \
                         value taken on the target): the changes swap values across partitions, \
                         which parallel replay cannot apply; roll back and run with `workers: 1`",
                        HELD_LIMIT.as_secs()
                    ),
                    class: Class::Permanent,
                });
            }
            if applied == 0 {
                // Nothing to commit: the transaction (and the refreshes) roll back.
                let mut batch = rest;
                batch.extend(refresh);
                batch.sort_by_key(|(s, _)| *s);
                self.held = Some(Held {
                    last,
                    batch,
                    since,
                    tried: Instant::now(),
                });
                return Ok(0);
            }
            (
                batch[applied - 1].0,
                Some(Held {
                    last,
                    batch: rest,
                    since,
                    tried: Instant::now(),
                }),
            )
        } else {
            (last, None)
        };
        // The last change the saved position covers: Kafka copies not after it are dropped.
        // With a remainder held, refreshes past the prefix do not count (after a crash they
        // are read and applied again, which changes nothing).
        let at = |c: &Change| (c.lsn, c.ordinal);
        let mut marker = batch.last().map_or(self.last, |(_, c)| at(c));
        if rest.is_none() {
            marker = marker.max(refresh.last().map_or(self.last, |(_, c)| at(c)));
        }
        let saved = tx
            .execute(
                &self.control.save_replay_position(),
                &[
                    &(part as i32),
                    &last.0,
                    &((batch.len() + refresh.len()) as i64),
                    &self.epoch.0,
                    &marker.0.to_string(),
                    &(marker.1 as i32),
                ],
            )
            .await
            .map_err(|e| replay_err(part, "-", &e))?;
        if saved != 1 {
            // Dropping the transaction rolls the batch back; the new holder applies it.
            return Err(ChangeLogError::PartitionLost { part });
        }
        tx.commit().await.map_err(|e| replay_err(part, "-", &e))?;
        self.pos = last;
        self.last = marker;
        self.held = rest;
        // Skipped duplicates count as progress, so the caller does not go idle on them.
        Ok((batch.len() + refresh.len()).max(1))
    }

    /// Applies `batch` in `tx`; returns how many of its first changes were applied: all,
    /// or (with several partitions) those before a change that conflicts with rows of
    /// other partitions.
    async fn apply(
        &self,
        tx: &mut Transaction<'_>,
        source: &Client,
        batch: &[(ChangeSeq, Change)],
    ) -> Result<usize, ChangeLogError> {
        if batch.is_empty() {
            return Ok(0);
        }
        // Collapsing is safe unless a unique constraint other than the key sees an
        // intermediate state; then the batch is applied change by change, in order.
        let db = |e: tokio_postgres::Error| replay_err(self.part, "-", &e);
        let mut sp = tx.savepoint("collapsed").await.map_err(db)?;
        match self.apply_collapsed(&mut sp, source, batch).await {
            Ok(()) => {
                sp.commit().await.map_err(db)?;
                return Ok(batch.len());
            }
            Err((e, Conflict::No)) => return Err(e),
            Err((e, _)) => {
                drop(sp);
                tracing::debug!(part = self.part, error = %e, "batch conflicts when collapsed; applying in order");
            }
        }
        for (i, one) in batch.iter().enumerate() {
            let mut sp = tx.savepoint("one").await.map_err(db)?;
            match self
                .apply_collapsed(&mut sp, source, std::slice::from_ref(one))
                .await
            {
                Ok(()) => sp.commit().await.map_err(db)?,
                Err((e, Conflict::Unique | Conflict::Deadlock)) if self.plan.partitions > 1 => {
                    drop(sp);
                    // The holder may be ahead (its partition applied a later state, e.g.
                    // a row moved there and back): the key's row as the source has it now
                    // fits that state. If it does not, the holder is behind: wait for it.
                    if !self.refresh_one(tx, source, &one.1).await? {
                        tracing::debug!(part = self.part, applied = i, error = %e, "change waits for another partition");
                        return Ok(i);
                    }
                }
                Err((e, _)) => return Err(e),
            }
            // Commit would clear the stage; within this transaction we must.
            tx.execute(&format!("DELETE FROM {}", stage_name(one.1.table)), &[])
                .await
                .map_err(db)?;
        }
        Ok(batch.len())
    }

    /// Replaces the target row of the change's key by the source's row now, in a
    /// savepoint; false when that conflicts with another partition's rows too.
    async fn refresh_one(
        &self,
        tx: &mut Transaction<'_>,
        source: &Client,
        change: &Change,
    ) -> Result<bool, ChangeLogError> {
        let Some(table) = self.plan.table(change.table) else {
            return Err(ChangeLogError::Corrupt(format!(
                "change for unknown table index {}",
                change.table
            )));
        };
        let err = |e: &tokio_postgres::Error| replay_err(self.part, &table.describe(), e);
        let Some(key) = change.key(&table.source_key_index()) else {
            return Ok(false);
        };
        let sp = tx.savepoint("refresh_one").await.map_err(|e| err(&e))?;
        match crate::refresh::refresh_keys(&sp, source, table, &[key]).await {
            Ok(()) => {
                sp.commit().await.map_err(|e| err(&e))?;
                Ok(true)
            }
            Err(e) if conflict_of(&e) != Conflict::No => {
                tracing::debug!(part = self.part, error = %err(&e), "refreshed row conflicts too");
                Ok(false)
            }
            Err(e) => Err(err(&e)),
        }
    }

    async fn apply_collapsed(
        &self,
        tx: &mut Transaction<'_>,
        source: &Client,
        batch: &[(ChangeSeq, Change)],
    ) -> Result<(), (ChangeLogError, Conflict)> {
        let mut by_table: HashMap<u32, Vec<&(ChangeSeq, Change)>> = HashMap::new();
        for c in batch {
            by_table.entry(c.1.table).or_default().push(c);
        }
        let mut tables: Vec<_> = by_table.into_iter().collect();
        tables.sort_by_key(|(t, _)| *t);
        for (t, changes) in tables {
            let Some(table) = self.plan.table(t) else {
                return Err((
                    ChangeLogError::Corrupt(format!("change for unknown table index {t}")),
                    Conflict::No,
                ));
            };
            apply::apply_table(tx, source, table, &changes)
                .await
                .map_err(|e| {
                    (
                        replay_err(self.part, &table.describe(), &e),
                        conflict_of(&e),
                    )
                })?;
        }
        Ok(())
    }
}

mod apply;
mod collapse;
mod rows;
use apply::stage_name;
use rows::row_to_change;
