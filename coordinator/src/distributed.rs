//! Distributed mode: the same run as embedded mode, but workers are other processes that
//! lease work over gRPC. Leases outlive this process (they are in the control schema), so
//! a restarted coordinator resumes while the workers' in-flight shards keep going.

use crate::error::CoordinatorError;
use crate::grpc::{serve, serve_members, ServeOptions, Served};
use crate::lease_gate::GatedLeases;
use crate::run::{drive, RunCtx, RunReport, Until, Workers};
use schemashift_common::fleet::HostGate;
use schemashift_common::spec::Spec;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct CoordinateOptions {
    pub listen: String,
    pub until: Until,
    pub lease_ttl: Duration,
    pub serve: ServeOptions,
    /// HOST:PORT for Prometheus metrics.
    pub metrics_listen: Option<String>,
}

/// The coordinator's listeners, bound before anything is written.
struct Bound {
    listener: TcpListener,
    addr: std::net::SocketAddr,
    metrics: Option<TcpListener>,
}

/// Binds the listeners and checks the TLS files: bad input, said before anything is written.
async fn bind_checked(opts: &CoordinateOptions) -> Result<Bound, CoordinatorError> {
    let listener = TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| CoordinatorError::Listen {
            addr: opts.listen.clone(),
            reason: e.to_string(),
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Serve(e.to_string()))?;
    if !addr.ip().is_loopback() && !opts.serve.guards_secrets() {
        return Err(CoordinatorError::Listen {
            addr: opts.listen.clone(),
            reason: "a coordinator reachable from other hosts hands every worker both \
                     connection strings, passwords included: it needs SCHEMASHIFT_TOKEN and \
                     --tls-cert/--tls-key, or mutual TLS (--tls-cert/--tls-key with \
                     --tls-client-ca); or listen on 127.0.0.1"
                .into(),
        });
    }
    let files = opts
        .serve
        .tls
        .iter()
        .flat_map(|(c, k)| [c, k])
        .chain(opts.serve.client_ca.as_ref());
    for f in files {
        if let Err(e) = std::fs::read(f) {
            return Err(CoordinatorError::Listen {
                addr: opts.listen.clone(),
                reason: format!("cannot read {}: {e}", f.display()),
            });
        }
    }
    let metrics = match &opts.metrics_listen {
        Some(m) => Some(crate::metrics::bind(m).await?),
        None => None,
    };
    Ok(Bound {
        listener,
        addr,
        metrics,
    })
}

/// `schemashift coordinator`: serve workers and take the run as far as `until`.
pub async fn coordinate(
    spec: &Spec,
    opts: CoordinateOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, CoordinatorError> {
    let Bound {
        listener,
        addr,
        metrics,
    } = bind_checked(&opts).await?;
    let mut ctx = RunCtx::open(
        spec,
        Workers::Remote {
            lease_ttl: opts.lease_ttl,
            gate: None,
        },
        crate::stopped::OnStopped::Resume,
    )
    .await?;
    if let Some(listener) = metrics {
        ctx.serve_metrics(listener);
    }
    let (svc, spec_arc, serve_opts) = (ctx.svc.clone(), Arc::new(spec.clone()), opts.serve.clone());
    // Stopped by `finish` once every worker was told the run is over.
    ctx.supervise("grpc server", tracing::info_span!("grpc", %addr), |stop| {
        serve(svc, spec_arc, listener, serve_opts, stop)
    });
    tracing::info!(%addr, tls = opts.serve.tls.is_some(), token = opts.serve.token.is_some(),
        "coordinator listening");
    drive(ctx, opts.until, shutdown).await
}

/// A fleet member a coordinator serves, with its estimated rows (the scheduler's weight).
pub struct FleetMember {
    pub name: String,
    pub spec: Spec,
    pub rows: u64,
    /// The plan the fleet's preflight made for it.
    pub planned: Option<crate::plan::preflight::Fresh>,
}

/// `schemashift coordinator` over a fleet: every member's run at once behind one address,
/// their shard leases sharing one pool of `workers` copies (the first member's spec `workers`,
/// default 4) and `per_host` per server, taken on this side lease by lease. A member that
/// fails to open or to run ends alone with its error; the others go on.
pub async fn coordinate_fleet(
    members: Vec<FleetMember>,
    per_host: Option<usize>,
    opts: CoordinateOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<(String, Result<RunReport, CoordinatorError>)>, CoordinatorError> {
    let Bound {
        listener,
        addr,
        metrics,
    } = bind_checked(&opts).await?;
    let pool = members
        .first()
        .and_then(|m| m.spec.workers)
        .unwrap_or(4)
        .max(1);
    let gate = HostGate::new(per_host, pool);
    let fleet_span = tracing::info_span!("fleet", members = members.len());
    let opened = members.into_iter().map(|mut m| {
        let planned = m
            .planned
            .take()
            .and_then(crate::plan::preflight::Fresh::still);
        let member_gate = gate.member(&m.spec, m.rows);
        let span = tracing::info_span!(parent: &fleet_span, "member", member = %m.name);
        async move {
            let ctx = RunCtx::open_with(
                &m.spec,
                Workers::Remote {
                    lease_ttl: opts.lease_ttl,
                    gate: Some(member_gate.clone()),
                },
                crate::stopped::OnStopped::Resume,
                planned,
            )
            .instrument(span.clone())
            .await;
            (m, member_gate, span, ctx)
        }
    });
    let opened = futures_util::future::join_all(opened).await;
    let (stop_serving, serving) = watch::channel(false);
    let mut served = BTreeMap::new();
    let mut specs = Vec::new();
    for (m, member_gate, _, ctx) in &opened {
        if let Ok(ctx) = ctx {
            let svc = GatedLeases::new(ctx.svc.clone(), member_gate.clone(), opts.lease_ttl);
            let spec = Arc::new(m.spec.clone());
            served.insert(
                m.name.clone(),
                Served {
                    svc: Arc::new(svc),
                    spec,
                },
            );
            specs.push((m.name.clone(), m.spec.clone()));
        }
    }
    let metrics_task = metrics.map(|listener| {
        tokio::spawn(
            crate::metrics::serve_fleet(listener, specs, serving.clone())
                .instrument(tracing::info_span!(parent: &fleet_span, "metrics")),
        )
    });
    let server = tokio::spawn(
        serve_members(served, listener, opts.serve.clone(), serving)
            .instrument(tracing::info_span!(parent: &fleet_span, "grpc", %addr)),
    );
    tracing::info!(%addr, tls = opts.serve.tls.is_some(), token = opts.serve.token.is_some(),
        "fleet coordinator listening");
    let runs = opened.into_iter().map(|(m, member_gate, span, ctx)| {
        let shutdown = shutdown.clone();
        async move {
            let result = match ctx {
                Ok(ctx) => drive(ctx, opts.until, shutdown).instrument(span).await,
                Err(e) => Err(e),
            };
            member_gate.finished();
            (m.name, result)
        }
    });
    let results = futures_util::future::join_all(runs).await;
    // Each member's run already gave its workers time to hear it is over.
    stop_serving.send_replace(true);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "grpc server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "grpc server task failed"),
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    Ok(results)
}
