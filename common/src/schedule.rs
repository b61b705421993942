//! The fleet scheduler, pure: which member's waiting copy (or index build) goes next.
//!
//! Every copy takes a slot of the fleet's one worker pool and a slot on each server it
//! touches (source and target, `limits.per_host` each); an index build takes a slot on its
//! target server only. Among the waiting work that fits, the scheduler picks:
//! 1. index builds before copies (a member is done only when its indexes are built, and a
//!    build is the last step of its copy work);
//! 2. the copy whose servers have the most work left per slot, summed over the servers it
//!    touches (the busiest servers bound when the fleet can finish, so they must not idle
//!    while they have work; and a copy between two busy servers uses both at once, where
//!    copies within one server would leave the other's slot to wait);
//! 3. copies by a member's first workers (its share of the pool, [`member_workers`]) before
//!    copies by its others ([`Kind::Spare`]), which take only what is left;
//! 4. then the member with the most work left (longest first), then the one asking first.
//!
//! It never leaves a slot idle while waiting work fits in it, so every member progresses
//! and the fleet ends when its busiest server or the pool runs out of work; the property
//! tests simulate fleets of up to 10,000 members and check the limits and the makespan.

use std::collections::HashMap;

/// A member's index in the [`Board`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A shard copy: the pool and both servers.
    Copy,
    /// A shard copy by a worker beyond its member's share of the pool: the same slots,
    /// started only when no other waiting work fits (the fleet's tail), so a member's
    /// extra workers open sessions only when they are the way to use a free slot.
    Spare,
    /// An index build: the target server.
    Build,
}

impl Kind {
    fn pooled(self) -> bool {
        matches!(self, Kind::Copy | Kind::Spare)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Copies at once in the whole fleet.
    pub pool: usize,
    /// Copies or builds at once on one server; none: no limit.
    pub per_host: Option<usize>,
}

#[derive(Debug)]
struct MemberState {
    /// Indexes into `servers`; one entry when source and target share a server.
    servers: Vec<usize>,
    target: usize,
    remaining: u64,
}

#[derive(Debug, Default)]
struct ServerState {
    busy: usize,
    /// Work left on this server: the remaining work of every member that touches it.
    load: u64,
}

/// The fleet's state as the scheduler sees it: limits, slots in use, work left.
#[derive(Debug)]
pub struct Board {
    limits: Limits,
    pool_busy: usize,
    names: HashMap<String, usize>,
    servers: Vec<ServerState>,
    members: Vec<MemberState>,
}

impl Board {
    pub fn new(limits: Limits) -> Board {
        Board {
            limits: Limits {
                pool: limits.pool.max(1),
                per_host: limits.per_host.map(|n| n.max(1)),
            },
            pool_busy: 0,
            names: HashMap::new(),
            servers: Vec::new(),
            members: Vec::new(),
        }
    }

    fn server(&mut self, name: &str) -> usize {
        if let Some(i) = self.names.get(name) {
            return *i;
        }
        self.servers.push(ServerState::default());
        self.names.insert(name.to_owned(), self.servers.len() - 1);
        self.servers.len() - 1
    }

    /// Adds a member reading from `source` and writing to `target` (`host:port` each) with
    /// `remaining` work (estimated rows) to copy.
    pub fn add_member(&mut self, source: &str, target: &str, remaining: u64) -> Slot {
        let s = self.server(source);
        let t = self.server(target);
        let servers = if s == t { vec![s] } else { vec![s, t] };
        for &i in &servers {
            self.servers[i].load += remaining;
        }
        self.members.push(MemberState {
            servers,
            target: t,
            remaining,
        });
        Slot(self.members.len() - 1)
    }

    fn touched(&self, m: Slot, kind: Kind) -> &[usize] {
        let member = &self.members[m.0];
        match kind {
            Kind::Copy | Kind::Spare => &member.servers,
            Kind::Build => std::slice::from_ref(&member.target),
        }
    }

    /// Whether `kind` work of member `m` fits in the free slots now.
    pub fn fits(&self, m: Slot, kind: Kind) -> bool {
        if kind.pooled() && self.pool_busy >= self.limits.pool {
            return false;
        }
        match self.limits.per_host {
            None => true,
            Some(n) => self
                .touched(m, kind)
                .iter()
                .all(|&s| self.servers[s].busy < n),
        }
    }

    /// Work left per slot on the member's servers, summed (none without a per-host limit:
    /// the pool is then the only bound, and the member's own work decides).
    fn pressure(&self, m: Slot) -> u64 {
        match self.limits.per_host {
            None => 0,
            Some(n) => self.members[m.0]
                .servers
                .iter()
                .map(|&s| self.servers[s].load.div_ceil(n as u64))
                .sum(),
        }
    }

    /// Of the waiting work (in the order it asked), the index of the one to start now, if any
    /// fits.
    pub fn pick(&self, waiting: &[(Slot, Kind)]) -> Option<usize> {
        waiting
            .iter()
            .enumerate()
            .filter(|(_, (m, kind))| self.fits(*m, *kind))
            // max_by_key keeps the last of equals; the reversed index keeps the first asker.
            .max_by_key(|(i, (m, kind))| {
                (
                    *kind == Kind::Build,
                    self.pressure(*m),
                    *kind != Kind::Spare,
                    self.members[m.0].remaining,
                    std::cmp::Reverse(*i),
                )
            })
            .map(|(i, _)| i)
    }

    /// Takes the slots for `kind` work of member `m` (after [`Board::fits`]).
    pub fn start(&mut self, m: Slot, kind: Kind) {
        if kind.pooled() {
            self.pool_busy += 1;
        }
        let touched = self.touched(m, kind).to_vec();
        for s in touched {
            self.servers[s].busy += 1;
        }
    }

    /// Gives the slots back; `done` is the work the copy finished (0 for a build or a copy
    /// that failed), taken off the member's and its servers' work left.
    pub fn finish(&mut self, m: Slot, kind: Kind, done: u64) {
        if kind.pooled() {
            self.pool_busy = self.pool_busy.saturating_sub(1);
        }
        let touched = self.touched(m, kind).to_vec();
        for s in touched {
            self.servers[s].busy = self.servers[s].busy.saturating_sub(1);
        }
        self.worked(m, done);
    }

    /// Takes `done` off the member's work left (also when its estimate was low: never below 0).
    pub fn worked(&mut self, m: Slot, done: u64) {
        let member = &mut self.members[m.0];
        let done = done.min(member.remaining);
        member.remaining -= done;
        for &s in &self.members[m.0].servers {
            self.servers[s].load = self.servers[s].load.saturating_sub(done);
        }
    }

    /// Slots in use: (pool, per server by name).
    pub fn busy(&self) -> (usize, Vec<(String, usize)>) {
        let mut per_server: Vec<(String, usize)> = self
            .names
            .iter()
            .map(|(name, &i)| (name.clone(), self.servers[i].busy))
            .collect();
        per_server.sort();
        (self.pool_busy, per_server)
    }
}

/// Workers for each member of a fleet run in one process: twice the member's share of the
/// pool by its share of the rows, rounded up, at least one, at most the pool. A member holds
/// the sessions its share needs, not a pool's worth each (every worker opens its own on both
/// servers), and its copies never take longer than half the fleet's work spread over the pool
/// (`rows / workers <= total / (2 · pool)`): the slack keeps it off the fleet's tail when the
/// pool fills unevenly at first and shards come in whole.
pub fn member_workers(rows: &[u64], pool: usize) -> Vec<usize> {
    let pool = pool.max(1);
    let total: u128 = rows.iter().map(|&r| u128::from(r)).sum();
    rows.iter()
        .map(|&r| {
            if total == 0 {
                return 1;
            }
            let share = (u128::from(r) * 2 * pool as u128).div_ceil(total);
            (share.min(pool as u128) as usize).max(1)
        })
        .collect()
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
