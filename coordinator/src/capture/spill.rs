//! Transactions streamed while in progress (pgoutput protocol 2), kept on disk until their
//! commit, so capture's memory does not grow with a transaction's size. Nothing of a
//! transaction is used before its commit, nothing of one that rolls back (or of a
//! subtransaction that does) ever.

use schemashift_common::change::Change;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

/// One streamed transaction's changes so far: `(subxid, partition, encoded change)`
/// records in a file of their own.
pub(super) struct Spill {
    path: PathBuf,
    out: BufWriter<File>,
    /// Subtransactions rolled back: their records are skipped at the commit.
    aborted: HashSet<u32>,
    /// Written by our own replay in the other direction: an echo, dropped at the commit.
    pub(super) ours: bool,
}

impl Drop for Spill {
    fn drop(&mut self) {
        // Best effort: the directory is ours and temporary anyway.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The transactions being streamed, by top-level xid.
pub(super) struct Spills {
    dir: PathBuf,
    open: HashMap<u32, Spill>,
    /// The transaction whose stream block is being received.
    pub(super) current: Option<u32>,
}

fn io_err(what: &str, e: std::io::Error) -> String {
    format!("spilling a large transaction to disk ({what}): {e}")
}

impl Spills {
    /// Spill files go under the system's temporary directory, one folder per capture.
    pub(super) fn new(slot: &str) -> Self {
        Spills {
            dir: std::env::temp_dir().join(format!("schemashift-{slot}-{}", std::process::id())),
            open: HashMap::new(),
            current: None,
        }
    }

    /// A stream block of `xid` begins (its first, or a later one).
    pub(super) fn start(&mut self, xid: u32) -> Result<(), String> {
        if !self.open.contains_key(&xid) {
            std::fs::create_dir_all(&self.dir).map_err(|e| io_err("creating its folder", e))?;
            let path = self.dir.join(format!("{xid}.spill"));
            let file = File::create(&path).map_err(|e| io_err("creating its file", e))?;
            self.open.insert(
                xid,
                Spill {
                    path,
                    out: BufWriter::new(file),
                    aborted: HashSet::new(),
                    ours: false,
                },
            );
        }
        self.current = Some(xid);
        Ok(())
    }

    pub(super) fn stop(&mut self) {
        self.current = None;
    }

    /// Marks the transaction of the current block as our own replay's.
    pub(super) fn mark_ours(&mut self) {
        if let Some(s) = self.current.and_then(|x| self.open.get_mut(&x)) {
            s.ours = true;
        }
    }

    /// Appends a change of (sub)transaction `subxid` to the current block's transaction.
    pub(super) fn push(&mut self, subxid: u32, part: u32, c: &Change) -> Result<(), String> {
        let Some(s) = self.current.and_then(|x| self.open.get_mut(&x)) else {
            return Err("a streamed change arrived outside a stream block".into());
        };
        let body = schemashift_proto::encode_change(c);
        let mut head = [0u8; 12];
        head[..4].copy_from_slice(&subxid.to_be_bytes());
        head[4..8].copy_from_slice(&part.to_be_bytes());
        head[8..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        s.out
            .write_all(&head)
            .and_then(|()| s.out.write_all(&body))
            .map_err(|e| io_err("writing", e))
    }

    /// `xid` rolled back (`subxid == xid`), or only its subtransaction `subxid` did.
    pub(super) fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            self.open.remove(&xid);
        } else if let Some(s) = self.open.get_mut(&xid) {
            s.aborted.insert(subxid);
        }
    }

    /// The committed transaction's spill, to read back.
    pub(super) fn take(&mut self, xid: u32) -> Option<Spill> {
        self.open.remove(&xid)
    }

    /// Forgets every transaction in progress: after a reconnect the server streams them
    /// again from their start.
    pub(super) fn clear(&mut self) {
        self.open.clear();
        self.current = None;
    }
}

impl Spill {
    /// Reads the changes back in order, `max` at a time, skipping rolled-back
    /// subtransactions.
    pub(super) fn reader(mut self) -> Result<SpillReader, String> {
        self.out.flush().map_err(|e| io_err("flushing", e))?;
        let file = File::open(&self.path).map_err(|e| io_err("reopening", e))?;
        Ok(SpillReader {
            input: BufReader::new(file),
            spill: self,
        })
    }
}

pub(super) struct SpillReader {
    input: BufReader<File>,
    /// Kept so the file is removed when reading is done.
    spill: Spill,
}

impl SpillReader {
    /// The next up to `max` changes with their partitions; empty at the end.
    pub(super) fn next_chunk(&mut self, max: usize) -> Result<Vec<(u32, Change)>, String> {
        let mut out = Vec::new();
        while out.len() < max {
            let mut head = [0u8; 12];
            match self.input.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io_err("reading", e)),
            }
            let word =
                |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
            let (subxid, part, len) = (word(0), word(4), word(8) as usize);
            let mut body = vec![0u8; len];
            self.input
                .read_exact(&mut body)
                .map_err(|e| io_err("reading", e))?;
            if self.spill.aborted.contains(&subxid) {
                continue;
            }
            let c = schemashift_proto::decode_change(&body).map_err(|e| e.to_string())?;
            out.push((part, c));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemashift_common::change::Op;
    use schemashift_common::ids::Lsn;

    fn change(v: &str) -> Change {
        Change {
            table: 0,
            op: Op::Insert,
            lsn: Lsn(0),
            xid: 0,
            ordinal: 0,
            old_key: None,
            values: vec![Some(v.into())],
            unchanged: Vec::new(),
        }
    }

    #[test]
    fn committed_stream_reads_back_in_order_without_rolled_back_subtransactions() {
        let mut s = Spills::new("unit-test");
        s.start(10).expect("start");
        s.push(10, 0, &change("a")).expect("push");
        s.push(11, 1, &change("b")).expect("push");
        s.stop();
        // Another transaction streams in between; it rolls back whole.
        s.start(20).expect("start");
        s.push(20, 0, &change("x")).expect("push");
        s.stop();
        s.start(10).expect("start");
        s.push(12, 0, &change("c")).expect("push");
        s.stop();
        s.abort(10, 11);
        s.abort(20, 20);
        assert!(
            s.take(20).is_none(),
            "a rolled-back transaction leaves nothing"
        );
        let mut r = s.take(10).expect("spill").reader().expect("reader");
        let first = r.next_chunk(1).expect("chunk");
        let rest = r.next_chunk(10).expect("chunk");
        let values: Vec<_> = first
            .iter()
            .chain(&rest)
            .map(|(p, c)| (*p, c.values[0].clone()))
            .collect();
        assert_eq!(values, vec![(0, Some("a".into())), (0, Some("c".into()))]);
        assert!(r.next_chunk(10).expect("chunk").is_empty());
    }
}
