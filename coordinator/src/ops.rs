//! Operator commands over an existing run: status, verify, cleanup, rollback.

use crate::control::{Phase, Store};
use crate::error::CoordinatorError;
use crate::replay::CatchUp;
use crate::run::{LocalWorker, RunCtx, VerifySummary, Workers};
use crate::verify::Verify;
use schemashift_common::pg::connect;
use schemashift_common::plan::{LogPlan, ShardRange};
use schemashift_common::spec::Spec;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Debug, Default, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub retained_wal_bytes: i64,
    pub unconfirmed_bytes: i64,
}

/// A worker as the coordinator last heard from it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerStatus {
    pub worker: String,
    pub host: String,
    pub state: String,
    pub lease: Option<String>,
    pub rows: i64,
    pub changes: i64,
    pub rows_per_s: f64,
    pub seconds_since_seen: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ShardStatus {
    pub shard: i64,
    pub estimated_rows: i64,
    pub table: String,
    pub range: String,
    pub state: String,
    pub worker: Option<String>,
    pub rows: Option<i64>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// One change-log partition: where the log ends and how far replay applied it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PartitionLag {
    pub partition: u32,
    pub head: i64,
    pub applied: i64,
    /// Entries waiting to be applied (Kafka messages, or change-log rows).
    pub lag: i64,
    pub worker: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub run_id: Option<String>,
    pub phase: String,
    pub shards: crate::control::ShardCounts,
    pub tables: Vec<String>,
    pub changes_logged: i64,
    pub changes_applied: i64,
    pub replay_lag_changes: i64,
    pub capture_lsn: Option<String>,
    pub slot: Option<SlotStatus>,
    pub report: Option<serde_json::Value>,
    pub workers: Vec<WorkerStatus>,
    pub shard_list: Vec<ShardStatus>,
    /// `postgres` or the Kafka topic.
    pub changelog: String,
    pub partitions: Vec<PartitionLag>,
    /// Replay batches given back after an error.
    pub replay_failures: i64,
    /// Rows per second of the backfill so far, and the estimated seconds until it is done
    /// (then replay catches up and the run is ready to verify and cut over).
    pub backfill_rows_per_s: f64,
    pub eta_seconds: Option<f64>,
    /// New shards are held back because the source is under stress.
    pub throttled: bool,
    pub throttle_reason: Option<String>,
    /// Time spent throttled so far, and how many times it started.
    pub throttled_seconds: f64,
    pub throttle_episodes: i32,
    /// Times the throttle measured its baseline again (the source got slower for reasons
    /// not ours), and why the last time.
    pub throttle_rebaselines: i32,
    pub throttle_rebaseline_reason: Option<String>,
    /// The probe latency the throttle compares with (ms); a fleet's members on one source
    /// server share it.
    pub throttle_baseline_ms: Option<f64>,
    /// Set while an operator has the run paused (`schemashift pause`).
    pub paused: Option<crate::pause::Paused>,
    /// Tables whose shards kept failing: stopped alone until `run` copies them again.
    pub stopped_tables: Vec<crate::stopped::StoppedTable>,
    /// Target indexes dropped for the load and not built yet (`index on table`): all of
    /// them during the backfill, then those that are not unique until replay catches up.
    pub indexes_to_build: Vec<String>,
}

fn db(context: &str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::db(context, &e)
}

pub async fn status(spec: &Spec) -> Result<Status, CoordinatorError> {
    let target = connect(&spec.target, "target").await?;
    let store = Store::new(&spec.control_schema);
    let Some(state) = store.load(&target).await? else {
        return Ok(Status {
            phase: "none".into(),
            ..Status::default()
        });
    };
    let mut st = Status {
        run_id: Some(state.run_id.0.clone()),
        phase: state.phase.as_str().into(),
        shards: store.shard_counts(&target).await?,
        tables: state.plan.tables.iter().map(|t| t.describe()).collect(),
        ..Status::default()
    };
    let row = target
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {c}), (SELECT coalesce(sum(applied), 0)::bigint FROM {r}), \
                 (SELECT count(*) FROM {c} c WHERE c.seq > coalesce((SELECT seq FROM {r} r WHERE r.part = c.part), 0)), \
                 (SELECT report::text FROM {run})",
                c = store.sql.table("changes"),
                r = store.sql.table("replay"),
                run = store.sql.table("run")
            ),
            &[],
        )
        .await
        .map_err(db("reading status"))?;
    st.paused = crate::pause::read(&target, &store.sql).await?;
    st.stopped_tables = crate::stopped::list(&target, &store.sql, &state.plan).await?;
    st.indexes_to_build = crate::indexes::to_build(&target, &store).await?;
    st.changes_logged = row.get(0);
    st.changes_applied = row.get(1);
    st.replay_lag_changes = row.get(2);
    st.report = row
        .get::<_, Option<String>>(3)
        .and_then(|s| serde_json::from_str(&s).ok());
    st.workers = target
        .query(
            &format!(
                "SELECT worker, host, state, lease, rows, changes, rows_per_s, \
                 extract(epoch FROM now() - last_seen)::float8 FROM {} ORDER BY worker",
                store.sql.table("workers")
            ),
            &[],
        )
        .await
        .map_err(db("reading workers"))?
        .iter()
        .map(|r| WorkerStatus {
            worker: r.get(0),
            host: r.get(1),
            state: r.get(2),
            lease: r.get(3),
            rows: r.get(4),
            changes: r.get(5),
            rows_per_s: r.get(6),
            seconds_since_seen: r.get(7),
        })
        .collect();
    st.shard_list = target
        .query(
            &format!(
                "SELECT shard_id, table_idx, lo, hi, state, worker, rows, attempts, last_error, est_rows \
                 FROM {} ORDER BY shard_id",
                store.sql.table("shards")
            ),
            &[],
        )
        .await
        .map_err(db("reading shards"))?
        .iter()
        .map(|r| ShardStatus {
            shard: r.get(0),
            table: state
                .plan
                .table(r.get::<_, i32>(1) as u32)
                .map(|t| t.target.to_string())
                .unwrap_or_default(),
            range: ShardRange {
                lo: r.get(2),
                hi: r.get(3),
            }
            .to_string(),
            state: r.get(4),
            worker: r.get(5),
            rows: r.get(6),
            attempts: r.get(7),
            last_error: r.get(8),
            estimated_rows: r.get(9),
        })
        .collect();
    let (sql, changelog) = match &state.plan.changelog {
        LogPlan::Postgres => (
            format!(
                "SELECT part, count(*) FROM {} GROUP BY part",
                store.sql.table("changes")
            ),
            "postgres".to_owned(),
        ),
        // Where capture's acknowledged deliveries end (saved with its position); status
        // needs no broker for it.
        LogPlan::Kafka { topic, .. } => (
            format!("SELECT part, head FROM {}", store.sql.table("log_heads")),
            format!("kafka topic {topic}"),
        ),
    };
    let heads: BTreeMap<u32, i64> = target
        .query(&sql, &[])
        .await
        .map_err(db("reading the change log"))?
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1)))
        .collect();
    st.changelog = changelog;
    let kafka = matches!(state.plan.changelog, LogPlan::Kafka { .. });
    for r in target
        .query(
            &format!(
                "SELECT part, seq, applied, worker FROM {} ORDER BY part",
                store.sql.table("replay")
            ),
            &[],
        )
        .await
        .map_err(db("reading replay positions"))?
    {
        let part = r.get::<_, i32>(0) as u32;
        let (seq, applied): (i64, i64) = (r.get(1), r.get(2));
        // Nothing logged to a partition yet: its log ends at 0.
        let head = heads.get(&part).copied().unwrap_or(0);
        // A table log's seq is global; its lag is counted as rows after the position.
        let lag = if kafka { head - seq } else { head - applied }.max(0);
        st.partitions.push(PartitionLag {
            partition: part,
            head,
            applied: if kafka { seq } else { applied },
            lag,
            worker: r.get(3),
        });
    }
    let (elapsed, remaining): (Option<f64>, i64) = target
        .query_one(
            &format!(
                "SELECT extract(epoch FROM now() - min(started_at))::float8, \
                 coalesce(sum(est_rows) FILTER (WHERE state NOT IN ('done', 'stopped')), 0)::bigint FROM {}",
                store.sql.table("shards")
            ),
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .map_err(db("reading backfill progress"))?;
    if let Some(secs) = elapsed.filter(|s| *s > 0.0) {
        st.backfill_rows_per_s = st.shards.rows_done as f64 / secs;
        if st.backfill_rows_per_s > 0.0 {
            st.eta_seconds = Some(remaining as f64 / st.backfill_rows_per_s);
        }
    }
    if let Some(r) = target
        .query_opt(
            &format!(
                "SELECT throttled, reason, seconds + CASE WHEN throttled THEN extract(epoch FROM now() - since) ELSE 0 END, \
                 episodes, rebaselines, rebaseline_reason, baseline_ms FROM {}",
                store.sql.table("throttle")
            ),
            &[],
        )
        .await
        .map_err(db("reading throttle state"))?
    {
        st.throttled = r.get(0);
        st.throttle_reason = r.get(1);
        st.throttled_seconds = r.get(2);
        st.throttle_episodes = r.get(3);
        st.throttle_rebaselines = r.get(4);
        st.throttle_rebaseline_reason = r.get(5);
        st.throttle_baseline_ms = r.get(6);
    }
    st.replay_failures = target
        .query_one(
            &format!(
                "SELECT coalesce(sum(failures), 0)::bigint FROM {}",
                store.sql.table("replay")
            ),
            &[],
        )
        .await
        .map_err(db("reading replay failures"))?
        .get(0);
    if kafka {
        st.changes_logged = st.partitions.iter().map(|p| p.head.max(0)).sum();
        st.replay_lag_changes = st.partitions.iter().map(|p| p.lag.max(0)).sum();
    }
    st.capture_lsn = store
        .capture_position(&target)
        .await?
        .map(|l| l.to_string());
    if let Ok(source) = connect(&spec.source, "source").await {
        let slot = source
            .query_opt(
                "SELECT active, coalesce(pg_current_wal_lsn() - restart_lsn, 0)::bigint, \
                 coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&state.slot],
            )
            .await
            .map_err(db("reading slot"))?;
        st.slot = Some(match slot {
            Some(r) => SlotStatus {
                name: state.slot.clone(),
                exists: true,
                active: r.get(0),
                retained_wal_bytes: r.get(1),
                unconfirmed_bytes: r.get(2),
            },
            None => SlotStatus {
                name: state.slot.clone(),
                ..SlotStatus::default()
            },
        });
    }
    Ok(st)
}

/// Compares source and target now (catching replay up first when a run exists).
pub async fn verify(
    spec: &Spec,
    local: Arc<dyn LocalWorker>,
) -> Result<VerifySummary, CoordinatorError> {
    let mut ctx = RunCtx::open(
        spec,
        Workers::Embedded(None, local),
        crate::stopped::OnStopped::Keep,
    )
    .await?;
    let phase = ctx.phase().await?;
    if phase < Phase::Replay {
        return Err(CoordinatorError::State(format!(
            "the run is in phase {}; verify after the backfill (`schemashift run SPEC`)",
            phase.as_str()
        )));
    }
    CatchUp::new(&mut ctx).now(None).await?;
    let summary = Verify::new(&mut ctx).drive().await?;
    ctx.finish().await?;
    Ok(summary)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanupReport {
    pub slot_dropped: bool,
    pub publication_dropped: bool,
    pub control_schema_dropped: bool,
    pub slot_remains: bool,
}

pub async fn cleanup(spec: &Spec) -> Result<CleanupReport, CoordinatorError> {
    let source = connect(&spec.source, "source").await?;
    let target = connect(&spec.target, "target").await?;
    let store = Store::new(&spec.control_schema);
    let mut report = CleanupReport::default();
    // Reverse sync: its slot on the target, its state on the source.
    let rstore = Store::new(&crate::reverse::schema(spec));
    if let Some(r) = rstore.load(&source).await? {
        crate::capture::drop_slot(&target, &r.slot).await?;
        rstore.drop_schema(&source).await?;
    }
    if let Some(state) = store.load(&target).await? {
        let (slot, publication) = crate::capture::drop_slot(&source, &state.slot).await?;
        report.slot_dropped = slot;
        report.publication_dropped = publication;
        let remains: bool = source
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&state.slot],
            )
            .await
            .map_err(db("checking slot"))?
            .get(0);
        report.slot_remains = remains;
    }
    let had: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&spec.control_schema],
        )
        .await
        .map_err(db("checking control schema"))?
        .get(0);
    // A run abandoned before its cutover must not leave the target without its keys.
    let restored = crate::constraints::restore(&target, &store).await?
        + crate::indexes::rebuild(
            &spec.target,
            &target,
            &store,
            crate::indexes::BuildOptions {
                set: crate::indexes::IndexSet::All,
                parallel: 2,
                low_priority: false,
                gate: None,
                skip_tables: &[],
            },
        )
        .await?;
    if restored > 0 {
        tracing::info!(restored, "foreign keys put back");
    }
    crate::fdw::drop(&target, &spec.control_schema).await?;
    if had {
        crate::history::ensure(&target, &store.sql).await?;
        crate::history::record(
            &target,
            &store.sql,
            "cleanup",
            serde_json::json!({ "slot_dropped": report.slot_dropped }),
            crate::history::By::Operator,
        )
        .await;
    }
    store.drop_schema(&target).await?;
    report.control_schema_dropped = had;
    Ok(report)
}

/// Before cutover: stop and clean up (the application never left the source).
pub async fn rollback(spec: &Spec) -> Result<RollbackOutcome, CoordinatorError> {
    let target = connect(&spec.target, "target").await?;
    let store = Store::new(&spec.control_schema);
    if let Some(state) = store.load(&target).await? {
        if state.phase == Phase::CutOver {
            // After the cutover: drain reverse sync in a short target freeze, switch back.
            let switched = crate::reverse::rollback(spec, &state.plan).await?;
            crate::history::record(
                &target,
                &store.sql,
                "rollback",
                serde_json::to_value(&switched).unwrap_or_default(),
                crate::history::By::Operator,
            )
            .await;
            tracing::info!(
                seconds = switched.seconds,
                applied = switched.changes_applied,
                "switched back to the source"
            );
            let cleaned = cleanup(spec).await?;
            return Ok(RollbackOutcome {
                switched_back: Some(switched),
                cleanup: cleaned,
            });
        }
    }
    Ok(RollbackOutcome {
        switched_back: None,
        cleanup: cleanup(spec).await?,
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RollbackOutcome {
    /// Set when the run was cut over and the application was switched back.
    pub switched_back: Option<crate::reverse::RollbackReport>,
    pub cleanup: CleanupReport,
}

/// What `plan` found: the roles' rights, and the analysis or every problem.
pub struct PlanOutput {
    pub privileges: Vec<crate::plan::privileges::Privilege>,
    pub analysis: Result<Vec<crate::plan::TableAnalysis>, CoordinatorError>,
}

/// `plan`: validate and analyse; writes nothing. Errs only when a server cannot be read.
pub async fn plan_only(spec: &Spec) -> Result<PlanOutput, CoordinatorError> {
    let source = connect(&spec.source, "source").await?;
    let target = connect(&spec.target, "target").await?;
    let privileges = crate::plan::privileges_of(spec, &source, &target)
        .await
        .map_err(|e| CoordinatorError::db("reading the roles' privileges", &e))?;
    let workers = spec.workers.unwrap_or(4);
    let (_, planned) = crate::plan::preflight::plan_now(spec, &source, &target, workers).await?;
    let analysis = planned.map(|p| p.analysis);
    Ok(PlanOutput {
        privileges,
        analysis,
    })
}
