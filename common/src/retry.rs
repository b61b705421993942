//! The one retry policy. Every error type says what it is through [`Classify`]; only
//! [`Class::Transient`] errors are retried, by [`retry`] with one of two backoffs.
//! SQLSTATEs stay typed ([`SqlState`]) until they are classified here.

use backon::{ExponentialBuilder, Retryable};
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio_postgres::error::SqlState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The same work can succeed later: lost connection, restart, lock or serialization
    /// conflict, unreachable broker.
    Transient,
    /// Retrying cannot help: bad input, wrong password, missing privilege, bad helper
    /// function, corrupt data. Said at once.
    Permanent,
    /// Another holder owns the work now (a newer lease epoch); this holder stops quietly.
    Fenced,
}

/// What an error is, for the retry policy.
pub trait Classify {
    fn class(&self) -> Class;

    fn is_transient(&self) -> bool {
        self.class() == Class::Transient
    }
}

/// SQLSTATE classes and codes worth retrying: connection exceptions (08), insufficient
/// resources (53), operator intervention (57: shutdown, cancel), serialization failure,
/// deadlock and lock timeout. Everything else (28 auth, 42 privilege or undefined
/// function, 23 constraint, 22 data) is permanent.
pub fn classify_sqlstate(code: &SqlState) -> Class {
    let c = code.code();
    let transient = c.starts_with("08")
        || c.starts_with("53")
        || c.starts_with("57")
        || [
            &SqlState::T_R_SERIALIZATION_FAILURE,
            &SqlState::T_R_DEADLOCK_DETECTED,
            &SqlState::LOCK_NOT_AVAILABLE,
        ]
        .contains(&code);
    if transient {
        Class::Transient
    } else {
        Class::Permanent
    }
}

/// A tokio-postgres error: the server's SQLSTATE when there is one; without one, a closed
/// session or an I/O failure (refused, reset, timed out) is transient, and anything else
/// (bad connection string, TLS or protocol failure) permanent.
pub fn classify_pg(e: &tokio_postgres::Error) -> Class {
    if let Some(code) = e.code() {
        return classify_sqlstate(code);
    }
    if e.is_closed() || io_cause(e) {
        return Class::Transient;
    }
    Class::Permanent
}

/// An I/O failure under the error, unless it is a TLS refusal (a certificate that does
/// not verify, a client certificate the server refuses): that one is permanent.
fn io_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = e.source();
    while let Some(inner) = src {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            let tls = io.get_ref().is_some_and(|i| i.is::<rustls::Error>());
            return !tls;
        }
        if inner.is::<rustls::Error>() {
            return false;
        }
        src = inner.source();
    }
    false
}

impl Classify for tokio_postgres::Error {
    fn class(&self) -> Class {
        classify_pg(self)
    }
}

/// How long to keep trying.
#[derive(Clone, Copy, Debug)]
pub enum Backoff {
    /// A database or broker: a few seconds in all, then the work is left to be leased again.
    Database,
    /// The coordinator from a worker: long enough to ride out its restart (about 3 min).
    Coordinator,
    /// Capture's stream and log: a server restart or failover (about a minute).
    Stream,
}

impl Backoff {
    pub fn builder(self) -> ExponentialBuilder {
        let (min, max, times) = match self {
            Backoff::Database => (Duration::from_millis(100), Duration::from_secs(2), 6),
            Backoff::Coordinator => (Duration::from_millis(100), Duration::from_secs(5), 40),
            Backoff::Stream => (Duration::from_millis(200), Duration::from_secs(5), 15),
        };
        ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_max_times(times)
            .with_jitter()
    }
}

/// Runs `op` until it succeeds, fails with a non-transient error, or the backoff ends.
pub async fn retry<T, E, F, Fut>(what: &str, backoff: Backoff, op: F) -> Result<T, E>
where
    E: Classify + Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    op.retry(backoff.builder())
        .when(|e: &E| e.is_transient())
        .notify(
            |e, d| tracing::warn!(what, error = %e, retry_in_ms = d.as_millis() as u64, "retrying"),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_privilege_and_missing_function_are_permanent() {
        for code in [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNIQUE_VIOLATION,
            SqlState::INVALID_TEXT_REPRESENTATION,
        ] {
            assert_eq!(classify_sqlstate(&code), Class::Permanent, "{code:?}");
        }
    }

    #[test]
    fn lost_connections_conflicts_and_restarts_are_transient() {
        for code in [
            SqlState::CONNECTION_FAILURE,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::QUERY_CANCELED,
        ] {
            assert_eq!(classify_sqlstate(&code), Class::Transient, "{code:?}");
        }
    }
}
