//! Decoder of the pgoutput logical replication protocol, versions 1 and 2 (text values;
//! version 2 adds transactions streamed while in progress, whose data messages carry
//! their transaction's xid). Message layouts: PostgreSQL docs, "Logical Replication
//! Message Formats".

use schemashift_common::ids::Lsn;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("pgoutput message has unknown tag {0:?}")]
    UnknownTag(char),
    #[error("pgoutput tuple column has unknown kind {0:?}")]
    UnknownColumnKind(char),
    #[error("pgoutput string is not UTF-8")]
    NotUtf8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// Unchanged TOASTed value: not sent; must not be overwritten.
    Unchanged,
    Text(String),
}

pub type Tuple = Vec<Datum>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

/// The old-row part of an UPDATE or DELETE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity key columns carry values ('K').
    Key(Tuple),
    /// The whole old row (REPLICA IDENTITY FULL, 'O').
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
    Origin {
        name: String,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Tuple,
    },
    Update {
        rel: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        rel: u32,
        old: OldTuple,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// A block of a transaction in progress follows (protocol 2).
    StreamStart {
        xid: u32,
        first: bool,
    },
    StreamStop,
    /// A streamed transaction committed: everything streamed for it (and not aborted)
    /// applies, at this commit.
    StreamCommit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
    /// A streamed transaction (`subxid == xid`) or one of its subtransactions rolled back.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
    /// Type and logical-decoding messages: nothing to do for us.
    Ignored,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError::NotUtf8)?;
        self.buf = &self.buf[end + 1..];
        Ok(s.to_owned())
    }
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            match self.u8("tuple column kind")? {
                b'n' => out.push(Datum::Null),
                b'u' => out.push(Datum::Unchanged),
                b't' | b'b' => {
                    let len = self.i32("tuple value length")?;
                    let bytes = self.take(len.max(0) as usize, "tuple value")?;
                    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8)?;
                    out.push(Datum::Text(s.to_owned()));
                }
                other => return Err(DecodeError::UnknownColumnKind(other as char)),
            }
        }
        Ok(out)
    }
}

/// A message outside a stream block (and every message of protocol 1).
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    decode_in(buf, false).map(|(_, m)| m)
}

/// A message, inside a stream block or not: there, data messages start with the xid of
/// the (sub)transaction they belong to, returned with the message.
pub fn decode_in(buf: &[u8], in_stream: bool) -> Result<(Option<u32>, Message), DecodeError> {
    let mut r = Reader { buf };
    let tag = r.u8("tag")?;
    let xid = if in_stream && matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M') {
        Some(r.u32("streamed xid")?)
    } else {
        None
    };
    decode_body(tag, &mut r).map(|m| (xid, m))
}

fn decode_body(tag: u8, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    match tag {
        b'S' => {
            let xid = r.u32("stream start xid")?;
            let first = r.u8("stream start first segment")? == 1;
            Ok(Message::StreamStart { xid, first })
        }
        b'E' => Ok(Message::StreamStop),
        b'c' => {
            let xid = r.u32("stream commit xid")?;
            let _flags = r.u8("stream commit flags")?;
            let commit_lsn = Lsn(r.u64("stream commit lsn")?);
            let end_lsn = Lsn(r.u64("stream commit end lsn")?);
            Ok(Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
            })
        }
        b'A' => {
            let xid = r.u32("stream abort xid")?;
            let subxid = r.u32("stream abort subxid")?;
            Ok(Message::StreamAbort { xid, subxid })
        }
        b'B' => {
            let final_lsn = Lsn(r.u64("begin final lsn")?);
            let _ts = r.u64("begin timestamp")?;
            let xid = r.u32("begin xid")?;
            Ok(Message::Begin { final_lsn, xid })
        }
        b'C' => {
            let _flags = r.u8("commit flags")?;
            let commit_lsn = Lsn(r.u64("commit lsn")?);
            let end_lsn = Lsn(r.u64("commit end lsn")?);
            Ok(Message::Commit {
                commit_lsn,
                end_lsn,
            })
        }
        b'O' => {
            let _lsn = r.u64("origin lsn")?;
            Ok(Message::Origin {
                name: r.cstr("origin name")?,
            })
        }
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("relation namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("relation column count")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(RelColumn {
                    is_key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column typmod")?,
                });
            }
            Ok(Message::Relation(Relation {
                oid,
                namespace: if namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    namespace
                },
                name,
                replica_identity,
                columns,
            }))
        }
        b'I' => {
            let rel = r.u32("insert relation")?;
            let _n = r.u8("insert marker")?;
            Ok(Message::Insert {
                rel,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let rel = r.u32("update relation")?;
            let mut marker = r.u8("update marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                let t = r.tuple()?;
                old = Some(if marker == b'K' {
                    OldTuple::Key(t)
                } else {
                    OldTuple::Full(t)
                });
                marker = r.u8("update new marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnknownTag(marker as char));
            }
            Ok(Message::Update {
                rel,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let rel = r.u32("delete relation")?;
            let marker = r.u8("delete marker")?;
            let t = r.tuple()?;
            let old = if marker == b'K' {
                OldTuple::Key(t)
            } else {
                OldTuple::Full(t)
            };
            Ok(Message::Delete { rel, old })
        }
        b'T' => {
            let n = r.i32("truncate count")?;
            let _opts = r.u8("truncate options")?;
            let rels = (0..n.max(0))
                .map(|_| r.u32("truncate relation"))
                .collect::<Result<_, _>>()?;
            Ok(Message::Truncate { rels })
        }
        b'Y' | b'M' => Ok(Message::Ignored),
        other => Err(DecodeError::UnknownTag(other as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_bytes(cols: &[Option<&str>], unchanged_at: Option<usize>) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (i, c) in cols.iter().enumerate() {
            if Some(i) == unchanged_at {
                b.push(b'u');
                continue;
            }
            match c {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_update_with_old_key_and_unchanged_toast() {
        let mut m = vec![b'U'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'K');
        m.extend(tuple_bytes(&[Some("1"), None, None], None));
        m.push(b'N');
        m.extend(tuple_bytes(&[Some("2"), Some("Ann Lee"), None], Some(2)));
        let msg = decode(&m).expect("decodes");
        assert_eq!(
            msg,
            Message::Update {
                rel: 16384,
                old: Some(OldTuple::Key(vec![
                    Datum::Text("1".into()),
                    Datum::Null,
                    Datum::Null
                ])),
                new: vec![
                    Datum::Text("2".into()),
                    Datum::Text("Ann Lee".into()),
                    Datum::Unchanged
                ],
            }
        );
    }

    #[test]
    fn decodes_relation_and_commit_and_rejects_truncation() {
        let mut m = vec![b'R'];
        m.extend(7u32.to_be_bytes());
        m.extend(b"public\0users\0");
        m.push(b'd');
        m.extend(2i16.to_be_bytes());
        m.push(1);
        m.extend(b"id\0");
        m.extend(20u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m.push(0);
        m.extend("名前\0".as_bytes());
        m.extend(25u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        let Message::Relation(rel) = decode(&m).expect("relation") else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "users");
        assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
        assert_eq!(rel.columns[1].name, "名前");
        assert!(decode(&m[..m.len() - 3]).is_err());

        let mut c = vec![b'C', 0];
        c.extend(0x10u64.to_be_bytes());
        c.extend(0x20u64.to_be_bytes());
        c.extend(0u64.to_be_bytes());
        assert_eq!(
            decode(&c).expect("commit"),
            Message::Commit {
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(0x20)
            }
        );
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag('Z')));
    }

    #[test]
    fn decodes_streamed_blocks_with_their_xids() {
        let mut start = vec![b'S'];
        start.extend(7u32.to_be_bytes());
        start.push(1);
        assert_eq!(
            decode_in(&start, false),
            Ok((
                None,
                Message::StreamStart {
                    xid: 7,
                    first: true
                }
            ))
        );
        // Inside a block an insert starts with its (sub)transaction's xid.
        let mut insert = vec![b'I'];
        insert.extend(9u32.to_be_bytes());
        insert.extend(16384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(tuple_bytes(&[Some("1")], None));
        let (xid, msg) = decode_in(&insert, true).expect("decodes");
        assert_eq!(xid, Some(9));
        assert!(matches!(msg, Message::Insert { rel: 16384, .. }), "{msg:?}");
        let mut commit = vec![b'c'];
        commit.extend(7u32.to_be_bytes());
        commit.push(0);
        commit.extend(100u64.to_be_bytes());
        commit.extend(108u64.to_be_bytes());
        commit.extend(0u64.to_be_bytes());
        assert_eq!(
            decode(&commit),
            Ok(Message::StreamCommit {
                xid: 7,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(108)
            })
        );
        let mut abort = vec![b'A'];
        abort.extend(7u32.to_be_bytes());
        abort.extend(9u32.to_be_bytes());
        assert_eq!(
            decode(&abort),
            Ok(Message::StreamAbort { xid: 7, subxid: 9 })
        );
        assert_eq!(decode(b"E"), Ok(Message::StreamStop));
    }
}
