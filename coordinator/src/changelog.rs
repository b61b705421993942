//! The run's change log as the coordinator reads it: a table in the control schema or a
//! Kafka topic. Positions are per partition; a replayer at position p has applied every
//! entry up to p (a table's `seq`, or a Kafka offset + 1).

use crate::error::CoordinatorError;
use crate::run::RunCtx;
use schemashift_common::change::{Change, Op};
use schemashift_common::plan::LogPlan;
use schemashift_worker::kafka;
use std::collections::BTreeMap;

/// Position per partition.
pub type LogHead = BTreeMap<u32, i64>;

impl RunCtx {
    /// Where each partition's log ends now.
    pub async fn log_head(&self) -> Result<LogHead, CoordinatorError> {
        let sql = match &self.plan.changelog {
            LogPlan::Postgres => format!(
                "SELECT part, max(seq) FROM {} GROUP BY part",
                self.store.sql.table("changes")
            ),
            // Capture saves the acknowledged ends with its position (see capture::sink).
            LogPlan::Kafka { .. } => format!(
                "SELECT part, head FROM {}",
                self.store.sql.table("log_heads")
            ),
        };
        let rows = self
            .target
            .query(&sql, &[])
            .await
            .map_err(|e| CoordinatorError::db("reading change log head", &e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1)))
            .collect())
    }

    /// The changes after `from` up to `to`, per partition.
    pub async fn log_between(
        &self,
        from: &LogHead,
        to: &LogHead,
    ) -> Result<Vec<Change>, CoordinatorError> {
        match &self.plan.changelog {
            LogPlan::Postgres => {
                let (parts, lo, hi): (Vec<i32>, Vec<i64>, Vec<i64>) = to
                    .iter()
                    .map(|(p, hi)| (*p as i32, from.get(p).copied().unwrap_or(0), *hi))
                    .fold(
                        (vec![], vec![], vec![]),
                        |(mut a, mut b, mut c), (p, l, h)| {
                            a.push(p);
                            b.push(l);
                            c.push(h);
                            (a, b, c)
                        },
                    );
                let rows = self
                    .target
                    .query(
                        &format!(
                            "SELECT c.table_idx, c.op, c.old_key, c.vals FROM {} c \
                             JOIN unnest($1::int[], $2::bigint[], $3::bigint[]) AS r(part, lo, hi) \
                             ON c.part = r.part AND c.seq > r.lo AND c.seq <= r.hi",
                            self.store.sql.table("changes")
                        ),
                        &[&parts, &lo, &hi],
                    )
                    .await
                    .map_err(|e| CoordinatorError::db("reading the change log", &e))?;
                rows.iter()
                    .map(|r| {
                        let op: i8 = r.get(1);
                        Ok(Change {
                            table: r.get::<_, i32>(0) as u32,
                            op: Op::from_code(op).ok_or_else(|| {
                                CoordinatorError::State(format!("change log holds unknown op {op}"))
                            })?,
                            lsn: schemashift_common::ids::Lsn(0),
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
            LogPlan::Kafka { brokers, topic, .. } => {
                Ok(kafka::read_between(brokers, topic, from, to).await?)
            }
        }
    }
}
