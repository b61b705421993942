//! A change ⇄ its Kafka message: key (table and row key) and value (prost `ChangeEvent`).

use crate::v1 as pb;
use crate::ProtoError;
use prost::Message;
use schemashift_common::change::{Change, Op};
use schemashift_common::ids::Lsn;

/// The message value of a change.
pub fn encode_change(c: &Change) -> Vec<u8> {
    let op = match c.op {
        Op::Insert => pb::ChangeOp::Insert,
        Op::Update => pb::ChangeOp::Update,
        Op::Delete => pb::ChangeOp::Delete,
        Op::Refresh => pb::ChangeOp::Refresh,
    };
    pb::ChangeEvent {
        table: c.table,
        op: op.into(),
        commit_lsn: c.lsn.0,
        xid: c.xid,
        ordinal: c.ordinal,
        has_old_key: c.old_key.is_some(),
        old_key: c.old_key.clone().unwrap_or_default(),
        values: c
            .values
            .iter()
            .map(|v| pb::ColumnValue { text: v.clone() })
            .collect(),
        unchanged: c.unchanged.iter().map(|&i| u32::from(i)).collect(),
    }
    .encode_to_vec()
}

/// A change from its message value.
pub fn decode_change(bytes: &[u8]) -> Result<Change, ProtoError> {
    let bad = |reason: String| ProtoError::Invalid {
        message: "ChangeEvent",
        reason,
    };
    let e = pb::ChangeEvent::decode(bytes).map_err(|e| bad(e.to_string()))?;
    let op = match e.op() {
        pb::ChangeOp::Insert => Op::Insert,
        pb::ChangeOp::Update => Op::Update,
        pb::ChangeOp::Delete => Op::Delete,
        pb::ChangeOp::Refresh => Op::Refresh,
        pb::ChangeOp::Unspecified => return Err(bad("no op".into())),
    };
    let unchanged = e
        .unchanged
        .iter()
        .map(|&i| u16::try_from(i).map_err(|_| bad(format!("column position {i} out of range"))))
        .collect::<Result<Vec<u16>, _>>()?;
    Ok(Change {
        table: e.table,
        op,
        lsn: Lsn(e.commit_lsn),
        xid: e.xid,
        ordinal: e.ordinal,
        old_key: e.has_old_key.then_some(e.old_key),
        values: e.values.into_iter().map(|v| v.text).collect(),
        unchanged,
    })
}

/// The message key: table index and row key, so tools that hash keys agree on order.
pub fn change_key(table: u32, key: &[String]) -> Vec<u8> {
    let mut out = table.to_string().into_bytes();
    for k in key {
        out.push(0);
        out.extend_from_slice(k.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_survives_kafka_encoding_nulls_and_unicode_included() {
        let c = Change {
            table: 2,
            op: Op::Update,
            lsn: Lsn(0x1_0000_0042),
            xid: 77,
            ordinal: 5,
            old_key: Some(vec!["7".into()]),
            values: vec![
                Some("8".into()),
                None,
                Some(String::new()),
                Some("Zoë 🌍".into()),
            ],
            unchanged: vec![1],
        };
        assert_eq!(decode_change(&encode_change(&c)).ok(), Some(c.clone()));
        let d = Change {
            op: Op::Delete,
            old_key: None,
            values: vec![],
            unchanged: vec![],
            ..c
        };
        assert_eq!(decode_change(&encode_change(&d)).ok(), Some(d));
        assert!(decode_change(b"\xff\xff").is_err());
    }
}
