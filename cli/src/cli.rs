use crate::report;
use clap::{Parser, Subcommand, ValueEnum};
use schemashift_common::fleet::{self, Loaded};
use schemashift_common::spec::Spec;
use schemashift_coordinator::distributed::CoordinateOptions;
use schemashift_coordinator::grpc::ServeOptions;
use schemashift_coordinator::run::{RunOptions, Until};
use schemashift_coordinator::CoordinatorError;
use std::path::PathBuf;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "schemashift",
    version,
    about = "Zero-downtime PostgreSQL schema-to-schema table migration"
)]
pub struct Cli {
    /// Only warnings and errors on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Log lines as JSON objects.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PhaseArg {
    Backfill,
    Replay,
    Verify,
    Cutover,
}

impl From<PhaseArg> for Until {
    fn from(p: PhaseArg) -> Until {
        match p {
            PhaseArg::Backfill => Until::Backfill,
            PhaseArg::Replay => Until::Replay,
            PhaseArg::Verify => Until::Verify,
            PhaseArg::Cutover => Until::Cutover,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    #[cfg(feature = "lab")]
    /// Self-contained demo: two throwaway clusters, the users scenario under write load, cutover.
    Demo {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Application operations per second during the migration.
        #[arg(long, default_value_t = 300)]
        load_rate: u32,
        /// Run without throttling, to compare the application's latency.
        #[arg(long)]
        no_throttle: bool,
        /// After the cutover, write to the target, then roll back and compare.
        #[arg(long)]
        rollback: bool,
        #[arg(long)]
        json: bool,
    },
    /// Validate the spec against both databases and print the analysis; writes nothing.
    Plan {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        json: bool,
    },
    /// Run (or resume) the migration in this process.
    Run {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        /// A fleet: refuse the whole run (exit 2, nothing written anywhere) when any member
        /// is unusable, instead of skipping it.
        #[arg(long)]
        strict: bool,
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long, value_enum, default_value = "verify")]
        until: PhaseArg,
        /// Serve Prometheus metrics on HOST:PORT while the run goes.
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Write the final report to DIR/report.md and DIR/report.json.
        #[arg(long, value_name = "DIR")]
        report: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Distributed mode: serve the run to `schemashift worker` processes over gRPC.
    /// The token, when used, comes from SCHEMASHIFT_TOKEN.
    Coordinator {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        /// HOST:PORT to listen on (port 0: any free port, logged).
        #[arg(long)]
        listen: String,
        #[arg(long, value_enum, default_value = "verify")]
        until: PhaseArg,
        /// A worker silent this long loses its lease; its work goes to another worker.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        lease_ttl: std::time::Duration,
        /// PEM certificate to serve TLS (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// PEM CA: only workers presenting a certificate it signed get in (mutual TLS, an
        /// alternative to SCHEMASHIFT_TOKEN; needs --tls-cert).
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Serve Prometheus metrics on HOST:PORT.
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Write the final report to DIR/report.md and DIR/report.json.
        #[arg(long, value_name = "DIR")]
        report: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Distributed mode: one worker; exits when the coordinator says the run is over.
    /// The token, when used, comes from SCHEMASHIFT_TOKEN.
    Worker {
        /// http://HOST:PORT, or https://HOST:PORT with --tls-ca.
        #[arg(long)]
        coordinator: String,
        /// Stable name of this worker (default: host name and process id).
        #[arg(long)]
        id: Option<String>,
        /// PEM CA certificate that signed the coordinator's TLS certificate.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// PEM certificate this worker presents to a coordinator that asks for one (mutual
        /// TLS; with --tls-key and --tls-ca).
        #[arg(long, requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// After the cutover: apply target writes to the old schema continuously (reverse
    /// sync), until Ctrl-C. `rollback` drains it by itself.
    Reverse {
        spec: PathBuf,
        /// Apply what is there now, then exit.
        #[arg(long)]
        once: bool,
        #[arg(long)]
        json: bool,
    },
    #[cfg(feature = "lab")]
    /// The built-in application load on the users scenario (the source of SPEC, or a DSN):
    /// reads by key, inserts, updates, deletes; latency percentiles per operation.
    Load {
        /// A spec file (its source is loaded) or a connection string.
        spec_or_dsn: String,
        /// Operations per second in all.
        #[arg(long, default_value_t = 300)]
        rate: u32,
        /// Weight of reads against inserts 60, updates 30, deletes 10.
        #[arg(long, default_value_t = 100)]
        reads: u8,
        /// Stop after this many seconds (default: at Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long)]
        json: bool,
        /// Required: the load inserts, updates and deletes rows of `public.users` in that
        /// database, which must be a test database, never a production one.
        #[arg(long)]
        allow_writes: bool,
    },
    /// Phase, shard progress and lag from the control state.
    Status {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        json: bool,
    },
    /// Compare source and target now; exit 0 only when nothing differs.
    Verify {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        json: bool,
    },
    /// Drain, freeze writes briefly, switch.
    Cutover {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        /// A fleet: cut members over this many at a time, in spec order, each with its own
        /// freeze; stop at the first member that fails.
        #[arg(long)]
        wave: Option<usize>,
        #[arg(long)]
        strict: bool,
        #[arg(long)]
        json: bool,
    },
    /// Before cutover: stop and clean up.
    Rollback {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
    },
    /// Drop slot, publication and control state.
    Cleanup {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
    },
    /// Pause every copy and every replay of the run (capture goes on, the slot keeps WAL),
    /// from any process, until `resume`; stored with the run, so it outlives restarts.
    Pause {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
    },
    /// Lift a pause.
    Resume {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
    },
    /// Every event of this spec's runs (phases, operator commands with user and host,
    /// throttle holds, freeze time, switch, rollback, cleanup); kept after cleanup.
    History {
        spec: PathBuf,
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        json: bool,
    },
    #[cfg(feature = "lab")]
    /// Measure schemashift side by side with its peers on two throwaway clusters.
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long)]
        json: bool,
        /// Also write the report as a markdown document (e.g. docs/benchmarks.md).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Measure only schemashift (`ours`), only the peers (`peers`), only capture and
        /// replay (`changes`), only the fleet rows (`fleet`), pgcopydb against schemashift
        /// with the same two indexes in three alternating rounds (`like-for-like`), or one
        /// raw stream against one worker in two (`one-worker`); ratios need both sides.
        #[arg(long, value_enum)]
        only: Option<schemashift_lab::bench::Only>,
        /// Changes in the capture and replay workload, one row pair per count (comma
        /// separated, e.g. 1000000,10000000); default a tenth of --rows, at least 50,000.
        #[arg(long, value_delimiter = ',')]
        changes: Vec<u64>,
    },
}

/// `--members NAME[,NAME…]`: the fleet members a command applies to (default: all).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Select {
    #[arg(long, value_delimiter = ',')]
    members: Vec<String>,
}

/// A spec file: one pair, or a fleet narrowed to `--members`; exit 2 on bad input.
fn load_any(path: &std::path::Path, select: &Select) -> Result<Loaded, i32> {
    let bad = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        2
    };
    match fleet::load(path) {
        Ok(Loaded::One(spec)) if select.members.is_empty() => Ok(Loaded::One(spec)),
        Ok(Loaded::One(_)) => Err(bad(&"--members needs a fleet spec (one with `members`)")),
        Ok(Loaded::Fleet(f)) => f
            .select(&select.members)
            .map(Loaded::Fleet)
            .map_err(|e| bad(&e)),
        Err(e) => Err(bad(&e)),
    }
}

/// One pair's spec, or a fleet's handling: `$fleet` is evaluated with the fleet bound to `$f`.
macro_rules! one_or_fleet {
    ($path:expr, $select:expr, |$f:ident| $fleet:expr) => {
        match load_any(&$path, &$select) {
            Ok(Loaded::One(spec)) => *spec,
            Ok(Loaded::Fleet($f)) => return $fleet,
            Err(code) => return code,
        }
    };
}

/// The spec at this path, or the command's exit code (2, the problem said) on bad input.
macro_rules! spec_or_return {
    ($path:expr) => {
        match load_spec(&$path) {
            Ok(s) => s,
            Err(code) => return code,
        }
    };
}

pub(crate) fn load_spec(path: &std::path::Path) -> Result<Spec, i32> {
    Spec::load(path).map_err(|e| {
        eprintln!("error: {e}");
        2
    })
}

pub(crate) fn fail(e: CoordinatorError) -> i32 {
    eprintln!("error: {e}");
    e.exit_code()
}

/// Ctrl-C flips the shutdown value; tasks see it and stop at a safe point.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted; stopping (run again to resume)");
            tx.send_replace(true);
        }
    });
    rx
}

pub async fn execute(cli: Cli) -> i32 {
    crate::progress::enable(crate::progress::wanted(cli.quiet, cli.log_json));
    match cli.command {
        #[cfg(feature = "lab")]
        Command::Demo {
            rows,
            workers,
            load_rate,
            no_throttle,
            rollback,
            json,
        } => match schemashift_lab::demo::demo(
            rows,
            workers,
            load_rate,
            !no_throttle,
            rollback,
            &crate::embedded::host(),
        )
        .await
        {
            Ok(r) => {
                report::print_demo(&r, json);
                let rolled = r.rollback_diff.map_or(0, |d| d.0 + d.1 + d.2);
                if r.diff.0 + r.diff.1 + r.diff.2 + rolled == 0 {
                    0
                } else {
                    1
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
        Command::Plan { spec, select, json } => {
            let spec = one_or_fleet!(spec, select, |f| crate::members::plan(&f, json).await);
            match schemashift_coordinator::ops::plan_only(&spec).await {
                Ok(out) => {
                    report::print_plan(&out, json);
                    match out.analysis {
                        Ok(_) => 0,
                        Err(e) => fail(e),
                    }
                }
                Err(e) => fail(e),
            }
        }
        Command::Run {
            spec,
            select,
            strict,
            workers,
            until,
            metrics_listen,
            report,
            json,
        } => match load_any(&spec, &select) {
            Ok(Loaded::Fleet(f)) => {
                let opts = crate::members::FleetRun {
                    workers,
                    until: until.into(),
                    wave: None,
                    strict,
                    metrics_listen,
                    json,
                };
                crate::members::run(f, opts, shutdown_signal()).await
            }
            Ok(Loaded::One(spec)) => {
                run_cmd(*spec, workers, until, metrics_listen, report, json).await
            }
            Err(code) => code,
        },
        Command::Coordinator {
            spec,
            select,
            listen,
            until,
            lease_ttl,
            tls_cert,
            tls_key,
            tls_client_ca,
            metrics_listen,
            report,
            json,
        } => {
            let loaded = match load_any(&spec, &select) {
                Ok(l) => l,
                Err(code) => return code,
            };
            let opts = CoordinateOptions {
                listen,
                until: until.into(),
                lease_ttl,
                serve: ServeOptions {
                    token: crate::fleet::token(),
                    tls: tls_cert.zip(tls_key),
                    client_ca: tls_client_ca,
                },
                metrics_listen,
            };
            let spec = match loaded {
                Loaded::One(spec) => *spec,
                Loaded::Fleet(f) => {
                    if report.is_some() {
                        eprintln!("error: --report is per run; a fleet coordinator prints each member's outcome (--json for a document)");
                        return 2;
                    }
                    return crate::fleet::fleet_coordinator(f, opts, json, shutdown_signal()).await;
                }
            };
            crate::fleet::coordinator(&spec, opts, report, json, shutdown_signal()).await
        }
        Command::Worker {
            coordinator,
            id,
            tls_ca,
            tls_cert,
            tls_key,
        } => {
            crate::fleet::worker(
                &coordinator,
                id,
                tls_ca,
                tls_cert.zip(tls_key),
                shutdown_signal(),
            )
            .await
        }
        Command::Cutover {
            spec,
            select,
            wave,
            strict,
            json,
        } => match load_any(&spec, &select) {
            Ok(Loaded::Fleet(f)) => {
                let opts = crate::members::FleetRun {
                    workers: None,
                    until: Until::Cutover,
                    wave: Some(wave.unwrap_or(usize::MAX)),
                    strict,
                    metrics_listen: None,
                    json,
                };
                crate::members::run(f, opts, shutdown_signal()).await
            }
            Ok(Loaded::One(_)) if wave.is_some() => {
                eprintln!("error: --wave needs a fleet spec (one with `members`)");
                2
            }
            Ok(Loaded::One(spec)) => {
                // A stopped table is taken up again by `run`, not by a cutover.
                if let Err(e) = schemashift_coordinator::stopped::refuse_cutover(&spec).await {
                    return fail(e);
                }
                run_cmd(*spec, None, PhaseArg::Cutover, None, None, json).await
            }
            Err(code) => code,
        },
        Command::Status { spec, select, json } => {
            let spec = one_or_fleet!(spec, select, |f| crate::members::status(&f, json).await);
            match schemashift_coordinator::ops::status(&spec).await {
                Ok(s) => {
                    report::print_status(&s, json);
                    0
                }
                Err(e) => fail(e),
            }
        }
        Command::Verify { spec, select, json } => {
            let spec = one_or_fleet!(spec, select, |f| crate::members::verify(&f).await);
            match schemashift_coordinator::ops::verify(&spec, crate::embedded::local()).await {
                Ok(v) => {
                    report::print_verify(&v, json);
                    // A stopped table was not compared: not "nothing differs".
                    if v.differing.is_empty() && v.skipped_tables.is_empty() {
                        0
                    } else {
                        1
                    }
                }
                Err(e) => fail(e),
            }
        }
        Command::Reverse { spec, once, json } => {
            let spec = spec_or_return!(spec);
            let until = if once {
                match schemashift_coordinator::reverse::now(&spec).await {
                    Ok(l) => schemashift_coordinator::reverse::Until::Lsn(l),
                    Err(e) => return fail(e),
                }
            } else {
                schemashift_coordinator::reverse::Until::Shutdown(shutdown_signal())
            };
            match schemashift_coordinator::reverse::sync(&spec, until).await {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        eprintln!(
                            "reverse sync: {} changes captured, {} applied to the source in {:.1} s",
                            r.changes_captured, r.changes_applied, r.seconds
                        );
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        #[cfg(feature = "lab")]
        Command::Load {
            spec_or_dsn,
            rate,
            reads,
            seconds,
            json,
            allow_writes,
        } => {
            if !allow_writes {
                eprintln!(
                    "error: `load` writes test traffic (inserts, updates, deletes) into \
                     public.users of that database; pass --allow-writes if it is a test database"
                );
                return 2;
            }
            schemashift_lab::load_cmd::load(&spec_or_dsn, rate, reads, seconds, json).await
        }
        Command::Rollback { spec, select } => {
            let _ = one_or_fleet!(spec, select, |f| crate::members::cleanup(&f, true).await);
            cleanup_cmd(spec, true).await
        }
        Command::Cleanup { spec, select } => {
            let _ = one_or_fleet!(spec, select, |f| crate::members::cleanup(&f, false).await);
            cleanup_cmd(spec, false).await
        }
        Command::Pause { spec, select } => {
            let spec = one_or_fleet!(spec, select, |f| crate::members::pause(&f).await);
            match schemashift_coordinator::pause::pause(&spec).await {
                Ok(p) => {
                    eprintln!("{p}: copies and replay hold within a second, capture goes on");
                    0
                }
                Err(e) => fail(e),
            }
        }
        Command::History { spec, select, json } => {
            let spec = one_or_fleet!(spec, select, |f| crate::members::history(&f, json).await);
            match schemashift_coordinator::history::read(&spec).await {
                Ok(events) => {
                    report::print_history(&events, json);
                    0
                }
                Err(e) => fail(e),
            }
        }
        Command::Resume { spec, select } => {
            let spec = one_or_fleet!(spec, select, |f| crate::members::resume(&f).await);
            match schemashift_coordinator::pause::resume(&spec).await {
                Ok(Some(p)) => {
                    eprintln!("resumed (was {p})");
                    0
                }
                Ok(None) => {
                    eprintln!("the run was not paused; nothing changed");
                    0
                }
                Err(e) => fail(e),
            }
        }
        #[cfg(feature = "lab")]
        Command::Bench {
            rows,
            workers,
            json,
            out,
            only,
            changes,
        } => {
            schemashift_lab::bench::bench(
                rows,
                workers,
                json,
                out,
                only,
                changes,
                &crate::embedded::host(),
            )
            .await
        }
    }
}

async fn run_cmd(
    spec: Spec,
    workers: Option<usize>,
    until: PhaseArg,
    metrics_listen: Option<String>,
    report_dir: Option<PathBuf>,
    json: bool,
) -> i32 {
    let until = until.into();
    let opts = RunOptions {
        workers,
        until,
        metrics_listen,
        ..RunOptions::new(crate::embedded::local())
    };
    let bars = crate::progress::enabled().then(|| crate::progress::start(&spec));
    let result = schemashift_coordinator::run::run(&spec, opts, shutdown_signal()).await;
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

async fn cleanup_cmd(spec: PathBuf, rollback: bool) -> i32 {
    let spec = match load_spec(&spec) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let r = if rollback {
        schemashift_coordinator::ops::rollback(&spec).await
    } else {
        schemashift_coordinator::ops::cleanup(&spec)
            .await
            .map(|cleanup| schemashift_coordinator::ops::RollbackOutcome {
                switched_back: None,
                cleanup,
            })
    };
    match r {
        Ok(out) => {
            if let Some(s) = &out.switched_back {
                eprintln!(
                    "switched back: {} target writes applied to the source, target frozen {:.0} ms, rollback took {:.1} s",
                    s.changes_applied, s.freeze_ms, s.seconds
                );
            }
            let r = &out.cleanup;
            eprintln!(
                "slot dropped: {}, publication dropped: {}, control schema dropped: {}; a slot remains on the source: {}",
                r.slot_dropped, r.publication_dropped, r.control_schema_dropped, r.slot_remains
            );
            if rollback && out.switched_back.is_none() {
                eprintln!("target tables were left as they are: empty them yourself before starting again");
            }
            0
        }
        Err(e) => fail(e),
    }
}
