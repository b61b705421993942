//! Distributed mode: the same run as embedded mode, but workers are other processes that
//! lease work over gRPC. Leases outlive this process (they are in the control schema), so
//! a restarted coordinator resumes while the workers' in-flight shards keep going.

use crate::error::CoordinatorError;
use crate::grpc::{serve, ServeOptions};
use crate::run::{drive, RunCtx, RunReport, Until, Workers};
use schemashift_common::spec::Spec;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct CoordinateOptions {
    pub listen: String,
    pub until: Until,
    pub lease_ttl: Duration,
    pub serve: ServeOptions,
    /// HOST:PORT for Prometheus metrics.
    pub metrics_listen: Option<String>,
}

/// `schemashift coordinator`: serve workers and take the run as far as `until`.
pub async fn coordinate(
    spec: &Spec,
    opts: CoordinateOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, CoordinatorError> {
    // Bind first: a bad address is bad input, reported before anything is written.
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
    // TLS files are bad input too: said now, not after the run was planned and written.
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
    let mut ctx = RunCtx::open(
        spec,
        Workers::Remote {
            lease_ttl: opts.lease_ttl,
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
