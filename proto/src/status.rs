//! Service errors ⇄ gRPC status codes, in one place for both ends.

use crate::ProtoError;
use schemashift_common::service::ServiceError;
use tonic::{Code, Status};

/// Metadata key of the shared token (`Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";
/// Metadata key of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Metadata key naming the fleet member a call is for (absent: the coordinator's only run).
pub const MEMBER: &str = "schemashift-member";

/// Server side: what a worker sees when the service refuses or fails.
pub fn to_status(e: ServiceError) -> Status {
    match e {
        ServiceError::Unavailable(m) => Status::unavailable(m),
        ServiceError::Rejected(m) => Status::failed_precondition(m),
        ServiceError::Unauthenticated(m) => Status::unauthenticated(m),
    }
}

impl From<ProtoError> for Status {
    fn from(e: ProtoError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// Client side: transport trouble and coordinator restarts are transient; refusals are not.
pub fn service_error(s: Status) -> ServiceError {
    match s.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Unknown => ServiceError::Unavailable(s.message().to_owned()),
        Code::Unauthenticated | Code::PermissionDenied => {
            ServiceError::Unauthenticated(s.message().to_owned())
        }
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => ServiceError::Rejected(format!("{:?}: {}", s.code(), s.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemashift_common::retry::Classify;

    #[test]
    fn errors_keep_their_kind_across_the_wire() {
        for e in [
            ServiceError::Unavailable("x".into()),
            ServiceError::Rejected("x".into()),
            ServiceError::Unauthenticated("x".into()),
        ] {
            let transient = e.is_transient();
            let kind = std::mem::discriminant(&e);
            let back = service_error(to_status(e));
            assert_eq!(back.is_transient(), transient);
            assert_eq!(std::mem::discriminant(&back), kind);
        }
    }
}
