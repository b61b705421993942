//! Reading the change log as the coordinator does (catch-up, cutover, status), from either
//! backend. Positions are per partition; a replayer at position p has applied every entry
//! up to p (a table's `seq`, or a Kafka offset + 1).

use crate::error::ChangeLogError;
use crate::kafka;
use schemashift_common::change::{Change, Op};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::Lsn;
use schemashift_common::plan::LogPlan;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Position per partition.
pub type LogHead = BTreeMap<u32, i64>;

/// The run's change log: one of the two backends the plan chose.
pub enum ChangeLog<'a> {
    /// `changes` in the control schema, written in capture's transaction.
    Table { control: &'a ControlSql },
    /// A topic; capture records the acknowledged ends in `log_heads` with its position.
    Kafka {
        control: &'a ControlSql,
        brokers: &'a schemashift_common::kafka_conn::KafkaConn,
        topic: &'a str,
    },
}

impl<'a> ChangeLog<'a> {
    pub fn of(plan: &'a LogPlan, control: &'a ControlSql) -> Self {
        match plan {
            LogPlan::Postgres => ChangeLog::Table { control },
            LogPlan::Kafka { conn, topic, .. } => ChangeLog::Kafka {
                control,
                brokers: conn,
                topic,
            },
        }
    }

    /// Where each partition's log ends now.
    pub async fn head(&self, target: &Client) -> Result<LogHead, ChangeLogError> {
        let sql = match self {
            ChangeLog::Table { control } => format!(
                "SELECT part, max(seq) FROM {} GROUP BY part",
                control.table("changes")
            ),
            ChangeLog::Kafka { control, .. } => {
                format!("SELECT part, head FROM {}", control.table("log_heads"))
            }
        };
        let rows = target
            .query(&sql, &[])
            .await
            .map_err(|e| ChangeLogError::db("reading its head", &e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1)))
            .collect())
    }

    /// The changes after `from` up to `to`, per partition.
    pub async fn between(
        &self,
        target: &Client,
        from: &LogHead,
        to: &LogHead,
    ) -> Result<Vec<Change>, ChangeLogError> {
        match self {
            ChangeLog::Table { control } => {
                let mut parts = Vec::with_capacity(to.len());
                let mut lo = Vec::with_capacity(to.len());
                let mut hi = Vec::with_capacity(to.len());
                for (p, h) in to {
                    parts.push(*p as i32);
                    lo.push(from.get(p).copied().unwrap_or(0));
                    hi.push(*h);
                }
                let rows = target
                    .query(
                        &format!(
                            "SELECT c.table_idx, c.op, c.old_key, c.vals FROM {} c \
                             JOIN unnest($1::int[], $2::bigint[], $3::bigint[]) AS r(part, lo, hi) \
                             ON c.part = r.part AND c.seq > r.lo AND c.seq <= r.hi",
                            control.table("changes")
                        ),
                        &[&parts, &lo, &hi],
                    )
                    .await
                    .map_err(|e| ChangeLogError::db("reading changes", &e))?;
                rows.iter()
                    .map(|r| {
                        let op: i8 = r.get(1);
                        Ok(Change {
                            table: r.get::<_, i32>(0) as u32,
                            op: Op::from_code(op).ok_or_else(|| {
                                ChangeLogError::Corrupt(format!("unknown op {op}"))
                            })?,
                            lsn: Lsn(0),
                            xid: 0,
                            ordinal: 0,
                            old_key: r.get(2),
                            values: r
                                .get::<_, Option<Vec<Option<String>>>>(3)
                                .unwrap_or_default(),
                            unchanged: Vec::new(),
                        })
                    })
                    .collect()
            }
            ChangeLog::Kafka { brokers, topic, .. } => {
                Ok(kafka::read_between(brokers, topic, from, to).await?)
            }
        }
    }
}
