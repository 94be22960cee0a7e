//! Synthetic WAL made of real records (tests and benchmarks): records laid out as
//! `XLogInsert` lays them out — 8-byte aligned, split across pages behind continuation headers
//! (`XLP_FIRST_IS_CONTRECORD`, `xlp_rem_len`), a long header at each segment start, every
//! record's `xl_crc` computed — so the record reader and the index can be exercised and timed
//! without a server.

use super::page::{write_test_page_header, LONG_HEADER_LEN, SHORT_HEADER_LEN, XLOG_BLCKSZ};
use super::{Lsn, TimeLineId};

const RECORD_HEADER_LEN: usize = 24;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;

/// One record: resource manager, info bits, transaction, and everything after the header
/// (block references and data, as `DecodeXLogRecord` reads them).
#[derive(Clone, Debug)]
pub struct SynthRecord {
    pub rmid: u8,
    pub info: u8,
    pub xid: u32,
    pub body: Vec<u8>,
}

/// A body holding only main data.
pub fn main_data_body(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(data.len() + 5);
    if data.len() < 256 {
        b.push(255); // XLR_BLOCK_ID_DATA_SHORT
        b.push(data.len() as u8);
    } else {
        b.push(254); // XLR_BLOCK_ID_DATA_LONG
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    }
    b.extend_from_slice(data);
    b
}

/// A commit (`xl_xact_commit` without extra info) at PostgreSQL time `pg_time`.
pub fn commit(xid: u32, pg_time: i64) -> SynthRecord {
    SynthRecord {
        rmid: 1,
        info: 0x00,
        xid,
        body: main_data_body(&pg_time.to_le_bytes()),
    }
}

/// A restore point (`xl_restore_point`).
pub fn restore_point(name: &str, pg_time: i64) -> SynthRecord {
    let mut d = pg_time.to_le_bytes().to_vec();
    let mut n = [0u8; 64];
    n[..name.len().min(63)].copy_from_slice(&name.as_bytes()[..name.len().min(63)]);
    d.extend_from_slice(&n);
    SynthRecord {
        rmid: 0,
        info: 0x70,
        xid: 0,
        body: main_data_body(&d),
    }
}

/// A running-transactions snapshot (`xl_running_xacts`, no xids listed).
pub fn running_xacts(next_xid: u32, oldest_running: u32) -> SynthRecord {
    let mut d = vec![0u8; 24];
    d[12..16].copy_from_slice(&next_xid.to_le_bytes());
    d[16..20].copy_from_slice(&oldest_running.to_le_bytes());
    d[20..24].copy_from_slice(&next_xid.wrapping_sub(1).to_le_bytes());
    SynthRecord {
        rmid: 8,
        info: 0x10,
        xid: 0,
        body: main_data_body(&d),
    }
}

/// A record of another resource manager (a heap change) with `len` bytes of data.
pub fn filler(xid: u32, len: usize, seed: u32) -> SynthRecord {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|i| {
            if i % 4 == 0 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
            }
            (x >> (8 * (i % 4))) as u8
        })
        .collect();
    SynthRecord {
        rmid: 10,
        info: 0x20,
        xid,
        body: main_data_body(&data),
    }
}

/// Lays `records` out as WAL from `start` (a page boundary) until `len` bytes are filled (the
/// last record may be cut off there). Returns the WAL and where each record starts.
pub fn lay_out(
    start: Lsn,
    len: usize,
    tli: TimeLineId,
    sysid: u64,
    seg_size: u64,
    magic: u16,
    records: impl IntoIterator<Item = SynthRecord>,
) -> (Vec<u8>, Vec<Lsn>) {
    let page = XLOG_BLCKSZ as usize;
    let mut out = vec![0u8; len];
    let mut starts = Vec::new();
    let mut pos = 0usize; // offset in `out` of the next byte to write
    let mut prev = 0u64;
    // Writes a page header at `pos` (a page boundary) announcing `rem` continuing bytes.
    let header = |out: &mut [u8], pos: usize, rem: usize| -> usize {
        let lsn = Lsn(start.0 + pos as u64);
        let hlen = if lsn.0 % seg_size == 0 {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_LEN
        };
        if pos + hlen > out.len() {
            return out.len() - pos;
        }
        write_test_page_header(&mut out[pos..pos + hlen], lsn, tli, sysid, seg_size, magic);
        if rem > 0 {
            let info = u16::from_le_bytes([out[pos + 2], out[pos + 3]]) | XLP_FIRST_IS_CONTRECORD;
            out[pos + 2..pos + 4].copy_from_slice(&info.to_le_bytes());
            out[pos + 16..pos + 20].copy_from_slice(&(rem as u32).to_le_bytes());
        }
        hlen
    };
    for r in records {
        pos = pos.next_multiple_of(8);
        if pos % page == 0 && pos < len {
            pos += header(&mut out, pos, 0);
        }
        if pos >= len {
            break;
        }
        let tot = RECORD_HEADER_LEN + r.body.len();
        let mut rec = Vec::with_capacity(tot);
        rec.extend_from_slice(&(tot as u32).to_le_bytes());
        rec.extend_from_slice(&r.xid.to_le_bytes());
        rec.extend_from_slice(&prev.to_le_bytes());
        rec.push(r.info);
        rec.push(r.rmid);
        rec.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&r.body), &rec[..20]);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(&r.body);
        let at = start.0 + pos as u64;
        starts.push(Lsn(at));
        prev = at;
        let mut done = 0;
        while done < tot && pos < len {
            if pos % page == 0 {
                pos += header(&mut out, pos, tot - done);
                if pos >= len {
                    break;
                }
            }
            let n = (tot - done).min(page - pos % page).min(len - pos);
            out[pos..pos + n].copy_from_slice(&rec[done..done + n]);
            pos += n;
            done += n;
        }
        if pos >= len {
            break;
        }
    }
    (out, starts)
}

/// A pgbench-like stream of records: per transaction three heap changes of 80–200 bytes and a
/// commit one millisecond after the previous one; every 500 transactions a page image of 8 KB
/// (a record over two pages) and a running-transactions snapshot; xids from `first_xid`.
pub fn pgbench_like(first_xid: u32, pg_time: i64) -> impl Iterator<Item = SynthRecord> {
    (0u32..).flat_map(move |i| {
        let xid = first_xid.wrapping_add(i);
        let mut v = vec![
            filler(xid, 80 + (i as usize * 37) % 120, i),
            filler(xid, 80 + (i as usize * 53) % 120, i ^ 0x55),
            filler(xid, 60 + (i as usize * 11) % 60, i ^ 0xAA),
            commit(xid, pg_time + i as i64 * 1000),
        ];
        if i % 500 == 0 {
            v.push(filler(0, 8192, i));
            v.push(running_xacts(xid + 1, xid + 1));
        }
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::index::Indexer;
    use crate::wal::page::PageValidator;
    use crate::wal::record::{Event, RecordReader};
    use crate::wal::SegmentName;

    const SEG: u64 = 1 << 20; // small segments: many boundaries

    #[test]
    fn records_read_back_across_pages_and_segments() {
        let start = Lsn(SEG);
        let len = 3 * SEG as usize;
        let (wal, starts) = lay_out(start, len, 1, 42, SEG, 0xD110, pgbench_like(1000, 0));
        // Page headers are what a server writes.
        let mut v = PageValidator::new(SEG, 42, Some(0xD110), start, 1);
        v.feed(start, &wal).unwrap();
        // Fed a segment at a time, every record whose end is in the WAL is read, in order.
        let mut reader = RecordReader::new(SEG, 16);
        let mut commits = Vec::new();
        let mut running = 0;
        for s in 0..3 {
            let base = Lsn(start.0 + s * SEG);
            let seg = &wal[(s * SEG) as usize..((s + 1) * SEG) as usize];
            reader
                .feed_segment(base, seg, &mut |e| match e {
                    Event::XactEnd { xid, start, .. } => commits.push((xid, start)),
                    Event::RunningXacts { .. } => running += 1,
                    _ => {}
                })
                .unwrap();
        }
        assert!(commits.len() > 3000, "{}", commits.len());
        assert!(running >= 6);
        assert!(commits.windows(2).all(|w| w[1].0 == w[0].0 + 1));
        assert!(commits.iter().all(|(_, s)| starts.binary_search(s).is_ok()));
        // The same through the indexer, fed in uneven runs of pages, segment by segment.
        let mut ix = Indexer::new(SEG, 16);
        let mut n = 0;
        for s in 0..3u64 {
            let seg = SegmentName::new(1, 1 + s, SEG);
            let bytes = &wal[(s * SEG) as usize..((s + 1) * SEG) as usize];
            let mut i = ix.begin(&seg);
            let mut off = 0usize;
            for run in [3usize, 1, 17, 200].iter().cycle() {
                if off >= bytes.len() {
                    break;
                }
                let end = (off + run * 8192).min(bytes.len());
                ix.feed(&mut i, &seg, off as u64, &bytes[off..end]).unwrap();
                off = end;
            }
            ix.finish(&seg);
            n += i.xacts.len();
        }
        assert_eq!(n, commits.len());
        // A flipped byte in one record's data: its CRC refuses it.
        let mut bad = wal.clone();
        let victim = starts[starts.len() / 2].0 - start.0 + 30;
        bad[victim as usize] ^= 0x10;
        let mut reader = RecordReader::new(SEG, 16);
        let mut r = Ok(());
        for s in 0..3 {
            let base = Lsn(start.0 + s * SEG);
            r = r.and_then(|_| {
                reader.feed_segment(
                    base,
                    &bad[(s * SEG) as usize..((s + 1) * SEG) as usize],
                    &mut |_| {},
                )
            });
        }
        assert!(r.is_err());
    }
}
