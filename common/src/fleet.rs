//! Fleets: one spec, many source/target pairs (`members`), and the per-server limit on
//! copies and index builds they share (`limits.per_host`).
//!
//! Each member is an ordinary [`Spec`] (the fleet's tables, functions, cutover and throttle
//! with the member's two connection strings), so it keeps its own slot, change log and control
//! schema on its own target, and can be verified, cut over, rolled back or cleaned up alone.

use crate::spec::{Dsn, Spec, SpecError};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// What a spec file holds: one pair, or a fleet.
pub enum Loaded {
    One(Box<Spec>),
    Fleet(Fleet),
}

pub struct Fleet {
    /// In spec order (waves follow it).
    pub members: Vec<Member>,
    /// `limits.per_host`: copies or index builds at once on one server; none: no limit.
    pub per_host: Option<usize>,
}

pub struct Member {
    pub name: String,
    pub spec: Spec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    source: String,
    target: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Limits {
    per_host: Option<usize>,
}

/// Reads a spec file: a fleet when it has `members` or `members_file`.
pub fn load(path: &Path) -> Result<Loaded, SpecError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| SpecError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let text = read(path)?;
    let yaml = |e: serde_norway::Error| SpecError::Yaml(e.to_string());
    let mut doc: serde_norway::Mapping = serde_norway::from_str(&text).map_err(yaml)?;
    let (members, file, limits) = (
        doc.remove("members"),
        doc.remove("members_file"),
        doc.remove("limits"),
    );
    if members.is_none() && file.is_none() {
        if limits.is_some() {
            return Err(SpecError::Invalid(vec![
                "limits: only a fleet (`members`) has limits".into(),
            ]));
        }
        return Spec::parse(&text).map(|s| Loaded::One(Box::new(s)));
    }
    let mut entries: Vec<Entry> = match members {
        Some(v) => serde_norway::from_value(v).map_err(|e| {
            SpecError::Yaml(format!("members: {e} (each member: name, source, target)"))
        })?,
        None => Vec::new(),
    };
    if let Some(f) = file {
        let f: String = serde_norway::from_value(f).map_err(yaml)?;
        let f = crate::spec::expand_env(&f)?;
        let p = path.parent().unwrap_or(Path::new(".")).join(&f);
        let more: Vec<Entry> = serde_norway::from_str(&read(&p)?)
            .map_err(|e| SpecError::Yaml(format!("members_file {f}: {e}")))?;
        entries.extend(more);
    }
    let limits: Limits = match limits {
        Some(v) => {
            serde_norway::from_value(v).map_err(|e| SpecError::Yaml(format!("limits: {e}")))?
        }
        None => Limits::default(),
    };
    let mut problems = check_entries(&entries);
    if doc.contains_key("source") || doc.contains_key("target") {
        problems.push("members replaces source and target: give them per member only".into());
    }
    if limits.per_host == Some(0) {
        problems.push("limits.per_host: must be at least 1".into());
    }
    if !problems.is_empty() {
        return Err(SpecError::Invalid(problems));
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let mut m = doc.clone();
        m.insert("source".into(), e.source.into());
        m.insert("target".into(), e.target.into());
        let mut spec =
            Spec::from_yaml(serde_norway::Value::Mapping(m)).map_err(|err| match err {
                SpecError::Invalid(p) => SpecError::Invalid(
                    p.into_iter()
                        .map(|p| format!("member {}: {p}", e.name))
                        .collect(),
                ),
                other => other,
            })?;
        spec.member = Some(e.name.clone());
        out.push(Member { name: e.name, spec });
    }
    Ok(Loaded::Fleet(Fleet {
        members: out,
        per_host: limits.per_host,
    }))
}

fn check_entries(entries: &[Entry]) -> Vec<String> {
    let mut problems = Vec::new();
    if entries.is_empty() {
        problems.push("members: the fleet has no members".into());
    }
    let mut seen = BTreeSet::new();
    for e in entries {
        let ok = !e.name.is_empty()
            && e.name.len() <= 63
            && e.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            problems.push(format!(
                "members: name {:?} must be 1 to 63 characters of a-z, 0-9, _ and -",
                e.name
            ));
        }
        if !seen.insert(e.name.as_str()) {
            problems.push(format!("members: name {:?} is used twice", e.name));
        }
    }
    problems
}

impl Fleet {
    /// The members named in `only` (all when empty), in spec order; an unknown name is bad
    /// input.
    pub fn select(self, only: &[String]) -> Result<Fleet, SpecError> {
        let unknown: Vec<String> = only
            .iter()
            .filter(|n| !self.members.iter().any(|m| &m.name == *n))
            .map(|n| format!("--members: no member is named {n:?}"))
            .collect();
        if !unknown.is_empty() {
            return Err(SpecError::Invalid(unknown));
        }
        let members = self
            .members
            .into_iter()
            .filter(|m| only.is_empty() || only.contains(&m.name))
            .collect();
        Ok(Fleet {
            members,
            per_host: self.per_host,
        })
    }
}

/// `host:port` of a connection string: the server a limit counts against.
pub fn server_of(dsn: &Dsn) -> String {
    let r = dsn.redacted();
    match r.rsplit_once('/') {
        Some((server, _db)) => server.to_owned(),
        None => r,
    }
}

pub use crate::gate::{GatePass, HostGate, MemberGate};

/// One member's backfill progress as `status` reads it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub rows_done: i64,
    pub rows_total: i64,
    /// Rows/s since the member's first shard started (0: none started).
    pub rate: f64,
    /// Its own estimate at that rate (None: none started).
    pub eta: Option<f64>,
}

/// The fleet's backfill ETA: members share one pool, so a member still waiting for its
/// first copy has no rate of its own, and the longest member's ETA alone ignores every
/// waiting member's rows. The fleet's pace is all rows done since the earliest start; the
/// rows left (each started member's own estimate, the waiting ones' totals) at that pace,
/// and never less than the longest started member's own ETA. None before anything started.
pub fn fleet_eta(members: &[Progress]) -> Option<f64> {
    let (mut done, mut left, mut since, mut longest) = (0f64, 0f64, 0f64, 0f64);
    for m in members {
        done += m.rows_done.max(0) as f64;
        match m.eta {
            Some(eta) if m.rate > 0.0 => {
                left += eta * m.rate;
                since = since.max(m.rows_done.max(0) as f64 / m.rate);
                longest = longest.max(eta);
            }
            _ => left += (m.rows_total - m.rows_done).max(0) as f64,
        }
    }
    (since > 0.0 && done > 0.0).then(|| (left / (done / since)).max(longest))
}

#[cfg(test)]
#[path = "fleet_tests.rs"]
mod tests;
