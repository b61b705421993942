//! The coordinator's gRPC protocol (`schemashift.v1`, generated from `proto/`), its
//! mapping to and from the domain types of `schemashift_common::service`, and the one
//! mapping between service errors and gRPC status codes.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("schemashift.v1");
}

mod convert;
mod event;
mod status;

pub use convert::{lease_ref, verified_request, verified_result, worker, ProtoError};
pub use event::{change_key, decode_change, encode_change};
pub use status::{service_error, to_status, AUTHORIZATION, MEMBER, TRACEPARENT};
