//! Verify leases: one pass over every shard range, handed out from memory (a restarted
//! coordinator simply verifies again).

use super::ControlCoordinator;
use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::plan::Shard;
use schemashift_common::service::{RangeCheck, Work};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// One verify pass over every shard range, leased to workers from memory: a restarted
/// coordinator simply verifies again.
#[derive(Default)]
pub(super) struct VerifyRound {
    pub(super) pending: VecDeque<Shard>,
    pub(super) leased: HashMap<ShardId, (Shard, LeaseEpoch, Instant)>,
    pub(super) results: Vec<(u32, RangeCheck)>,
    pub(super) failures: HashMap<ShardId, (u32, String)>,
    pub(super) total: usize,
    pub(super) next_epoch: i64,
}

impl ControlCoordinator {
    /// Queues every range for a verify pass; workers pick them up in stage Verify.
    pub fn start_verify(&self, shards: Vec<Shard>) {
        if let Ok(mut v) = self.verify.lock() {
            let next_epoch = v.next_epoch;
            *v = VerifyRound {
                total: shards.len(),
                pending: shards.into(),
                next_epoch,
                ..VerifyRound::default()
            };
        }
    }

    /// Ok(Some(results)) once every range is compared; Err when one keeps failing.
    pub fn verify_results(
        &self,
        max_attempts: u32,
    ) -> Result<Option<Vec<(u32, RangeCheck)>>, String> {
        let Ok(mut v) = self.verify.lock() else {
            return Err("verify state poisoned".into());
        };
        if let Some((shard, (n, why))) = v.failures.iter().find(|(_, (n, _))| *n >= max_attempts) {
            return Err(format!("verify of shard {shard} failed {n} times: {why}"));
        }
        if v.results.len() == v.total {
            return Ok(Some(std::mem::take(&mut v.results)));
        }
        Ok(None)
    }

    /// (ranges compared, ranges in the pass), for progress.
    pub fn verify_progress(&self) -> (usize, usize) {
        self.verify
            .lock()
            .map(|v| (v.results.len(), v.total))
            .unwrap_or_default()
    }

    pub(super) fn lease_verify(&self) -> Option<Work> {
        let mut v = self.verify.lock().ok()?;
        // A verify lease has no heartbeat: a silent worker's range goes back after this.
        let hold = self.registration.lease_ttl * 6;
        let expired = v
            .leased
            .iter()
            .find(|(_, (_, _, at))| at.elapsed() > hold)
            .map(|(id, _)| *id);
        let shard = match expired.and_then(|id| v.leased.remove(&id)) {
            Some((shard, _, _)) => shard,
            None => v.pending.pop_front()?,
        };
        v.next_epoch += 1;
        let epoch = LeaseEpoch(v.next_epoch);
        v.leased
            .insert(shard.id, (shard.clone(), epoch, Instant::now()));
        Some(Work::Verify { shard, epoch })
    }
}
