//! Domain type ⇄ wire message. Anything missing or malformed on the wire is a
//! [`ProtoError`], never a panic.

use crate::v1 as pb;
use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::plan::{RunPlan, Shard, ShardRange};
use schemashift_common::service::{
    Beat, DiffKind, KeyDiff, LeaseRef, PartitionLease, Progress, RangeCheck, Registration, Work,
    WorkerInfo,
};
use schemashift_common::spec::Dsn;
use std::fmt;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("message {message} lacks field {field}")]
    Missing {
        message: &'static str,
        field: &'static str,
    },
    #[error("message {message}: {reason}")]
    Invalid {
        message: &'static str,
        reason: String,
    },
}

fn missing(message: &'static str, field: &'static str) -> ProtoError {
    ProtoError::Missing { message, field }
}

impl fmt::Debug for pb::RegisterReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterReply")
            .field("run_id", &self.run_id)
            .field("source_dsn", &Dsn::new(self.source_dsn.clone()))
            .field("target_dsn", &Dsn::new(self.target_dsn.clone()))
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .finish_non_exhaustive()
    }
}

impl From<&WorkerInfo> for pb::WorkerInfo {
    fn from(w: &WorkerInfo) -> Self {
        pb::WorkerInfo {
            id: w.id.clone(),
            host: w.host.clone(),
        }
    }
}

impl From<pb::WorkerInfo> for WorkerInfo {
    fn from(w: pb::WorkerInfo) -> Self {
        WorkerInfo {
            id: w.id,
            host: w.host,
        }
    }
}

/// The worker of a request; an empty id is refused.
pub fn worker(w: Option<pb::WorkerInfo>, message: &'static str) -> Result<WorkerInfo, ProtoError> {
    let w: WorkerInfo = w.ok_or_else(|| missing(message, "worker"))?.into();
    if w.id.is_empty() {
        return Err(ProtoError::Invalid {
            message,
            reason: "empty worker id".into(),
        });
    }
    Ok(w)
}

impl From<Progress> for pb::Progress {
    fn from(p: Progress) -> Self {
        pb::Progress {
            rows: p.rows,
            bytes: p.bytes,
            changes: p.changes,
        }
    }
}

impl From<pb::Progress> for Progress {
    fn from(p: pb::Progress) -> Self {
        Progress {
            rows: p.rows,
            bytes: p.bytes,
            changes: p.changes,
        }
    }
}

impl TryFrom<&Registration> for pb::RegisterReply {
    type Error = ProtoError;
    fn try_from(r: &Registration) -> Result<Self, ProtoError> {
        Ok(pb::RegisterReply {
            run_id: r.run_id.clone(),
            source_dsn: r.source.expose().to_owned(),
            target_dsn: r.target.expose().to_owned(),
            plan_json: serde_json::to_string(&r.plan).map_err(|e| ProtoError::Invalid {
                message: "RegisterReply",
                reason: e.to_string(),
            })?,
            lease_ttl_ms: r.lease_ttl.as_millis() as u64,
            traceparent: r.traceparent.clone().unwrap_or_default(),
        })
    }
}

impl TryFrom<pb::RegisterReply> for Registration {
    type Error = ProtoError;
    fn try_from(r: pb::RegisterReply) -> Result<Self, ProtoError> {
        let plan: RunPlan =
            serde_json::from_str(&r.plan_json).map_err(|e| ProtoError::Invalid {
                message: "RegisterReply",
                reason: format!("plan: {e}"),
            })?;
        if r.lease_ttl_ms == 0 {
            return Err(ProtoError::Invalid {
                message: "RegisterReply",
                reason: "lease_ttl_ms is 0".into(),
            });
        }
        Ok(Registration {
            run_id: r.run_id,
            source: Dsn::new(r.source_dsn),
            target: Dsn::new(r.target_dsn),
            plan,
            lease_ttl: Duration::from_millis(r.lease_ttl_ms),
            traceparent: (!r.traceparent.is_empty()).then_some(r.traceparent),
        })
    }
}

fn shard_lease(shard: &Shard, epoch: LeaseEpoch) -> pb::ShardLease {
    let bound = |b: &Option<Vec<String>>| b.as_ref().map(|v| pb::KeyBound { values: v.clone() });
    pb::ShardLease {
        shard_id: shard.id.0,
        table: shard.table,
        lo: bound(&shard.range.lo),
        hi: bound(&shard.range.hi),
        estimated_rows: shard.estimated_rows,
        epoch: epoch.0,
    }
}

fn shard_of(s: pb::ShardLease) -> (Shard, LeaseEpoch) {
    (
        Shard {
            id: ShardId(s.shard_id),
            table: s.table,
            range: ShardRange {
                lo: s.lo.map(|b| b.values),
                hi: s.hi.map(|b| b.values),
            },
            estimated_rows: s.estimated_rows,
        },
        LeaseEpoch(s.epoch),
    )
}

fn partitions(p: &[PartitionLease]) -> pb::PartitionLeases {
    pb::PartitionLeases {
        partitions: p
            .iter()
            .map(|l| pb::PartitionLease {
                partition: l.part,
                epoch: l.epoch.0,
            })
            .collect(),
    }
}

fn partitions_of(p: pb::PartitionLeases) -> Vec<PartitionLease> {
    p.partitions
        .into_iter()
        .map(|l| PartitionLease {
            part: l.partition,
            epoch: LeaseEpoch(l.epoch),
        })
        .collect()
}

impl From<&Work> for pb::LeaseReply {
    fn from(w: &Work) -> Self {
        use pb::lease_reply::Work as W;
        let work = match w {
            Work::Backfill { shard, epoch } => W::Backfill(shard_lease(shard, *epoch)),
            Work::Replay { partitions: p } => W::Replay(partitions(p)),
            Work::Verify { shard, epoch } => W::Verify(shard_lease(shard, *epoch)),
            Work::Wait(d) => W::WaitMs(d.as_millis() as u64),
            Work::Done => W::Done(pb::Done {}),
        };
        pb::LeaseReply { work: Some(work) }
    }
}

impl TryFrom<pb::LeaseReply> for Work {
    type Error = ProtoError;
    fn try_from(r: pb::LeaseReply) -> Result<Self, ProtoError> {
        use pb::lease_reply::Work as W;
        Ok(match r.work.ok_or_else(|| missing("LeaseReply", "work"))? {
            W::Backfill(s) => {
                let (shard, epoch) = shard_of(s);
                Work::Backfill { shard, epoch }
            }
            W::Replay(p) => Work::Replay {
                partitions: partitions_of(p),
            },
            W::Verify(s) => {
                let (shard, epoch) = shard_of(s);
                Work::Verify { shard, epoch }
            }
            W::WaitMs(ms) => Work::Wait(Duration::from_millis(ms)),
            W::Done(_) => Work::Done,
        })
    }
}

impl From<&LeaseRef> for pb::LeaseRef {
    fn from(l: &LeaseRef) -> Self {
        use pb::lease_ref::Lease as L;
        let lease = match l {
            LeaseRef::Shard { shard, epoch } => L::Shard(pb::ShardLease {
                shard_id: shard.0,
                epoch: epoch.0,
                ..pb::ShardLease::default()
            }),
            LeaseRef::Partitions(p) => L::Partitions(partitions(p)),
        };
        pb::LeaseRef { lease: Some(lease) }
    }
}

/// The lease a request is about.
pub fn lease_ref(l: Option<pb::LeaseRef>, message: &'static str) -> Result<LeaseRef, ProtoError> {
    use pb::lease_ref::Lease as L;
    Ok(
        match l
            .and_then(|l| l.lease)
            .ok_or_else(|| missing(message, "lease"))?
        {
            L::Shard(s) => LeaseRef::Shard {
                shard: ShardId(s.shard_id),
                epoch: LeaseEpoch(s.epoch),
            },
            L::Partitions(p) => LeaseRef::Partitions(partitions_of(p)),
        },
    )
}

/// A verify result on the wire.
pub fn verified_request(
    worker: &WorkerInfo,
    shard: ShardId,
    epoch: LeaseEpoch,
    result: &Result<RangeCheck, String>,
) -> pb::VerifiedRequest {
    let mut r = pb::VerifiedRequest {
        worker: Some(worker.into()),
        shard_id: shard.0,
        epoch: epoch.0,
        ..pb::VerifiedRequest::default()
    };
    match result {
        Ok(c) => {
            r.source_rows = c.source_rows;
            r.target_rows = c.target_rows;
            r.diffs = c
                .diffs
                .iter()
                .map(|d| pb::KeyDiff {
                    table: d.table.clone(),
                    key: d.key.clone(),
                    kind: match d.kind {
                        DiffKind::Missing => pb::DiffKind::Missing,
                        DiffKind::Extra => pb::DiffKind::Extra,
                        DiffKind::Different => pb::DiffKind::Different,
                    }
                    .into(),
                })
                .collect();
        }
        Err(e) => {
            r.error = if e.is_empty() {
                "verify failed".into()
            } else {
                e.clone()
            }
        }
    }
    r
}

/// A verify result off the wire: (shard, epoch, result).
pub fn verified_result(
    r: &pb::VerifiedRequest,
) -> Result<(ShardId, LeaseEpoch, Result<RangeCheck, String>), ProtoError> {
    let result = if r.error.is_empty() {
        let mut diffs = Vec::with_capacity(r.diffs.len());
        for d in &r.diffs {
            let kind = match d.kind() {
                pb::DiffKind::Missing => DiffKind::Missing,
                pb::DiffKind::Extra => DiffKind::Extra,
                pb::DiffKind::Different => DiffKind::Different,
                pb::DiffKind::Unspecified => {
                    return Err(ProtoError::Invalid {
                        message: "VerifiedRequest",
                        reason: "diff without a kind".into(),
                    })
                }
            };
            diffs.push(KeyDiff {
                table: d.table.clone(),
                key: d.key.clone(),
                kind,
            });
        }
        Ok(RangeCheck {
            source_rows: r.source_rows,
            target_rows: r.target_rows,
            diffs,
        })
    } else {
        Err(r.error.clone())
    };
    Ok((ShardId(r.shard_id), LeaseEpoch(r.epoch), result))
}

impl From<Beat> for pb::BeatAnswer {
    fn from(b: Beat) -> Self {
        match b {
            Beat::Keep => pb::BeatAnswer::Keep,
            Beat::Lost => pb::BeatAnswer::Lost,
            Beat::Stop => pb::BeatAnswer::Stop,
            Beat::Hold => pb::BeatAnswer::Hold,
        }
    }
}

impl TryFrom<pb::HeartbeatReply> for Beat {
    type Error = ProtoError;
    fn try_from(r: pb::HeartbeatReply) -> Result<Self, ProtoError> {
        match r.answer() {
            pb::BeatAnswer::Keep => Ok(Beat::Keep),
            pb::BeatAnswer::Lost => Ok(Beat::Lost),
            pb::BeatAnswer::Stop => Ok(Beat::Stop),
            pb::BeatAnswer::Hold => Ok(Beat::Hold),
            pb::BeatAnswer::Unspecified => Err(ProtoError::Invalid {
                message: "HeartbeatReply",
                reason: "no answer".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_survives_the_wire() {
        let w = Work::Backfill {
            shard: Shard {
                id: ShardId(7),
                table: 1,
                range: ShardRange {
                    lo: None,
                    hi: Some(vec!["42".into(), "a".into()]),
                },
                estimated_rows: 1000,
            },
            epoch: LeaseEpoch(3),
        };
        let back = Work::try_from(pb::LeaseReply::from(&w)).map_err(|e| e.to_string());
        assert_eq!(format!("{back:?}"), format!("{:?}", Ok::<_, String>(w)));
        let r = Work::Replay {
            partitions: vec![PartitionLease {
                part: 2,
                epoch: LeaseEpoch(9),
            }],
        };
        let back = Work::try_from(pb::LeaseReply::from(&r)).map_err(|e| e.to_string());
        assert_eq!(format!("{back:?}"), format!("{:?}", Ok::<_, String>(r)));
    }

    #[test]
    fn verify_results_survive_the_wire() {
        let me = WorkerInfo {
            id: "w".into(),
            host: "h".into(),
        };
        let check = RangeCheck {
            source_rows: 10,
            target_rows: 9,
            diffs: vec![KeyDiff {
                table: "t".into(),
                key: vec!["1".into(), "x".into()],
                kind: DiffKind::Missing,
            }],
        };
        let wire = verified_request(&me, ShardId(3), LeaseEpoch(4), &Ok(check.clone()));
        let (s, e, back) = verified_result(&wire)
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s, e), (ShardId(3), LeaseEpoch(4)));
        assert_eq!(format!("{back:?}"), format!("{:?}", Ok::<_, String>(check)));
        let wire = verified_request(&me, ShardId(3), LeaseEpoch(4), &Err("boom".into()));
        assert!(matches!(verified_result(&wire), Ok((_, _, Err(m))) if m == "boom"));
    }

    #[test]
    fn register_reply_debug_hides_passwords() {
        let r = pb::RegisterReply {
            source_dsn: "postgres://app:hunter2@db/app".into(),
            target_dsn: "host=db password=hunter3".into(),
            ..pb::RegisterReply::default()
        };
        let s = format!("{r:?}");
        assert!(!s.contains("hunter2") && !s.contains("hunter3"), "{s}");
    }

    #[test]
    fn a_reply_without_work_is_an_error_not_a_panic() {
        assert!(Work::try_from(pb::LeaseReply { work: None }).is_err());
        assert!(Beat::try_from(pb::HeartbeatReply { answer: 0 }).is_err());
    }
}
