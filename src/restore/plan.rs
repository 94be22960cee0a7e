//! The restore plan as a pure function of the catalog, the WAL inventory and the request: which
//! backup, which timeline path, which WAL segments and history files, and how far the archive can
//! take recovery — or why it cannot reach the target, with the earliest and latest points it can.
//!
//! Timelines follow PostgreSQL (`XLogFileReadAnyTLI`): segment `s` is read from the newest
//! timeline on the path whose beginning lies in a segment `<= s`; the segment where a timeline
//! branches is read from the child's file.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::target::{Target, TimelineChoice};
use crate::repo::catalog::{BackupRecord, BackupStatus};
use crate::repo::gaps::Gap;
use crate::repo::layout::WalObject;
use crate::repo::local_wal::WalSource;
use crate::time::Timestamp;
use crate::wal::timeline::HistoryEntry;
use crate::wal::{Lsn, SegmentName, TimeLineId};

/// What the repository holds of the WAL.
#[derive(Clone, Debug, Default)]
pub struct WalInventory {
    pub segments: BTreeSet<(u64, TimeLineId)>,
    pub partials: BTreeSet<(u64, TimeLineId)>,
    /// Complete segments in the local spool, not yet published.
    pub spool_segments: BTreeSet<(u64, TimeLineId)>,
    /// The segment the stream is receiving, in the local spool: (segno, tli, durable bytes).
    pub spool_tail: Option<(u64, TimeLineId, u64)>,
    /// Parsed history files, by the timeline they describe.
    pub histories: BTreeMap<TimeLineId, Vec<HistoryEntry>>,
    /// When the newest complete segment was archived (microseconds since the epoch): no WAL
    /// in the archive was written after it.
    pub newest_segment_time: Option<Timestamp>,
    /// Holes accepted with `stream --accept-gap`, in LSN order: no plan crosses one.
    pub gaps: Vec<Gap>,
}

impl WalInventory {
    /// From the repository's WAL objects; `histories` are the parsed history files.
    pub fn new(objects: &[WalObject], histories: BTreeMap<TimeLineId, Vec<HistoryEntry>>) -> Self {
        let mut inv = WalInventory {
            histories,
            ..Default::default()
        };
        for o in objects {
            match o {
                WalObject::Segment(s) => {
                    inv.segments.insert((s.segno, s.tli));
                }
                WalObject::Partial(s) => {
                    inv.partials.insert((s.segno, s.tli));
                }
                WalObject::History(_) => {}
            }
        }
        inv
    }

    /// Adds what the local spool holds.
    pub fn add_spool(&mut self, spool: &crate::spool::SpoolWal) {
        for s in &spool.complete {
            self.spool_segments.insert((s.segno, s.tli));
        }
        self.spool_tail = spool.tail.map(|(s, n)| (s.segno, s.tli, n));
    }

    fn newest_timeline(&self) -> TimeLineId {
        let seg_max = self
            .segments
            .iter()
            .chain(&self.spool_segments)
            .map(|(_, t)| *t)
            .chain(self.spool_tail.map(|(_, t, _)| t))
            .max()
            .unwrap_or(1);
        let hist_max = self.histories.keys().copied().max().unwrap_or(1);
        seg_max.max(hist_max)
    }
}

/// One timeline of the path to the target: WAL positions `[begin, end)` are read on `tli`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathStep {
    pub tli: TimeLineId,
    pub begin: Lsn,
    /// `None`: open-ended (the target timeline).
    pub end: Option<Lsn>,
}

/// The timelines from 1 to `tli` (its history file's ancestors, then itself).
fn timeline_path(inv: &WalInventory, tli: TimeLineId) -> Result<Vec<PathStep>, PlanError> {
    let entries: &[HistoryEntry] = match inv.histories.get(&tli) {
        Some(e) => e,
        None if tli == 1 => &[],
        None => return Err(PlanError::from((tli, inv))),
    };
    let mut path = Vec::new();
    let mut begin = Lsn(0);
    for e in entries {
        path.push(PathStep {
            tli: e.tli,
            begin,
            end: Some(e.end),
        });
        begin = e.end;
    }
    path.push(PathStep {
        tli,
        begin,
        end: None,
    });
    Ok(path)
}

/// A run of WAL segments a restore would need that the archive does not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hole {
    pub timeline: TimeLineId,
    /// The first missing position and the first one present again (segment boundaries).
    pub from: Lsn,
    pub to: Lsn,
}

/// What WAL continuity looks like: the holes, and timelines whose history is missing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Continuity {
    pub holes: Vec<Hole>,
    pub problems: Vec<String>,
}

/// Checks that the WAL is unbroken from each complete backup in `backups` to the newest
/// segment of every timeline the archive holds (each timeline read along its history, as a
/// restore reads it). Segments inside a recorded gap are not expected.
pub fn continuity(inv: &WalInventory, backups: &[BackupRecord], seg_size: u64) -> Continuity {
    let mut out = Continuity::default();
    let mut timelines: BTreeSet<TimeLineId> = inv
        .segments
        .iter()
        .chain(&inv.partials)
        .chain(&inv.spool_segments)
        .map(|(_, t)| *t)
        .collect();
    timelines.extend(inv.spool_tail.map(|(_, t, _)| t));
    let present = |segno: u64, tli: TimeLineId| {
        inv.segments.contains(&(segno, tli))
            || inv.partials.contains(&(segno, tli))
            || inv.spool_segments.contains(&(segno, tli))
            || inv
                .spool_tail
                .is_some_and(|(s, t, _)| (s, t) == (segno, tli))
    };
    let in_gap = |segno: u64| {
        let (a, b) = (Lsn(segno * seg_size), Lsn((segno + 1) * seg_size));
        inv.gaps.iter().any(|g| g.from_lsn < b && a < g.to_lsn)
    };
    for tli in timelines {
        let path = match timeline_path(inv, tli) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(e.to_string());
                continue;
            }
        };
        let on_path = |b: &&BackupRecord| {
            b.status == BackupStatus::Complete && path.iter().any(|s| s.tli == b.timeline)
        };
        let Some(start) = backups
            .iter()
            .filter(on_path)
            .map(|b| b.start_lsn.0 / seg_size)
            .min()
        else {
            continue;
        };
        let end = inv
            .segments
            .iter()
            .chain(&inv.partials)
            .chain(&inv.spool_segments)
            .filter(|(_, t)| *t == tli)
            .map(|(s, _)| *s)
            .chain(inv.spool_tail.filter(|t| t.1 == tli).map(|t| t.0))
            .max()
            .unwrap_or(0);
        let mut open: Option<(TimeLineId, u64)> = None;
        for segno in start..=end {
            let t = tli_for_segment(&path, segno, seg_size);
            let missing = !present(segno, t) && !in_gap(segno);
            match (missing, open) {
                (true, None) => open = Some((t, segno)),
                (false, Some((ht, from))) => {
                    out.holes.push(Hole {
                        timeline: ht,
                        from: Lsn(from * seg_size),
                        to: Lsn(segno * seg_size),
                    });
                    open = None;
                }
                _ => {}
            }
        }
        // Each hole once, though several timelines share the segments before their switch.
        out.holes.sort_by_key(|h| (h.from, h.timeline));
        out.holes.dedup();
    }
    out
}

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct Request {
    pub target: Target,
    pub timeline: TimelineChoice,
    /// Force this backup.
    pub backup: Option<String>,
}

/// A segment the restore needs; `partial`: only its first part exists (the archive's end).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NeededSegment {
    pub name: String,
    pub partial: bool,
    /// Where it is read from.
    pub source: WalSource,
}

impl NeededSegment {
    pub fn segment(&self, seg_size: u64) -> SegmentName {
        SegmentName::parse(&self.name, seg_size).expect("plan names are valid")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub backup_id: String,
    pub backup_stop_lsn: Lsn,
    pub timeline: TimeLineId,
    pub path: Vec<PathStep>,
    pub segments: Vec<NeededSegment>,
    pub history_files: Vec<TimeLineId>,
    /// How far the archived WAL reaches along the path (the end of its last complete segment,
    /// or the start of a final partial one).
    pub wal_end: Lsn,
    /// When the WAL ends in a partial segment: how far its durable prefix reaches (None when
    /// that is not known yet: a partial object before it is read).
    pub partial_reaches: Option<Lsn>,
    /// Where the target's search found it (time, xid and name targets; set by the caller that
    /// reads the WAL index, never by the pure planner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub located: Option<super::locate::Located>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the repository has no complete backup")]
    NoBackups,
    #[error("no backup with id {0}")]
    UnknownBackup(String),
    #[error("backup {0} is not complete ({1})")]
    BackupNotComplete(String, String),
    /// An incremental backup whose chain down to a full backup is not whole.
    #[error("backup {0} cannot be restored: {1}")]
    BrokenChain(String, String),
    #[error("timeline {0} has no history file in the archive; archived timelines: {1}")]
    NoHistory(TimeLineId, String),
    #[error(
        "{target} lies before the first point any backup can reach: the earliest is {earliest}"
    )]
    BeforeFirstBackup { target: String, earliest: String },
    #[error("backup {backup} cannot reach {target}: {reason}")]
    BackupCannotReach {
        backup: String,
        target: String,
        reason: String,
    },
    #[error("{target} lies beyond the archive: the WAL reachable from backup {backup} ends at {latest}{gap}")]
    BeyondArchive {
        target: String,
        backup: String,
        latest: Lsn,
        gap: String,
    },
    #[error("{target} lies beyond the archive: its newest WAL was received at {newest}, so no WAL after that can be replayed")]
    TimeBeyondArchive { target: String, newest: String },
    #[error("{target} cannot be reached from backup {backup}: the archive has a gap after it ({gap}), and no restore crosses a gap. Recovery windows: {windows}")]
    AcrossGap {
        target: String,
        backup: String,
        gap: String,
        windows: String,
    },
    #[error("no backup lies on the history of timeline {tli}: {reason}")]
    TimelineUnreachable { tli: TimeLineId, reason: String },
    #[error("the WAL of backup {backup} is incomplete: segment {missing} is missing from the archive (needed up to the backup's end, {stop})")]
    BackupWalMissing {
        backup: String,
        missing: String,
        stop: Lsn,
    },
}

impl From<(TimeLineId, &WalInventory)> for PlanError {
    fn from((tli, inv): (TimeLineId, &WalInventory)) -> Self {
        let mut known: Vec<String> = inv.histories.keys().map(|t| t.to_string()).collect();
        known.insert(0, "1".into());
        PlanError::NoHistory(tli, known.join(", "))
    }
}

/// A stretch of the archive between gaps that a restore can reach, and the backup it starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    /// The oldest complete backup inside the window: restores start from it (or a newer one).
    pub backup: Option<String>,
    /// The window's first reachable point: that backup's end.
    pub from_lsn: Option<Lsn>,
    pub from_time: Option<Timestamp>,
    /// Where the window's WAL ends: the start of the gap after it (`None`: the archive's end).
    pub to_lsn: Option<Lsn>,
    /// When that WAL was received, when known.
    pub to_time: Option<Timestamp>,
}

impl Window {
    pub fn describe(&self) -> String {
        let end = match (self.to_lsn, &self.to_time) {
            (None, _) => "the newest archived WAL".to_string(),
            (Some(l), Some(t)) => format!("{l} (WAL received until {t})"),
            (Some(l), None) => l.to_string(),
        };
        match (&self.backup, self.from_lsn) {
            (Some(b), Some(l)) => format!(
                "from the end of backup {b} ({l}, {}) to {end}",
                self.from_time
                    .map_or_else(|| "time unknown".into(), |t| t.to_string())
            ),
            _ => format!(
                "none yet up to {end}: no complete backup is inside it (take one: archiver backup)"
            ),
        }
    }
}

/// The recovery windows of the archive: one per stretch between recorded gaps, oldest first.
pub fn recovery_windows(backups: &[BackupRecord], gaps: &[Gap]) -> Vec<Window> {
    let mut complete: Vec<&BackupRecord> =
        backups.iter().filter(|b| restorable(backups, b)).collect();
    complete.sort_by_key(|b| b.stop_lsn);
    let mut gaps: Vec<&Gap> = gaps.iter().collect();
    gaps.sort_by_key(|g| g.from_lsn);
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    // Each gap ends a window; the last window runs to the archive's end.
    for end in gaps.into_iter().map(Some).chain([None]) {
        let b = complete.iter().find(|b| {
            b.start_lsn >= begin
                && end.is_none_or(|g| b.stop_lsn.unwrap_or(b.start_lsn) <= g.from_lsn)
        });
        out.push(Window {
            backup: b.map(|b| b.id.clone()),
            from_lsn: b.and_then(|b| b.stop_lsn),
            from_time: b.and_then(|b| b.stop_time),
            to_lsn: end.map(|g| g.from_lsn),
            to_time: end.map(|g| g.window_end()),
        });
        if let Some(g) = end {
            begin = g.to_lsn;
        }
    }
    out
}

/// The first recorded gap after a backup that starts at `start`: the end of its window.
pub fn gap_after(gaps: &[Gap], start: Lsn) -> Option<&Gap> {
    gaps.iter().find(|g| g.to_lsn > start)
}

/// The recovery windows, numbered, in one line (for refusals).
pub fn describe_windows(backups: &[BackupRecord], gaps: &[Gap]) -> String {
    recovery_windows(backups, gaps)
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}) {}", i + 1, w.describe()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The timeline a segment is read from along `path`.
fn tli_for_segment(path: &[PathStep], segno: u64, seg_size: u64) -> TimeLineId {
    path.iter()
        .rev()
        .find(|s| s.begin.0 / seg_size <= segno)
        .map_or(1, |s| s.tli)
}

/// Whether the backup's WAL range lies on the path (its timeline is on it, and the path leaves
/// that timeline no earlier than the backup's end).
fn on_path(path: &[PathStep], b: &BackupRecord) -> Result<(), String> {
    let stop = b.stop_lsn.unwrap_or(b.start_lsn);
    match path.iter().find(|s| s.tli == b.timeline) {
        None => Err(format!(
            "its timeline {} is not an ancestor of timeline {}",
            b.timeline,
            path.last().map_or(1, |s| s.tli)
        )),
        Some(s) if s.end.is_some_and(|e| e < stop) => Err(format!(
            "timeline {} branched off at {} before the backup's end {stop}",
            path.last().map_or(1, |s| s.tli),
            s.end.unwrap()
        )),
        Some(_) => Ok(()),
    }
}

/// Whether backup `b` can serve `target` (its consistent point lies at or before the target).
fn serves(b: &BackupRecord, target: &Target) -> Result<(), String> {
    let stop = b.stop_lsn.unwrap_or(b.start_lsn);
    match target {
        Target::Lsn(l) if *l < stop => Err(format!("it is consistent only from {stop}")),
        Target::Time(t) => match b.stop_time {
            Some(s) if s > *t => Err(format!("it finished at {s}, after the target")),
            None => Err("its end time is unknown".into()),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Whether `b` can be restored: complete, and when incremental, its whole chain too.
pub fn restorable(backups: &[BackupRecord], b: &BackupRecord) -> bool {
    b.status == BackupStatus::Complete
        && b.stop_lsn.is_some()
        && (b.parent.is_none() || crate::repo::catalog::chain(backups, &b.id).is_ok())
}

/// Builds the plan. `backups` may be in any order and include failed ones (ignored).
pub fn plan(
    backups: &[BackupRecord],
    inv: &WalInventory,
    req: &Request,
    seg_size: u64,
) -> Result<Plan, PlanError> {
    let mut complete: Vec<&BackupRecord> =
        backups.iter().filter(|b| restorable(backups, b)).collect();
    complete.sort_by_key(|b| (b.stop_lsn, b.id.clone()));
    let target_desc = req.target.describe();

    // The backup: forced, or the newest one on the path that serves the target.
    let forced = match &req.backup {
        Some(id) => {
            let b = backups
                .iter()
                .find(|b| &b.id == id)
                .ok_or_else(|| PlanError::UnknownBackup(id.clone()))?;
            if b.status != BackupStatus::Complete || b.stop_lsn.is_none() {
                return Err(PlanError::BackupNotComplete(
                    id.clone(),
                    format!("{:?}", b.status).to_lowercase(),
                ));
            }
            if let Err(why) = crate::repo::catalog::chain(backups, id) {
                return Err(PlanError::BrokenChain(id.clone(), why));
            }
            Some(b)
        }
        None => None,
    };
    if complete.is_empty() && forced.is_none() {
        return Err(PlanError::NoBackups);
    }
    let tli = match req.timeline {
        TimelineChoice::Latest => inv.newest_timeline(),
        TimelineChoice::Id(t) => t,
        TimelineChoice::Current => forced
            .or_else(|| complete.last().copied())
            .map_or(1, |b| b.timeline),
    };
    let path = timeline_path(inv, tli)?;

    let backup = match forced {
        Some(b) => {
            on_path(&path, b).map_err(|reason| PlanError::BackupCannotReach {
                backup: b.id.clone(),
                target: target_desc.clone(),
                reason,
            })?;
            serves(b, &req.target).map_err(|reason| PlanError::BackupCannotReach {
                backup: b.id.clone(),
                target: target_desc.clone(),
                reason,
            })?;
            b
        }
        None => {
            let on: Vec<&BackupRecord> = complete
                .iter()
                .copied()
                .filter(|b| on_path(&path, b).is_ok())
                .collect();
            if on.is_empty() {
                let reason = complete
                    .iter()
                    .map(|b| format!("{}: {}", b.id, on_path(&path, b).unwrap_err()))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(PlanError::TimelineUnreachable { tli, reason });
            }
            match on.iter().rev().find(|b| serves(b, &req.target).is_ok()) {
                Some(b) => *b,
                None => {
                    let first = on[0];
                    let earliest = match &req.target {
                        Target::Time(_) => first
                            .stop_time
                            .map_or_else(|| "unknown".into(), |t| t.to_string()),
                        _ => first.stop_lsn.unwrap_or_default().to_string(),
                    };
                    return Err(PlanError::BeforeFirstBackup {
                        target: target_desc,
                        earliest: format!("{earliest} (the end of backup {})", first.id),
                    });
                }
            }
        }
    };

    // Walk the WAL from the backup's start along the path.
    let stop = backup.stop_lsn.expect("complete backups have a stop LSN");
    let first_seg = backup.start_lsn.0 / seg_size;
    let stop_seg = stop.0.saturating_sub(1) / seg_size;
    let mut segments = Vec::new();
    let mut s = first_seg;
    let mut partial_end = false;
    let mut partial_reaches = None;
    loop {
        let t = tli_for_segment(&path, s, seg_size);
        let name = SegmentName::new(t, s, seg_size).to_string();
        let full = if inv.segments.contains(&(s, t)) {
            Some(WalSource::Object)
        } else if inv.spool_segments.contains(&(s, t)) {
            Some(WalSource::SpoolSegment)
        } else {
            None
        };
        if let Some(source) = full {
            segments.push(NeededSegment {
                name,
                partial: false,
                source,
            });
            s += 1;
            continue;
        }
        let partial = match inv.spool_tail {
            Some((ts, tt, bytes)) if (ts, tt) == (s, t) => {
                partial_reaches = Some(Lsn(s * seg_size + bytes));
                Some(WalSource::SpoolTail { bytes })
            }
            _ if inv.partials.contains(&(s, t)) => Some(WalSource::PartialObject),
            _ => None,
        };
        if let Some(source) = partial {
            segments.push(NeededSegment {
                name,
                partial: true,
                source,
            });
            partial_end = true;
        }
        break;
    }
    // `s` is now the first segment not (completely) archived.
    let wal_end = Lsn(s * seg_size);
    let missing_name = SegmentName::new(tli_for_segment(&path, s, seg_size), s, seg_size);
    let covers_stop = s > stop_seg || (partial_end && s == stop_seg);
    if !covers_stop {
        return Err(PlanError::BackupWalMissing {
            backup: backup.id.clone(),
            missing: missing_name.to_string(),
            stop,
        });
    }
    // A recorded gap after the backup ends its window: nothing beyond it is reachable from it.
    if let Some(g) = gap_after(&inv.gaps, backup.start_lsn) {
        let beyond = match &req.target {
            // "latest" means the archive's end; from here only the gap's start is reachable.
            Target::Latest => forced.is_none(),
            Target::Lsn(l) => *l > g.from_lsn,
            Target::Time(t) => *t > g.window_end(),
            _ => false,
        };
        if beyond {
            return Err(PlanError::AcrossGap {
                target: target_desc,
                backup: backup.id.clone(),
                gap: g.describe(),
                windows: describe_windows(backups, &inv.gaps),
            });
        }
        let gap_seg = g.from_lsn.0 / seg_size;
        segments.retain(|n| n.segment(seg_size).segno <= gap_seg);
    }
    let later_exists = inv.segments.range((s + 1, 0)..).next().is_some();
    let gap = if later_exists && !partial_end {
        format!(" (segment {missing_name} is missing; WAL archived after it is unreachable)")
    } else {
        String::new()
    };
    if let Target::Lsn(l) = req.target {
        let need = l.0 / seg_size;
        let reachable = (need < s || (partial_end && need == s))
            && !matches!(partial_reaches, Some(r) if need == s && l > r);
        if !reachable {
            return Err(PlanError::BeyondArchive {
                target: target_desc,
                backup: backup.id.clone(),
                latest: partial_reaches.unwrap_or(wal_end),
                gap,
            });
        }
        // Only the segments up to the target are needed.
        segments.truncate((need - first_seg + 1) as usize);
    }
    if let (Target::Time(t), Some(newest)) = (&req.target, inv.newest_segment_time) {
        if *t > newest {
            return Err(PlanError::TimeBeyondArchive {
                target: target_desc,
                newest: newest.to_string(),
            });
        }
    }
    if matches!(req.target, Target::Immediate) {
        segments.truncate((stop_seg - first_seg + 1) as usize);
    }
    let history_files = path.iter().filter(|p| p.tli > 1).map(|p| p.tli).collect();
    Ok(Plan {
        backup_id: backup.id.clone(),
        backup_stop_lsn: stop,
        timeline: tli,
        path,
        segments,
        history_files,
        wal_end,
        partial_reaches,
        located: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn backup(
        id: &str,
        tli: TimeLineId,
        start_seg: u64,
        stop: u64,
        stop_time: &str,
    ) -> BackupRecord {
        let t = stop_time.parse().unwrap();
        let mut b =
            BackupRecord::for_test(id, BackupStatus::Complete, Lsn(start_seg * SEG + 0x28), t);
        b.stop_lsn = Some(Lsn(stop));
        b.timeline = tli;
        b.stop_time = Some(t);
        b
    }

    fn inv(
        segs: &[(u64, TimeLineId)],
        partials: &[(u64, TimeLineId)],
        hist: &[(TimeLineId, &[(TimeLineId, u64)])],
    ) -> WalInventory {
        WalInventory {
            newest_segment_time: None,
            gaps: Vec::new(),
            spool_segments: Default::default(),
            spool_tail: None,
            segments: segs.iter().copied().collect(),
            partials: partials.iter().copied().collect(),
            histories: hist
                .iter()
                .map(|(t, e)| {
                    (
                        *t,
                        e.iter()
                            .map(|(tli, end)| HistoryEntry {
                                tli: *tli,
                                end: Lsn(*end),
                            })
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    fn req(target: Target) -> Request {
        Request {
            target,
            timeline: TimelineChoice::Latest,
            backup: None,
        }
    }

    fn names(p: &Plan) -> Vec<String> {
        p.segments
            .iter()
            .map(|s| {
                format!(
                    "{}{}",
                    &s.name[..8].trim_start_matches('0'),
                    &s.name[16..24].trim_start_matches('0')
                ) + if s.partial { "p" } else { "" }
            })
            .collect()
    }

    #[test]
    fn an_incremental_backup_serves_only_with_its_whole_chain() {
        // Full A (segs 2-3), incremental B on A (6-7), incremental C on a failed one (8).
        let mut bs = vec![
            backup("A", 1, 2, 3 * SEG + 0x100, "2026-11-23T01:00:00Z"),
            backup("B", 1, 6, 7 * SEG + 0x100, "2026-11-23T02:00:00Z"),
            backup("X", 1, 7, 7 * SEG + 0x200, "2026-11-23T02:10:00Z"),
            backup("C", 1, 8, 8 * SEG + 0x100, "2026-11-23T03:00:00Z"),
        ];
        bs[1].parent = Some("A".into());
        bs[2].status = BackupStatus::Failed;
        bs[3].parent = Some("X".into());
        let i = inv(&(2..=9).map(|s| (s, 1)).collect::<Vec<_>>(), &[], &[]);
        assert_eq!(
            plan(&bs, &i, &req(Target::Latest), SEG).unwrap().backup_id,
            "B"
        );
        let mut forced = req(Target::Latest);
        forced.backup = Some("C".into());
        match plan(&bs, &i, &forced, SEG) {
            Err(PlanError::BrokenChain(id, why)) => {
                assert_eq!(id, "C");
                assert!(
                    why.contains("backup X, the parent of incremental backup C, is failed"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // The parent gone: B no longer serves; A does.
        bs.remove(0);
        bs.insert(
            0,
            backup("A2", 1, 2, 3 * SEG + 0x100, "2026-11-23T01:00:00Z"),
        );
        assert_eq!(
            plan(&bs, &i, &req(Target::Latest), SEG).unwrap().backup_id,
            "A2"
        );
    }

    #[test]
    fn picks_the_newest_backup_that_serves_the_target() {
        // Backups A (segs 2-3) and B (segs 6-7); WAL 2..=9 on timeline 1.
        let bs = [
            backup("A", 1, 2, 3 * SEG + 0x100, "2026-11-23T01:00:00Z"),
            backup("B", 1, 6, 7 * SEG + 0x100, "2026-11-23T02:00:00Z"),
        ];
        let i = inv(&(2..=9).map(|s| (s, 1)).collect::<Vec<_>>(), &[], &[]);
        let t = |s: &str| crate::time::parse_utc(s).unwrap();
        let cases: Vec<(Target, &str, usize)> = vec![
            (Target::Latest, "B", 4),
            (Target::Time(t("2026-11-23 01:30:00")), "A", 8),
            (Target::Time(t("2026-11-23 02:00:00")), "B", 4),
            (Target::Lsn(Lsn(5 * SEG)), "A", 4),
            (Target::Lsn(Lsn(7 * SEG + 0x200)), "B", 2),
            (Target::Immediate, "B", 2),
            (Target::Xid(1234), "B", 4),
            (Target::Name("before".into()), "B", 4),
        ];
        for (target, want, n) in cases {
            let p = plan(&bs, &i, &req(target.clone()), SEG).unwrap();
            assert_eq!(
                (p.backup_id.as_str(), p.segments.len()),
                (want, n),
                "{target:?}: {:?}",
                names(&p)
            );
            assert_eq!(p.wal_end, Lsn(10 * SEG));
        }
        // Forcing A for a late target works; forcing B for an early one is refused.
        let mut r = req(Target::Latest);
        r.backup = Some("A".into());
        assert_eq!(plan(&bs, &i, &r, SEG).unwrap().segments.len(), 8);
        let mut r = req(Target::Lsn(Lsn(4 * SEG)));
        r.backup = Some("B".into());
        assert!(matches!(
            plan(&bs, &i, &r, SEG),
            Err(PlanError::BackupCannotReach { .. })
        ));
        r.backup = Some("nope".into());
        assert_eq!(
            plan(&bs, &i, &r, SEG).unwrap_err(),
            PlanError::UnknownBackup("nope".into())
        );
    }

    #[test]
    fn refusals_name_the_reachable_range() {
        let bs = [backup("A", 1, 2, 3 * SEG + 0x100, "2026-11-23T01:00:00Z")];
        // A gap at segment 6: WAL reaches 6/0 only.
        let i = inv(&[(2, 1), (3, 1), (4, 1), (5, 1), (7, 1)], &[], &[]);
        let t = crate::time::parse_utc("2026-11-23 00:30:00Z").unwrap();
        match plan(&bs, &i, &req(Target::Time(t)), SEG).unwrap_err() {
            PlanError::BeforeFirstBackup { earliest, .. } => {
                assert!(earliest.contains("2026-11-23T01:00:00"), "{earliest}")
            }
            e => panic!("{e}"),
        }
        let e = plan(&bs, &i, &req(Target::Lsn(Lsn(7 * SEG))), SEG).unwrap_err();
        assert!(
            matches!(&e, PlanError::BeyondArchive { latest, gap, .. } if *latest == Lsn(6 * SEG) && gap.contains("000000010000000000000006")),
            "{e}"
        );
        assert!(plan(&bs, &i, &req(Target::Lsn(Lsn(6 * SEG - 1))), SEG).is_ok());
        // A time after the newest archived segment was written.
        let mut late = inv(&[(2, 1), (3, 1), (4, 1)], &[], &[]);
        late.newest_segment_time = Some(crate::time::parse_utc("2026-11-23 03:00:00").unwrap());
        let t = crate::time::parse_utc("2026-11-23 03:00:01").unwrap();
        assert!(matches!(
            plan(&bs, &late, &req(Target::Time(t)), SEG),
            Err(PlanError::TimeBeyondArchive { .. })
        ));
        let t = crate::time::parse_utc("2026-11-23 02:59:00").unwrap();
        assert!(plan(&bs, &late, &req(Target::Time(t)), SEG).is_ok());
        // The backup's own WAL incomplete.
        let i = inv(&[(2, 1)], &[], &[]);
        assert!(matches!(
            plan(&bs, &i, &req(Target::Latest), SEG),
            Err(PlanError::BackupWalMissing { .. })
        ));
        // Its stop segment archived only as a partial (a standby backup): fine.
        let i = inv(&[(2, 1)], &[(3, 1)], &[]);
        let p = plan(&bs, &i, &req(Target::Immediate), SEG).unwrap();
        assert_eq!(names(&p), ["12", "13p"]);
        assert!(matches!(
            plan(&[], &i, &req(Target::Latest), SEG),
            Err(PlanError::NoBackups)
        ));
    }

    #[test]
    fn the_local_spool_extends_the_archive() {
        let bs = [backup("A", 1, 2, 2 * SEG + 0x100, "2026-11-23T01:00:00Z")];
        // Objects 2-3, segment 4 complete in the spool, 5 being received (0x5000 bytes durable),
        // and an older shipped partial of 5 that the spool's longer prefix supersedes.
        let mut i = inv(&[(2, 1), (3, 1)], &[(5, 1)], &[]);
        i.spool_segments.insert((4, 1));
        i.spool_tail = Some((5, 1, 0x5000));
        let p = plan(&bs, &i, &req(Target::Latest), SEG).unwrap();
        assert_eq!(names(&p), ["12", "13", "14", "15p"]);
        let sources: Vec<WalSource> = p.segments.iter().map(|s| s.source).collect();
        assert_eq!(
            sources,
            [
                WalSource::Object,
                WalSource::Object,
                WalSource::SpoolSegment,
                WalSource::SpoolTail { bytes: 0x5000 }
            ]
        );
        assert_eq!(p.partial_reaches, Some(Lsn(5 * SEG + 0x5000)));
        // An LSN inside the durable prefix is reachable; one after it is refused naming it.
        assert!(plan(&bs, &i, &req(Target::Lsn(Lsn(5 * SEG + 0x4000))), SEG).is_ok());
        let e = plan(&bs, &i, &req(Target::Lsn(Lsn(5 * SEG + 0x6000))), SEG).unwrap_err();
        assert!(
            matches!(e, PlanError::BeyondArchive { latest, .. } if latest == Lsn(5 * SEG + 0x5000)),
            "{e}"
        );
        // Without the spool, segment 4 is missing: the WAL ends after segment 3.
        i.spool_segments.clear();
        i.spool_tail = None;
        let p = plan(&bs, &i, &req(Target::Latest), SEG).unwrap();
        assert_eq!(names(&p), ["12", "13"]);
    }

    #[test]
    fn no_plan_crosses_a_recorded_gap() {
        // A (segs 2-3) before a gap [5/0x4000, 9/0); B (segs 9-10) after it; WAL 2-4, 5 partial,
        // 9-11. The WAL before the gap was last received at 01:30.
        let bs = [
            backup("A", 1, 2, 3 * SEG + 0x100, "2026-11-23T01:00:00Z"),
            backup("B", 1, 9, 10 * SEG + 0x100, "2026-11-23T03:00:00Z"),
        ];
        let mut i = inv(
            &[(2, 1), (3, 1), (4, 1), (9, 1), (10, 1), (11, 1)],
            &[(5, 1)],
            &[],
        );
        i.gaps = vec![Gap {
            from_timeline: 1,
            from_lsn: Lsn(5 * SEG + 0x4000),
            timeline: 1,
            to_lsn: Lsn(9 * SEG),
            at: "2026-11-23T02:30:00Z".parse().unwrap(),
            last_received_before: Some("2026-11-23T01:30:00Z".parse().unwrap()),
            reason: "requested WAL segment has already been removed".into(),
        }];
        let t = |s: &str| Target::Time(crate::time::parse_utc(s).unwrap());
        // Each side of the gap restores; window 1 ends with the partial before the gap.
        let p = plan(&bs, &i, &req(t("2026-11-23 01:20:00")), SEG).unwrap();
        assert_eq!(
            (p.backup_id.as_str(), names(&p)),
            (
                "A",
                vec!["12".into(), "13".into(), "14".into(), "15p".into()]
            )
        );
        let p = plan(&bs, &i, &req(Target::Lsn(Lsn(5 * SEG + 0x3000))), SEG).unwrap();
        assert_eq!(p.backup_id, "A");
        let p = plan(&bs, &i, &req(Target::Latest), SEG).unwrap();
        assert_eq!((p.backup_id.as_str(), names(&p).len()), ("B", 3));
        let p = plan(&bs, &i, &req(t("2026-11-23 03:10:00")), SEG).unwrap();
        assert_eq!(p.backup_id, "B");
        // A target inside the gap is refused, naming both windows.
        for target in [
            t("2026-11-23 02:00:00"),
            Target::Lsn(Lsn(5 * SEG + 0x5000)),
            Target::Lsn(Lsn(8 * SEG)),
        ] {
            let e = plan(&bs, &i, &req(target.clone()), SEG).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, PlanError::AcrossGap { .. }),
                "{target:?}: {msg}"
            );
            assert!(
                msg.contains("1) from the end of backup A")
                    && msg.contains("2) from the end of backup B"),
                "{msg}"
            );
            assert!(
                msg.contains("0/5004000") && msg.contains("0/9000000"),
                "{msg}"
            );
        }
        // "latest" from A (forced) ends at the gap; without B, latest is refused.
        let mut r = req(Target::Latest);
        r.backup = Some("A".into());
        let p = plan(&bs, &i, &r, SEG).unwrap();
        assert_eq!(names(&p).last().unwrap(), "15p");
        assert!(matches!(
            plan(&bs[..1], &i, &req(Target::Latest), SEG),
            Err(PlanError::AcrossGap { .. })
        ));
        // The windows.
        let w = recovery_windows(&bs, &i.gaps);
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].backup.as_deref(), w[0].to_lsn),
            (Some("A"), Some(Lsn(5 * SEG + 0x4000)))
        );
        assert_eq!(
            w[0].to_time.map(|t| t.to_string()).as_deref(),
            Some("2026-11-23T01:30:00Z")
        );
        assert_eq!((w[1].backup.as_deref(), w[1].to_lsn), (Some("B"), None));
        let w = recovery_windows(&bs[..1], &i.gaps);
        assert_eq!(w[1].backup, None);
        assert!(
            w[1].describe().contains("archiver backup"),
            "{}",
            w[1].describe()
        );
    }

    #[test]
    fn continuity_names_each_hole_on_every_timeline() {
        // Timeline 2 branched from 1 inside segment 5; timeline 1 went on to 7 (segment 6 lost).
        let switch = 5 * SEG + 0x3000;
        let hist: &[(TimeLineId, &[(TimeLineId, u64)])] = &[(2, &[(1, switch)])];
        let segs = [(2, 1), (3, 1), (4, 1), (7, 1), (5, 2), (6, 2), (8, 2)];
        let mut i = inv(&segs, &[(5, 1)], hist);
        let bs = [backup("A", 1, 2, 2 * SEG + 0x100, "2026-11-23T01:00:00Z")];
        let c = continuity(&i, &bs, SEG);
        let hole = |tli, a: u64, b: u64| Hole {
            timeline: tli,
            from: Lsn(a * SEG),
            to: Lsn(b * SEG),
        };
        assert_eq!(c.holes, [hole(1, 6, 7), hole(2, 7, 8)]);
        assert!(c.problems.is_empty());
        // A hole inside a recorded gap is expected; without a backup nothing is needed.
        i.gaps = vec![Gap {
            from_timeline: 2,
            from_lsn: Lsn(7 * SEG),
            timeline: 2,
            to_lsn: Lsn(8 * SEG),
            at: "2026-11-23T02:30:00Z".parse().unwrap(),
            last_received_before: None,
            reason: "test".into(),
        }];
        assert_eq!(continuity(&i, &bs, SEG).holes, [hole(1, 6, 7)]);
        assert_eq!(continuity(&i, &[], SEG), Continuity::default());
        // A timeline without its history file is named.
        i.histories.clear();
        let c = continuity(&i, &bs, SEG);
        assert_eq!(c.problems.len(), 1, "{c:?}");
    }

    #[test]
    fn follows_timelines() {
        // Timeline 2 branched from 1 at 5/0x3000 (inside segment 5); tli 1 continued to 7 elsewhere.
        let switch = 5 * SEG + 0x3000;
        let hist: &[(TimeLineId, &[(TimeLineId, u64)])] = &[(2, &[(1, switch)])];
        let i = inv(
            &[
                (2, 1),
                (3, 1),
                (4, 1),
                (6, 1),
                (7, 1),
                (5, 2),
                (6, 2),
                (7, 2),
            ],
            &[(5, 1)],
            hist,
        );
        let bs = [backup("A", 1, 2, 2 * SEG + 0x100, "2026-11-23T01:00:00Z")];
        // Latest: timeline 2, its file for the switch segment.
        let p = plan(&bs, &i, &req(Target::Latest), SEG).unwrap();
        assert_eq!(p.timeline, 2);
        assert_eq!(names(&p), ["12", "13", "14", "25", "26", "27"]);
        assert_eq!(p.history_files, [2]);
        // Timeline 1 (before the promotion): its partial segment 5 ends the WAL.
        let mut r = req(Target::Lsn(Lsn(5 * SEG + 0x1000)));
        r.timeline = TimelineChoice::Id(1);
        let p = plan(&bs, &i, &r, SEG).unwrap();
        assert_eq!(names(&p), ["12", "13", "14", "15p"]);
        // A backup taken on timeline 2 cannot serve timeline 1.
        let b2 = [backup("B", 2, 6, 6 * SEG + 0x100, "2026-11-23T02:00:00Z")];
        assert!(matches!(
            plan(&b2, &i, &r, SEG),
            Err(PlanError::TimelineUnreachable { .. })
        ));
        // A timeline with no history file.
        let mut r = req(Target::Latest);
        r.timeline = TimelineChoice::Id(3);
        assert!(matches!(
            plan(&bs, &i, &r, SEG),
            Err(PlanError::NoHistory(3, _))
        ));
    }
}
