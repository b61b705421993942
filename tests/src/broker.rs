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
    /// The port clients use (the TLS front's with [`Broker::start_tls`]).
    pub port: u16,
    /// Stops the TLS front (when there is one) when dropped.
    _front: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The tansu binary: $SCHEMASHIFT_TANSU, then PATH, then ~/.cargo/bin.
fn tansu_bin() -> anyhow::Result<PathBuf> {
    schemashift_lab::tansu_bin().context("tansu not found: run ./scripts/test.sh (it installs it) or `cargo install tansu --locked --features dynostore`")
}

impl Broker {
    pub async fn start() -> anyhow::Result<Broker> {
        let port = free_port()?;
        let child = spawn_tansu(port, &format!("tcp://127.0.0.1:{port}"))?;
        wait_listening(port).await?;
        Ok(Broker {
            child,
            port,
            _front: None,
        })
    }

    /// A broker reached over TLS only: tansu has no TLS listener, so a TLS front of the test's
    /// own (`{name}-server.crt`/`.key` of `certs`, for localhost) takes the connections and
    /// passes the decrypted bytes on, and tansu advertises the front (`localhost:PORT`) in
    /// its metadata, so every connection of the client goes through it. A plaintext client
    /// gets no answer it can read.
    pub async fn start_tls(certs: &std::path::Path, name: &str) -> anyhow::Result<Broker> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let (inner, port) = (free_port()?, listener.local_addr()?.port());
        let child = spawn_tansu(inner, &format!("tcp://localhost:{port}"))?;
        wait_listening(inner).await?;
        let chain = CertificateDer::pem_file_iter(certs.join(format!("{name}-server.crt")))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(certs.join(format!("{name}-server.key")))?;
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        // Its own thread and runtime: tests block their own thread while `schemashift` runs.
        let listener = listener.into_std()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("kafka-tls-front".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let serve = async {
                        while let Ok((tcp, _)) = listener.accept().await {
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                let Ok(mut tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                if let Ok(mut plain) =
                                    tokio::net::TcpStream::connect(("127.0.0.1", inner)).await
                                {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                                }
                            });
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Broker {
            child,
            port,
            _front: Some(stop),
        })
    }

    /// `kafka://localhost:PORT`, for a spec's `changelog` (the name the TLS front's
    /// certificate holds).
    pub fn changelog_localhost(&self) -> String {
        format!("kafka://localhost:{}", self.port)
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

fn spawn_tansu(port: u16, advertised: &str) -> anyhow::Result<Child> {
    Command::new(tansu_bin()?)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting tansu")
}

async fn wait_listening(port: u16) -> anyhow::Result<()> {
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
    Ok(())
}
