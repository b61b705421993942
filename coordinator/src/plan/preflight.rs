//! A fleet's preflight: each member planned before anything is written anywhere, and the
//! plan kept for the member's run so it is not planned twice.

use crate::control::Store;
use crate::error::CoordinatorError;
use schemashift_common::pg::connect;
use schemashift_common::spec::Spec;
use tokio_postgres::Client;

/// A fleet member checked before anything is written: its estimated rows, and the plan its
/// run would make now (`None` when a run already exists: that run resumes instead).
pub struct Preflight {
    pub rows: u64,
    pub planned: Option<Fresh>,
}

/// A plan made by a fleet's preflight, handed to the member's run so the member is not
/// planned twice (two full reads of a small table, and a session each side, per member).
pub struct Fresh {
    pub planned: super::Planned,
    pub at: std::time::Instant,
}

impl Fresh {
    /// Older than this, the run plans again: the tables may have changed since (a later
    /// wave of a fleet cutover starts long after the preflight).
    pub const FOR: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn still(self) -> Option<super::Planned> {
        (self.at.elapsed() < Self::FOR).then_some(self.planned)
    }
}

/// A fleet member's preflight with `workers` as its run will have them: every problem
/// `plan` would report, as the error; nothing is written.
pub async fn preflight(spec: &Spec, workers: usize) -> Result<Preflight, CoordinatorError> {
    let source = connect(&spec.source, "source").await?;
    let target = connect(&spec.target, "target").await?;
    let (resuming, planned) = plan_now(spec, &source, &target, workers).await?;
    let planned = planned?;
    let rows = planned.analysis.iter().map(|t| t.rows).sum();
    Ok(Preflight {
        rows,
        planned: (!resuming).then(|| Fresh {
            planned,
            at: std::time::Instant::now(),
        }),
    })
}

/// Plans `spec` as a run with `workers` would now, and says whether a run already exists
/// (then it is planned as resuming: its target need not be empty). The outer error: a
/// server could not be read; the inner one: every problem with the spec.
pub(crate) async fn plan_now(
    spec: &Spec,
    source: &Client,
    target: &Client,
    workers: usize,
) -> Result<(bool, Result<super::Planned, CoordinatorError>), CoordinatorError> {
    let resuming = Store::new(&spec.control_schema)
        .load(target)
        .await?
        .is_some();
    let planned = super::plan(
        spec,
        source,
        target,
        &super::PlanOptions { workers, resuming },
    )
    .await;
    Ok((resuming, planned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemashift_common::plan::{LogPlan, RunPlan};
    use std::time::{Duration, Instant};

    fn planned() -> super::super::Planned {
        super::super::Planned {
            plan: RunPlan {
                helpers: Vec::new(),
                tables: Vec::new(),
                partitions: 4,
                control_schema: "schemashift".into(),
                changelog: LogPlan::Postgres,
                low_priority: false,
                replay_batch: 1000,
                publication: None,
                spec_print: None,
            },
            shards: Vec::new(),
            analysis: Vec::new(),
            reverse_notes: Vec::new(),
        }
    }

    #[test]
    fn a_plan_from_moments_ago_is_used_and_an_old_one_is_made_again() {
        let now = Fresh {
            planned: planned(),
            at: Instant::now(),
        };
        assert!(now.still().is_some());
        let Some(then) = Instant::now().checked_sub(Fresh::FOR + Duration::from_secs(1)) else {
            return; // the clock started less than a minute ago: nothing to compare with
        };
        let old = Fresh {
            planned: planned(),
            at: then,
        };
        assert!(old.still().is_none());
    }
}
