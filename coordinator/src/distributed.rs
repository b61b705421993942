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
    let (stop, stop_rx) = watch::channel(false);
    if let Some(m) = &opts.metrics_listen {
        crate::metrics::start(m, spec, stop_rx.clone()).await?;
    }
    let ctx = RunCtx::open(
        spec,
        Workers::Remote {
            lease_ttl: opts.lease_ttl,
        },
    )
    .await?;
    let server = tokio::spawn(
        serve(
            ctx.svc.clone(),
            Arc::new(spec.clone()),
            listener,
            opts.serve.clone(),
            stop_rx,
        )
        .instrument(tracing::info_span!("grpc", %addr)),
    );
    tracing::info!(%addr, tls = opts.serve.tls.is_some(), token = opts.serve.token.is_some(),
        "coordinator listening");
    let report = drive(ctx, opts.until, shutdown).await;
    stop.send_replace(true);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "gRPC server task panicked"),
    }
    report
}
