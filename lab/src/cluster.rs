//! A throwaway PostgreSQL cluster in a temporary directory, for `schemashift demo` and tests.
//!
//! PostgreSQL refuses to run as root, so when we are root every server binary runs through
//! `runuser -u postgres --` and the temporary directory is handed to that user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::sync::OnceLock;

use tempfile::TempDir;
use tokio::process::Command;

/// Attempts to find a port the server can bind; another process may take a free port between
/// our probe and the server's bind.
const START_ATTEMPTS: usize = 5;
/// Lines of the server log quoted in a start error.
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (set SCHEMASHIFT_PG_BIN, or install them: \
         apt-get install postgresql)"
    )]
    NoBinaries,
    #[error(
        "running as root needs the `postgres` system user to run the server; none exists \
         (install it with: apt-get install postgresql)"
    )]
    NoPostgresUser,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "postgres did not start on port {port}: {detail}\n--- server log tail ---\n{log_tail}"
    )]
    Start {
        port: u16,
        detail: String,
        log_tail: String,
    },
}

impl ClusterError {
    /// A start that failed because another process took the port; worth a retry.
    fn is_port_conflict(&self) -> bool {
        match self {
            ClusterError::Start { log_tail, .. } => {
                log_tail.contains("could not bind") || log_tail.contains("already in use")
            }
            _ => false,
        }
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Settings of a new cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `wal_level`; capture needs `logical`.
    pub wal_level: String,
    /// Extra `postgresql.conf` settings, written after (and so overriding) the defaults.
    pub extra_conf: Vec<(String, String)>,
    /// Files written into the data directory before the start (server certificate and
    /// key), readable by the server's user only.
    pub files: Vec<(String, Vec<u8>)>,
    /// Replaces `pg_hba.conf` (for example `hostssl` lines only, as managed services).
    pub hba: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical".to_string(),
            extra_conf: Vec::new(),
            files: Vec::new(),
            hba: None,
        }
    }
}

/// A running PostgreSQL cluster that lives as long as this value.
#[derive(Debug)]
pub struct Cluster {
    // Option so that stop() and Drop can take it; the directory is removed when dropped.
    dir: Option<TempDir>,
    data_dir: PathBuf,
    log_path: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    stopped: bool,
}

/// Directory of the PostgreSQL server binaries: `$SCHEMASHIFT_PG_BIN`, else
/// `/usr/lib/postgresql/15/bin`, else `pg_config --bindir`.
pub fn bin_dir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("SCHEMASHIFT_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if dir.join("postgres").is_file() {
            Ok(dir)
        } else {
            Err(ClusterError::NoBinaries)
        };
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("postgres").is_file() {
        return Ok(debian);
    }
    let out = StdCommand::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(dir);
            }
        }
    }
    Err(ClusterError::NoBinaries)
}

/// Whether this process runs as root; asked once with `id -u` (no libc calls needed).
fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        StdCommand::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

fn postgres_user_exists() -> bool {
    StdCommand::new("id")
        .arg("-u")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A free TCP port on 127.0.0.1 at the time of asking.
fn free_port() -> Result<u16, ClusterError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError::io("find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ClusterError::io("find a free port", e))?;
    Ok(addr.port())
}

/// Builds a command for a server binary, through `runuser` when we are root.
fn pg_command(bin: &Path, program: &str, as_postgres: bool, cwd: &Path) -> StdCommand {
    let mut cmd = if as_postgres {
        let mut c = StdCommand::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        StdCommand::new(bin.join(program))
    };
    // The caller's cwd may be unreadable for the postgres user (e.g. /root).
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

async fn run(cmd: StdCommand, what: &str) -> Result<Output, ClusterError> {
    let out = Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ClusterError::io(format!("run {what}"), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(command_error(what, &out))
    }
}

fn command_error(what: &str, out: &Output) -> ClusterError {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if text.is_empty() {
        text = stdout.trim().to_string();
    }
    ClusterError::Command {
        command: what.to_string(),
        status: out.status.to_string(),
        output: text,
    }
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[start..].join("\n")
        }
        Err(e) => format!("(log {} unreadable: {e})", path.display()),
    }
}

/// `postgresql.conf` lines for a new cluster.
fn conf_text(opts: &ClusterOptions, socket_dir: &Path) -> String {
    let mut settings: Vec<(String, String)> = vec![
        ("listen_addresses".into(), "'127.0.0.1'".into()),
        (
            "unix_socket_directories".into(),
            quote_conf(&socket_dir.display().to_string()),
        ),
        ("wal_level".into(), quote_conf(&opts.wal_level)),
        ("max_replication_slots".into(), "64".into()),
        ("max_wal_senders".into(), "16".into()),
        ("max_connections".into(), "200".into()),
        ("fsync".into(), "off".into()),
        ("synchronous_commit".into(), "off".into()),
        ("full_page_writes".into(), "off".into()),
        ("shared_buffers".into(), "'256MB'".into()),
        ("max_wal_size".into(), "'4GB'".into()),
    ];
    settings.extend(opts.extra_conf.iter().cloned());
    let mut text = String::from("\n# added by schemashift cluster\n");
    for (k, v) in settings {
        text.push_str(&format!("{k} = {v}\n"));
    }
    // The port lives in its own file so a retry can change it.
    text.push_str("include = 'schemashift_port.conf'\n");
    text
}

fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl Cluster {
    /// Creates and starts a new cluster in a fresh temporary directory.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        if as_postgres && !postgres_user_exists() {
            return Err(ClusterError::NoPostgresUser);
        }
        let dir = tempfile::Builder::new()
            .prefix("schemashift-pg-")
            .tempdir()
            .map_err(|e| ClusterError::io("create temporary directory", e))?;
        let root = dir.path().to_path_buf();
        if as_postgres {
            let mut chown = StdCommand::new("chown");
            chown.arg("-R").arg("postgres:").arg(&root);
            run(chown, "chown of the cluster directory").await?;
        }
        let data_dir = root.join("data");
        let log_path = root.join("postgres.log");
        initdb(&bin, &data_dir, as_postgres, &root).await?;

        let conf_path = data_dir.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path)
            .map_err(|e| ClusterError::io("read postgresql.conf", e))?;
        conf.push_str(&conf_text(&opts, &root));
        std::fs::write(&conf_path, conf)
            .map_err(|e| ClusterError::io("write postgresql.conf", e))?;
        for (name, bytes) in &opts.files {
            use std::os::unix::fs::PermissionsExt;
            let path = data_dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| ClusterError::io("write a data file", e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| ClusterError::io("restrict a data file", e))?;
        }
        if let Some(hba) = &opts.hba {
            std::fs::write(data_dir.join("pg_hba.conf"), hba)
                .map_err(|e| ClusterError::io("write pg_hba.conf", e))?;
        }
        if as_postgres && (!opts.files.is_empty() || opts.hba.is_some()) {
            let mut chown = StdCommand::new("chown");
            chown.arg("-R").arg("postgres:").arg(&data_dir);
            run(chown, "chown of the data files").await?;
        }

        let mut cluster = Cluster {
            dir: Some(dir),
            data_dir,
            log_path,
            bin,
            port: 0,
            as_postgres,
            // Nothing to stop until the server has been started.
            stopped: true,
        };
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            match cluster.try_start(port).await {
                Ok(()) => {
                    tracing::debug!(port, data_dir = %cluster.data_dir.display(), "cluster started");
                    return Ok(cluster);
                }
                Err(e) if attempt < START_ATTEMPTS && e.is_port_conflict() => {
                    tracing::debug!(port, attempt, error = %e, "cluster start failed, retrying");
                    // A half-started server must not keep the port or directory busy.
                    cluster.pg_ctl_stop_sync("immediate");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_start(&mut self, port: u16) -> Result<(), ClusterError> {
        let port_conf = self.data_dir.join("schemashift_port.conf");
        std::fs::write(&port_conf, format!("port = {port}\n"))
            .map_err(|e| ClusterError::io("write port configuration", e))?;
        let cwd = self.root();
        let mut cmd = pg_command(&self.bin, "pg_ctl", self.as_postgres, &cwd);
        cmd.args(["-w", "-t", "120", "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .arg("start");
        self.port = port;
        self.stopped = false;
        match run(cmd, "pg_ctl start").await {
            Ok(_) => Ok(()),
            Err(e) => Err(ClusterError::Start {
                port,
                detail: e.to_string(),
                log_tail: log_tail(&self.log_path),
            }),
        }
    }

    fn root(&self) -> PathBuf {
        self.data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.data_dir.clone())
    }

    /// TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection string for database `db` as the `postgres` superuser (trust auth).
    pub fn dsn(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The data directory (inside the temporary directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log, useful when a test fails.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the server (`pg_ctl stop -m fast`) and keeps its data, for [`Cluster::resume`]:
    /// a server going away under a run.
    pub async fn halt(&mut self) -> Result<(), ClusterError> {
        let cwd = self.root();
        let mut cmd = pg_command(&self.bin, "pg_ctl", self.as_postgres, &cwd);
        cmd.args(["-w", "-t", "60", "-m", "fast", "-D"])
            .arg(&self.data_dir)
            .arg("stop");
        run(cmd, "pg_ctl stop").await?;
        self.stopped = true;
        Ok(())
    }

    /// Starts a halted server again on its port.
    pub async fn resume(&mut self) -> Result<(), ClusterError> {
        self.try_start(self.port).await
    }

    /// Stops the server (`pg_ctl stop -m fast`) and removes its directory.
    pub async fn stop(mut self) -> Result<(), ClusterError> {
        if !self.stopped {
            self.halt().await?;
        }
        if let Some(dir) = self.dir.take() {
            dir.close()
                .map_err(|e| ClusterError::io("remove the cluster directory", e))?;
        }
        Ok(())
    }

    /// Best-effort synchronous stop, for Drop and failed starts.
    fn pg_ctl_stop_sync(&mut self, mode: &str) {
        let cwd = self.root();
        let mut cmd = pg_command(&self.bin, "pg_ctl", self.as_postgres, &cwd);
        cmd.args(["-w", "-t", "30", "-m", mode, "-D"])
            .arg(&self.data_dir)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Err(e) = cmd.status() {
            tracing::warn!(error = %e, "could not run pg_ctl stop");
        }
        self.stopped = true;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            self.pg_ctl_stop_sync("immediate");
        }
    }
}

async fn initdb(
    bin: &Path,
    data_dir: &Path,
    as_postgres: bool,
    cwd: &Path,
) -> Result<(), ClusterError> {
    let attempt = |locale: &str| {
        let mut cmd = pg_command(bin, "initdb", as_postgres, cwd);
        cmd.arg("-D")
            .arg(data_dir)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .arg(locale);
        cmd
    };
    match run(attempt("--locale=C.UTF-8"), "initdb").await {
        Ok(_) => Ok(()),
        Err(first) => {
            // Some systems lack the C.UTF-8 locale; the plain C locale works everywhere.
            tracing::debug!(error = %first, "initdb with C.UTF-8 failed, retrying with --no-locale");
            if data_dir.exists() {
                std::fs::remove_dir_all(data_dir)
                    .map_err(|e| ClusterError::io("clean up after failed initdb", e))?;
            }
            run(attempt("--no-locale"), "initdb").await.map(|_| ())
        }
    }
}

/// Shared by the unit tests of modules that need a database.
#[cfg(test)]
pub(crate) async fn test_cluster() -> (Cluster, tokio_postgres::Client) {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let (client, conn) = tokio_postgres::connect(&cluster.dsn("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(conn);
    (cluster, client)
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
