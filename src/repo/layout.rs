//! Object keys of a repository. One key space for every backend; names sort in LSN order within
//! a timeline, so a listing of `wal/<tli>/` is already the WAL chain.
//!
//! ```text
//! repo.json                                  repository identity (sealed JSON)
//! wal/<TLI>/<segment>.zst                    a complete WAL segment
//! wal/<TLI>/<segment>.partial.zst            the received prefix of a timeline's last segment
//! wal/history/<TLI>.history.zst              timeline history file
//! catalog/<id>.json                          one backup's record (sealed JSON)
//! backups/<id>/<name>.zst                    a backup's objects (tablespace archives, manifest)
//! gaps/<TLI>-<from LSN>.json                 a hole in the WAL accepted with `stream --accept-gap`
//! slots.json                                 the replication slots archiver created
//! index/<TLI>/<segment>.zst                  what a complete segment's records say (wal::index)
//! index/<TLI>/<segment>.points.zst           its restore points, where it has any
//! index/<TLI>/<segment>.drops.zst            its relation files removed and created, where any were removed
//! ```

use crate::wal::segment::{history_file_name, parse_history_file_name};
use crate::wal::{SegmentName, TimeLineId};

pub const REPO_META_KEY: &str = "repo.json";
pub const WAL_PREFIX: &str = "wal/";
pub const HISTORY_PREFIX: &str = "wal/history/";
pub const CATALOG_PREFIX: &str = "catalog/";

pub fn catalog_key(backup_id: &str) -> String {
    format!("{CATALOG_PREFIX}{backup_id}.json")
}

pub fn backup_object_key(backup_id: &str, name: &str) -> String {
    format!("{}{name}.zst", backup_prefix(backup_id))
}

/// Where a backup's objects are: `backups/<id>/`.
pub fn backup_prefix(backup_id: &str) -> String {
    format!("backups/{backup_id}/")
}

pub fn wal_segment_key(seg: &SegmentName) -> String {
    format!("wal/{:08X}/{seg}.zst", seg.tli)
}

pub fn partial_segment_key(seg: &SegmentName) -> String {
    format!("wal/{:08X}/{seg}.partial.zst", seg.tli)
}

pub fn history_key(tli: TimeLineId) -> String {
    format!("{HISTORY_PREFIX}{}.zst", history_file_name(tli))
}

pub const INDEX_PREFIX: &str = "index/";

/// The index of a complete segment.
pub fn wal_index_key(seg: &SegmentName) -> String {
    format!("{INDEX_PREFIX}{:08X}/{seg}.zst", seg.tli)
}

/// The restore points of a segment (only for segments that have some: a listing finds every
/// restore point of the archive without reading the indexes).
pub fn restore_points_key(seg: &SegmentName) -> String {
    format!("{INDEX_PREFIX}{:08X}/{seg}.points.zst", seg.tli)
}

/// The relation files a segment's transactions removed (and those its records created), only
/// for segments where some were removed: `--before-drop` lists these instead of reading every
/// index.
pub fn drops_key(seg: &SegmentName) -> String {
    format!("{INDEX_PREFIX}{:08X}/{seg}.drops.zst", seg.tli)
}

/// What a key under `index/` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexObject {
    Index(SegmentName),
    Points(SegmentName),
    Drops(SegmentName),
}

/// Parses a key under `index/`; `None` for anything else.
pub fn parse_index_key(key: &str, seg_size: u64) -> Option<IndexObject> {
    let rest = key.strip_prefix(INDEX_PREFIX)?;
    let (dir, file) = rest.split_once('/')?;
    let tli = u32::from_str_radix(dir, 16).ok()?;
    let stem = file.strip_suffix(".zst")?;
    let (name, kind): (&str, fn(SegmentName) -> IndexObject) =
        if let Some(n) = stem.strip_suffix(".points") {
            (n, IndexObject::Points)
        } else if let Some(n) = stem.strip_suffix(".drops") {
            (n, IndexObject::Drops)
        } else {
            (stem, IndexObject::Index)
        };
    let seg = SegmentName::parse(name, seg_size)?;
    if seg.tli != tli || dir.len() != 8 {
        return None;
    }
    Some(kind(seg))
}

/// What a key under `wal/` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalObject {
    Segment(SegmentName),
    Partial(SegmentName),
    History(TimeLineId),
}

/// Parses a key under `wal/`; `None` for anything else.
pub fn parse_wal_key(key: &str, seg_size: u64) -> Option<WalObject> {
    if let Some(name) = key.strip_prefix(HISTORY_PREFIX) {
        return parse_history_file_name(name.strip_suffix(".zst")?).map(WalObject::History);
    }
    let rest = key.strip_prefix(WAL_PREFIX)?;
    let (dir, file) = rest.split_once('/')?;
    let tli = u32::from_str_radix(dir, 16).ok()?;
    let stem = file.strip_suffix(".zst")?;
    let (name, partial) = match stem.strip_suffix(".partial") {
        Some(n) => (n, true),
        None => (stem, false),
    };
    let seg = SegmentName::parse(name, seg_size)?;
    if seg.tli != tli || dir.len() != 8 {
        return None;
    }
    Some(if partial {
        WalObject::Partial(seg)
    } else {
        WalObject::Segment(seg)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn keys_round_trip() {
        let s = SegmentName::new(2, 0x1FF, SEG);
        assert_eq!(
            wal_segment_key(&s),
            "wal/00000002/0000000200000001000000FF.zst"
        );
        assert_eq!(
            parse_wal_key(&wal_segment_key(&s), SEG),
            Some(WalObject::Segment(s))
        );
        assert_eq!(
            parse_wal_key(&partial_segment_key(&s), SEG),
            Some(WalObject::Partial(s))
        );
        assert_eq!(history_key(3), "wal/history/00000003.history.zst");
        assert_eq!(
            parse_wal_key(&history_key(3), SEG),
            Some(WalObject::History(3))
        );
        assert_eq!(
            parse_wal_key("wal/00000001/000000020000000000000001.zst", SEG),
            None
        );
        assert_eq!(parse_wal_key("wal/00000001/junk.zst", SEG), None);
        assert_eq!(parse_wal_key("repo.json", SEG), None);
        assert_eq!(
            wal_index_key(&s),
            "index/00000002/0000000200000001000000FF.zst"
        );
        assert_eq!(
            parse_index_key(&wal_index_key(&s), SEG),
            Some(IndexObject::Index(s))
        );
        assert_eq!(
            parse_index_key(&restore_points_key(&s), SEG),
            Some(IndexObject::Points(s))
        );
        assert_eq!(
            parse_index_key(&drops_key(&s), SEG),
            Some(IndexObject::Drops(s))
        );
        assert_eq!(parse_index_key(&wal_segment_key(&s), SEG), None);
        assert_eq!(parse_wal_key(&wal_index_key(&s), SEG), None);
    }

    #[test]
    fn keys_sort_in_lsn_order() {
        let keys: Vec<String> = [1u64, 2, 255, 256, 4096]
            .iter()
            .map(|n| wal_segment_key(&SegmentName::new(1, *n, SEG)))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
