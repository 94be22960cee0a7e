//! `Lsn`: a WAL position (PostgreSQL's `XLogRecPtr`), printed and parsed as `X/X` hex halves.

use std::fmt;
use std::str::FromStr;

/// A WAL location, `XLogRecPtr` in PostgreSQL. `Lsn(0)` is `InvalidXLogRecPtr`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// Offset of this position within its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: u64) -> u64 {
        self.0 % seg_size
    }

    /// Segment number containing this position (`XLByteToSeg`).
    pub fn segment_number(self, seg_size: u64) -> u64 {
        self.0 / seg_size
    }

    /// Start of the segment containing this position.
    pub fn segment_start(self, seg_size: u64) -> Lsn {
        Lsn(self.0 - self.0 % seg_size)
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for (v, s) in [
            (0u64, "0/0"),
            (0x16_B374_D848, "16/B374D848"),
            (0x1_0000_0000, "1/0"),
            (u64::MAX, "FFFFFFFF/FFFFFFFF"),
        ] {
            assert_eq!(Lsn(v).to_string(), s);
            assert_eq!(s.parse::<Lsn>().unwrap(), Lsn(v));
        }
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "G/0",
            "1/2/3",
            "123456789/0",
            "-1/0",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s} should not parse");
        }
    }

    #[test]
    fn segment_arithmetic() {
        let seg = 16 * 1024 * 1024;
        let l = Lsn(0x3_0100_0028);
        assert_eq!(l.segment_number(seg), 0x301);
        assert_eq!(l.segment_offset(seg), 0x28);
        assert_eq!(l.segment_start(seg), Lsn(0x3_0100_0000));
    }
}
