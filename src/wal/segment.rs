//! WAL segment file names (`XLogFileName`, `XLogFromFileName`) and timeline history names
//! (`TLHistoryFileName`).

use std::fmt;

use super::Lsn;

/// PostgreSQL's `TimeLineID`.
pub type TimeLineId = u32;

/// Valid `wal_segment_size` values: powers of two from 1 MiB to 1 GiB (`IsValidWalSegSize`).
pub fn is_valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size)
}

/// One WAL segment: a timeline and a segment number (`XLogSegNo`) for a given segment size.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SegmentName {
    pub tli: TimeLineId,
    pub segno: u64,
    pub seg_size: u64,
}

impl SegmentName {
    pub fn new(tli: TimeLineId, segno: u64, seg_size: u64) -> Self {
        debug_assert!(is_valid_segment_size(seg_size));
        SegmentName {
            tli,
            segno,
            seg_size,
        }
    }

    /// The segment containing `lsn` on timeline `tli`.
    pub fn containing(tli: TimeLineId, lsn: Lsn, seg_size: u64) -> Self {
        Self::new(tli, lsn.segment_number(seg_size), seg_size)
    }

    /// The name's second and third parts: `segno` split by segments per xlog id (as
    /// `XLogFileName` prints them).
    pub fn log_and_id(&self) -> (u64, u64) {
        let per_id = self.segments_per_xlog_id();
        (self.segno / per_id, self.segno % per_id)
    }

    fn segments_per_xlog_id(&self) -> u64 {
        0x1_0000_0000 / self.seg_size
    }

    /// First byte of the segment (`XLogSegNoOffsetToRecPtr(segno, 0, ...)`).
    pub fn start_lsn(&self) -> Lsn {
        Lsn(self.segno * self.seg_size)
    }

    /// One past the last byte of the segment.
    pub fn end_lsn(&self) -> Lsn {
        Lsn((self.segno + 1) * self.seg_size)
    }

    pub fn next(&self) -> Self {
        Self::new(self.tli, self.segno + 1, self.seg_size)
    }

    /// Parses a 24-hex-digit segment file name (`XLogFromFileName`).
    pub fn parse(name: &str, seg_size: u64) -> Option<Self> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_id = 0x1_0000_0000 / seg_size;
        if seg >= per_id || tli == 0 {
            return None;
        }
        Some(Self::new(tli, log * per_id + seg, seg_size))
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (log, id) = self.log_and_id();
        write!(f, "{:08X}{log:08X}{id:08X}", self.tli)
    }
}

/// `0000000N.history` (`TLHistoryFileName`).
pub fn history_file_name(tli: TimeLineId) -> String {
    format!("{tli:08X}.history")
}

/// Parses `0000000N.history` back into its timeline.
pub fn parse_history_file_name(name: &str) -> Option<TimeLineId> {
    let hex = name.strip_suffix(".history")?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().filter(|t| *t > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 * 1024 * 1024;

    #[test]
    fn names_match_postgres() {
        assert_eq!(
            SegmentName::new(1, 1, SEG).to_string(),
            "000000010000000000000001"
        );
        // 256 segments of 16 MiB per xlogid.
        assert_eq!(
            SegmentName::new(2, 0x1FF, SEG).to_string(),
            "0000000200000001000000FF"
        );
        // 1 GiB segments: 4 per xlogid.
        assert_eq!(
            SegmentName::new(0x1A, 5, 1 << 30).to_string(),
            "0000001A0000000100000001"
        );
    }

    #[test]
    fn parse_round_trip_and_rejects() {
        for seg_size in [1 << 20, SEG, 1 << 30] {
            for segno in [1u64, 255, 256, 4097, 123_456] {
                let n = SegmentName::new(3, segno, seg_size);
                assert_eq!(SegmentName::parse(&n.to_string(), seg_size), Some(n));
            }
        }
        assert_eq!(SegmentName::parse("000000010000000000000100", SEG), None);
        assert_eq!(SegmentName::parse("00000001000000000000000", SEG), None);
        assert_eq!(SegmentName::parse("00000000000000000000000A", SEG), None);
        assert_eq!(SegmentName::parse("0000000100000000000000XY", SEG), None);
    }

    #[test]
    fn containing_and_bounds() {
        let s = SegmentName::containing(1, Lsn(0x0300_0100), SEG);
        assert_eq!(s.to_string(), "000000010000000000000003");
        assert_eq!(s.start_lsn(), Lsn(0x0300_0000));
        assert_eq!(s.end_lsn(), Lsn(0x0400_0000));
        assert_eq!(s.next().segno, 4);
    }

    #[test]
    fn history_names() {
        assert_eq!(history_file_name(2), "00000002.history");
        assert_eq!(parse_history_file_name("0000000A.history"), Some(10));
        assert_eq!(parse_history_file_name("00000000.history"), None);
        assert_eq!(parse_history_file_name("0000000A.hist"), None);
        assert!(is_valid_segment_size(SEG));
        assert!(!is_valid_segment_size(3 << 20));
        assert!(!is_valid_segment_size(1 << 31));
    }
}
