//! Where capture writes decoded changes: the control schema's `changes` table, or Kafka.
//! Either way the capture position is saved only once the changes are durable (committed
//! with them, or acknowledged by Kafka), and the slot advances only after that.

use crate::error::CoordinatorError;
use schemashift_changelog::kafka::{ChangeProducer, Outgoing};
use schemashift_common::change::{Change, Op};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::Lsn;
use schemashift_common::plan::{LogPlan, RunPlan};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{PgLsn, Type};
use tokio_postgres::Client;

pub enum Sink {
    Table(Growth),
    /// With each table's key positions, computed once (the message key needs them).
    Kafka(ChangeProducer, HashMap<u32, Vec<usize>>),
}

fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

/// Rows this capture appended to the table log, and how many there were at its last
/// ANALYZE. The log grows from nothing faster than autovacuum analyzes it (a million
/// changes in seconds); with the empty table's statistics the planner reads a partition's
/// next batch by sorting everything after the position (measured: 590 ms per batch at 1M
/// rows, 2 ms once analyzed). So capture analyzes it whenever it has doubled.
#[derive(Default)]
pub struct Growth {
    appended: AtomicU64,
    analyzed_at: AtomicU64,
}

/// Below this the sort costs little.
const ANALYZE_FROM_ROWS: u64 = 10_000;

impl Growth {
    async fn grew(
        &self,
        target: &Client,
        control: &ControlSql,
        rows: usize,
    ) -> Result<(), CoordinatorError> {
        let n = self.appended.fetch_add(rows as u64, Ordering::Relaxed) + rows as u64;
        if n < ANALYZE_FROM_ROWS || n < 2 * self.analyzed_at.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Only the columns replay's read filters and orders by: statistics of the value
        // arrays (most common elements) cost far more and no plan uses them.
        target
            .batch_execute(&format!("ANALYZE {} (part, seq)", control.table("changes")))
            .await
            .map_err(db("analyzing the change log"))?;
        self.analyzed_at.store(n, Ordering::Relaxed);
        tracing::debug!(appended = n, "change log analyzed");
        Ok(())
    }
}

impl Sink {
    pub fn for_plan(plan: &RunPlan) -> Result<Sink, CoordinatorError> {
        Ok(match &plan.changelog {
            LogPlan::Postgres => Sink::Table(Growth::default()),
            LogPlan::Kafka {
                conn: brokers,
                topic,
                ..
            } => Sink::Kafka(
                ChangeProducer::new(brokers, topic)?,
                plan.tables
                    .iter()
                    .map(|t| (t.index, t.source_key_index()))
                    .collect(),
            ),
        })
    }

    /// Makes `changes` durable, then records `end` as the capture position.
    pub async fn write(
        &self,
        target: &mut Client,
        control: &ControlSql,
        changes: &[(u32, Change)],
        end: Lsn,
    ) -> Result<(), CoordinatorError> {
        match self {
            Sink::Table(growth) => {
                append(target, control, changes, end).await?;
                growth.grew(target, control, changes.len()).await
            }
            Sink::Kafka(producer, key_index) => {
                // Consumers can link what they apply to the capture that produced it.
                let traceparent = schemashift_common::trace::current_traceparent();
                let batch: Vec<Outgoing> = changes
                    .iter()
                    .map(|(part, c)| {
                        let key = key_index
                            .get(&c.table)
                            .and_then(|k| c.key(k))
                            .unwrap_or_default();
                        Outgoing {
                            partition: *part,
                            key: schemashift_proto::change_key(c.table, &key),
                            value: schemashift_proto::encode_change(c),
                            traceparent: traceparent.clone(),
                        }
                    })
                    .collect();
                let heads = producer.send_all(&batch).await?;
                // Only where Kafka really holds changes the saved position does not cover: a
                // round that only moves the position (no changes of ours) proves nothing.
                if !batch.is_empty() {
                    crate::failpoint("capture-after-kafka-ack");
                }
                save_position(target, control, end, &heads).await
            }
        }
    }
}

/// The capture position and where the acknowledged deliveries end, in one transaction:
/// a catch-up that sees the position also sees heads covering its changes.
async fn save_position(
    target: &mut Client,
    control: &ControlSql,
    end: Lsn,
    heads: &BTreeMap<u32, i64>,
) -> Result<(), CoordinatorError> {
    let e = db("saving the capture position");
    let tx = target.transaction().await.map_err(&e)?;
    if !heads.is_empty() {
        let (parts, ends): (Vec<i32>, Vec<i64>) =
            heads.iter().map(|(p, h)| (*p as i32, *h)).unzip();
        tx.execute(
            &format!(
                "INSERT INTO {t} AS h (part, head) SELECT * FROM unnest($1::int[], $2::bigint[]) \
                 ON CONFLICT (part) DO UPDATE SET head = GREATEST(h.head, EXCLUDED.head)",
                t = control.table("log_heads")
            ),
            &[&parts, &ends],
        )
        .await
        .map_err(&e)?;
    }
    commit_with_position(tx, control, end).await
}

/// Records `end` as the capture position and commits what the transaction holds.
async fn commit_with_position(
    tx: tokio_postgres::Transaction<'_>,
    control: &ControlSql,
    end: Lsn,
) -> Result<(), CoordinatorError> {
    let e = db("saving the capture position");
    tx.execute(&position_sql(control), &[&end.to_string()])
        .await
        .map_err(&e)?;
    tx.commit().await.map_err(&e)
}

/// Never moves back: a capture that lost a race with a newer one (fenced elsewhere) cannot
/// make the next start re-read what the log already holds past it.
pub fn position_sql(control: &ControlSql) -> String {
    format!(
        "INSERT INTO {} AS c (id, lsn) VALUES (1, $1::text::pg_lsn) \
         ON CONFLICT (id) DO UPDATE SET lsn = GREATEST(c.lsn, EXCLUDED.lsn), updated_at = now()",
        control.table("capture")
    )
}

/// The changes and the capture position in one target transaction. One binary COPY: the
/// values go as they are, with nothing to escape on our side or parse on the server's
/// (a JSON document per 1,000 changes cost more CPU on both sides than the rows' writes).
async fn append(
    target: &mut Client,
    control: &ControlSql,
    changes: &[(u32, Change)],
    end: Lsn,
) -> Result<(), CoordinatorError> {
    let e = db("appending to the change log");
    let tx = target.transaction().await.map_err(&e)?;
    let sink = tx
        .copy_in(&format!(
            "COPY {} (part, table_idx, op, lsn, ordinal, old_key, vals, unchanged) \
             FROM STDIN (FORMAT binary)",
            control.table("changes")
        ))
        .await
        .map_err(&e)?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT4,
            Type::INT4,
            Type::CHAR,
            Type::PG_LSN,
            Type::INT4,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::INT2_ARRAY,
        ],
    );
    futures_util::pin_mut!(writer);
    for (part, c) in changes {
        let (part, table, op) = (*part as i32, c.table as i32, c.op.code());
        let (lsn, ordinal) = (PgLsn::from(c.lsn.0), c.ordinal as i32);
        let vals = (c.op != Op::Delete).then_some(&c.values);
        let unchanged: Option<Vec<i16>> =
            (!c.unchanged.is_empty()).then(|| c.unchanged.iter().map(|&u| u as i16).collect());
        writer
            .as_mut()
            .write(&[
                &part, &table, &op, &lsn, &ordinal, &c.old_key, &vals, &unchanged,
            ])
            .await
            .map_err(&e)?;
    }
    writer.finish().await.map_err(&e)?;
    commit_with_position(tx, control, end).await
}
