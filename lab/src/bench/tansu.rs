//! A Kafka-protocol broker (tansu, in-memory storage) for the Kafka change-log rows.

use anyhow::Context;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A Kafka-protocol broker with in-memory storage, started like the tests start it.
pub(super) struct Tansu {
    child: Child,
    port: u16,
}

impl Tansu {
    pub async fn start() -> anyhow::Result<Option<Tansu>> {
        let Some(bin) = crate::tansu_bin() else {
            return Ok(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for tansu")?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting tansu")?;
        let broker = Tansu { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tansu did not listen on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(port, "tansu started");
        Ok(Some(broker))
    }

    pub fn changelog(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        if let Err(e) = self.child.kill().await {
            tracing::warn!(error = %e, "could not stop tansu");
        }
    }
}
