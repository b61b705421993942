//! Real `schemashift` processes for distributed tests: spawned with their output in files,
//! killed with SIGKILL on demand, and killed when dropped so a failing test leaves none.

use crate::schemashift_bin;
use anyhow::Context;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

pub struct Proc {
    pub name: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// Starts `schemashift ARGS` with extra environment; output goes to files in `dir`.
    pub fn spawn(
        dir: &std::path::Path,
        name: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = Command::new(schemashift_bin())
            .args(args)
            .env("RUST_LOG", "info,tokio_postgres=warn")
            .env_remove("SCHEMASHIFT_TOKEN")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            child,
            out,
            err,
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("kill -9")?;
        Ok(())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a process frozen as by a long GC pause or a
    /// suspended VM, with its sockets open.
    pub fn freeze(&mut self, frozen: bool) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            .context("process already exited")?;
        let sig = if frozen {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::CONT
        };
        rustix::process::kill_process(pid, sig).context("sending signal")?;
        Ok(())
    }

    /// Waits for the process to exit on its own, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => Ok(s?),
            Err(_) => {
                anyhow::bail!(
                    "{} still running after {limit:?}; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                )
            }
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The end of stderr, for assertion messages.
    pub fn stderr_tail(&self) -> String {
        let s = self.stderr();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// `schemashift worker` processes named `ids`, dialling `url`.
pub fn spawn_workers(
    dir: &std::path::Path,
    url: &str,
    ids: &[&str],
    envs: &[(&str, &str)],
) -> anyhow::Result<Vec<Proc>> {
    spawn_workers_with(dir, url, ids, &[], envs)
}

/// [`spawn_workers`] with more worker flags (`--tls-ca`, a client certificate, …).
pub fn spawn_workers_with(
    dir: &std::path::Path,
    url: &str,
    ids: &[&str],
    extra: &[&str],
    envs: &[(&str, &str)],
) -> anyhow::Result<Vec<Proc>> {
    ids.iter()
        .map(|id| {
            let mut args = vec!["worker", "--coordinator", url, "--id", id];
            args.extend_from_slice(extra);
            Proc::spawn(dir, id, &args, envs)
        })
        .collect()
}

/// `schemashift coordinator SPEC --listen LISTEN --until UNTIL --lease-ttl 2s` and `extra`.
pub fn coordinator_args<'a>(
    spec: &'a str,
    listen: &'a str,
    until: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "coordinator",
        spec,
        "--listen",
        listen,
        "--until",
        until,
        "--lease-ttl",
        "2s",
    ];
    args.extend_from_slice(extra);
    args
}

/// A free local address for a coordinator, and the URL workers dial.
pub fn local_listen() -> anyhow::Result<(String, String)> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let url = format!("http://{listen}");
    Ok((listen, url))
}

/// A port that was free a moment ago (the coordinator binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
