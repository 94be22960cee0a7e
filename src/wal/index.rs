//! The index of one WAL segment: what its records say, kept small so that a restore target is
//! found without reading WAL ([`SegmentIndex`]). Built from the [`Event`]s of the records that
//! *end* in the segment (a record that began in the previous segment belongs to this one, as
//! the reader completes it here), so indexing the segments of a timeline in order, each primed
//! with its predecessor, gives every record exactly once.
//!
//! The index is a pure function of the WAL: `archiver reindex` rebuilds byte-identical objects.
//! Encoding ([`SegmentIndex::encode`]): a magic and version, the transaction ends column-wise as
//! zigzag varint deltas (xid, time, start after the previous end, length: a few bytes per
//! commit before compression, cheap to write on the receive path and to read in a search),
//! then the rarer entries as JSON.

use serde::{Deserialize, Serialize};

use super::record::{Event, RecordError, RecordReader, RelFile};
use super::{Lsn, SegmentName};
use crate::time::Timestamp;

/// The format of [`SegmentIndex`]; a reader refuses another.
pub const INDEX_VERSION: u32 = 2;
const MAGIC: &[u8; 4] = b"ARXI";

/// Transaction ends in WAL order, column-wise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xacts {
    pub xid: Vec<u32>,
    /// `xact_time` in microseconds since the Unix epoch.
    pub time: Vec<i64>,
    pub start: Vec<u64>,
    pub end: Vec<u64>,
    /// Positions (in the columns above) of aborts; every other entry is a commit.
    pub aborted: Vec<u32>,
}

/// One transaction end, read out of [`Xacts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactRef {
    pub xid: u32,
    pub committed: bool,
    pub time: Timestamp,
    pub start: Lsn,
    pub end: Lsn,
}

impl Xacts {
    pub fn len(&self) -> usize {
        self.xid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.xid.is_empty()
    }

    pub fn get(&self, i: usize) -> XactRef {
        XactRef {
            xid: self.xid[i],
            committed: self.aborted.binary_search(&(i as u32)).is_err(),
            time: micros(self.time[i]),
            start: Lsn(self.start[i]),
            end: Lsn(self.end[i]),
        }
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = XactRef> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The newest commit time in the segment (commit times are not strictly ordered in WAL:
    /// backends stamp them before inserting their records).
    pub fn max_time(&self) -> Option<Timestamp> {
        self.time.iter().max().map(|t| micros(*t))
    }

    pub fn min_time(&self) -> Option<Timestamp> {
        self.time.iter().min().map(|t| micros(*t))
    }
}

fn micros(t: i64) -> Timestamp {
    Timestamp::from_microsecond(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePointEntry {
    pub name: String,
    pub time: Timestamp,
    pub start: Lsn,
    pub end: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    pub redo: Lsn,
    pub time: Timestamp,
    pub next_xid: u64,
    pub shutdown: bool,
    pub start: Lsn,
    pub end: Lsn,
}

/// A running-transactions snapshot (`xl_running_xacts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningEntry {
    pub next_xid: u32,
    pub oldest_running: u32,
    pub start: Lsn,
}

/// A transaction end that removed relation files (a drop, truncate or rewrite committed; the
/// files of an aborted transaction's new relations).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEntry {
    pub xid: u32,
    pub committed: bool,
    pub time: Timestamp,
    pub start: Lsn,
    pub end: Lsn,
    pub files: Vec<RelFile>,
}

/// A relation file created or truncated (`RM_SMGR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: RelFile,
    /// The record's transaction (0: none assigned yet).
    pub xid: u32,
    pub start: Lsn,
    /// For a truncation: the blocks left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u32>,
}

/// A database dropped (`DROP DATABASE`), with its transaction's commit when that ends in the
/// same segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseDrop {
    pub db: u32,
    pub xid: u32,
    pub start: Lsn,
    /// Where `DROP DATABASE` marked the database invalid (the last in-place update of a shared
    /// catalog before the drop record): recovery stops before it. None when that record was
    /// not seen (it lies before the WAL read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidated: Option<Lsn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<XactRef>,
}

/// What the records ending in one segment say.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    pub version: u32,
    pub segment: String,
    /// Encoded column-wise ahead of the JSON part.
    #[serde(skip)]
    pub xacts: Xacts,
    #[serde(default)]
    pub restore_points: Vec<RestorePointEntry>,
    #[serde(default)]
    pub checkpoints: Vec<CheckpointEntry>,
    #[serde(default)]
    pub running: Vec<RunningEntry>,
    #[serde(default)]
    pub drops: Vec<DropEntry>,
    #[serde(default)]
    pub created: Vec<FileEntry>,
    #[serde(default)]
    pub truncated: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases_dropped: Vec<DatabaseDrop>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index object is not JSON of an index: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("index object is not an index: {0}")]
    Format(&'static str),
    #[error("index of format {0}, this archiver reads {INDEX_VERSION} (run `archiver reindex`)")]
    Version(u32),
    #[error("index object names segment {found}, expected {expected}")]
    Segment { found: String, expected: String },
}

impl SegmentIndex {
    pub fn new(seg: &SegmentName) -> SegmentIndex {
        SegmentIndex {
            version: INDEX_VERSION,
            segment: seg.to_string(),
            ..Default::default()
        }
    }

    /// Adds one event (in WAL order).
    pub fn add(&mut self, e: Event) {
        match e {
            Event::XactEnd {
                xid,
                committed,
                time,
                start,
                end,
                dropped,
            } => {
                for d in self.databases_dropped.iter_mut() {
                    if d.xid == xid && d.commit.is_none() {
                        d.commit = Some(XactRef {
                            xid,
                            committed,
                            time,
                            start,
                            end,
                        });
                    }
                }
                let x = &mut self.xacts;
                if !committed {
                    x.aborted.push(x.xid.len() as u32);
                }
                x.xid.push(xid);
                x.time.push(time.as_microsecond());
                x.start.push(start.0);
                x.end.push(end.0);
                if !dropped.is_empty() {
                    self.drops.push(DropEntry {
                        xid,
                        committed,
                        time,
                        start,
                        end,
                        files: dropped,
                    });
                }
            }
            Event::RestorePoint {
                name,
                time,
                start,
                end,
            } => self.restore_points.push(RestorePointEntry {
                name,
                time,
                start,
                end,
            }),
            Event::Checkpoint {
                redo,
                time,
                next_xid,
                shutdown,
                start,
                end,
            } => self.checkpoints.push(CheckpointEntry {
                redo,
                time,
                next_xid,
                shutdown,
                start,
                end,
            }),
            Event::RunningXacts {
                next_xid,
                oldest_running,
                start,
                ..
            } => self.running.push(RunningEntry {
                next_xid,
                oldest_running,
                start,
            }),
            Event::FileCreated { file, xid, start } => self.created.push(FileEntry {
                file,
                xid,
                start,
                blocks: None,
            }),
            Event::DatabaseDropped {
                db,
                xid,
                start,
                invalidated,
            } => self.databases_dropped.push(DatabaseDrop {
                db,
                xid,
                start,
                invalidated,
                commit: None,
            }),
            Event::FileTruncated {
                file,
                blocks,
                xid,
                start,
            } => self.truncated.push(FileEntry {
                file,
                xid,
                start,
                blocks: Some(blocks),
            }),
        }
    }

    /// The stored form: magic, version, the transaction columns, then the rest as JSON.
    pub fn encode(&self) -> Vec<u8> {
        let x = &self.xacts;
        let mut out = Vec::with_capacity(16 + x.len() * 8);
        out.extend_from_slice(MAGIC);
        put_varint(&mut out, INDEX_VERSION as u64);
        put_varint(&mut out, x.len() as u64);
        let (mut xid, mut time, mut end) = (0i64, 0i64, 0i64);
        for i in 0..x.len() {
            put_zigzag(&mut out, x.xid[i] as i64 - xid);
            xid = x.xid[i] as i64;
            put_zigzag(&mut out, x.time[i] - time);
            time = x.time[i];
            put_zigzag(&mut out, x.start[i] as i64 - end);
            put_varint(&mut out, x.end[i] - x.start[i]);
            end = x.end[i] as i64;
        }
        put_varint(&mut out, x.aborted.len() as u64);
        let mut prev = 0u64;
        for a in &x.aborted {
            put_varint(&mut out, *a as u64 - prev);
            prev = *a as u64;
        }
        out.extend_from_slice(&serde_json::to_vec(self).expect("an index serializes"));
        out
    }

    /// Reads an index object's content, checking its format and that it is `seg`'s.
    pub fn decode(raw: &[u8], seg: &SegmentName) -> Result<SegmentIndex, IndexError> {
        let mut b = raw
            .strip_prefix(MAGIC)
            .ok_or(IndexError::Format("no magic"))?;
        let version = get_varint(&mut b)?;
        if version != INDEX_VERSION as u64 {
            return Err(IndexError::Version(version as u32));
        }
        let n = get_varint(&mut b)? as usize;
        if n > b.len() {
            return Err(IndexError::Format("more transactions than bytes"));
        }
        let mut x = Xacts {
            xid: Vec::with_capacity(n),
            time: Vec::with_capacity(n),
            start: Vec::with_capacity(n),
            end: Vec::with_capacity(n),
            aborted: Vec::new(),
        };
        let (mut xid, mut time, mut end) = (0i64, 0i64, 0i64);
        for _ in 0..n {
            xid += get_zigzag(&mut b)?;
            time += get_zigzag(&mut b)?;
            let start = end + get_zigzag(&mut b)?;
            end = start + get_varint(&mut b)? as i64;
            x.xid.push(xid as u32);
            x.time.push(time);
            x.start.push(start as u64);
            x.end.push(end as u64);
        }
        let na = get_varint(&mut b)? as usize;
        let mut prev = 0u64;
        for _ in 0..na.min(n) {
            prev += get_varint(&mut b)?;
            x.aborted.push(prev as u32);
        }
        let mut ix: SegmentIndex = serde_json::from_slice(b)?;
        if ix.version != INDEX_VERSION {
            return Err(IndexError::Version(ix.version));
        }
        if ix.segment != seg.to_string() {
            return Err(IndexError::Segment {
                found: ix.segment,
                expected: seg.to_string(),
            });
        }
        ix.xacts = x;
        Ok(ix)
    }

    /// The first transaction end in WAL order satisfying `f`.
    pub fn find_xact(&self, mut f: impl FnMut(&XactRef) -> bool) -> Option<XactRef> {
        self.xacts.iter().find(|x| f(x))
    }
}

/// Indexes the segments of a timeline fed in order, carrying records that cross segment
/// boundaries. Fed a segment that does not follow the last one, it starts afresh: the record
/// that began in the unseen segment is skipped unless [`Indexer::prime`] fed that segment.
#[derive(Debug, Clone)]
pub struct Indexer {
    reader: RecordReader,
    seg_size: u64,
    major: u32,
    /// The segment number expected next.
    next: Option<u64>,
}

impl Indexer {
    pub fn new(seg_size: u64, major: u32) -> Indexer {
        Indexer {
            reader: RecordReader::new(seg_size, major),
            seg_size,
            major,
            next: None,
        }
    }

    /// Whether `seg` follows the last segment fed (its first record may have begun there).
    pub fn continues(&self, seg: &SegmentName) -> bool {
        self.next == Some(seg.segno)
    }

    /// Reads `seg` (the one before the next to index) for the records it leaves unfinished.
    pub fn prime(&mut self, seg: &SegmentName, bytes: &[u8]) -> Result<(), RecordError> {
        self.reader = RecordReader::new(self.seg_size, self.major);
        let r = self
            .reader
            .feed_segment(seg.start_lsn(), bytes, &mut |_| {});
        self.next = r.is_ok().then_some(seg.segno + 1);
        r
    }

    /// Starts indexing `seg`; feed it with [`Indexer::feed`], in order, from its start.
    pub fn begin(&mut self, seg: &SegmentName) -> SegmentIndex {
        if !self.continues(seg) || self.reader.ended() {
            self.reader = RecordReader::new(self.seg_size, self.major);
        }
        self.next = None;
        SegmentIndex::new(seg)
    }

    /// Feeds whole pages of the segment `ix` indexes, from `offset` within it.
    pub fn feed(
        &mut self,
        ix: &mut SegmentIndex,
        seg: &SegmentName,
        offset: u64,
        pages: &[u8],
    ) -> Result<(), RecordError> {
        let r = self
            .reader
            .feed_segment(Lsn(seg.start_lsn().0 + offset), pages, &mut |e| ix.add(e));
        if r.is_err() {
            self.next = None;
            self.reader = RecordReader::new(self.seg_size, self.major);
        }
        r
    }

    /// `seg` was fed whole: the next segment continues from it.
    pub fn finish(&mut self, seg: &SegmentName) {
        self.next = Some(seg.segno + 1);
    }

    /// Indexes a whole segment.
    pub fn index(&mut self, seg: &SegmentName, bytes: &[u8]) -> Result<SegmentIndex, RecordError> {
        let mut ix = self.begin(seg);
        self.feed(&mut ix, seg, 0, bytes)?;
        self.finish(seg);
        Ok(ix)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn get_varint(b: &mut &[u8]) -> Result<u64, IndexError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or(IndexError::Format("truncated"))?;
        *b = rest;
        v |= ((byte & 0x7F) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(IndexError::Format("varint too long"))
}

fn get_zigzag(b: &mut &[u8]) -> Result<i64, IndexError> {
    let v = get_varint(b)?;
    Ok((v >> 1) as i64 ^ -((v & 1) as i64))
}

/// `TransactionIdPrecedes` for normal xids: `a` is older than `b` (modulo 2^32).
pub fn xid_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn xact(xid: u32, committed: bool, s: i64, at: u64, dropped: Vec<RelFile>) -> Event {
        Event::XactEnd {
            xid,
            committed,
            time: t(s),
            start: Lsn(at),
            end: Lsn(at + 40),
            dropped,
        }
    }

    #[test]
    fn builds_and_round_trips() {
        let seg = SegmentName::new(1, 3, 16 << 20);
        let mut ix = SegmentIndex::new(&seg);
        let f = RelFile {
            spc: 1663,
            db: 5,
            rel: 16384,
        };
        ix.add(xact(700, true, 1, 0x300_0100, vec![]));
        ix.add(xact(701, false, 2, 0x300_0200, vec![]));
        ix.add(xact(702, true, 3, 0x300_0300, vec![f]));
        ix.add(Event::RestorePoint {
            name: "before".into(),
            time: t(4),
            start: Lsn(0x300_0400),
            end: Lsn(0x300_0460),
        });
        ix.add(Event::FileCreated {
            file: f,
            xid: 0,
            start: Lsn(0x300_0500),
        });
        ix.add(Event::RunningXacts {
            next_xid: 703,
            oldest_running: 703,
            start: Lsn(0x300_0600),
            end: Lsn(0x300_0640),
        });
        assert_eq!(ix.xacts.len(), 3);
        assert_eq!(ix.xacts.aborted, vec![1]);
        assert!(!ix.xacts.get(1).committed && ix.xacts.get(2).committed);
        assert_eq!(ix.xacts.get(2).end, Lsn(0x300_0300 + 40));
        assert_eq!(ix.drops.len(), 1);
        assert_eq!(ix.drops[0].files, vec![f]);
        assert_eq!(ix.xacts.max_time(), Some(t(3)));
        let back = SegmentIndex::decode(&ix.encode(), &seg).unwrap();
        assert_eq!(back, ix);
        assert_eq!(back.find_xact(|x| x.time > t(1)).map(|x| x.xid), Some(701));
        // Another segment's index, or another format: refused.
        let other = SegmentName::new(1, 4, 16 << 20);
        assert!(matches!(
            SegmentIndex::decode(&ix.encode(), &other),
            Err(IndexError::Segment { .. })
        ));
        let mut v9 = ix.encode();
        v9[4] = 9;
        assert!(matches!(
            SegmentIndex::decode(&v9, &seg),
            Err(IndexError::Version(9))
        ));
        // Cut short anywhere: refused, never a panic.
        let whole = ix.encode();
        for n in 0..whole.len() {
            assert!(SegmentIndex::decode(&whole[..n], &seg).is_err(), "{n}");
        }
        // Extreme values survive.
        let mut big = SegmentIndex::new(&seg);
        big.add(xact(u32::MAX, false, -2_000_000_000, u64::MAX / 4, vec![]));
        big.add(xact(3, true, 2_000_000_000, u64::MAX / 4 + 64, vec![]));
        assert_eq!(SegmentIndex::decode(&big.encode(), &seg).unwrap(), big);
    }

    #[test]
    fn xid_order_wraps() {
        assert!(xid_precedes(5, 6));
        assert!(!xid_precedes(6, 5));
        assert!(xid_precedes(u32::MAX - 3, 10));
        assert!(!xid_precedes(10, u32::MAX - 3));
    }
}
