//! The retention planner: a pure function from the catalog, the WAL objects, a policy and
//! "now" to what an expire keeps and removes, each with its reason.
//!
//! Rules (a backup is kept if any rule keeps it; only complete backups count for the rules):
//! - `keep_last N`: the N newest;
//! - `keep_within D`: every backup started in the last D, and the newest one that finished
//!   before the window began, so that PITR to any instant of the window stays possible;
//! - `keep_hourly/daily/weekly/monthly/quarterly/yearly N`: the newest backup of each of the N
//!   most recent such calendar periods (UTC; weeks are ISO weeks) that hold a backup — as
//!   restic and Borg count them, so a pause in backups never makes older ones go sooner;
//! - a running backup is always kept; a failed one goes once older than the grace period; one
//!   marked `expiring` (an interrupted expire) always goes.
//!
//! WAL (invariant 4, by construction): a segment or partial goes only if its segment lies
//! before the start of the oldest backup kept (running ones included), on every timeline;
//! history files always stay. With no backup kept — no complete or running backup at all —
//! no WAL goes. Gap records wholly before that point go with the WAL they describe.

use std::time::Duration;

use jiff::tz::TimeZone;
use serde::Serialize;

use crate::repo::catalog::{BackupRecord, BackupStatus};
use crate::repo::gaps::Gap;
use crate::repo::layout::WalObject;
use crate::time::Timestamp;
use crate::wal::Lsn;

/// What to keep. Counts of 0 and `None` mean "this rule keeps nothing".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub keep_last: u32,
    #[serde(with = "opt_duration")]
    pub keep_within: Option<Duration>,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_quarterly: u32,
    pub keep_yearly: u32,
    /// A failed backup is removed once this long has passed since it ended.
    #[serde(with = "humantime_duration")]
    pub failed_grace: Duration,
}

impl Policy {
    /// Whether no rule keeps anything: such a policy is refused, never read as "delete all".
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_within.is_none_or(|d| d.is_zero())
            && self.periods().iter().all(|(_, n)| *n == 0)
    }

    /// Whether this policy keeps, by every rule, at least what `other` keeps.
    pub fn keeps_at_least(&self, other: &Policy) -> bool {
        let within = |p: &Policy| p.keep_within.unwrap_or_default();
        self.keep_last >= other.keep_last
            && within(self) >= within(other)
            && self
                .periods()
                .iter()
                .zip(other.periods())
                .all(|((_, a), (_, b))| *a >= b)
    }

    fn periods(&self) -> [(Period, u32); 6] {
        [
            (Period::Hourly, self.keep_hourly),
            (Period::Daily, self.keep_daily),
            (Period::Weekly, self.keep_weekly),
            (Period::Monthly, self.keep_monthly),
            (Period::Quarterly, self.keep_quarterly),
            (Period::Yearly, self.keep_yearly),
        ]
    }
}

mod humantime_duration {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod opt_duration {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::humantime_duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the retention policy keeps nothing: give at least one of keep-last, keep-within, keep-hourly, keep-daily, keep-weekly, keep-monthly, keep-quarterly, keep-yearly (an empty policy never means \"remove everything\")")]
    Empty,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Quarterly,
    Yearly,
}

impl Period {
    /// The calendar period (UTC) `t` falls in, as a sortable key.
    fn key(self, t: Timestamp) -> (i16, i16, i16, i8) {
        let z = t.to_zoned(TimeZone::UTC);
        let (y, m, d, h) = (z.year(), z.month() as i16, z.day() as i16, z.hour());
        match self {
            Period::Hourly => (y, m, d, h),
            Period::Daily => (y, m, d, 0),
            Period::Weekly => {
                let w = z.date().iso_week_date();
                (w.year(), w.week() as i16, 0, 0)
            }
            Period::Monthly => (y, m, 0, 0),
            Period::Quarterly => (y, (m - 1) / 3 + 1, 0, 0),
            Period::Yearly => (y, 0, 0, 0),
        }
    }

    /// The rule's name: `hourly` … `yearly`.
    fn name(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Quarterly => "quarterly",
            Period::Yearly => "yearly",
        }
    }

    fn label(self, t: Timestamp) -> String {
        let (a, b, c, d) = self.key(t);
        match self {
            Period::Hourly => format!("hour {a:04}-{b:02}-{c:02} {d:02}h"),
            Period::Daily => format!("day {a:04}-{b:02}-{c:02}"),
            Period::Weekly => format!("week {a:04}-W{b:02}"),
            Period::Monthly => format!("month {a:04}-{b:02}"),
            Period::Quarterly => format!("quarter {a:04}-Q{b}"),
            Period::Yearly => format!("year {a:04}"),
        }
    }
}

/// What becomes of one backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub id: String,
    pub status: BackupStatus,
    pub keep: bool,
    /// Why: each rule that keeps it, or why it goes.
    pub reasons: Vec<String>,
    /// Bytes its objects take in storage.
    pub stored_bytes: u64,
}

/// A WAL object an expire removes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WalRemoval {
    pub key: String,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Every backup of the catalog, in catalog order.
    pub backups: Vec<Verdict>,
    /// WAL before this position (a segment start) goes, on every timeline; `None`: none goes.
    pub wal_cutoff: Option<Lsn>,
    /// The WAL objects that go, oldest first.
    pub wal: Vec<WalRemoval>,
    /// Gap records that go (the WAL around them is gone).
    pub gaps: Vec<String>,
    /// The WAL that goes, as ranges of segments per timeline.
    pub wal_ranges: Vec<WalRange>,
}

/// Consecutive segments of one timeline that go (partials counted with their segment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WalRange {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub objects: usize,
    pub bytes: u64,
}

impl Plan {
    pub fn removed_backups(&self) -> impl Iterator<Item = &Verdict> {
        self.backups.iter().filter(|v| !v.keep)
    }

    /// Bytes the plan frees in storage.
    pub fn bytes_freed(&self) -> u64 {
        self.removed_backups().map(|v| v.stored_bytes).sum::<u64>()
            + self.wal.iter().map(|w| w.size).sum::<u64>()
    }
}

/// Plans an expire. `wal` holds every WAL object with its key and stored size.
pub fn plan(
    backups: &[BackupRecord],
    wal: &[(WalObject, String, u64)],
    gaps: &[Gap],
    policy: &Policy,
    now: Timestamp,
    seg_size: u64,
) -> Result<Plan, PolicyError> {
    if policy.is_empty() {
        return Err(PolicyError::Empty);
    }
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); backups.len()];
    // Restorable points: complete backups (an incremental one with its whole chain), newest
    // first (by start time, then catalog order).
    let broken = |i: usize| {
        backups[i]
            .parent
            .as_ref()
            .and_then(|_| crate::repo::catalog::chain(backups, &backups[i].id).err())
    };
    let mut complete: Vec<usize> = (0..backups.len())
        .filter(|&i| backups[i].status == BackupStatus::Complete && broken(i).is_none())
        .collect();
    complete.sort_by(|&a, &b| (backups[b].start_time, b).cmp(&(backups[a].start_time, a)));
    for (n, &i) in complete.iter().enumerate() {
        if (n as u32) < policy.keep_last {
            reasons[i].push(format!("keep-last: one of the {} newest", policy.keep_last));
        }
    }
    if let Some(within) = policy.keep_within.filter(|d| !d.is_zero()) {
        let start = now
            .checked_sub(
                jiff::SignedDuration::try_from(within).unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MIN);
        let span = humantime::format_duration(within);
        for &i in &complete {
            if backups[i].start_time >= start {
                reasons[i].push(format!("keep-within: started in the last {span}"));
            }
        }
        // The base of the window's first instant: the newest backup finished before it.
        let base = complete.iter().copied().find(|&i| {
            backups[i].start_time < start && backups[i].stop_time.is_none_or(|t| t <= start)
        });
        if let Some(i) = base {
            reasons[i].push(format!(
                "keep-within: the newest backup before the {span} window, so PITR reaches its start ({start})"
            ));
        }
    }
    for (period, count) in policy.periods() {
        let mut seen = Vec::new();
        for &i in &complete {
            if seen.len() as u32 >= count {
                break;
            }
            let key = period.key(backups[i].start_time);
            if !seen.contains(&key) {
                seen.push(key);
                reasons[i].push(format!(
                    "keep-{}: the newest of {}",
                    period.name(),
                    period.label(backups[i].start_time)
                ));
            }
        }
    }
    let mut verdicts = Vec::with_capacity(backups.len());
    for (i, b) in backups.iter().enumerate() {
        let mut why = std::mem::take(&mut reasons[i]);
        let keep = match b.status {
            BackupStatus::Complete if why.is_empty() => {
                why.push(match broken(i) {
                    Some(e) => format!("cannot be restored: {e}"),
                    None => "no rule keeps it".into(),
                });
                false
            }
            BackupStatus::Complete => true,
            BackupStatus::Running => {
                why.push("running".into());
                true
            }
            BackupStatus::Failed => {
                let ended = b.stop_time.unwrap_or(b.start_time);
                let age = now.duration_since(ended);
                let grace = jiff::SignedDuration::try_from(policy.failed_grace)
                    .unwrap_or(jiff::SignedDuration::MAX);
                if age >= grace {
                    why.push(format!(
                        "failed, and older than the grace period ({})",
                        humantime::format_duration(policy.failed_grace)
                    ));
                    false
                } else {
                    why.push(format!(
                        "failed less than {} ago (kept to read why)",
                        humantime::format_duration(policy.failed_grace)
                    ));
                    true
                }
            }
            BackupStatus::Expiring => {
                why.push("an earlier expire began removing it".into());
                false
            }
        };
        verdicts.push(Verdict {
            id: b.id.clone(),
            status: b.status,
            keep,
            reasons: why,
            stored_bytes: b.stored_bytes,
        });
    }
    // A chain is a unit: every backup a kept incremental backup builds on stays with it.
    let mut changed = true;
    while changed {
        changed = false;
        for i in 0..backups.len() {
            let Some(parent) = backups[i].parent.as_ref().filter(|_| verdicts[i].keep) else {
                continue;
            };
            let Some(j) = backups.iter().position(|b| &b.id == parent) else {
                continue;
            };
            if backups[j].status != BackupStatus::Complete {
                continue;
            }
            let reason = format!(
                "the parent of incremental backup {}, kept with its chain",
                backups[i].id
            );
            if !verdicts[j].keep {
                verdicts[j].keep = true;
                verdicts[j].reasons = vec![reason];
                changed = true;
            } else if !verdicts[j].reasons.contains(&reason) {
                verdicts[j].reasons.push(reason);
            }
        }
    }
    // The oldest start among what stays; WAL before its segment goes.
    let kept_starts = backups
        .iter()
        .zip(&verdicts)
        .filter(|(b, v)| {
            v.keep && matches!(b.status, BackupStatus::Complete | BackupStatus::Running)
        })
        .map(|(b, _)| b.start_lsn);
    let wal_cutoff = kept_starts.min().map(|l| l.segment_start(seg_size));
    let mut removals: Vec<(u64, u32, WalRemoval)> = Vec::new();
    if let Some(cut) = wal_cutoff {
        let cut_segno = cut.0 / seg_size;
        for (obj, key, size) in wal {
            let seg = match obj {
                WalObject::Segment(s) | WalObject::Partial(s) => s,
                WalObject::History(_) => continue,
            };
            if seg.segno < cut_segno {
                removals.push((
                    seg.segno,
                    seg.tli,
                    WalRemoval {
                        key: key.clone(),
                        size: *size,
                    },
                ));
            }
        }
    }
    removals.sort_by(|a, b| (a.0, a.1, &a.2.key).cmp(&(b.0, b.1, &b.2.key)));
    let wal_ranges = ranges(&removals, seg_size);
    let gaps = match wal_cutoff {
        Some(cut) => gaps
            .iter()
            .filter(|g| g.to_lsn <= cut)
            .map(Gap::key)
            .collect(),
        None => Vec::new(),
    };
    Ok(Plan {
        backups: verdicts,
        wal_cutoff,
        wal: removals.into_iter().map(|(_, _, r)| r).collect(),
        wal_ranges,
        gaps,
    })
}

/// Groups removals (sorted by segment, timeline) into runs of consecutive segments per timeline.
fn ranges(removals: &[(u64, u32, WalRemoval)], seg_size: u64) -> Vec<WalRange> {
    let name = |tli, segno| {
        crate::wal::SegmentName {
            tli,
            segno,
            seg_size,
        }
        .to_string()
    };
    let mut by_tli: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
    for (segno, tli, r) in removals {
        by_tli.entry(*tli).or_default().push((*segno, r.size));
    }
    let mut out = Vec::new();
    for (tli, segs) in by_tli {
        // Runs of consecutive segments: (first, last, objects, bytes).
        let mut runs: Vec<(u64, u64, usize, u64)> = Vec::new();
        for (segno, size) in segs {
            match runs.last_mut() {
                Some((_, last, n, b)) if segno <= *last + 1 => {
                    (*last, *n, *b) = (segno, *n + 1, *b + size);
                }
                _ => runs.push((segno, segno, 1, size)),
            }
        }
        out.extend(runs.into_iter().map(|(f, l, objects, bytes)| WalRange {
            timeline: tli,
            first: name(tli, f),
            last: name(tli, l),
            objects,
            bytes,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::SegmentName;

    const SEG: u64 = 16 << 20;

    fn t(s: &str) -> Timestamp {
        crate::time::parse_utc(s).unwrap()
    }

    /// A backup started at `start` (UTC), at WAL segment `segno`.
    fn backup(id: &str, start: &str, segno: u64, status: BackupStatus) -> BackupRecord {
        let start_time = t(start);
        let mut b = BackupRecord::for_test(id, status, Lsn(segno * SEG + 0x28), start_time);
        b.stop_lsn = (status == BackupStatus::Complete).then_some(Lsn(segno * SEG + 0x100));
        b.stop_time = (status != BackupStatus::Running)
            .then(|| start_time + std::time::Duration::from_secs(600));
        b
    }

    fn complete(id: &str, start: &str, segno: u64) -> BackupRecord {
        backup(id, start, segno, BackupStatus::Complete)
    }

    fn kept(p: &Plan) -> Vec<&str> {
        p.backups
            .iter()
            .filter(|v| v.keep)
            .map(|v| v.id.as_str())
            .collect()
    }

    fn run(backups: &[BackupRecord], policy: Policy, now: &str) -> Plan {
        plan(backups, &[], &[], &policy, t(now), SEG).unwrap()
    }

    /// One backup a day at 01:00 from `first` for `days` days, at segment = day number.
    fn daily(first: &str, days: u64) -> Vec<BackupRecord> {
        (0..days)
            .map(|d| {
                let start = t(first) + std::time::Duration::from_secs(d * 86400);
                let mut b = complete(&format!("b{d:03}"), first, d + 1);
                b.start_time = start;
                b.stop_time = Some(start + std::time::Duration::from_secs(600));
                b
            })
            .collect()
    }

    #[test]
    fn an_empty_policy_is_refused() {
        let b = [complete("a", "2026-01-01 01:00:00", 1)];
        let zero = Policy {
            keep_within: Some(Duration::ZERO),
            ..Policy::default()
        };
        for p in [Policy::default(), zero] {
            assert_eq!(
                plan(&b, &[], &[], &p, t("2026-02-01 00:00:00"), SEG),
                Err(PolicyError::Empty)
            );
        }
    }

    #[test]
    fn chains_are_kept_whole() {
        // full f0 ← i1 ← i2, full f3 ← i4; a broken incremental x5 on a failed backup.
        let mut b = daily("2026-03-01 01:00:00", 6);
        for (i, parent) in [(1, "b000"), (2, "b001"), (4, "b003"), (5, "failed")] {
            b[i].parent = Some(parent.into());
        }
        b.push(backup(
            "failed",
            "2026-03-07 01:00:00",
            9,
            BackupStatus::Failed,
        ));
        let keep = |n| Policy {
            keep_last: n,
            ..Policy::default()
        };
        let now = "2026-03-07 00:00:00";
        // keep-last 1: the newest restorable point is i4 (x5 cannot be restored): f3 with it.
        let p = run(&b, keep(1), now);
        assert_eq!(kept(&p), ["b003", "b004", "failed"]);
        assert_eq!(
            p.backups[3].reasons,
            ["the parent of incremental backup b004, kept with its chain"]
        );
        assert!(
            p.backups[5].reasons[0].starts_with("cannot be restored: backup failed"),
            "{:?}",
            p.backups[5].reasons
        );
        // keep-last 3: i4, f3, i2 — and i2's whole chain.
        let p = run(&b, keep(3), now);
        assert_eq!(kept(&p), ["b000", "b001", "b002", "b003", "b004", "failed"]);
        assert_eq!(
            p.backups[0].reasons,
            ["the parent of incremental backup b001, kept with its chain"]
        );
        // WAL from the chain's full backup on stays.
        assert_eq!(p.wal_cutoff, Some(Lsn(SEG)));
    }

    #[test]
    fn keep_last_and_reasons() {
        let b = daily("2026-03-01 01:00:00", 5);
        let p = run(
            &b,
            Policy {
                keep_last: 2,
                ..Policy::default()
            },
            "2026-03-10 00:00:00",
        );
        assert_eq!(kept(&p), ["b003", "b004"]);
        assert_eq!(p.backups[0].reasons, ["no rule keeps it"]);
        assert!(p.backups[4].reasons[0].starts_with("keep-last"));
        // WAL before the oldest kept backup's segment goes: segments 1..4 of b003 (segno 4).
        assert_eq!(p.wal_cutoff, Some(Lsn(4 * SEG)));
    }

    #[test]
    fn calendar_periods_at_their_boundaries() {
        // Month, quarter and year boundaries; a leap day.
        let b = [
            complete("dec31-late", "2023-12-31 23:30:00", 1),
            complete("jan01", "2024-01-01 00:10:00", 2),
            complete("feb28", "2024-02-28 12:00:00", 3),
            complete("feb29", "2024-02-29 12:00:00", 4),
            complete("mar31", "2024-03-31 23:59:59", 5),
            complete("apr01", "2024-04-01 00:00:00", 6),
        ];
        let now = "2024-04-02 00:00:00";
        let monthly = |n| Policy {
            keep_monthly: n,
            ..Policy::default()
        };
        assert_eq!(kept(&run(&b, monthly(3), now)), ["feb29", "mar31", "apr01"]);
        assert_eq!(
            kept(&run(&b, monthly(5), now)),
            ["dec31-late", "jan01", "feb29", "mar31", "apr01"]
        );
        let quarterly = Policy {
            keep_quarterly: 3,
            ..Policy::default()
        };
        assert_eq!(
            kept(&run(&b, quarterly, now)),
            ["dec31-late", "mar31", "apr01"]
        );
        let yearly = Policy {
            keep_yearly: 2,
            ..Policy::default()
        };
        assert_eq!(kept(&run(&b, yearly, now)), ["dec31-late", "apr01"]);
        let daily = Policy {
            keep_daily: 3,
            ..Policy::default()
        };
        let p = run(&b, daily, now);
        assert_eq!(kept(&p), ["feb29", "mar31", "apr01"]);
        assert!(
            p.backups[3].reasons[0].contains("day 2024-02-29"),
            "{:?}",
            p.backups[3]
        );
        // ISO weeks: 2023-12-31 is a Sunday (week 2023-W52), 2024-01-01 a Monday (2024-W01).
        let weekly = Policy {
            keep_weekly: 6,
            ..Policy::default()
        };
        assert_eq!(
            kept(&run(&b, weekly, now)),
            ["dec31-late", "jan01", "feb29", "mar31", "apr01"]
        );
    }

    #[test]
    fn hourly_keeps_the_newest_of_each_hour() {
        let b = [
            complete("a", "2026-05-01 10:05:00", 1),
            complete("b", "2026-05-01 10:55:00", 2),
            complete("c", "2026-05-01 11:00:00", 3),
        ];
        let p = Policy {
            keep_hourly: 24,
            ..Policy::default()
        };
        assert_eq!(kept(&run(&b, p, "2026-05-01 12:00:00")), ["b", "c"]);
    }

    #[test]
    fn the_policy_users_asked_for() {
        // 30 days rolling, one per month for 12 months, one per quarter for 7 years — over
        // three years of daily backups.
        let b = daily("2023-01-01 01:00:00", 3 * 365);
        let p = Policy {
            keep_within: Some(Duration::from_secs(30 * 86400)),
            keep_monthly: 12,
            keep_quarterly: 28,
            ..Policy::default()
        };
        let now = b.last().unwrap().start_time + Duration::from_secs(3600);
        let plan = plan(&b, &[], &[], &p, now, SEG).unwrap();
        let k = kept(&plan);
        // The last backup is 2025-12-30 (2024 is a leap year). 31 for the window (December's
        // 30 and November 30th before it, also November's month-end), 10 more month-ends of
        // 2025, and the 8 quarter-ends of 2023 and 2024 (those of 2025 are month-ends already).
        let within = plan
            .backups
            .iter()
            .filter(|v| v.reasons.iter().any(|r| r.starts_with("keep-within")))
            .count();
        assert_eq!(within, 31);
        assert_eq!(k.len(), 31 + 10 + 8);
        // The oldest kept is the first quarter's last backup: 2023-03-31.
        let oldest = &b[b.iter().position(|r| r.id == k[0]).unwrap()];
        assert_eq!(oldest.start_time.to_string(), "2023-03-31T01:00:00Z");
    }

    #[test]
    fn keep_within_keeps_the_base_of_the_window() {
        // Backups on the 1st, 10th and 20th; a 7-day window ending on the 25th starts on the
        // 18th: the backup of the 10th is its base, the 1st goes.
        let b = [
            complete("d01", "2026-06-01 01:00:00", 1),
            complete("d10", "2026-06-10 01:00:00", 10),
            complete("d20", "2026-06-20 01:00:00", 20),
        ];
        let p = Policy {
            keep_within: Some(Duration::from_secs(7 * 86400)),
            ..Policy::default()
        };
        let plan = run(&b, p, "2026-06-25 00:00:00");
        assert_eq!(kept(&plan), ["d10", "d20"]);
        assert!(plan.backups[1].reasons[0].contains("PITR reaches its start"));
        assert_eq!(plan.wal_cutoff, Some(Lsn(10 * SEG)));
    }

    #[test]
    fn running_failed_and_expiring_backups() {
        let mut b = vec![
            complete("old", "2026-07-01 01:00:00", 1),
            backup("failed-old", "2026-07-02 01:00:00", 2, BackupStatus::Failed),
            backup("failed-new", "2026-07-09 23:00:00", 3, BackupStatus::Failed),
            backup("expiring", "2026-07-03 01:00:00", 4, BackupStatus::Expiring),
            complete("new", "2026-07-09 01:00:00", 5),
            backup("running", "2026-07-09 23:30:00", 6, BackupStatus::Running),
        ];
        let p = Policy {
            keep_last: 1,
            failed_grace: Duration::from_secs(86400),
            ..Policy::default()
        };
        let plan = run(&b, p.clone(), "2026-07-10 00:00:00");
        assert_eq!(kept(&plan), ["failed-new", "new", "running"]);
        assert_eq!(plan.wal_cutoff, Some(Lsn(5 * SEG)));
        // A running backup holds the WAL from its start, even when it started first.
        b[5].start_lsn = Lsn(0x28);
        let plan = run(&b, p.clone(), "2026-07-10 00:00:00");
        assert_eq!(plan.wal_cutoff, Some(Lsn(0)));
        // One that has not read its start position yet (0/0) holds all WAL.
        b[5].start_lsn = Lsn::INVALID;
        assert_eq!(run(&b, p, "2026-07-10 00:00:00").wal_cutoff, Some(Lsn(0)));
    }

    #[test]
    fn wal_before_the_oldest_kept_backup_goes_on_every_timeline_history_stays() {
        let mut b = vec![
            complete("a", "2026-08-01 01:00:00", 3),
            complete("b", "2026-08-02 01:00:00", 6),
        ];
        b[1].timeline = 2;
        let seg = |tli, segno| SegmentName {
            tli,
            segno,
            seg_size: SEG,
        };
        let key = |o: &WalObject| format!("{o:?}");
        let objs: Vec<(WalObject, String, u64)> = [
            WalObject::Segment(seg(1, 4)),
            WalObject::Segment(seg(1, 5)),
            WalObject::Partial(seg(1, 5)),
            WalObject::Segment(seg(2, 5)),
            WalObject::Segment(seg(2, 6)),
            WalObject::Segment(seg(2, 7)),
            WalObject::History(2),
        ]
        .into_iter()
        .map(|o| (o.clone(), key(&o), 1000))
        .collect();
        let gap = Gap {
            from_timeline: 1,
            from_lsn: Lsn(4 * SEG + 0x100),
            timeline: 1,
            to_lsn: Lsn(5 * SEG),
            at: t("2026-08-01 12:00:00"),
            last_received_before: None,
            reason: "test".into(),
        };
        let p = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let plan = plan(
            &b,
            &objs,
            std::slice::from_ref(&gap),
            &p,
            t("2026-08-03 00:00:00"),
            SEG,
        )
        .unwrap();
        assert_eq!(kept(&plan), ["b"]);
        let gone: Vec<&str> = plan.wal.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            gone,
            [
                key(&WalObject::Segment(seg(1, 4))),
                key(&WalObject::Partial(seg(1, 5))),
                key(&WalObject::Segment(seg(1, 5))),
                key(&WalObject::Segment(seg(2, 5))),
            ]
        );
        assert_eq!(plan.gaps, [gap.key()]);
        let r: Vec<(u32, &str, &str, usize)> = plan
            .wal_ranges
            .iter()
            .map(|r| (r.timeline, r.first.as_str(), r.last.as_str(), r.objects))
            .collect();
        assert_eq!(
            r,
            [
                (1, "000000010000000000000004", "000000010000000000000005", 3),
                (2, "000000020000000000000005", "000000020000000000000005", 1)
            ]
        );
        assert_eq!(plan.bytes_freed(), 10 + 4 * 1000);
        // Nothing complete or running: no WAL goes.
        let only_failed = [backup("f", "2026-08-01 01:00:00", 3, BackupStatus::Failed)];
        let plan =
            super::plan(&only_failed, &objs, &[], &p, t("2026-09-01 00:00:00"), SEG).unwrap();
        assert_eq!(plan.wal_cutoff, None);
        assert!(plan.wal.is_empty());
    }
}
