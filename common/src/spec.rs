//! The migration spec (one YAML file): parsing, `${ENV}` expansion and validation.
//!
//! Parsing happens on the raw text so a typo gets a line number; environment
//! references are expanded afterwards, field by field, so a value can never
//! inject YAML structure.

use crate::sql::QualifiedName;
use indexmap::IndexMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read spec {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("spec is not valid YAML for schemashift: {0}")]
    Yaml(String),
    #[error("spec refers to environment variable ${{{0}}}, which is not set: export it or edit the spec")]
    MissingEnv(String),
    #[error("spec is invalid:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// A connection string. Held as a secret: it usually carries a password.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Dsn(SecretString);

impl Dsn {
    pub fn new(s: impl Into<String>) -> Self {
        Dsn(SecretString::from(s.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
    /// The connection string as libpq would read it (see [`crate::conninfo`]).
    pub fn conninfo(&self) -> Result<crate::conninfo::ConnInfo, String> {
        crate::conninfo::parse(self.expose())
    }

    /// `host:port/dbname` without user info or password, for messages and spans.
    pub fn redacted(&self) -> String {
        match crate::conninfo::address(self.expose()) {
            Ok(cfg) => {
                let host = cfg
                    .get_hosts()
                    .first()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(h) => h.clone(),
                        #[cfg(unix)]
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .unwrap_or_else(|| "localhost".into());
                let port = cfg.get_ports().first().copied().unwrap_or(5432);
                let db = cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres");
                format!("{host}:{port}/{db}")
            }
            Err(_) => "<unparseable connection string>".into(),
        }
    }
    /// `${NAME}` standing for the whole string is taken as it is (a DSN kept in the
    /// environment); inside a connection string the value is encoded for the form it lands
    /// in, so a password with a space, quote, `@` or `/` stays one value.
    fn expand_env(&mut self) -> Result<(), SpecError> {
        let raw = self.expose();
        let whole = raw.starts_with("${") && raw.ends_with('}') && raw.matches("${").count() == 1;
        let expanded = if whole {
            expand_env(raw)?
        } else if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            expand_env_with(raw, percent_encode)?
        } else {
            expand_env_with(raw, escape_conninfo)?
        };
        self.0 = SecretString::from(expanded);
        Ok(())
    }
}

/// Percent-encoding of everything but RFC 3986's unreserved characters.
fn percent_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A `key=value` connection-string value with its backslashes, quotes and white space
/// escaped (libpq reads a backslash as "take the next character" quoted or not).
fn escape_conninfo(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c == '\\' || c == '\'' || c.is_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({})", self.redacted())
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Auto,
    Copy,
    Fdw,
}

/// A key: one column or a list of columns (composite key).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum KeySpec {
    One(String),
    Many(Vec<String>),
}

impl KeySpec {
    pub fn columns(&self) -> Vec<String> {
        match self {
            KeySpec::One(c) => vec![c.clone()],
            KeySpec::Many(cs) => cs.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub source: String,
    pub target: String,
    pub key: KeySpec,
    #[serde(default)]
    pub shard_rows: Option<u64>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Target column → SQL expression over source columns, in target order.
    pub columns: IndexMap<String, String>,
    /// Source column → SQL expression over target columns (reverse sync, accuracy).
    #[serde(default)]
    pub reverse: Option<IndexMap<String, String>>,
    /// Other source tables the column expressions read (a merge): their changes are
    /// captured too and refresh the target rows of the keys they name.
    #[serde(default)]
    pub lookups: Vec<LookupSpec>,
}

/// A source table read by a table's expressions, and the columns of it that hold the
/// driving table's key (in key order).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    pub table: String,
    pub key: KeySpec,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverSpec {
    #[serde(default = "default_max_lag", with = "humantime_serde")]
    pub max_lag: Duration,
    #[serde(default = "default_freeze_timeout", with = "humantime_serde")]
    pub freeze_timeout: Duration,
    #[serde(default)]
    pub switch_command: Option<String>,
    /// Run by `rollback` after a cutover, in its freeze: point the application back.
    #[serde(default)]
    pub switch_back_command: Option<String>,
    /// Start reverse sync at the cutover, so a rollback loses nothing (default). With
    /// `false` the cutover goes ahead without a way back; otherwise it refuses when
    /// reverse sync cannot start.
    #[serde(default = "default_true")]
    pub reverse: bool,
}

fn default_max_lag() -> Duration {
    Duration::from_secs(1)
}
fn default_freeze_timeout() -> Duration {
    Duration::from_secs(1)
}

impl Default for CutoverSpec {
    fn default() -> Self {
        CutoverSpec {
            max_lag: default_max_lag(),
            freeze_timeout: default_freeze_timeout(),
            switch_command: None,
            switch_back_command: None,
            reverse: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub source: Dsn,
    pub target: Dsn,
    #[serde(default = "default_changelog")]
    pub changelog: String,
    #[serde(default)]
    pub workers: Option<usize>,
    /// Schema in the target database that holds the run's control state.
    #[serde(default = "default_control_schema")]
    pub control_schema: String,
    #[serde(default)]
    pub functions: Vec<String>,
    pub tables: Vec<TableSpec>,
    #[serde(default)]
    pub cutover: CutoverSpec,
    #[serde(default)]
    pub throttle: ThrottleSpec,
    #[serde(default)]
    pub replay: ReplaySpec,
    /// An existing publication covering the source tables (made by an administrator, as
    /// creating one needs table ownership): used as it is, never created, altered or
    /// dropped.
    #[serde(default)]
    pub source_publication: Option<String>,
    /// The fleet member this spec is for (see [`crate::fleet`]); not a YAML field.
    #[serde(skip)]
    pub member: Option<String>,
}

/// Replay tuning: changes applied per partition in one target transaction.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySpec {
    #[serde(default = "default_replay_batch")]
    pub batch: u32,
}

fn default_replay_batch() -> u32 {
    5_000
}

impl Default for ReplaySpec {
    fn default() -> Self {
        ReplaySpec {
            batch: default_replay_batch(),
        }
    }
}

/// Source health limits: while one is exceeded, no new backfill shard starts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Latency of a one-row read of a migrated table on the source.
    #[serde(default = "default_probe_latency", with = "humantime_serde")]
    pub probe_latency: Duration,
    /// Replay lag of the source's physical replicas (pg_stat_replication).
    #[serde(default = "default_replica_lag", with = "humantime_serde")]
    pub replica_lag: Duration,
    /// Sessions waiting on a lock on the source.
    #[serde(default = "default_lock_waiters")]
    pub lock_waiters: i64,
    /// How much slower than its baseline (measured before the backfill) the probe may
    /// get, as a fraction: 0.10 = 10%. Copies pause mid-shard while it is exceeded.
    #[serde(default = "default_probe_increase")]
    pub probe_increase: f64,
    /// Run our bulk sessions' server processes at the lowest CPU priority (nice 19) when
    /// the database runs on this host, so the application's queries go first.
    #[serde(default = "default_true")]
    pub low_priority: bool,
    /// The busiest the host may get (all its CPUs, every process; 0.7 = 70%) before fewer
    /// copies and index builds run at once. Read from /proc/stat when the source database
    /// runs on this host. On a saturated host the application's queries wait for a core
    /// whatever the priorities (measured: two nice-19 spinners quadruple a read's p95 on 2
    /// cores, one leaves it unchanged), so the migration keeps a core's headroom.
    #[serde(default = "default_max_host_cpu")]
    pub max_host_cpu: f64,
}

fn default_true() -> bool {
    true
}
fn default_probe_latency() -> Duration {
    Duration::from_millis(50)
}
fn default_replica_lag() -> Duration {
    Duration::from_secs(10)
}
fn default_lock_waiters() -> i64 {
    10
}
fn default_probe_increase() -> f64 {
    0.10
}
fn default_max_host_cpu() -> f64 {
    0.7
}

impl Default for ThrottleSpec {
    fn default() -> Self {
        ThrottleSpec {
            enabled: true,
            probe_latency: default_probe_latency(),
            replica_lag: default_replica_lag(),
            lock_waiters: default_lock_waiters(),
            probe_increase: default_probe_increase(),
            low_priority: true,
            max_host_cpu: default_max_host_cpu(),
        }
    }
}

fn default_changelog() -> String {
    "postgres".into()
}
fn default_control_schema() -> String {
    "schemashift".into()
}

/// Where decoded changes are stored until replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changelog {
    /// A change table in the target database's control schema.
    Postgres,
    Kafka(KafkaOptions),
}

/// `kafka://HOST:PORT[,HOST:PORT][?topic_prefix=P&replication_factor=N&security_protocol=…]`.
/// The topic is `<topic_prefix><run id>` with one partition per change-log partition of the
/// plan; the security options are [`KafkaSecurity`](crate::kafka_conn::KafkaSecurity)'s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaOptions {
    pub conn: crate::kafka_conn::KafkaConn,
    pub topic_prefix: String,
    pub replication_factor: i32,
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Spec::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let mut spec: Spec =
            serde_norway::from_str(text).map_err(|e| SpecError::Yaml(e.to_string()))?;
        spec.expand_env()?;
        spec.validate()?;
        Ok(spec)
    }

    /// `sh -c CMD` for the spec's switch commands; a fleet member's name is in its
    /// environment as `SCHEMASHIFT_MEMBER`, so one script can switch every member.
    pub fn shell(&self, cmd: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(cmd);
        if let Some(m) = &self.member {
            c.env("SCHEMASHIFT_MEMBER", m);
        }
        c
    }

    /// [`Spec::parse`] of an already parsed YAML document (a fleet member's).
    pub fn from_yaml(doc: serde_norway::Value) -> Result<Spec, SpecError> {
        let mut spec: Spec =
            serde_norway::from_value(doc).map_err(|e| SpecError::Yaml(e.to_string()))?;
        spec.expand_env()?;
        spec.validate()?;
        Ok(spec)
    }

    fn expand_env(&mut self) -> Result<(), SpecError> {
        self.source.expand_env()?;
        self.target.expand_env()?;
        self.changelog = expand_env(&self.changelog)?;
        self.control_schema = expand_env(&self.control_schema)?;
        for f in &mut self.functions {
            *f = expand_env(f)?;
        }
        for t in &mut self.tables {
            t.source = expand_env(&t.source)?;
            t.target = expand_env(&t.target)?;
            for v in t.columns.values_mut() {
                *v = expand_env(v)?;
            }
            if let Some(rev) = &mut t.reverse {
                for v in rev.values_mut() {
                    *v = expand_env(v)?;
                }
            }
        }
        if let Some(cmd) = &mut self.cutover.switch_command {
            *cmd = expand_env(cmd)?;
        }
        Ok(())
    }

    /// Checks that need no database; every problem is listed, not just the first.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut problems = Vec::new();
        for (what, dsn) in [("source", &self.source), ("target", &self.target)] {
            if let Err(e) = dsn.conninfo() {
                problems.push(format!("{what}: not a valid connection string ({e})"));
            }
        }
        if let Err(e) = self.changelog() {
            problems.push(e);
        }
        if !(1..=100_000).contains(&self.replay.batch) {
            problems.push(format!(
                "replay.batch: {} is out of range (1..=100000)",
                self.replay.batch
            ));
        }
        if let Some(w) = self.workers {
            if !(1..=256).contains(&w) {
                problems.push(format!("workers: {w} is out of range (1..=256)"));
            }
        }
        if QualifiedName::parse(&self.control_schema).is_err() || self.control_schema.contains('.')
        {
            problems.push(format!(
                "control_schema: {:?} is not a schema name",
                self.control_schema
            ));
        }
        if self.tables.is_empty() {
            problems.push("tables: at least one table is needed".into());
        }
        let mut targets = std::collections::HashSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            let at = format!("tables[{i}] ({})", t.source);
            match QualifiedName::parse(&t.source) {
                Ok(_) => {}
                Err(e) => problems.push(format!("{at}: source: {e}")),
            }
            match QualifiedName::parse(&t.target) {
                Ok(q) => {
                    if !targets.insert(q.clone()) {
                        problems.push(format!("{at}: target {q} is named by two tables"));
                    }
                }
                Err(e) => problems.push(format!("{at}: target: {e}")),
            }
            let key = t.key.columns();
            if key.is_empty() || key.iter().any(|k| k.trim().is_empty()) {
                problems.push(format!("{at}: key: name the key column(s), e.g. `key: id`"));
            }
            if t.shard_rows == Some(0) {
                problems.push(format!("{at}: shard_rows must be greater than 0"));
            }
            if t.columns.is_empty() {
                problems.push(format!(
                    "{at}: columns: map at least one target column, e.g. `id: id`"
                ));
            }
            for (col, expr) in &t.columns {
                if expr.trim().is_empty() {
                    problems.push(format!("{at}: columns.{col}: the expression is empty"));
                }
            }
        }
        if !(self.throttle.probe_increase.is_finite() && self.throttle.probe_increase >= 0.0) {
            problems.push(format!(
                "throttle.probe_increase: {} is not a fraction >= 0 (0.10 allows the probe 10% slower than before the run)",
                self.throttle.probe_increase
            ));
        }
        let cpu = self.throttle.max_host_cpu;
        if !(cpu.is_finite() && cpu > 0.0 && cpu <= 1.0) {
            problems.push(format!(
                "throttle.max_host_cpu: {cpu} is not a fraction in (0, 1] (0.7 keeps the host at most 70% busy; 1 turns the limit off)"
            ));
        }
        if self.cutover.freeze_timeout.is_zero() {
            problems.push("cutover.freeze_timeout must be greater than 0".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid(problems))
        }
    }

    pub fn changelog(&self) -> Result<Changelog, String> {
        let c = self.changelog.trim();
        if c == "postgres" {
            return Ok(Changelog::Postgres);
        }
        if let Some(rest) = c.strip_prefix("kafka://") {
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            let mut opts = KafkaOptions {
                conn: crate::kafka_conn::KafkaConn::default(),
                topic_prefix: "schemashift.".into(),
                replication_factor: 1,
            };
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                match k {
                    "topic_prefix" => {
                        if v.is_empty()
                            || !v
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                        {
                            return Err(format!(
                                "changelog: topic_prefix {v:?} may only use letters, digits, '.', '_' and '-'"
                            ));
                        }
                        opts.topic_prefix = v.to_owned();
                    }
                    "replication_factor" => {
                        opts.replication_factor = v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                            format!("changelog: replication_factor {v:?} must be a whole number of at least 1")
                        })?;
                    }
                    other => {
                        if !opts.conn.security.set(other, v)? {
                            return Err(format!(
                                "changelog: unknown Kafka option {other:?} (known: topic_prefix, \
                                 replication_factor, security_protocol, ssl_ca, ssl_cert, ssl_key, \
                                 sasl_mechanism)"
                            ));
                        }
                    }
                }
            }
            let brokers: Vec<String> = hosts
                .split(',')
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty())
                .collect();
            if brokers.is_empty() || brokers.iter().any(|b| !b.contains(':')) {
                return Err(format!(
                    "changelog: {c:?} must list brokers as kafka://HOST:PORT[,HOST:PORT]"
                ));
            }
            opts.conn.brokers = brokers;
            opts.conn.security.validate()?;
            return Ok(Changelog::Kafka(opts));
        }
        Err(format!(
            "changelog: {c:?} is neither `postgres` nor `kafka://HOST:PORT[,HOST:PORT]`"
        ))
    }

    /// A stable fingerprint of what the run does, so a resumed run can refuse a changed spec.
    pub fn fingerprint(&self) -> String {
        let tables = self.tables.iter().flat_map(|t| {
            std::iter::once(format!("{}|{}|{:?}|", t.source, t.target, t.key.columns()))
                .chain(t.columns.iter().map(|(k, v)| format!("{k}={v};")))
        });
        crate::spec_print::hash(std::iter::once(self.functions.join("\n")).chain(tables))
    }
}

/// Replaces `${NAME}` with the variable's value; `$$` and a lone `$` stay as they are
/// (SQL dollar quoting in function bodies must survive).
pub fn expand_env(s: &str) -> Result<String, SpecError> {
    expand_env_with(s, str::to_owned)
}

/// [`expand_env`] with each value passed through `encode`.
fn expand_env_with(s: &str, encode: impl Fn(&str) -> String) -> Result<String, SpecError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("${") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        match after.find('}') {
            Some(end)
                if !after[..end].is_empty()
                    && after[..end]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                let name = &after[..end];
                let val =
                    std::env::var(name).map_err(|_| SpecError::MissingEnv(name.to_owned()))?;
                out.push_str(&encode(&val));
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
