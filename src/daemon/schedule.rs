//! When the daemon's scheduled jobs run: the next occurrence of a cron schedule in its zone,
//! whether one was missed while the daemon was down, and the record of when each job last
//! ran (`<hot>/spool/schedule.json`, written atomically).
//!
//! A missed occurrence runs once at start, however many were missed; a job that has never run
//! counts as missed only for backups (a repository without a backup restores nothing), the
//! others from the daemon's first start on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::daemon::Cron;
use crate::time::Timestamp;

/// A job the daemon runs by the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Job {
    Backup,
    /// An incremental backup (PostgreSQL 17+), or a full one where none can be taken.
    Incremental,
    Verify,
    Drill,
}

impl Job {
    pub const ALL: [Job; 4] = [Job::Backup, Job::Incremental, Job::Verify, Job::Drill];

    pub fn name(self) -> &'static str {
        match self {
            Job::Backup => "backup",
            Job::Incremental => "incremental",
            Job::Verify => "verify",
            Job::Drill => "drill",
        }
    }
}

/// Jobs due together, in the order they run: a full backup due with an incremental one
/// stands for both (the incremental would copy only what changed in between: nothing).
pub fn due_order(mut due: Vec<Job>) -> Vec<Job> {
    if due.contains(&Job::Backup) {
        due.retain(|j| *j != Job::Incremental);
    }
    due.sort();
    due.dedup();
    due
}

/// The first occurrence of `cron` strictly after `after`, read in `tz`.
pub fn next_after(cron: &Cron, tz: &jiff::tz::TimeZone, after: Timestamp) -> Option<Timestamp> {
    let z = after.to_zoned(tz.clone());
    cron.cron
        .find_next_occurrence(&z, false)
        .ok()
        .map(|z| z.timestamp())
}

/// The last occurrence of `cron` at or before `now`.
pub fn last_due(cron: &Cron, tz: &jiff::tz::TimeZone, now: Timestamp) -> Option<Timestamp> {
    let z = now.to_zoned(tz.clone());
    cron.cron
        .find_previous_occurrence(&z, true)
        .ok()
        .map(|z| z.timestamp())
}

/// Whether an occurrence of `cron` came and went without the job running: the last one due
/// is after `last_run` (`None`: never ran; then `since`, when given, stands for it).
pub fn overdue(
    cron: &Cron,
    tz: &jiff::tz::TimeZone,
    last_run: Option<Timestamp>,
    since: Option<Timestamp>,
    now: Timestamp,
) -> bool {
    let Some(due) = last_due(cron, tz, now) else {
        return false;
    };
    match last_run.or(since) {
        Some(t) => due > t,
        None => true,
    }
}

/// When each job last started, and when the daemon first started on this repository.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct JobLog {
    pub first_start: Option<Timestamp>,
    #[serde(default)]
    pub last_run: BTreeMap<Job, Timestamp>,
}

impl JobLog {
    pub fn path(spool: &Path) -> PathBuf {
        spool.join("schedule.json")
    }

    /// The log in `spool` (empty when there is none or it cannot be read: the worst case is
    /// one job run again).
    pub fn load(spool: &Path) -> JobLog {
        std::fs::read(Self::path(spool))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, spool: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::storage::fs::write_atomic(&Self::path(spool), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        crate::time::parse_utc(s).unwrap()
    }

    fn cron(s: &str) -> Cron {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_backup_due_with_an_incremental_one_stands_for_both() {
        use Job::*;
        let cases: [(&[Job], &[Job]); 5] = [
            (&[Incremental, Backup], &[Backup]),
            (&[Incremental], &[Incremental]),
            (&[Drill, Incremental, Verify], &[Incremental, Verify, Drill]),
            (
                &[Verify, Backup, Incremental, Drill],
                &[Backup, Verify, Drill],
            ),
            (&[Backup, Backup], &[Backup]),
        ];
        for (due, want) in cases {
            assert_eq!(due_order(due.to_vec()), want, "{due:?}");
        }
    }

    #[test]
    fn next_and_last_in_a_zone() {
        let utc = jiff::tz::TimeZone::UTC;
        let paris = jiff::tz::TimeZone::get("Europe/Paris").unwrap();
        let c = cron("0 2 * * *");
        assert_eq!(
            next_after(&c, &utc, t("2026-12-04 18:00:00")),
            Some(t("2026-12-05 02:00:00"))
        );
        // 02:00 in Paris is 01:00 UTC in winter, 00:00 UTC in summer.
        assert_eq!(
            next_after(&c, &paris, t("2026-12-04 18:00:00")),
            Some(t("2026-12-05 01:00:00"))
        );
        assert_eq!(
            next_after(&c, &paris, t("2026-07-04 18:00:00")),
            Some(t("2026-07-05 00:00:00"))
        );
        // Exactly at an occurrence: the next one is the following day's.
        assert_eq!(
            next_after(&c, &utc, t("2026-12-05 02:00:00")),
            Some(t("2026-12-06 02:00:00"))
        );
        assert_eq!(
            last_due(&c, &utc, t("2026-12-05 02:00:00")),
            Some(t("2026-12-05 02:00:00"))
        );
        assert_eq!(
            last_due(&cron("0 5 1 * *"), &utc, t("2026-12-04 18:00:00")),
            Some(t("2026-12-01 05:00:00"))
        );
        // Weekly on Sunday (0 and 7 both Sunday).
        assert_eq!(
            next_after(&cron("0 4 * * 0"), &utc, t("2026-12-04 18:00:00")),
            Some(t("2026-12-06 04:00:00"))
        );
    }

    #[test]
    fn missed_runs() {
        let utc = jiff::tz::TimeZone::UTC;
        let c = cron("0 2 * * *");
        let now = t("2026-12-04 18:00:00");
        for (last, since, want) in [
            // Ran after today's 02:00: nothing missed.
            (Some("2026-12-04 02:00:05"), None, false),
            // Last ran yesterday: today's 02:00 was missed.
            (Some("2026-12-03 02:00:05"), None, true),
            // Down for a week: still one run (the caller runs it once).
            (Some("2026-11-27 02:00:00"), None, true),
            // Never ran: missed (backups) ...
            (None, None, true),
            // ... or counted from the first start (verify, drill).
            (None, Some("2026-12-04 10:00:00"), false),
            (None, Some("2026-12-03 10:00:00"), true),
        ] {
            assert_eq!(
                overdue(&c, &utc, last.map(t), since.map(t), now),
                want,
                "{last:?} {since:?}"
            );
        }
    }

    #[test]
    fn the_log_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(JobLog::load(d.path()), JobLog::default());
        let mut l = JobLog {
            first_start: Some(t("2026-12-01 00:00:00")),
            ..Default::default()
        };
        l.last_run.insert(Job::Verify, t("2026-12-04 04:00:00"));
        l.save(d.path()).unwrap();
        assert_eq!(JobLog::load(d.path()), l);
    }
}
