//! Replay: applies one change-log partition to the target with the same mapping as the
//! backfill, in batches. Per batch, each key's changes collapse to one final action
//! (delete, full upsert, or partial update when pgoutput withheld unchanged TOAST
//! values), loaded into a staging table with one COPY and applied with one statement per
//! action kind; the partition position is saved in the same transaction.

use crate::error::pg_reason;
use crate::kafka::PartitionReader;
use crate::WorkerError;
use futures_util::SinkExt;
use schemashift_common::change::{Change, Op};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{ChangeSeq, LeaseEpoch, Lsn};
use schemashift_common::plan::{LogPlan, RunPlan, TablePlan};
use schemashift_common::service::PartitionLease;
use schemashift_common::sql::{ident_list, quote_ident};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
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
}

/// What one key ends up as after the changes of a batch.
#[derive(Clone, Debug)]
enum Action {
    Delete,
    Upsert(Vec<Option<String>>),
    /// Values with the positions that were not sent (unchanged TOAST).
    Partial(Vec<Option<String>>, BTreeSet<u16>),
}

fn stage_name(table: u32) -> String {
    quote_ident(&format!("schemashift_stage_{table}"))
}

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

    /// Applies up to `max` changes; returns how many were applied (0: caught up).
    /// `source` serves tables whose mapping reads other tables (merges): their rows are
    /// re-read from it by key.
    pub async fn step(
        &mut self,
        target: &mut Client,
        source: &Client,
        max: i64,
    ) -> Result<usize, WorkerError> {
        let part = self.part;
        let fetched = self.fetch(target, max).await?;
        let Some(last) = fetched.last().map(|(s, _)| *s) else {
            return Ok(0);
        };
        let mut batch = fetched;
        if let Source::Kafka(_) = self.source {
            // Capture re-sends what it produced but had not confirmed before a crash. A
            // partition's changes come in (commit LSN, ordinal) order, so anything not after
            // the latest seen is a copy, whether applied before or earlier in this batch.
            let mut latest = self.last;
            batch.retain(|(_, c)| {
                let fresh = (c.lsn, c.ordinal) > latest;
                latest = latest.max((c.lsn, c.ordinal));
                fresh
            });
        }
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
            self.apply(&mut tx, &batch).await?;
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
        batch: &[(ChangeSeq, Change)],
    ) -> Result<(), WorkerError> {
        // Collapsing is safe unless a unique constraint other than the key sees an
        // intermediate state; then the batch is applied change by change, in order.
        let mut sp = tx
            .savepoint("collapsed")
            .await
            .map_err(|e| replay_err(self.part, "-", &e))?;
        match self.apply_collapsed(&mut sp, batch).await {
            Ok(()) => sp
                .commit()
                .await
                .map_err(|e| replay_err(self.part, "-", &e)),
            Err((e, unique)) if unique => {
                drop(sp);
                tracing::debug!(part = self.part, error = %e, "batch conflicts when collapsed; applying in order");
                for one in batch {
                    self.apply_collapsed(tx, std::slice::from_ref(one))
                        .await
                        .map_err(|(e, _)| e)?;
                    // Commit would clear the stage; within this transaction we must.
                    tx.execute(&format!("DELETE FROM {}", stage_name(one.1.table)), &[])
                        .await
                        .map_err(|e| replay_err(self.part, "-", &e))?;
                }
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    async fn apply_collapsed(
        &self,
        tx: &mut Transaction<'_>,
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
            self.apply_table(tx, table, &changes).await.map_err(|e| {
                let unique = e.code() == Some(&SqlState::UNIQUE_VIOLATION);
                (replay_err(self.part, &table.describe(), &e), unique)
            })?;
        }
        Ok(())
    }

    async fn apply_table(
        &self,
        tx: &Transaction<'_>,
        table: &TablePlan,
        changes: &[&(ChangeSeq, Change)],
    ) -> Result<(), tokio_postgres::Error> {
        let key_idx = table.source_key_index();
        let ncols = table.source_columns.len();
        let mut last: HashMap<Vec<String>, (ChangeSeq, Action)> = HashMap::new();
        for (seq, c) in changes.iter().map(|x| (&x.0, &x.1)) {
            let new_key = c.key(&key_idx);
            if let Some(old) = &c.old_key {
                if c.op == Op::Delete || Some(old) != new_key.as_ref() {
                    last.insert(old.clone(), (*seq, Action::Delete));
                }
            }
            if c.op == Op::Delete {
                continue;
            }
            let Some(key) = new_key else { continue };
            let action = if c.unchanged.is_empty() {
                Action::Upsert(c.values.clone())
            } else {
                let mut vals = c.values.clone();
                let mut missing: BTreeSet<u16> = c.unchanged.iter().copied().collect();
                match last.get(&key) {
                    Some((_, Action::Upsert(prev))) => {
                        for &i in &missing {
                            vals[i as usize] = prev[i as usize].clone();
                        }
                        missing.clear();
                    }
                    Some((_, Action::Partial(prev, prev_missing))) => {
                        missing.retain(|i| {
                            if prev_missing.contains(i) {
                                true
                            } else {
                                vals[*i as usize] = prev[*i as usize].clone();
                                false
                            }
                        });
                    }
                    _ => {}
                }
                if missing.is_empty() {
                    Action::Upsert(vals)
                } else {
                    Action::Partial(vals, missing)
                }
            };
            last.insert(key, (*seq, action));
        }

        // Stage: group -1 deletes (key only), 0 upserts, 1.. one per set of missing columns.
        let mut groups: Vec<BTreeSet<u16>> = Vec::new();
        let mut lines = String::new();
        let mut entries: Vec<_> = last.into_iter().collect();
        entries.sort_by_key(|(_, (seq, _))| *seq);
        for (key, (seq, action)) in &entries {
            let (grp, vals): (i32, Vec<Option<String>>) = match action {
                Action::Delete => {
                    let mut v = vec![None; ncols];
                    for (k, &i) in key.iter().zip(&key_idx) {
                        v[i] = Some(k.clone());
                    }
                    (-1, v)
                }
                Action::Upsert(v) => (0, v.clone()),
                Action::Partial(v, missing) => {
                    let g = match groups.iter().position(|m| m == missing) {
                        Some(g) => g,
                        None => {
                            groups.push(missing.clone());
                            groups.len() - 1
                        }
                    };
                    (g as i32 + 1, v.clone())
                }
            };
            lines.push_str(&seq.0.to_string());
            lines.push('\t');
            lines.push_str(&grp.to_string());
            for v in vals.iter().take(ncols) {
                lines.push('\t');
                match v {
                    None => lines.push_str("\\N"),
                    Some(s) => escape_copy_text(s, &mut lines),
                }
            }
            lines.push('\n');
        }
        let stage = stage_name(table.index);
        let sink = tx
            .copy_in(&format!("COPY {stage} FROM STDIN (FORMAT text)"))
            .await?;
        futures_util::pin_mut!(sink);
        sink.feed(bytes::Bytes::from(lines)).await?;
        sink.as_mut().finish().await?;

        let tkeys: Vec<String> = table.target_key.iter().map(|k| k.name.clone()).collect();
        let key_join = table
            .key
            .iter()
            .zip(&table.target_key)
            .map(|(s, t)| format!("t.{} = s.{}", quote_ident(&t.name), quote_ident(&s.name)))
            .collect::<Vec<_>>()
            .join(" AND ");
        tx.execute(
            &format!(
                "DELETE FROM {} t USING {stage} s WHERE s.__grp = -1 AND {key_join}",
                table.target
            ),
            &[],
        )
        .await?;
        let non_key: Vec<&String> = table
            .columns
            .iter()
            .map(|c| &c.target)
            .filter(|c| !tkeys.contains(c))
            .collect();
        let on_conflict = if non_key.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!(
                "DO UPDATE SET {}",
                non_key
                    .iter()
                    .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        tx.execute(
            &format!(
                "INSERT INTO {} ({}) SELECT {} FROM {stage} WHERE __grp = 0 ORDER BY __seq \
                 ON CONFLICT ({}) {on_conflict}",
                table.target,
                ident_list(&table.target_column_names()),
                table.mapped_select_list(),
                ident_list(&tkeys),
            ),
            &[],
        )
        .await?;
        for (g, missing) in groups.iter().enumerate() {
            let missing_names: BTreeSet<&str> = missing
                .iter()
                .filter_map(|&i| {
                    table
                        .source_columns
                        .get(i as usize)
                        .map(|c| c.name.as_str())
                })
                .collect();
            let settable: Vec<_> = table
                .columns
                .iter()
                .filter(|c| !tkeys.contains(&c.target))
                .filter(|c| c.deps.iter().all(|d| !missing_names.contains(d.as_str())))
                .collect();
            if settable.is_empty() {
                continue;
            }
            let names: Vec<String> = settable.iter().map(|c| c.target.clone()).collect();
            let exprs = settable
                .iter()
                .map(|c| {
                    format!(
                        "({})::{} AS {}",
                        c.expr,
                        c.target_type,
                        quote_ident(&c.target)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let keys = table
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} AS __k{i}", quote_ident(&k.name)))
                .collect::<Vec<_>>()
                .join(", ");
            let m_join = table
                .target_key
                .iter()
                .enumerate()
                .map(|(i, t)| format!("t.{} = m.__k{i}", quote_ident(&t.name)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let m_cols = names
                .iter()
                .map(|n| format!("m.{}", quote_ident(n)))
                .collect::<Vec<_>>()
                .join(", ");
            tx.execute(
                &format!(
                    "UPDATE {} t SET ({}) = ROW({m_cols}) FROM (SELECT {exprs}, {keys} FROM {stage} \
                     WHERE __grp = {}) m WHERE {m_join}",
                    table.target,
                    ident_list(&names),
                    g + 1
                ),
                &[],
            )
            .await?;
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

mod rows;
use rows::{escape_copy_text, row_to_change};
