//! Replay: applies one change-log partition to the target with the same mapping as the
//! backfill, in batches. Per batch, each key's changes collapse to one final action
//! (delete, full upsert, or partial update when pgoutput withheld unchanged TOAST
//! values), loaded into a staging table with one COPY and applied with one statement per
//! action kind; the partition position is saved in the same transaction.

use crate::error::pg_reason;
use crate::kafka::PartitionReader;
use crate::WorkerError;
use schemashift_common::change::Change;
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{ChangeSeq, LeaseEpoch, Lsn};
use schemashift_common::plan::{LogPlan, RunPlan};
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
}

struct Held {
    last: ChangeSeq,
    batch: Vec<(ChangeSeq, Change)>,
    since: Instant,
}

/// How long a batch may wait for other partitions to release a unique value.
const HELD_LIMIT: Duration = Duration::from_secs(60);

impl PartitionReplayer {
    /// Reads the partition's position and creates the session's staging tables.
    pub async fn open(
        target: &Client,
        plan: Arc<RunPlan>,
        lease: PartitionLease,
    ) -> Result<Self, WorkerError> {
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
                    .map_err(|e| WorkerError::ChangeLog(e.to_string()))?,
                o.max(0) as u32,
            ),
            _ => (Lsn(0), 0),
        };
        let source = match &plan.changelog {
            LogPlan::Postgres => Source::Table,
            LogPlan::Kafka { brokers, topic, .. } => Source::Kafka(PartitionReader::open(
                brokers,
                topic,
                part,
                pos.0,
                &format!("schemashift-replay-{part}"),
            )?),
        };
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
    ) -> Result<Vec<(ChangeSeq, Change)>, WorkerError> {
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
                    .map(|r| row_to_change(r).map_err(WorkerError::ChangeLog))
                    .collect()
            }
            Source::Kafka(reader) => Ok(reader
                .read(max as usize, std::time::Duration::from_millis(20))
                .await?),
        }
    }

    /// Drops Kafka's re-sent copies. Capture re-sends what it produced but had not
    /// confirmed before a crash. A partition's changes come in (commit LSN, ordinal) order,
    /// so anything not after the latest seen is a copy, whether applied before or earlier
    /// in this batch.
    fn fresh(&self, mut batch: Vec<(ChangeSeq, Change)>) -> Vec<(ChangeSeq, Change)> {
        if let Source::Kafka(_) = self.source {
            let mut latest = self.last;
            batch.retain(|(_, c)| {
                let fresh = (c.lsn, c.ordinal) > latest;
                latest = latest.max((c.lsn, c.ordinal));
                fresh
            });
        }
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
    ) -> Result<usize, WorkerError> {
        let part = self.part;
        let (last, batch, held_since) = match self.held.take() {
            Some(h) => (h.last, h.batch, Some(h.since)),
            None => {
                let fetched = self.fetch(target, max).await?;
                let Some(last) = fetched.last().map(|(s, _)| *s) else {
                    return Ok(0);
                };
                (last, self.fresh(fetched), None)
            }
        };
        let marker = batch
            .last()
            .map(|(_, c)| (c.lsn, c.ordinal))
            .unwrap_or(self.last);
        let mut tx = target
            .transaction()
            .await
            .map_err(|e| replay_err(part, "-", &e))?;
        let (refresh, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(_, c)| self.plan.table(c.table).is_some_and(|t| t.refreshes()));
        crate::refresh::refresh(&tx, source, &self.plan, self.part, &refresh).await?;
        if !batch.is_empty() {
            match self.apply(&mut tx, source, &batch).await {
                Ok(()) => {}
                // With several partitions, a row of this batch may take a unique value that
                // a row of another partition still holds on the target (a row moved to a key
                // of another partition, whose old key that partition has not deleted yet):
                // keep the batch and try again once the others have moved on.
                Err((e, true)) if self.plan.partitions > 1 => {
                    let since = held_since.unwrap_or_else(Instant::now);
                    if since.elapsed() > HELD_LIMIT {
                        return Err(WorkerError::Replay {
                            part,
                            table: "-".into(),
                            reason: format!(
                                "{e}; no other partition released the value in {} s: the changes \
                                 conflict across partitions (values swapped between rows), which \
                                 parallel replay cannot apply; roll back and run with `workers: 1`",
                                HELD_LIMIT.as_secs()
                            ),
                            transient: false,
                        });
                    }
                    tracing::debug!(part, error = %e, "batch waits for another partition");
                    let mut batch = batch;
                    batch.extend(refresh);
                    batch.sort_by_key(|(s, _)| *s);
                    self.held = Some(Held { last, batch, since });
                    return Ok(0);
                }
                Err((e, _)) => return Err(e),
            }
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
            return Err(WorkerError::PartitionLost { part });
        }
        tx.commit().await.map_err(|e| replay_err(part, "-", &e))?;
        self.pos = last;
        self.last = marker;
        // Skipped duplicates count as progress, so the caller does not go idle on them.
        Ok((batch.len() + refresh.len()).max(1))
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'_>,
        source: &Client,
        batch: &[(ChangeSeq, Change)],
    ) -> Result<(), (WorkerError, bool)> {
        // Collapsing is safe unless a unique constraint other than the key sees an
        // intermediate state; then the batch is applied change by change, in order. Err
        // says whether a unique constraint still refused it then.
        let db = |e: tokio_postgres::Error| (replay_err(self.part, "-", &e), false);
        let mut sp = tx.savepoint("collapsed").await.map_err(db)?;
        match self.apply_collapsed(&mut sp, source, batch).await {
            Ok(()) => sp.commit().await.map_err(db),
            Err((e, unique)) if unique => {
                drop(sp);
                tracing::debug!(part = self.part, error = %e, "batch conflicts when collapsed; applying in order");
                for one in batch {
                    self.apply_collapsed(tx, source, std::slice::from_ref(one))
                        .await?;
                    // Commit would clear the stage; within this transaction we must.
                    tx.execute(&format!("DELETE FROM {}", stage_name(one.1.table)), &[])
                        .await
                        .map_err(db)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn apply_collapsed(
        &self,
        tx: &mut Transaction<'_>,
        source: &Client,
        batch: &[(ChangeSeq, Change)],
    ) -> Result<(), (WorkerError, bool)> {
        let mut by_table: HashMap<u32, Vec<&(ChangeSeq, Change)>> = HashMap::new();
        for c in batch {
            by_table.entry(c.1.table).or_default().push(c);
        }
        let mut tables: Vec<_> = by_table.into_iter().collect();
        tables.sort_by_key(|(t, _)| *t);
        for (t, changes) in tables {
            let Some(table) = self.plan.table(t) else {
                return Err((
                    WorkerError::ChangeLog(format!("change for unknown table index {t}")),
                    false,
                ));
            };
            apply::apply_table(tx, source, table, &changes)
                .await
                .map_err(|e| {
                    let unique = e.code() == Some(&SqlState::UNIQUE_VIOLATION);
                    (replay_err(self.part, &table.describe(), &e), unique)
                })?;
        }
        Ok(())
    }
}

pub(crate) fn replay_err(part: u32, table: &str, e: &tokio_postgres::Error) -> WorkerError {
    let (reason, transient) = pg_reason(e);
    WorkerError::Replay {
        part,
        table: table.to_owned(),
        reason,
        transient,
    }
}

mod apply;
mod collapse;
mod rows;
use apply::stage_name;
use rows::row_to_change;
