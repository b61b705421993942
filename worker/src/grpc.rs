//! The coordinator reached over gRPC: the same trait the in-process service implements,
//! so the worker loop cannot tell the difference. The channel reconnects by itself; the
//! worker loop retries transient failures with backoff (a coordinator restart is one).

use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::service::{
    Beat, CoordinatorService, LeaseRef, Progress, RangeCheck, Registration, ServiceError, Work,
    WorkerInfo,
};
use schemashift_common::trace::current_traceparent;
use schemashift_proto::v1 as pb;
use schemashift_proto::v1::coordinator_client::CoordinatorClient;
use schemashift_proto::{service_error, verified_request, AUTHORIZATION, MEMBER, TRACEPARENT};
use secrecy::{ExposeSecret, SecretString};
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    pub token: Option<SecretString>,
    /// PEM CA certificate that signed the coordinator's certificate (https:// URLs).
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate and key this worker presents (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone)]
struct Auth {
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The fleet member every call is for (none: the coordinator's only run).
    member: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.token {
            req.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        if let Some(v) = &self.member {
            req.metadata_mut().insert(MEMBER, v.clone());
        }
        // The coordinator's handler span becomes a child of the worker span making the call.
        if let Some(tp) = current_traceparent().and_then(|t| t.parse().ok()) {
            req.metadata_mut().insert(TRACEPARENT, tp);
        }
        Ok(req)
    }
}

#[derive(Clone)]
pub struct GrpcCoordinator {
    client: CoordinatorClient<InterceptedService<Channel, Auth>>,
    channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

#[derive(Debug, thiserror::Error)]
#[error("coordinator address {url}: {reason}")]
pub struct ClientError {
    pub url: String,
    pub reason: String,
}

impl GrpcCoordinator {
    /// Prepares a lazily connecting client: the coordinator need not be up yet.
    pub fn new(url: &str, opts: &ClientOptions) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError {
            url: url.to_owned(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if let Some(ca) = &opts.tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| bad(format!("reading {}: {e}", ca.display())))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some((cert, key)) = &opts.identity {
                let read = |p: &PathBuf| {
                    std::fs::read(p).map_err(|e| bad(format!("reading {}: {e}", p.display())))
                };
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| bad(format!("TLS: {e}")))?;
        }
        let auth = match &opts.token {
            Some(t) => Some(
                format!("Bearer {}", t.expose_secret())
                    .parse()
                    .map_err(|_| bad("the token has characters not allowed in a header".into()))?,
            ),
            None => None,
        };
        let channel = endpoint.connect_lazy();
        Ok(GrpcCoordinator {
            channel: channel.clone(),
            token: auth.clone(),
            client: CoordinatorClient::with_interceptor(
                channel,
                Auth {
                    token: auth,
                    member: None,
                },
            ),
        })
    }

    /// The same connection, every call naming fleet member `name`.
    pub fn for_member(&self, name: &str) -> Result<Self, ServiceError> {
        let member = name.parse().map_err(|_| {
            ServiceError::Rejected(format!("member name {name:?} cannot be sent in a header"))
        })?;
        let channel = self.channel.clone();
        Ok(GrpcCoordinator {
            client: CoordinatorClient::with_interceptor(
                channel.clone(),
                Auth {
                    token: self.token.clone(),
                    member: Some(member),
                },
            ),
            channel,
            token: self.token.clone(),
        })
    }

    /// The coordinator's fleet members; empty when it serves one run.
    pub async fn members(&self) -> Result<Vec<String>, ServiceError> {
        let r = self
            .client
            .clone()
            .members(pb::MembersRequest {})
            .await
            .map_err(service_error)?;
        Ok(r.into_inner().names)
    }
}

fn bad_reply(e: schemashift_proto::ProtoError) -> ServiceError {
    ServiceError::Rejected(e.to_string())
}

impl CoordinatorService for GrpcCoordinator {
    async fn register(&self, worker: &WorkerInfo) -> Result<Registration, ServiceError> {
        let r = self
            .client
            .clone()
            .register(pb::RegisterRequest {
                worker: Some(worker.into()),
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .await
            .map_err(service_error)?;
        Registration::try_from(r.into_inner()).map_err(bad_reply)
    }

    async fn lease(&self, worker: &WorkerInfo, progress: Progress) -> Result<Work, ServiceError> {
        let r = self
            .client
            .clone()
            .lease(pb::LeaseRequest {
                worker: Some(worker.into()),
                progress: Some(progress.into()),
            })
            .await
            .map_err(service_error)?;
        Work::try_from(r.into_inner()).map_err(bad_reply)
    }

    async fn heartbeat(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        progress: Progress,
    ) -> Result<Beat, ServiceError> {
        let r = self
            .client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                worker: Some(worker.into()),
                lease: Some(lease.into()),
                progress: Some(progress.into()),
            })
            .await
            .map_err(service_error)?;
        Beat::try_from(r.into_inner()).map_err(bad_reply)
    }

    async fn completed(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        rows: u64,
        bytes: u64,
    ) -> Result<(), ServiceError> {
        self.client
            .clone()
            .complete(pb::CompleteRequest {
                worker: Some(worker.into()),
                shard_id: shard.0,
                epoch: epoch.0,
                rows,
                bytes,
            })
            .await
            .map_err(service_error)?;
        Ok(())
    }

    async fn verified(
        &self,
        worker: &WorkerInfo,
        shard: ShardId,
        epoch: LeaseEpoch,
        result: Result<RangeCheck, String>,
    ) -> Result<(), ServiceError> {
        self.client
            .clone()
            .verified(verified_request(worker, shard, epoch, &result))
            .await
            .map_err(service_error)?;
        Ok(())
    }

    async fn failed(
        &self,
        worker: &WorkerInfo,
        lease: &LeaseRef,
        reason: String,
    ) -> Result<(), ServiceError> {
        self.client
            .clone()
            .fail(pb::FailRequest {
                worker: Some(worker.into()),
                lease: Some(lease.into()),
                reason,
            })
            .await
            .map_err(service_error)?;
        Ok(())
    }
}
