//! A real Kafka-protocol broker for tests: `tansu` with in-memory storage, one per test,
//! on a free port, killed when dropped. `scripts/test.sh` installs tansu when missing.

use crate::free_port;
use anyhow::Context;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub struct Broker {
    child: Child,
    pub port: u16,
}

/// The tansu binary: $SCHEMASHIFT_TANSU, then PATH, then ~/.cargo/bin.
fn tansu_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("SCHEMASHIFT_TANSU") {
        return Ok(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
        .context("tansu not found: run ./scripts/test.sh (it installs it) or `cargo install tansu --locked --features dynostore`")
}

impl Broker {
    pub async fn start() -> anyhow::Result<Broker> {
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin()?)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting tansu")?;
        let b = Broker { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "tansu did not listen on {port}"
            );
            tokio::task::yield_now().await;
        }
        Ok(b)
    }

    /// `kafka://127.0.0.1:PORT`, for a spec's `changelog`.
    pub fn changelog(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("broker already exited")?;
        let s = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        anyhow::ensure!(s.success(), "kill {sig} {pid} failed");
        Ok(())
    }

    /// SIGSTOP: the broker stops answering but keeps its connections and data.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }
}
