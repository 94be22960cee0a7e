//! WAL page-header checks on receipt (`XLogReaderValidatePageHeader` in `xlogreader.c`).
//!
//! [`PageValidator`] is a sans-IO checker: feed it the WAL bytes in stream order, in chunks of any
//! size, and it validates every page header whose bytes it has seen, including headers split
//! across chunks. The stream refuses to archive WAL that fails.

use bytes::Buf;

use super::{Lsn, TimeLineId};

/// `XLOG_BLCKSZ`: the WAL page size. Builds with another page size are not supported.
pub const XLOG_BLCKSZ: u64 = 8192;
/// `SizeOfXLogShortPHD`.
pub const SHORT_HEADER_LEN: usize = 24;
/// `SizeOfXLogLongPHD`.
pub const LONG_HEADER_LEN: usize = 40;
/// `XLP_LONG_HEADER` in `xlp_info`.
const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_ALL_FLAGS`.
const XLP_ALL_FLAGS: u16 = 0x000F;

/// `XLOG_PAGE_MAGIC` for a PostgreSQL major version, when known.
pub fn page_magic_for_major(major: u32) -> Option<u16> {
    Some(match major {
        13 => 0xD106,
        14 => 0xD10D,
        15 => 0xD110,
        16 => 0xD113,
        17 => 0xD116,
        18 => 0xD118,
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid WAL page header at {page}: {reason}")]
pub struct PageError {
    pub page: Lsn,
    pub reason: String,
}

/// Validates WAL page headers of a contiguous byte stream.
#[derive(Debug)]
pub struct PageValidator {
    seg_size: u64,
    sysid: u64,
    magic: Option<u16>,
    max_tli: TimeLineId,
    last_tli: TimeLineId,
    /// Next byte expected from the stream.
    pos: Lsn,
    /// Start of the next page whose header has not been validated yet.
    next_page: Lsn,
    hdr: [u8; LONG_HEADER_LEN],
    hdr_have: usize,
    /// Segment number in which an all-zero page was seen: the rest of that segment is the zero
    /// padding that follows an `XLOG_SWITCH` record, and must stay zero.
    zero_tail_segno: Option<u64>,
}

impl PageValidator {
    /// `magic`: the expected `XLOG_PAGE_MAGIC` (None: learn it from the first page and then
    /// insist on it). `max_tli`: the timeline being streamed; pages may carry older timelines.
    pub fn new(
        seg_size: u64,
        sysid: u64,
        magic: Option<u16>,
        start: Lsn,
        max_tli: TimeLineId,
    ) -> Self {
        let next_page = Lsn(start.0.div_ceil(XLOG_BLCKSZ) * XLOG_BLCKSZ);
        PageValidator {
            seg_size,
            sysid,
            magic,
            max_tli,
            last_tli: 0,
            pos: start,
            next_page,
            hdr: [0; LONG_HEADER_LEN],
            hdr_have: 0,
            zero_tail_segno: None,
        }
    }

    /// The next position the validator expects.
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Checks the headers of all pages starting within `data` (which begins at `start`).
    pub fn feed(&mut self, start: Lsn, data: &[u8]) -> Result<(), PageError> {
        if start != self.pos {
            return Err(PageError {
                page: start,
                reason: format!("WAL arrived out of order: expected {}", self.pos),
            });
        }
        let end = start.0 + data.len() as u64;
        while self.next_page.0 < end {
            let page = self.next_page;
            let hlen = if page.0 % self.seg_size == 0 {
                LONG_HEADER_LEN
            } else {
                SHORT_HEADER_LEN
            };
            let from = page.0 + self.hdr_have as u64;
            let take = ((hlen - self.hdr_have) as u64).min(end - from) as usize;
            let off = (from - start.0) as usize;
            self.hdr[self.hdr_have..self.hdr_have + take].copy_from_slice(&data[off..off + take]);
            self.hdr_have += take;
            if self.hdr_have < hlen {
                break;
            }
            let hdr = self.hdr;
            self.check(page, &hdr[..hlen])?;
            self.hdr_have = 0;
            self.next_page = Lsn(page.0 + XLOG_BLCKSZ);
        }
        self.pos = Lsn(end);
        Ok(())
    }

    fn check(&mut self, page: Lsn, h: &[u8]) -> Result<(), PageError> {
        let fail = |reason: String| Err(PageError { page, reason });
        let segno = page.0 / self.seg_size;
        let is_seg_start = page.0 % self.seg_size == 0;
        if !is_seg_start && h.iter().all(|b| *b == 0) {
            // Zero padding after a WAL switch (pg_switch_wal, archive_timeout).
            self.zero_tail_segno = Some(segno);
            return Ok(());
        }
        if self.zero_tail_segno == Some(segno) {
            return fail("a page header follows zero padding in the same segment".into());
        }
        let u16_at = |o: usize| (&h[o..]).get_u16_le();
        let u32_at = |o: usize| (&h[o..]).get_u32_le();
        let u64_at = |o: usize| (&h[o..]).get_u64_le();

        let magic = u16_at(0);
        match self.magic {
            Some(m) if m != magic => {
                return fail(format!("xlp_magic {magic:#06X}, expected {m:#06X}"));
            }
            None => self.magic = Some(magic),
            _ => {}
        }
        let info = u16_at(2);
        if info & !XLP_ALL_FLAGS != 0 {
            return fail(format!("invalid xlp_info {info:#06X}"));
        }
        if is_seg_start != (info & XLP_LONG_HEADER != 0) {
            return fail(format!(
                "XLP_LONG_HEADER is {} on a page {} a segment",
                if is_seg_start { "missing" } else { "set" },
                if is_seg_start { "starting" } else { "inside" }
            ));
        }
        let tli = u32_at(4);
        if tli == 0 || tli > self.max_tli {
            return fail(format!("xlp_tli {tli} is outside 1..={}", self.max_tli));
        }
        if tli < self.last_tli {
            return fail(format!(
                "xlp_tli went backwards from {} to {tli}",
                self.last_tli
            ));
        }
        self.last_tli = tli;
        let addr = Lsn(u64_at(8));
        if addr != page {
            return fail(format!("xlp_pageaddr is {addr}"));
        }
        if is_seg_start {
            let sysid = u64_at(24);
            if sysid != self.sysid {
                return fail(format!(
                    "WAL belongs to system identifier {sysid}, expected {}",
                    self.sysid
                ));
            }
            let seg = u32_at(32) as u64;
            if seg != self.seg_size {
                return fail(format!("xlp_seg_size {seg}, expected {}", self.seg_size));
            }
            let blcksz = u32_at(36) as u64;
            if blcksz != XLOG_BLCKSZ {
                return fail(format!("xlp_xlog_blcksz {blcksz}, expected {XLOG_BLCKSZ}"));
            }
        }
        Ok(())
    }
}

/// Writes a valid page header (test helper for this module, the stream tests and benches).
#[doc(hidden)]
pub fn write_test_page_header(
    buf: &mut [u8],
    page: Lsn,
    tli: TimeLineId,
    sysid: u64,
    seg_size: u64,
    magic: u16,
) {
    let long = page.0 % seg_size == 0;
    buf[0..2].copy_from_slice(&magic.to_le_bytes());
    let info: u16 = if long { XLP_LONG_HEADER } else { 0 };
    buf[2..4].copy_from_slice(&info.to_le_bytes());
    buf[4..8].copy_from_slice(&tli.to_le_bytes());
    buf[8..16].copy_from_slice(&page.0.to_le_bytes());
    buf[16..20].copy_from_slice(&0u32.to_le_bytes());
    if long {
        buf[24..32].copy_from_slice(&sysid.to_le_bytes());
        buf[32..36].copy_from_slice(&(seg_size as u32).to_le_bytes());
        buf[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
    }
}

/// Builds `len` bytes of synthetic WAL starting at page-aligned `start` (tests and benches).
#[doc(hidden)]
pub fn synthetic_wal(
    start: Lsn,
    len: usize,
    tli: TimeLineId,
    sysid: u64,
    seg_size: u64,
) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x: u32 = 0x9E37_79B9;
    for (i, b) in out.iter_mut().enumerate() {
        // Mildly compressible filler, like real WAL (record headers, repeated tuples).
        if i % 64 < 40 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    let mut p = 0;
    while p < len {
        let end = (p + LONG_HEADER_LEN).min(len);
        let mut hdr = [0u8; LONG_HEADER_LEN];
        write_test_page_header(
            &mut hdr,
            Lsn(start.0 + p as u64),
            tli,
            sysid,
            seg_size,
            0xD110,
        );
        out[p..end].copy_from_slice(&hdr[..end - p]);
        let hlen = if (start.0 + p as u64) % seg_size == 0 {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_LEN
        };
        if hlen == SHORT_HEADER_LEN && end > p + SHORT_HEADER_LEN {
            // The bytes after a short header are record data; keep the filler there.
            out[p + SHORT_HEADER_LEN..end].fill(7);
        }
        p += XLOG_BLCKSZ as usize;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;
    const SYSID: u64 = 7_300_000_000_000_000_001;

    fn wal(start: u64, len: usize) -> Vec<u8> {
        synthetic_wal(Lsn(start), len, 1, SYSID, SEG)
    }

    #[test]
    fn accepts_valid_stream_in_any_chunking() {
        let data = wal(0, 3 * SEG as usize);
        for chunk in [1usize, 7, 24, 40, 8191, 8192, 100_000, SEG as usize] {
            let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), Lsn(0), 1);
            for (i, c) in data.chunks(chunk).enumerate() {
                v.feed(Lsn((i * chunk) as u64), c).unwrap();
            }
            assert_eq!(v.position(), Lsn(3 * SEG));
        }
    }

    #[test]
    fn starts_mid_page() {
        let data = wal(0, 4 * XLOG_BLCKSZ as usize);
        let mut v = PageValidator::new(SEG, SYSID, None, Lsn(100), 1);
        v.feed(Lsn(100), &data[100..]).unwrap();
    }

    fn corrupt(at: usize, flip: u8) -> PageError {
        let mut data = wal(0, 2 * SEG as usize);
        data[at] ^= flip;
        let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), Lsn(0), 1);
        let mut err = None;
        for (i, c) in data.chunks(5000).enumerate() {
            if let Err(e) = v.feed(Lsn(i as u64 * 5000), c) {
                err = Some(e);
                break;
            }
        }
        err.expect("corruption must be detected")
    }

    #[test]
    fn detects_each_kind_of_damage() {
        let page2 = 2 * XLOG_BLCKSZ as usize;
        let seg1 = SEG as usize;
        assert!(corrupt(page2, 0x01).reason.contains("xlp_magic"));
        assert!(corrupt(page2 + 2, 0x02).reason.contains("XLP_LONG_HEADER"));
        assert!(corrupt(page2 + 2, 0x40).reason.contains("xlp_info"));
        assert!(corrupt(page2 + 4, 9).reason.contains("xlp_tli"));
        let e = corrupt(page2 + 9, 0x55);
        assert!(e.reason.contains("xlp_pageaddr"));
        assert_eq!(e.page, Lsn(page2 as u64));
        assert!(corrupt(seg1 + 24, 1).reason.contains("system identifier"));
        assert!(corrupt(seg1 + 34, 1).reason.contains("xlp_seg_size"));
        assert!(corrupt(seg1 + 37, 1).reason.contains("xlp_xlog_blcksz"));
    }

    #[test]
    fn zero_padding_after_a_switch() {
        let mut data = wal(0, 2 * SEG as usize);
        let pad_from = 5 * XLOG_BLCKSZ as usize;
        data[pad_from..SEG as usize].fill(0);
        let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), Lsn(0), 1);
        v.feed(Lsn(0), &data).unwrap();
        // A live header after the padding, in the same segment, is damage.
        let mut bad = data.clone();
        write_test_page_header(
            &mut bad[pad_from + 8192..],
            Lsn((pad_from + 8192) as u64),
            1,
            SYSID,
            SEG,
            0xD110,
        );
        let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), Lsn(0), 1);
        assert!(v
            .feed(Lsn(0), &bad)
            .unwrap_err()
            .reason
            .contains("zero padding"));
        // A zeroed segment start is never padding.
        let mut bad = data;
        bad[SEG as usize..SEG as usize + 40].fill(0);
        let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), Lsn(0), 1);
        assert!(v.feed(Lsn(0), &bad).is_err());
    }

    #[test]
    fn rejects_gaps() {
        let data = wal(0, 3 * XLOG_BLCKSZ as usize);
        let mut v = PageValidator::new(SEG, SYSID, None, Lsn(0), 1);
        v.feed(Lsn(0), &data[..100]).unwrap();
        assert!(v.feed(Lsn(200), &data[200..300]).is_err());
    }

    #[test]
    fn magic_table() {
        assert_eq!(page_magic_for_major(15), Some(0xD110));
        assert_eq!(page_magic_for_major(17), Some(0xD116));
        assert_eq!(page_magic_for_major(9), None);
    }
}
