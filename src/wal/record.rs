//! A sans-IO reader of WAL *records*, enough to index what recovery targets name and what an
//! operator asks about: transaction commits and aborts (`RM_XACT_ID`: xid, time, the relation
//! files they remove), restore points and checkpoints (`RM_XLOG_ID`), relation files created
//! and truncated (`RM_SMGR_ID`) and running-transaction snapshots (`RM_STANDBY_ID`).
//! Feed it whole segments in order; it reassembles records across pages and segments
//! (`XLogReadRecord` / `DecodeXLogRecord` in `src/backend/access/transam/xlogreader.c`).
//!
//! Every complete record's CRC-32C is checked as `ValidXLogRecord` does (the data after the
//! header, then the header up to `xl_crc`): a mismatch is an error, never skipped — the archived
//! WAL is damaged there. Page headers are the page validator's business. A zero `xl_tot_len`
//! ends the WAL; after `XLOG_SWITCH` the rest of the segment is skipped.

use bytes::Buf;

use super::page::{LONG_HEADER_LEN, SHORT_HEADER_LEN, XLOG_BLCKSZ};
use super::Lsn;
use crate::time::Timestamp;

const RECORD_HEADER_LEN: usize = 24;
const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const RM_SMGR_ID: u8 = 2;
const RM_DBASE_ID: u8 = 4;
const RM_STANDBY_ID: u8 = 8;
const RM_HEAP_ID: u8 = 10;
/// `XLOG_HEAP_INPLACE` (heapam_xlog.h), under `XLOG_HEAP_OPMASK`.
const XLOG_HEAP_INPLACE: u8 = 0x70;
/// `GLOBALTABLESPACE_OID`: shared catalogs (pg_database among them) live there.
const GLOBALTABLESPACE_OID: u32 = 1664;
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
const XLOG_SWITCH: u8 = 0x40;
/// `XLOG_SMGR_CREATE` / `XLOG_SMGR_TRUNCATE` (storage_xlog.h).
const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
/// `XLOG_RUNNING_XACTS` (standbydefs.h).
const XLOG_RUNNING_XACTS: u8 = 0x10;
/// `MAIN_FORKNUM`: only the main fork of a relation names it.
const MAIN_FORKNUM: u32 = 0;
/// `offsetof(CheckPoint, nextXid)` and `offsetof(CheckPoint, time)` (pg_control.h, 13–18).
const CHECKPOINT_NEXT_XID: usize = 24;
const CHECKPOINT_TIME: usize = 64;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `XLOG_XACT_HAS_INFO`: an `xl_xact_xinfo` follows the commit/abort time.
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
/// PostgreSQL 15+: the statistics a transaction end drops (`xl_xact_stats_items`).
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;
const XLP_LONG_HEADER: u16 = 0x0002;

/// A relation's storage (`RelFileLocator`, `RelFileNode` before 16): tablespace, database and
/// the relation's file number.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RelFile {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
}

/// A record the index keeps. `start` is where its record begins (what `recovery_target_lsn`
/// with `recovery_target_inclusive = off` stops before), `end` where it ends, 8-aligned as
/// PostgreSQL reports record ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A transaction ended (`committed` false: aborted) at `time` (`xl_xact_commit.xact_time`).
    /// `dropped`: the relation files the end of the transaction removes — on commit those of
    /// dropped, truncated and rewritten relations (`DROP TABLE`, `TRUNCATE`, `VACUUM FULL`), on
    /// abort those the transaction created.
    XactEnd {
        xid: u32,
        committed: bool,
        time: Timestamp,
        start: Lsn,
        end: Lsn,
        dropped: Vec<RelFile>,
    },
    RestorePoint {
        name: String,
        time: Timestamp,
        start: Lsn,
        end: Lsn,
    },
    /// A checkpoint record (`CheckPoint`): where its redo starts, its time (to the second),
    /// the next full transaction id, and whether it is a shutdown checkpoint.
    Checkpoint {
        redo: Lsn,
        time: Timestamp,
        next_xid: u64,
        shutdown: bool,
        start: Lsn,
        end: Lsn,
    },
    /// `xl_running_xacts`: transactions below `oldest_running` had ended before this record;
    /// `next_xid` had not been assigned when its snapshot was taken.
    RunningXacts {
        next_xid: u32,
        oldest_running: u32,
        start: Lsn,
        end: Lsn,
    },
    /// A relation's main fork was created (`xl_smgr_create`): a new table, index, or the new
    /// file of a truncated or rewritten one. `xid` is the record's (0 when none was assigned).
    FileCreated { file: RelFile, xid: u32, start: Lsn },
    /// A database's directories were removed (`xl_dbase_drop_rec`: `DROP DATABASE`); `xid`
    /// is the dropping transaction's. `invalidated`: where `DROP DATABASE` first marked the
    /// database invalid — the last in-place update of a shared catalog's row
    /// (`XLOG_HEAP_INPLACE` in the global tablespace) the reader saw before; recovery must stop
    /// before it to get the database back usable. None when the reader did not see one.
    DatabaseDropped {
        db: u32,
        xid: u32,
        start: Lsn,
        invalidated: Option<Lsn>,
    },
    /// A relation file was cut to `blocks` blocks (`xl_smgr_truncate`: VACUUM's truncation,
    /// or a truncate of a table created in the same transaction).
    FileTruncated {
        file: RelFile,
        blocks: u32,
        xid: u32,
        start: Lsn,
    },
}

impl Event {
    /// Where the record begins.
    pub fn start(&self) -> Lsn {
        match self {
            Event::XactEnd { start, .. }
            | Event::RestorePoint { start, .. }
            | Event::Checkpoint { start, .. }
            | Event::RunningXacts { start, .. }
            | Event::FileCreated { start, .. }
            | Event::FileTruncated { start, .. }
            | Event::DatabaseDropped { start, .. } => *start,
        }
    }
}

/// A record that cannot be what PostgreSQL wrote.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("WAL record at {at} fails its CRC-32C check (xl_crc {want:08x}, computed {got:08x}): the archived WAL is damaged there")]
    Crc { at: Lsn, want: u32, got: u32 },
}

/// `offsetof(XLogRecord, xl_crc)`.
const XL_CRC_OFFSET: usize = 20;

/// Checks a complete record's `xl_crc` (`ValidXLogRecord` in xlogreader.c).
pub fn check_crc(rec: &[u8], at: Lsn) -> Result<(), RecordError> {
    let want = u32le(rec, XL_CRC_OFFSET);
    let got = crc32c::crc32c_append(
        crc32c::crc32c(&rec[RECORD_HEADER_LEN..]),
        &rec[..XL_CRC_OFFSET],
    );
    if got == want {
        Ok(())
    } else {
        Err(RecordError::Crc { at, want, got })
    }
}

/// Reassembles records from segments fed in order.
#[derive(Debug, Clone)]
pub struct RecordReader {
    seg_size: u64,
    major: u32,
    /// The record being assembled, where it starts, and its total length once its header is
    /// complete.
    pending: Vec<u8>,
    pending_start: Lsn,
    pending_len: Option<usize>,
    ended: bool,
    /// After `XLOG_SWITCH`: the next segment's start; bytes before it are padding.
    skip_until: Option<Lsn>,
    /// The last shared-catalog in-place update read (see [`Event::DatabaseDropped`]).
    last_shared_inplace: Option<Lsn>,
}

fn u16le(b: &[u8], at: usize) -> u16 {
    (&b[at..]).get_u16_le()
}
fn u32le(b: &[u8], at: usize) -> u32 {
    (&b[at..]).get_u32_le()
}
/// A `TimestampTz` field (`xact_time`, `rp_time`).
fn time_at(b: &[u8], at: usize) -> Timestamp {
    crate::time::from_pg((&b[at..]).get_i64_le())
}

/// The main data of a complete record (`DecodeXLogRecord`'s header walk), or None if the
/// headers do not parse.
fn main_data(rec: &[u8], major: u32) -> Option<&[u8]> {
    walk(rec, major).map(|(d, _)| d)
}

/// The main data and the first block reference's relation (`DecodeXLogRecord`'s header walk).
fn walk(rec: &[u8], major: u32) -> Option<(&[u8], Option<RelFile>)> {
    let mut first_rel = None;
    let tot = rec.len();
    let mut p = RECORD_HEADER_LEN;
    let mut remaining = tot - RECORD_HEADER_LEN;
    let mut datatotal = 0usize;
    let mut main_len = 0usize;
    while remaining > datatotal {
        let id = *rec.get(p)?;
        p += 1;
        remaining = remaining.checked_sub(1)?;
        match id {
            255 => {
                main_len = *rec.get(p)? as usize;
                break;
            }
            254 => {
                main_len = u32le(rec.get(p..p + 4)?, 0) as usize;
                break;
            }
            253 => {
                p += 2;
                remaining = remaining.checked_sub(2)?;
            }
            252 => {
                p += 4;
                remaining = remaining.checked_sub(4)?;
            }
            0..=32 => {
                let fork_flags = *rec.get(p)?;
                let data_len = u16le(rec.get(p + 1..p + 3)?, 0) as usize;
                p += 3;
                remaining = remaining.checked_sub(3)?;
                datatotal += data_len;
                if fork_flags & 0x10 != 0 {
                    let bimg_len = u16le(rec.get(p..p + 2)?, 0) as usize;
                    let bimg_info = *rec.get(p + 4)?;
                    p += 5;
                    remaining = remaining.checked_sub(5)?;
                    datatotal += bimg_len;
                    let compressed = if major >= 15 {
                        bimg_info & (0x04 | 0x08 | 0x10) != 0
                    } else {
                        bimg_info & 0x02 != 0
                    };
                    if bimg_info & 0x01 != 0 && compressed {
                        p += 2;
                        remaining = remaining.checked_sub(2)?;
                    }
                }
                if fork_flags & 0x80 == 0 {
                    if first_rel.is_none() {
                        first_rel = Some(rel_file(rec.get(p..p + 12)?, 0));
                    }
                    p += 12;
                    remaining = remaining.checked_sub(12)?;
                }
                p += 4;
                remaining = remaining.checked_sub(4)?;
            }
            _ => return None,
        }
    }
    Some((rec.get(tot.checked_sub(main_len)?..tot)?, first_rel))
}

/// What a transaction end record says beyond its time (`ParseCommitRecord` /
/// `ParseAbortRecord` in xactdesc.c).
#[derive(Debug, Default, PartialEq, Eq)]
struct XactEndInfo {
    /// The relation files it removes.
    dropped: Vec<RelFile>,
    /// For `COMMIT PREPARED` / `ROLLBACK PREPARED`: the prepared transaction's xid (the
    /// record's own is the backend's that ran the command).
    twophase_xid: Option<u32>,
}

/// Parses a commit or abort record's main data `d`: the time, then with `XLOG_XACT_HAS_INFO`
/// the xinfo flags, the database info, the subtransactions, the relation files, the dropped
/// statistics (15+: items of 12 bytes, 16 from 18 on), the invalidations (commits only), the
/// two-phase xid. `None` if the record is too short for what its flags say.
fn xact_end_info(d: &[u8], info: u8, commit: bool, major: u32) -> Option<XactEndInfo> {
    let mut out = XactEndInfo::default();
    if info & XLOG_XACT_HAS_INFO == 0 {
        return Some(out);
    }
    let xinfo = u32le(d.get(8..12)?, 0);
    let mut p = 12;
    let counted = |p: &mut usize, size: usize| -> Option<usize> {
        let n = u32le(d.get(*p..*p + 4)?, 0) as usize;
        let start = *p + 4;
        *p = start.checked_add(n.checked_mul(size)?)?;
        (*p <= d.len()).then_some(start)
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        p += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        counted(&mut p, 4)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        let at = counted(&mut p, 12)?;
        out.dropped = d[at..p].chunks_exact(12).map(|c| rel_file(c, 0)).collect();
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return Some(out);
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        counted(&mut p, if major >= 18 { 16 } else { 12 })?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        counted(&mut p, 16)?;
    }
    out.twophase_xid = Some(u32le(d.get(p..p + 4)?, 0));
    Some(out)
}

impl RecordReader {
    pub fn new(seg_size: u64, major: u32) -> Self {
        RecordReader {
            seg_size,
            major,
            pending: Vec::new(),
            pending_start: Lsn(0),
            pending_len: None,
            ended: false,
            skip_until: None,
            last_shared_inplace: None,
        }
    }

    /// True once a zero record length marked the end of the WAL.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads WAL from `base`: a whole segment, or any run of whole pages of one (fed in order);
    /// calls `on` for each event. A partial segment (zero-filled after its end) is fine. A
    /// record whose CRC fails is an error.
    pub fn feed_segment(
        &mut self,
        base: Lsn,
        seg: &[u8],
        on: &mut dyn FnMut(Event),
    ) -> Result<(), RecordError> {
        if self.ended {
            return Ok(());
        }
        let page = XLOG_BLCKSZ as usize;
        let mut off = 0usize;
        if let Some(until) = self.skip_until {
            if base < until {
                off = (until.0 - base.0).min(seg.len() as u64) as usize;
            } else {
                self.skip_until = None;
            }
        }
        while off + SHORT_HEADER_LEN <= seg.len() && (off as u64) < self.seg_size {
            let info = u16le(seg, off + 2);
            let hlen = if info & XLP_LONG_HEADER != 0 {
                LONG_HEADER_LEN
            } else {
                SHORT_HEADER_LEN
            };
            let page_end = (off + page).min(seg.len());
            let mut cur = off + hlen;
            if self.pending.is_empty() && info & XLP_FIRST_IS_CONTRECORD != 0 {
                // The stream started mid-record: skip its remainder.
                let rem = u32le(seg, off + 16) as usize;
                cur = off + hlen + rem;
                cur = cur.next_multiple_of(8);
                if cur >= page_end {
                    off += page;
                    continue;
                }
            }
            while cur < page_end {
                // Continue or start a record.
                if self.pending.is_empty() {
                    if cur + 4 <= page_end && u32le(seg, cur) == 0 {
                        self.ended = true;
                        return Ok(());
                    }
                    // The common case: the whole record on this page, read in place.
                    if cur + RECORD_HEADER_LEN <= page_end {
                        let tot = u32le(seg, cur) as usize;
                        if tot < RECORD_HEADER_LEN {
                            self.ended = true;
                            return Ok(());
                        }
                        if cur + tot <= page_end {
                            let start = Lsn(base.0 + cur as u64);
                            cur += tot;
                            let end = Lsn((base.0 + cur as u64).next_multiple_of(8));
                            if self.record(&seg[cur - tot..cur], start, end, on)? {
                                self.switched(end);
                                return Ok(());
                            }
                            cur = cur.next_multiple_of(8);
                            continue;
                        }
                    }
                    self.pending_start = Lsn(base.0 + cur as u64);
                }
                let want = match self.pending_len {
                    Some(n) => n - self.pending.len(),
                    None => RECORD_HEADER_LEN - self.pending.len(),
                };
                let take = want.min(page_end - cur);
                self.pending.extend_from_slice(&seg[cur..cur + take]);
                cur += take;
                if self.pending_len.is_none() && self.pending.len() == RECORD_HEADER_LEN {
                    let tot = u32le(&self.pending, 0) as usize;
                    if tot < RECORD_HEADER_LEN {
                        self.ended = true;
                        return Ok(());
                    }
                    self.pending_len = Some(tot);
                }
                if self.pending_len == Some(self.pending.len()) {
                    let end = Lsn((base.0 + cur as u64).next_multiple_of(8));
                    let rec = std::mem::take(&mut self.pending);
                    self.pending_len = None;
                    if self.record(&rec, self.pending_start, end, on)? {
                        self.switched(end);
                        return Ok(());
                    }
                    self.pending = rec; // keep the allocation
                    self.pending.clear();
                    cur = cur.next_multiple_of(8);
                }
            }
            off += page;
        }
        Ok(())
    }

    /// An `XLOG_SWITCH` record ended at `end`: the rest of its segment is padding.
    fn switched(&mut self, end: Lsn) {
        self.skip_until = Some(Lsn(
            (end.0 - 1) / self.seg_size * self.seg_size + self.seg_size
        ));
    }

    /// One complete record: its CRC checked, its event reported. True after `XLOG_SWITCH`
    /// (the rest of the segment is padding).
    fn record(
        &mut self,
        rec: &[u8],
        start: Lsn,
        end: Lsn,
        on: &mut dyn FnMut(Event),
    ) -> Result<bool, RecordError> {
        check_crc(rec, start)?;
        let (info, rmid) = (rec[16], rec[17]);
        if rmid == RM_XLOG_ID && info & 0xF0 == XLOG_SWITCH {
            return Ok(true);
        }
        if matches!(
            rmid,
            RM_XLOG_ID | RM_XACT_ID | RM_SMGR_ID | RM_DBASE_ID | RM_STANDBY_ID
        ) {
            self.event(rec, start, end, on);
        } else if rmid == RM_HEAP_ID && info & 0x70 == XLOG_HEAP_INPLACE {
            if let Some((_, Some(f))) = walk(rec, self.major) {
                if f.spc == GLOBALTABLESPACE_OID && f.db == 0 {
                    self.last_shared_inplace = Some(start);
                }
            }
        }
        Ok(false)
    }

    fn event(&self, rec: &[u8], start: Lsn, end: Lsn, on: &mut dyn FnMut(Event)) {
        let (info, rmid, xid) = (rec[16], rec[17], u32le(rec, 4));
        let Some(d) = main_data(rec, self.major) else {
            return;
        };
        match rmid {
            RM_XACT_ID => {
                let op = info & XLOG_XACT_OPMASK;
                let commit = matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED);
                let ends = commit || matches!(op, XLOG_XACT_ABORT | XLOG_XACT_ABORT_PREPARED);
                if ends && d.len() >= 8 {
                    let parsed = xact_end_info(d, info, commit, self.major).unwrap_or_default();
                    let prepared =
                        matches!(op, XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED);
                    if prepared && parsed.twophase_xid.is_none() {
                        return; // cannot say whose end it is
                    }
                    on(Event::XactEnd {
                        xid: if prepared {
                            parsed.twophase_xid.unwrap_or(xid)
                        } else {
                            xid
                        },
                        committed: commit,
                        time: time_at(d, 0),
                        start,
                        end,
                        dropped: parsed.dropped,
                    });
                }
            }
            RM_XLOG_ID => match info & 0xF0 {
                XLOG_RESTORE_POINT if d.len() >= 8 + 64 => {
                    let raw = &d[8..8 + 64];
                    let n = raw.iter().position(|b| *b == 0).unwrap_or(64);
                    on(Event::RestorePoint {
                        name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        time: time_at(d, 0),
                        start,
                        end,
                    });
                }
                op @ (XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE)
                    if d.len() >= CHECKPOINT_TIME + 8 =>
                {
                    let secs = (&d[CHECKPOINT_TIME..]).get_i64_le();
                    on(Event::Checkpoint {
                        redo: Lsn((&d[..]).get_u64_le()),
                        time: Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH),
                        next_xid: (&d[CHECKPOINT_NEXT_XID..]).get_u64_le(),
                        shutdown: op == XLOG_CHECKPOINT_SHUTDOWN,
                        start,
                        end,
                    });
                }
                _ => {}
            },
            RM_SMGR_ID => match info & 0xF0 {
                XLOG_SMGR_CREATE if d.len() >= 16 && u32le(d, 12) == MAIN_FORKNUM => {
                    on(Event::FileCreated {
                        file: rel_file(d, 0),
                        xid,
                        start,
                    });
                }
                XLOG_SMGR_TRUNCATE if d.len() >= 16 => on(Event::FileTruncated {
                    file: rel_file(d, 4),
                    blocks: u32le(d, 0),
                    xid,
                    start,
                }),
                _ => {}
            },
            // `XLOG_DBASE_DROP`: 0x10 up to PostgreSQL 14, 0x20 from 15 (dbcommands_xlog.h).
            RM_DBASE_ID
                if info & 0xF0 == if self.major >= 15 { 0x20 } else { 0x10 } && d.len() >= 8 =>
            {
                on(Event::DatabaseDropped {
                    db: u32le(d, 0),
                    xid,
                    start,
                    invalidated: self.last_shared_inplace,
                })
            }
            RM_STANDBY_ID if info & 0xF0 == XLOG_RUNNING_XACTS && d.len() >= 24 => {
                on(Event::RunningXacts {
                    next_xid: u32le(d, 12),
                    oldest_running: u32le(d, 16),
                    start,
                    end,
                });
            }
            _ => {}
        }
    }
}

/// A `RelFileLocator` at `at`.
fn rel_file(d: &[u8], at: usize) -> RelFile {
    RelFile {
        spc: u32le(d, at),
        db: u32le(d, at + 4),
        rel: u32le(d, at + 8),
    }
}

#[cfg(test)]
mod crc_tests {
    use super::*;

    /// A record of `body` with its `xl_crc` as PostgreSQL computes it.
    fn record(body: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER_LEN];
        r[..4].copy_from_slice(&((RECORD_HEADER_LEN + body.len()) as u32).to_le_bytes());
        r[4..8].copy_from_slice(&42u32.to_le_bytes());
        r[17] = RM_XACT_ID;
        r.extend_from_slice(body);
        let crc = crc32c::crc32c_append(crc32c::crc32c(body), &r[..XL_CRC_OFFSET]);
        r[XL_CRC_OFFSET..XL_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        r
    }

    #[test]
    fn record_crc() {
        let r = record(b"\xff\x08some main data");
        assert_eq!(check_crc(&r, Lsn(0x100)), Ok(()));
        // A flipped bit in the data, in the header, or in the stored CRC: refused.
        for i in [RECORD_HEADER_LEN + 3, 4, 17, XL_CRC_OFFSET + 1] {
            let mut bad = r.clone();
            bad[i] ^= 0x01;
            match check_crc(&bad, Lsn(0x100)) {
                Err(RecordError::Crc { at, .. }) => assert_eq!(at, Lsn(0x100)),
                other => panic!("byte {i}: {other:?}"),
            }
        }
        // The padding bytes between xl_rmid and xl_crc are covered as well.
        let mut pad = r.clone();
        pad[18] = 1;
        assert!(check_crc(&pad, Lsn(0)).is_err());
    }
}

#[cfg(test)]
mod xact_tests {
    use super::*;

    fn commit_data(xinfo: u32, dbinfo: bool, subxacts: &[u32], rels: &[RelFile]) -> Vec<u8> {
        let mut d = 0i64.to_le_bytes().to_vec();
        d.extend_from_slice(&xinfo.to_le_bytes());
        if dbinfo {
            d.extend_from_slice(&[5, 0, 0, 0, 0x7f, 6, 0, 0]);
        }
        if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
            d.extend_from_slice(&(subxacts.len() as u32).to_le_bytes());
            for x in subxacts {
                d.extend_from_slice(&x.to_le_bytes());
            }
        }
        if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
            d.extend_from_slice(&(rels.len() as u32).to_le_bytes());
            for r in rels {
                for v in [r.spc, r.db, r.rel] {
                    d.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        d.extend_from_slice(&[0xAA; 20]); // invalidations etc. follow
        d
    }

    #[test]
    fn dropped_relation_files() {
        let rels = [
            RelFile {
                spc: 1663,
                db: 5,
                rel: 16384,
            },
            RelFile {
                spc: 1663,
                db: 5,
                rel: 16387,
            },
        ];
        let all = XACT_XINFO_HAS_DBINFO | XACT_XINFO_HAS_SUBXACTS | XACT_XINFO_HAS_RELFILELOCATORS;
        let d = commit_data(all, true, &[801, 802], &rels);
        let dropped = |d: &[u8], info| xact_end_info(d, info, true, 16).map(|i| i.dropped);
        assert_eq!(dropped(&d, XLOG_XACT_HAS_INFO).unwrap(), rels);
        let d = commit_data(XACT_XINFO_HAS_RELFILELOCATORS, false, &[], &rels[..1]);
        assert_eq!(dropped(&d, XLOG_XACT_HAS_INFO).unwrap(), rels[..1]);
        // No xinfo, or no files: none.
        assert_eq!(dropped(&0i64.to_le_bytes(), 0).unwrap(), vec![]);
        let d = commit_data(XACT_XINFO_HAS_SUBXACTS, false, &[9], &[]);
        assert_eq!(dropped(&d, XLOG_XACT_HAS_INFO).unwrap(), vec![]);
        // Shorter than its flags say: not guessed at.
        let d = commit_data(all, true, &[801], &rels);
        assert_eq!(dropped(&d[..d.len() - 30], XLOG_XACT_HAS_INFO), None);
    }
}
