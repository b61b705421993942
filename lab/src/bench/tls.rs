//! TLS for the bench's TLS rows: a self-signed server certificate made with the openssl
//! CLI (`sslmode=require` encrypts without verifying, as the rows measure the cost of the
//! encryption), and the connection strings that ask for it.

use super::{Bench, Collected, Outcome};
use std::process::Stdio;
use tokio::process::Command;

/// `server.crt` and `server.key` for a cluster's data directory, or why not.
pub(super) async fn server_certificate() -> Result<Vec<(String, Vec<u8>)>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let (crt, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("the openssl CLI is needed to make a server certificate: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl could not make a server certificate: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    Ok(vec![
        ("server.crt".into(), read(&crt)?),
        ("server.key".into(), read(&key)?),
    ])
}

/// The connection string with TLS required (the cluster's URLs carry no query yet).
pub(super) fn require(dsn: &str) -> String {
    format!("{dsn}?sslmode=require")
}

/// A row measured with TLS on both servers, turned off again whatever the outcome.
pub(super) async fn rows<F, Fut>(b: &Bench, c: &mut Collected, label: &str, ddl: &str, f: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Outcome>>,
{
    if let Err(e) = b.set_ssl(true).await {
        c.notes
            .push(format!("{label}: TLS could not be turned on: {e:#}"));
        c.failed = true;
        return;
    }
    b.measure(c, label, ddl, f).await;
    if let Err(e) = b.set_ssl(false).await {
        c.notes
            .push(format!("{label}: TLS could not be turned off: {e:#}"));
        c.failed = true;
    }
}
