//! The gRPC adapter: checks the token, delegates to the service, maps errors. No rules
//! live here; they are in the service, which embedded mode calls directly.

use crate::error::CoordinatorError;
use schemashift_common::service::CoordinatorService;
use schemashift_common::spec::Spec;
use schemashift_common::trace::set_parent;
use schemashift_proto::v1 as pb;
use schemashift_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use schemashift_proto::{
    lease_ref, to_status, verified_result, worker, AUTHORIZATION, MEMBER, TRACEPARENT,
};
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// What one coordinator serves: one run, or each member of a fleet (named by the
/// `schemashift-member` metadata of every call).
pub struct Served<S> {
    pub svc: Arc<S>,
    pub spec: Arc<Spec>,
}

pub struct GrpcAdapter<S> {
    /// Key "" for a one-pair run.
    members: BTreeMap<String, Served<S>>,
}

impl<S> GrpcAdapter<S> {
    /// The run a call is for.
    fn served<T>(&self, r: &Request<T>) -> Result<&Served<S>, Status> {
        let named = r.metadata().get(MEMBER).and_then(|v| v.to_str().ok());
        match named {
            Some(name) => self.members.get(name).ok_or_else(|| {
                Status::not_found(format!("this coordinator serves no member {name:?}"))
            }),
            None => match self.members.get("") {
                Some(one) => Ok(one),
                None => Err(Status::failed_precondition(
                    "this coordinator serves a fleet: call Members and name the member",
                )),
            },
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// A span for one call, child of the caller's span when it sent a `traceparent`.
fn rpc_span<T>(method: &'static str, r: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!("rpc", method);
    let tp = r.metadata().get(TRACEPARENT).and_then(|v| v.to_str().ok());
    set_parent(&span, tp);
    span
}

#[tonic::async_trait]
impl<S: CoordinatorService> Coordinator for GrpcAdapter<S> {
    async fn register(&self, r: Request<pb::RegisterRequest>) -> Reply<pb::RegisterReply> {
        let span = rpc_span("Register", &r);
        let svc = &self.served(&r)?.svc;
        let r = r.into_inner();
        let me = worker(r.worker, "RegisterRequest")?;
        if r.version != env!("CARGO_PKG_VERSION") {
            return Err(Status::failed_precondition(format!(
                "worker version {} does not match coordinator version {}",
                r.version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        let reg = svc
            .register(&me)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RegisterReply::try_from(&reg)?))
    }

    async fn lease(&self, r: Request<pb::LeaseRequest>) -> Reply<pb::LeaseReply> {
        let span = rpc_span("Lease", &r);
        let svc = &self.served(&r)?.svc;
        let r = r.into_inner();
        let me = worker(r.worker, "LeaseRequest")?;
        let progress = r.progress.unwrap_or_default().into();
        let work = svc
            .lease(&me, progress)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new((&work).into()))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatReply> {
        let span = rpc_span("Heartbeat", &r);
        let svc = &self.served(&r)?.svc;
        let r = r.into_inner();
        let me = worker(r.worker, "HeartbeatRequest")?;
        let lease = lease_ref(r.lease, "HeartbeatRequest")?;
        let progress = r.progress.unwrap_or_default().into();
        let beat = svc
            .heartbeat(&me, &lease, progress)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::HeartbeatReply {
            answer: pb::BeatAnswer::from(beat).into(),
        }))
    }

    async fn complete(&self, r: Request<pb::CompleteRequest>) -> Reply<pb::CompleteReply> {
        let span = rpc_span("Complete", &r);
        let svc = &self.served(&r)?.svc;
        let r = r.into_inner();
        let me = worker(r.worker, "CompleteRequest")?;
        svc.completed(
            &me,
            schemashift_common::ids::ShardId(r.shard_id),
            schemashift_common::ids::LeaseEpoch(r.epoch),
            r.rows,
            r.bytes,
        )
        .instrument(span)
        .await
        .map_err(to_status)?;
        Ok(Response::new(pb::CompleteReply {}))
    }

    async fn verified(&self, r: Request<pb::VerifiedRequest>) -> Reply<pb::VerifiedReply> {
        let span = rpc_span("Verified", &r);
        let svc = &self.served(&r)?.svc;
        let r = r.into_inner();
        let me = worker(r.worker.clone(), "VerifiedRequest")?;
        let (shard, epoch, result) = verified_result(&r)?;
        svc.verified(&me, shard, epoch, result)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::VerifiedReply {}))
    }

    async fn fail(&self, r: Request<pb::FailRequest>) -> Reply<pb::FailReply> {
        let span = rpc_span("Fail", &r);
        let svc = &self.served(&r)?.svc;
        let r = r.into_inner();
        let me = worker(r.worker, "FailRequest")?;
        let lease = lease_ref(r.lease, "FailRequest")?;
        svc.failed(&me, &lease, r.reason)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::FailReply {}))
    }

    async fn status(&self, r: Request<pb::StatusRequest>) -> Reply<pb::StatusReply> {
        let spec = &self.served(&r)?.spec;
        let st = crate::ops::status(spec)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let json = serde_json::to_string(&st).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::StatusReply { json }))
    }

    async fn members(&self, _r: Request<pb::MembersRequest>) -> Reply<pb::MembersReply> {
        let names = self.members.keys().filter(|n| !n.is_empty()).cloned();
        Ok(Response::new(pb::MembersReply {
            names: names.collect(),
        }))
    }
}

/// How the coordinator listens.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Required as `authorization: Bearer <token>` on every call when set.
    pub token: Option<SecretString>,
    /// PEM certificate and key: serve TLS instead of plaintext.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// PEM CA: with TLS, only workers presenting a certificate it signed get in (mutual
    /// TLS, an alternative to the token).
    pub client_ca: Option<PathBuf>,
}

impl ServeOptions {
    /// Whether callers are both authenticated and encrypted: a token over TLS, or mutual
    /// TLS (which is both). `Register` hands out the connection strings, passwords
    /// included, so anything less may only listen on loopback.
    pub fn guards_secrets(&self) -> bool {
        self.tls.is_some() && (self.token.is_some() || self.client_ca.is_some())
    }
}

fn check_token(token: Option<SecretString>) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| {
        let Some(token) = &token else { return Ok(req) };
        let given = req
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.expose_secret().as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "wrong token: set SCHEMASHIFT_TOKEN on the worker to the coordinator's token",
            )),
            None => Err(Status::unauthenticated(
                "this coordinator requires a token: set SCHEMASHIFT_TOKEN on the worker",
            )),
        }
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves one run on `listener` until `shutdown` turns true.
pub async fn serve<S: CoordinatorService>(
    svc: Arc<S>,
    spec: Arc<Spec>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let one = BTreeMap::from([(String::new(), Served { svc, spec })]);
    serve_members(one, listener, opts, shutdown).await
}

/// Serves a fleet's members (by name) on `listener` until `shutdown` turns true.
pub async fn serve_members<S: CoordinatorService>(
    members: BTreeMap<String, Served<S>>,
    listener: TcpListener,
    opts: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| CoordinatorError::Serve(format!("reading {}: {e}", p.display())))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &opts.client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Serve(format!("TLS configuration: {e}")))?;
    }
    let server =
        CoordinatorServer::with_interceptor(GrpcAdapter { members }, check_token(opts.token));
    builder
        .add_service(server)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = shutdown.wait_for(|s| *s).await;
            },
        )
        .await
        .map_err(|e| CoordinatorError::Serve(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            if let Ok(v) = h.parse() {
                r.metadata_mut().insert(AUTHORIZATION, v);
            }
        }
        r
    }

    #[test]
    fn token_is_required_only_when_set() {
        let mut open = check_token(None);
        assert!(open.call(with(None)).is_ok());
        let mut closed = check_token(Some(SecretString::from("s3cret")));
        assert!(closed.call(with(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let e = closed.call(with(bad)).err().map(|s| s.code());
            assert_eq!(e, Some(tonic::Code::Unauthenticated), "{bad:?}");
        }
    }
}
