//! Fleet commands: a spec with `members` runs every selected member in this process, their
//! copies and index builds sharing one pool and the per-server limit (see
//! `schemashift_common::fleet`). Each member keeps its own run (slot, change log, control
//! schema on its target), so its state survives a crash like any run's and every command
//! below is the one-pair command applied member by member.

use crate::embedded::InProcess;
use schemashift_common::fleet::{Fleet, HostGate, Member};
use schemashift_coordinator::error::CoordinatorError;
use schemashift_coordinator::plan::preflight::Fresh;
use schemashift_coordinator::run::{RunOptions, RunReport, Until};
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::Instrument;

/// How one member ended in a fleet command.
#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Reached the phase asked for.
    Done {
        phase: String,
        rows_copied: i64,
        seconds: f64,
    },
    /// Unusable before anything was written to it (drift, unreachable, rights missing).
    Skipped { reason: String },
    /// Failed during the run; the others went on.
    Failed { error: String },
    /// Not reached: an earlier wave failed.
    NotRun,
}

#[derive(Serialize)]
pub struct MemberOutcome {
    pub name: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A member usable now: its estimated rows and the plan its run starts from.
pub(crate) struct Ready {
    pub member: Member,
    pub rows: u64,
    pub planned: Option<Fresh>,
}

/// Members usable now, and the others with why not; nothing is written to any of them.
/// `workers`: the runs' worker count when it overrides the members' specs.
pub(crate) async fn preflight(
    fleet: Fleet,
    workers: Option<usize>,
) -> (Vec<Ready>, Vec<MemberOutcome>) {
    let checks = fleet.members.into_iter().map(|m| async move {
        let n = workers.or(m.spec.workers).unwrap_or(4).max(1);
        let verdict = schemashift_coordinator::plan::preflight::preflight(&m.spec, n).await;
        (m, verdict)
    });
    let mut usable = Vec::new();
    let mut skipped = Vec::new();
    for (m, verdict) in futures_util::future::join_all(checks).await {
        match verdict {
            Ok(p) => usable.push(Ready {
                member: m,
                rows: p.rows,
                planned: p.planned,
            }),
            Err(e) => skipped.push(MemberOutcome {
                name: m.name,
                outcome: Outcome::Skipped {
                    reason: one_line(&e.to_string()),
                },
            }),
        }
    }
    (usable, skipped)
}

/// Members run together with their shares of the pool: every member runs `pool` workers,
/// of which its share asks for copies first and the rest only take free slots (see
/// `schemashift_common::schedule::member_workers`).
fn shares(together: Vec<Ready>, pool: usize) -> impl Iterator<Item = (Ready, usize)> {
    let rows: Vec<u64> = together.iter().map(|r| r.rows).collect();
    let shares = schemashift_common::schedule::member_workers(&rows, pool);
    together.into_iter().zip(shares)
}

pub(crate) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

async fn run_member(
    fleet_span: &tracing::Span,
    (ready, share): (Ready, usize),
    gate: &Arc<HostGate>,
    workers: usize,
    until: Until,
    shutdown: watch::Receiver<bool>,
) -> (String, Outcome) {
    let Ready {
        member: m,
        rows,
        planned,
    } = ready;
    let member_gate = gate.member(&m.spec, rows).with_share(share);
    let opts = RunOptions {
        workers: Some(workers),
        until,
        planned: planned.and_then(Fresh::still),
        ..RunOptions::new(Arc::new(InProcess {
            gate: Some(member_gate.clone()),
        }))
    };
    // Every member's spans under the fleet's: one trace for the fleet run.
    let span = tracing::info_span!(parent: fleet_span, "member", member = %m.name);
    let result: Result<RunReport, CoordinatorError> =
        schemashift_coordinator::run::run(&m.spec, opts, shutdown)
            .instrument(span)
            .await;
    member_gate.finished();
    let outcome = match result {
        Ok(r) => Outcome::Done {
            phase: r.phase,
            rows_copied: r.rows_copied,
            seconds: r.total_seconds,
        },
        Err(e) => Outcome::Failed {
            error: one_line(&e.to_string()),
        },
    };
    (m.name, outcome)
}

/// `run` (and `cutover`) over a fleet: skipped members first (or exit 2 with `strict`), then
/// every usable member at once, biggest first so the longest finishes soonest, each member's
/// copies waiting their turn in the shared pool; with `wave`, `Until::Cutover` goes wave by
/// wave in spec order and stops at the first member that fails.
pub struct FleetRun {
    pub workers: Option<usize>,
    pub until: Until,
    pub wave: Option<usize>,
    pub strict: bool,
    pub metrics_listen: Option<String>,
    pub json: bool,
}

pub async fn run(fleet: Fleet, opts: FleetRun, shutdown: watch::Receiver<bool>) -> i32 {
    let FleetRun {
        workers,
        until,
        wave,
        strict,
        metrics_listen,
        json,
    } = opts;
    let pool = workers
        .or_else(|| fleet.members.first().and_then(|m| m.spec.workers))
        .unwrap_or(4)
        .max(1);
    let gate = HostGate::new(fleet.per_host, pool);
    let order: Vec<String> = fleet.members.iter().map(|m| m.name.clone()).collect();
    let (mut usable, skipped) = preflight(fleet, Some(pool)).await;
    if strict && !skipped.is_empty() {
        print(&skipped, json);
        eprintln!(
            "error: --strict: {} member(s) unusable; nothing was written anywhere",
            skipped.len()
        );
        return 2;
    }
    let fleet_span = tracing::info_span!("fleet", members = usable.len() + skipped.len());
    let (stop_metrics, metrics) = watch::channel(false);
    let metrics_task = match metrics_listen {
        Some(addr) => match schemashift_coordinator::metrics::bind(&addr).await {
            Ok(listener) => {
                let members = usable
                    .iter()
                    .map(|r| (r.member.name.clone(), r.member.spec.clone()))
                    .collect();
                Some(tokio::spawn(
                    schemashift_coordinator::metrics::serve_fleet(listener, members, metrics)
                        .instrument(tracing::info_span!(parent: &fleet_span, "metrics")),
                ))
            }
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        },
        None => None,
    };
    let mut outcomes = skipped;
    match (until, wave) {
        (Until::Cutover, Some(n)) => {
            // Spec order, `n` at a time; what is left after a failure is not touched.
            usable.sort_by_key(|r| order.iter().position(|o| o == &r.member.name));
            let mut failed = false;
            let mut left = usable.into_iter().peekable();
            while left.peek().is_some() {
                let chunk: Vec<Ready> = left.by_ref().take(n.max(1)).collect();
                if failed {
                    outcomes.extend(chunk.into_iter().map(|r| MemberOutcome {
                        name: r.member.name,
                        outcome: Outcome::NotRun,
                    }));
                    continue;
                }
                let runs = shares(chunk, pool)
                    .map(|r| run_member(&fleet_span, r, &gate, pool, until, shutdown.clone()));
                for (name, outcome) in futures_util::future::join_all(runs).await {
                    failed |= !matches!(outcome, Outcome::Done { .. });
                    outcomes.push(MemberOutcome { name, outcome });
                }
            }
        }
        _ => {
            usable.sort_by_key(|r| std::cmp::Reverse(r.rows));
            let runs = shares(usable, pool)
                .map(|r| run_member(&fleet_span, r, &gate, pool, until, shutdown.clone()));
            for (name, outcome) in futures_util::future::join_all(runs).await {
                outcomes.push(MemberOutcome { name, outcome });
            }
        }
    }
    stop_metrics.send_replace(true);
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    outcomes.sort_by_key(|o| order.iter().position(|n| n == &o.name));
    print(&outcomes, json);
    if outcomes
        .iter()
        .all(|o| matches!(o.outcome, Outcome::Done { .. }))
    {
        0
    } else {
        1
    }
}

pub(crate) fn print(outcomes: &[MemberOutcome], json: bool) {
    if json {
        let doc = serde_json::json!({ "members": outcomes });
        println!("{doc}");
    }
    for o in outcomes {
        let line = match &o.outcome {
            Outcome::Done {
                phase,
                rows_copied,
                seconds,
            } => format!("{phase}: {rows_copied} rows copied, {seconds:.1} s"),
            Outcome::Skipped { reason } => format!("SKIPPED, nothing written: {reason}"),
            Outcome::Failed { error } => format!("FAILED: {error}"),
            Outcome::NotRun => "not run (an earlier wave failed): still on the old schema".into(),
        };
        eprintln!("member {}: {line}", o.name);
    }
    let bad: Vec<&str> = outcomes
        .iter()
        .filter(|o| !matches!(o.outcome, Outcome::Done { .. }))
        .map(|o| o.name.as_str())
        .collect();
    if !bad.is_empty() {
        eprintln!(
            "fleet: {} of {} members did not get there: {} (fix them, then run again with --members {})",
            bad.len(),
            outcomes.len(),
            bad.join(", "),
            bad.join(",")
        );
    }
}

/// `status` over a fleet: one line per member and the fleet's totals.
pub async fn status(fleet: &Fleet, json: bool) -> i32 {
    let mut members = Vec::new();
    let mut code = 0;
    let (mut done, mut total) = (0i64, 0i64);
    let mut progress = Vec::new();
    for m in &fleet.members {
        match schemashift_coordinator::ops::status(&m.spec).await {
            Ok(s) => {
                let rows_total: i64 = s
                    .report
                    .as_ref()
                    .and_then(|r| r["tables"].as_array().cloned())
                    .map(|t| t.iter().filter_map(|t| t["rows"].as_i64()).sum())
                    .unwrap_or(0);
                done += s.shards.rows_done;
                total += rows_total.max(s.shards.rows_done);
                progress.push(schemashift_common::fleet::Progress {
                    rows_done: s.shards.rows_done,
                    rows_total,
                    rate: s.backfill_rows_per_s,
                    eta: s.eta_seconds,
                });
                if !json {
                    eprintln!(
                        "member {}: {}, rows {}/{}, replay lag {} changes{}{}",
                        m.name,
                        s.phase,
                        s.shards.rows_done,
                        rows_total,
                        s.replay_lag_changes,
                        s.throttle_reason
                            .as_deref()
                            .map(|r| format!(", throttled: {r}"))
                            .unwrap_or_default(),
                        if s.replay_failures > 0 {
                            format!(", {} replay batches given back", s.replay_failures)
                        } else {
                            String::new()
                        }
                    );
                }
                members.push(serde_json::json!({ "name": m.name, "status": s }));
            }
            Err(e) => {
                code = 1;
                if !json {
                    eprintln!(
                        "member {}: cannot read its state: {}",
                        m.name,
                        one_line(&e.to_string())
                    );
                }
                members
                    .push(serde_json::json!({ "name": m.name, "error": one_line(&e.to_string()) }));
            }
        }
    }
    let eta = schemashift_common::fleet::fleet_eta(&progress);
    if json {
        let doc = serde_json::json!({
            "members": members,
            "totals": { "rows_done": done, "rows_total": total, "eta_seconds": eta },
        });
        println!("{doc}");
    } else {
        eprintln!(
            "fleet: {} members, rows {done}/{total}, ETA {}",
            fleet.members.len(),
            eta.map_or("unknown".into(), |e| format!("{e:.0} s"))
        );
    }
    code
}

/// A one-pair command applied to each member in turn: every member is tried, each result
/// printed with its name; the worst exit code is the fleet's.
pub async fn each<F, Fut>(fleet: &Fleet, what: &str, f: F) -> i32
where
    F: Fn(schemashift_common::spec::Spec) -> Fut,
    Fut: std::future::Future<Output = Result<String, CoordinatorError>>,
{
    let mut code = 0;
    for m in &fleet.members {
        match f(m.spec.clone()).await {
            Ok(line) => eprintln!("member {}: {line}", m.name),
            Err(e) => {
                eprintln!(
                    "member {}: {what} failed: {}",
                    m.name,
                    one_line(&e.to_string())
                );
                code = code.max(e.exit_code());
            }
        }
    }
    code
}

/// `plan` over a fleet: each member's analysis (or its problems), the members whose tables
/// differ from most members' flagged, and the fleet's total.
pub async fn plan(fleet: &Fleet, json: bool) -> i32 {
    let mut code = 0;
    let (mut rows, mut seconds) = (0u64, 0f64);
    let mut docs = Vec::new();
    for m in &fleet.members {
        if !json {
            eprintln!(
                "== member {} ({} → {})",
                m.name,
                m.spec.source.redacted(),
                m.spec.target.redacted()
            );
        }
        match schemashift_coordinator::ops::plan_only(&m.spec).await {
            Ok(out) => {
                if !json {
                    crate::report::print_plan(&out, false);
                }
                match &out.analysis {
                    Ok(tables) => {
                        let r: u64 = tables.iter().map(|t| t.rows).sum();
                        let s: f64 = tables.iter().map(|t| t.estimated_seconds).sum();
                        rows += r;
                        seconds += s;
                        docs.push(serde_json::json!({"name": m.name, "rows": r, "estimated_seconds": s, "tables": tables}));
                    }
                    Err(e) => {
                        code = code.max(e.exit_code());
                        if !json {
                            eprintln!("member {}: {}", m.name, one_line(&e.to_string()));
                        }
                        docs.push(serde_json::json!({"name": m.name, "problems": one_line(&e.to_string())}));
                    }
                }
            }
            Err(e) => {
                code = code.max(e.exit_code());
                eprintln!("member {}: {}", m.name, one_line(&e.to_string()));
                docs.push(
                    serde_json::json!({"name": m.name, "problems": one_line(&e.to_string())}),
                );
            }
        }
    }
    let odd = odd_members(fleet).await;
    if !json {
        for (name, lines) in &odd {
            eprintln!(
                "member {name}: its tables differ from most members': {}",
                lines.join("; ")
            );
        }
    }
    if json {
        let odd: Vec<_> = odd
            .iter()
            .map(|(name, lines)| serde_json::json!({"name": name, "differs": lines}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"members": docs, "rows": rows, "estimated_seconds": seconds, "odd_members": odd})
        );
    } else {
        // Members copy side by side, so the fleet's time is not the sum; the sum is the
        // work, the per-host limit and the pool decide how it spreads.
        eprintln!(
            "fleet: {} members, {rows} rows, {seconds:.0} s of copying in all (members run side by side)",
            fleet.members.len()
        );
    }
    code
}

/// `verify` over a fleet: exit 0 only when no member differs.
pub async fn verify(fleet: &Fleet) -> i32 {
    let mut code = 0;
    for m in &fleet.members {
        match schemashift_coordinator::ops::verify(&m.spec, crate::embedded::local()).await {
            Ok(v) if v.differing.is_empty() => eprintln!("member {}: no differences", m.name),
            Ok(v) => {
                code = code.max(1);
                eprintln!("member {}: {} keys differ", m.name, v.differing.len());
            }
            Err(e) => {
                code = code.max(e.exit_code());
                eprintln!(
                    "member {}: verify failed: {}",
                    m.name,
                    one_line(&e.to_string())
                );
            }
        }
    }
    code
}

/// `rollback` or `cleanup` over a fleet, member by member.
pub async fn cleanup(fleet: &Fleet, rollback: bool) -> i32 {
    let what = if rollback { "rollback" } else { "cleanup" };
    each(fleet, what, |spec| async move {
        if rollback {
            schemashift_coordinator::ops::rollback(&spec)
                .await
                .map(|o| match o.switched_back {
                    Some(s) => format!(
                        "switched back, {} target writes applied to the source",
                        s.changes_applied
                    ),
                    None => "stopped and cleaned up".into(),
                })
        } else {
            schemashift_coordinator::ops::cleanup(&spec).await.map(|r| {
                format!(
                    "slot dropped: {}, control schema dropped: {}",
                    r.slot_dropped, r.control_schema_dropped
                )
            })
        }
    })
    .await
}

pub async fn pause(fleet: &Fleet) -> i32 {
    each(fleet, "pause", |spec| async move {
        schemashift_coordinator::pause::pause(&spec)
            .await
            .map(|p| p.to_string())
    })
    .await
}

pub async fn resume(fleet: &Fleet) -> i32 {
    each(fleet, "resume", |spec| async move {
        schemashift_coordinator::pause::resume(&spec)
            .await
            .map(|p| match p {
                Some(p) => format!("resumed (was {p})"),
                None => "was not paused".into(),
            })
    })
    .await
}

pub async fn history(fleet: &Fleet, json: bool) -> i32 {
    let mut code = 0;
    for m in &fleet.members {
        match schemashift_coordinator::history::read(&m.spec).await {
            Ok(events) => {
                if !json {
                    eprintln!("== member {}", m.name);
                }
                crate::report::print_history(&events, json);
            }
            Err(e) => {
                code = code.max(e.exit_code());
                eprintln!("member {}: {}", m.name, one_line(&e.to_string()));
            }
        }
    }
    code
}

/// The columns (name and type, in order) of the spec's tables on both sides, one line per
/// table: members of one fleet should all look alike.
async fn shape(spec: &schemashift_common::spec::Spec) -> Result<Vec<String>, CoordinatorError> {
    use schemashift_common::sql::QualifiedName;
    let mut lines = Vec::new();
    for (side, dsn) in [("source", &spec.source), ("target", &spec.target)] {
        let c = schemashift_common::pg::connect(dsn, side).await?;
        for t in &spec.tables {
            let name = if side == "source" {
                &t.source
            } else {
                &t.target
            };
            let quoted =
                QualifiedName::parse(name).map_or_else(|_| name.clone(), |q| q.to_string());
            let cols: String = c
                .query_one(
                    "SELECT coalesce(string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), \
                     ', ' ORDER BY a.attnum), '(missing)') FROM pg_attribute a \
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&quoted],
                )
                .await
                .map_err(|e| CoordinatorError::db("reading a member's columns", &e))?
                .get(0);
            lines.push(format!("{side} {name}: {cols}"));
        }
    }
    Ok(lines)
}

/// Members whose tables do not look like most members' (the fleet's usual shape), with the
/// lines where they differ.
pub async fn odd_members(fleet: &Fleet) -> Vec<(String, Vec<String>)> {
    let mut shapes = Vec::new();
    for m in &fleet.members {
        if let Ok(s) = shape(&m.spec).await {
            shapes.push((m.name.clone(), s));
        }
    }
    let mut counts: std::collections::HashMap<&Vec<String>, usize> = Default::default();
    for (_, s) in &shapes {
        *counts.entry(s).or_default() += 1;
    }
    let Some((usual, _)) = counts.iter().max_by_key(|(_, n)| **n) else {
        return Vec::new();
    };
    let usual: Vec<String> = (*usual).clone();
    shapes
        .into_iter()
        .filter(|(_, s)| *s != usual)
        .map(|(name, s)| {
            let diff = s.into_iter().filter(|l| !usual.contains(l)).collect();
            (name, diff)
        })
        .collect()
}
