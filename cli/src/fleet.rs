//! `coordinator` and `worker`: distributed mode's two commands.

use crate::cli::fail;
use crate::members::{MemberOutcome, Outcome};
use crate::report;
use schemashift_common::fleet::Fleet;
use schemashift_common::service::WorkerInfo;
use schemashift_common::spec::Spec;
use schemashift_coordinator::distributed::{
    coordinate, coordinate_fleet, CoordinateOptions, FleetMember,
};
use schemashift_worker::grpc::{ClientOptions, GrpcCoordinator};
use schemashift_worker::WorkerError;
use secrecy::SecretString;
use std::path::PathBuf;
use tokio::sync::watch;
use tracing::Instrument;

/// The shared token, from the environment only (a flag would show in `ps`).
pub fn token() -> Option<SecretString> {
    std::env::var("SCHEMASHIFT_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(SecretString::from)
}

pub async fn coordinator(
    spec: &Spec,
    opts: CoordinateOptions,
    report_dir: Option<PathBuf>,
    json: bool,
    shutdown: watch::Receiver<bool>,
) -> i32 {
    let bars = crate::progress::enabled().then(|| crate::progress::start(spec));
    let result = coordinate(spec, opts, shutdown).await;
    crate::progress::finish(bars);
    match result {
        Ok(r) => {
            if let Err(code) = report::write_report(report_dir.as_deref(), &r) {
                return code;
            }
            report::print_run(&r, json);
            0
        }
        Err(e) => fail(e),
    }
}

/// `coordinator` over a fleet: unusable members skipped with their reason (nothing written
/// to them), the others served at once to whatever workers connect.
pub async fn fleet_coordinator(
    fleet: Fleet,
    opts: CoordinateOptions,
    json: bool,
    shutdown: watch::Receiver<bool>,
) -> i32 {
    let order: Vec<String> = fleet.members.iter().map(|m| m.name.clone()).collect();
    let per_host = fleet.per_host;
    // The coordinator's members plan with their specs' workers, as their runs will.
    let (usable, mut outcomes) = crate::members::preflight(fleet, None).await;
    let members = usable
        .into_iter()
        .map(|r| FleetMember {
            name: r.member.name,
            spec: r.member.spec,
            rows: r.rows,
            planned: r.planned,
        })
        .collect();
    let results = match coordinate_fleet(members, per_host, opts, shutdown).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for (name, result) in results {
        let outcome = match result {
            Ok(r) => Outcome::Done {
                phase: r.phase,
                rows_copied: r.rows_copied,
                seconds: r.total_seconds,
            },
            Err(e) => Outcome::Failed {
                error: crate::members::one_line(&e.to_string()),
            },
        };
        outcomes.push(MemberOutcome { name, outcome });
    }
    outcomes.sort_by_key(|o| order.iter().position(|n| n == &o.name));
    crate::members::print(&outcomes, json);
    if outcomes
        .iter()
        .all(|o| matches!(o.outcome, Outcome::Done { .. }))
    {
        0
    } else {
        1
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub async fn worker(
    url: &str,
    id: Option<String>,
    tls_ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    shutdown: watch::Receiver<bool>,
) -> i32 {
    let client = match GrpcCoordinator::new(
        url,
        &ClientOptions {
            token: token(),
            tls_ca,
            identity,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let host = host_name();
    let me = WorkerInfo {
        id: id.unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        host,
    };
    let span = tracing::info_span!("worker", worker = %me.id);
    match schemashift_worker::fleet::run_any(client, me, shutdown)
        .instrument(span)
        .await
    {
        Ok(stats) => {
            eprintln!(
                "worker done: {} shards, {} rows copied, {} changes applied, {} retries",
                stats.shards, stats.rows, stats.changes, stats.retries
            );
            0
        }
        Err(e @ WorkerError::Refused(_)) => {
            eprintln!("error: {e}");
            2
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
