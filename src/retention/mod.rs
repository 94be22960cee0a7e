//! Retention: applying a policy to a repository (`archiver expire`). [`plan`] decides, purely;
//! this module carries the plan out.
//!
//! Invariants:
//! - invariant 4 of the guide: nothing a kept backup needs is removed — the plan removes WAL
//!   only before the oldest kept (or running) backup's start, and a backup only when no rule
//!   keeps it;
//! - one expire at a time per repository (a lock in its local directory); a streamer or a
//!   backup running meanwhile is safe: the streamer only adds WAL after the head, and a running
//!   backup is kept with the WAL from its start;
//! - crash safety (kill -9 at any instant): a backup is first marked `expiring` in the catalog
//!   (never restorable again), then its objects go, then its record; WAL goes oldest first, so
//!   what remains is always one unbroken run up to the archive's head; the next expire finishes
//!   an interrupted one (an `expiring` backup always goes);
//! - relation-name snapshots (`relmaps/`) go once no kept WAL can use them ([`stale_relmaps`]),
//!   after the WAL.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tracing::{info, warn};

use crate::repo::catalog::BackupStatus;
use crate::repo::layout::{
    backup_prefix, catalog_key, drops_key, parse_wal_key, restore_points_key, wal_index_key,
    WalObject, WAL_PREFIX,
};
use crate::repo::lock::{LockError, RepoLock};
use crate::repo::relmap::RELMAP_PREFIX;
use crate::repo::{Repo, RepoError};
use crate::storage::{Storage, StorageError};
use crate::time::Timestamp;
use crate::wal::Lsn;

pub mod plan;

pub use plan::{Plan, Policy, PolicyError};

#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("another expire is running on this repository ({0})")]
    Busy(String),
    #[error("cannot lock the repository for expire")]
    Lock(#[source] LockError),
}

impl From<StorageError> for ExpireError {
    fn from(e: StorageError) -> Self {
        ExpireError::Repo(e.into())
    }
}

/// What an expire did (or, with `dry_run`, would do).
#[derive(Debug, Serialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub now: Timestamp,
    pub policy: Policy,
    pub plan: Plan,
    /// Backups whose objects and record are gone.
    pub removed_backups: Vec<String>,
    pub removed_wal_objects: usize,
    /// Relation-name snapshots no kept WAL can use ([`stale_relmaps`]).
    pub removed_relmaps: usize,
    pub bytes_freed: u64,
    /// Objects the storage would not remove (still under S3 Object Lock, say), with why; their
    /// backup stays `expiring` and a later expire removes them.
    pub skipped: Vec<String>,
}

/// Plans an expire of `repo` under `policy` at `now` and, unless `dry_run`, carries it out.
/// `local_dir` is the repository's local directory (the lock lives in its `spool/`).
pub async fn expire(
    repo: &Repo,
    local_dir: &Path,
    policy: &Policy,
    now: Timestamp,
    dry_run: bool,
) -> Result<ExpireReport, ExpireError> {
    let _lock = lock(local_dir, dry_run)?;
    expire_locked(repo, policy, now, dry_run).await
}

/// One tier of a tiered repository and its policy.
pub struct TierPolicy {
    pub name: String,
    pub repo: Repo,
    /// `None`: no policy for this tier; nothing is expired there.
    pub policy: Option<Policy>,
}

/// Expires each tier of a tiered repository under its own policy (a hot tier keeps days, an
/// offsite one years): each plan is made from what that tier holds, and carried out there
/// only. A backup is gone once no tier holds it.
pub async fn expire_tiers(
    tiers: &[TierPolicy],
    local_dir: &Path,
    now: Timestamp,
    dry_run: bool,
) -> Result<Vec<(String, Option<ExpireReport>)>, ExpireError> {
    let _lock = lock(local_dir, dry_run)?;
    let mut out = Vec::new();
    for t in tiers {
        let report = match &t.policy {
            Some(p) => Some(expire_locked(&t.repo, p, now, dry_run).await?),
            None => None,
        };
        out.push((t.name.clone(), report));
    }
    Ok(out)
}

/// Each tier of a tiered repository with its policy: `flags` when given (for every tier), else
/// `[remote.retention]` for a remote tier and `[retention]` for the rest. `tiers`: each
/// tier's name and storage, the hot tier first (as `RepoLocation::each_tier` lists them). Refuses when no
/// tier has a policy, or one is empty; warns when a remote tier keeps less than the hot one.
pub async fn tier_policies(
    config: &crate::config::Config,
    tiers: Vec<(String, Arc<dyn Storage>)>,
    flags: Option<Policy>,
) -> Result<Vec<TierPolicy>, ExpireError> {
    let mut out = Vec::new();
    for (name, storage) in tiers {
        let own = config
            .remotes
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.retention.as_ref());
        let policy = flags
            .clone()
            .or_else(|| own.or(config.retention.as_ref()).map(Policy::from));
        if policy.as_ref().is_some_and(Policy::is_empty) {
            return Err(ExpireError::Policy(PolicyError::Empty));
        }
        let repo = Repo::open(storage, &name).await?;
        out.push(TierPolicy { name, repo, policy });
    }
    if let Some(hot) = out.first().and_then(|t| t.policy.clone()) {
        for t in &out[1..] {
            if t.policy.as_ref().is_some_and(|p| !p.keeps_at_least(&hot)) {
                warn!(tier = %t.name, "this tier's retention keeps less than the hot tier's: what it expires while the hot tier still holds it is shipped to it again");
            }
        }
    }
    if out.iter().all(|t| t.policy.is_none()) {
        return Err(ExpireError::Policy(PolicyError::Empty));
    }
    Ok(out)
}

impl From<&crate::config::RetentionConfig> for Policy {
    fn from(r: &crate::config::RetentionConfig) -> Policy {
        Policy {
            keep_last: r.keep_last,
            keep_within: r.keep_within,
            keep_hourly: r.keep_hourly,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
            keep_quarterly: r.keep_quarterly,
            keep_yearly: r.keep_yearly,
            failed_grace: r
                .failed_grace
                .unwrap_or(std::time::Duration::from_secs(86_400)),
        }
    }
}

/// One expire at a time per repository (none needed for a dry run).
fn lock(local_dir: &Path, dry_run: bool) -> Result<Option<RepoLock>, ExpireError> {
    if dry_run {
        return Ok(None);
    }
    let dir = local_dir.join(crate::repo::SPOOL_DIR);
    crate::storage::fs::create_dir_all_durable(&dir).map_err(|cause| {
        ExpireError::Lock(LockError::Io {
            path: dir.clone(),
            cause,
        })
    })?;
    match RepoLock::acquire(&dir.join("expire.lock")) {
        Ok(l) => Ok(Some(l)),
        Err(LockError::Busy { .. }) => Err(ExpireError::Busy(local_dir.display().to_string())),
        Err(e) => Err(ExpireError::Lock(e)),
    }
}

async fn expire_locked(
    repo: &Repo,
    policy: &Policy,
    now: Timestamp,
    dry_run: bool,
) -> Result<ExpireReport, ExpireError> {
    let backups = repo.list_backups().await?;
    let seg_size = repo.seg_size();
    let wal: Vec<_> = repo
        .storage()
        .list(WAL_PREFIX)
        .await?
        .into_iter()
        .filter_map(|m| parse_wal_key(&m.key, seg_size).map(|o| (o, m.key, m.size)))
        .collect();
    let gaps = repo.list_gaps().await?;
    let plan = plan::plan(&backups, &wal, &gaps, policy, now, seg_size)?;
    let mut report = ExpireReport {
        dry_run,
        now,
        policy: policy.clone(),
        removed_backups: Vec::new(),
        removed_wal_objects: 0,
        removed_relmaps: 0,
        bytes_freed: 0,
        skipped: Vec::new(),
        plan,
    };
    // The relation-name snapshots before the plan's WAL cutoff but the newest one are of no
    // further use.
    let stale = match report.plan.wal_cutoff {
        Some(cutoff) => {
            let relmaps: Vec<String> = repo
                .storage()
                .list(RELMAP_PREFIX)
                .await?
                .into_iter()
                .map(|m| m.key)
                .collect();
            stale_relmaps(&relmaps, Some(cutoff))
        }
        None => Vec::new(),
    };
    if dry_run {
        report.bytes_freed = report.plan.bytes_freed();
        report.removed_relmaps = stale.len();
        return Ok(report);
    }
    let storage = repo.storage();
    // The plan's verdicts are in catalog order.
    for (rec, v) in backups.iter().zip(&report.plan.backups) {
        if v.keep {
            continue;
        }
        let mut rec = rec.clone();
        if rec.status != BackupStatus::Expiring {
            rec.status = BackupStatus::Expiring;
            repo.put_backup(&rec).await?;
        }
        let mut keys: Vec<String> = rec.objects.iter().map(|o| o.key.clone()).collect();
        let prefix = backup_prefix(&rec.id);
        keys.extend(storage.list(&prefix).await?.into_iter().map(|m| m.key));
        keys.sort();
        keys.dedup();
        let mut all_gone = true;
        for k in &keys {
            if let Err(e) = remove(storage.as_ref(), k, &mut report.skipped).await? {
                warn!(key = %k, error = %e, "kept for a later expire");
                all_gone = false;
            }
        }
        if all_gone {
            storage.delete_prefix(&prefix).await?;
            storage.delete(&catalog_key(&rec.id)).await?;
            report.bytes_freed += v.stored_bytes;
            report.removed_backups.push(rec.id.clone());
            info!(backup = %rec.id, reasons = %v.reasons.join("; "), "backup expired");
        }
    }
    for w in &report.plan.wal {
        if remove(storage.as_ref(), &w.key, &mut report.skipped)
            .await?
            .is_ok()
        {
            report.removed_wal_objects += 1;
            report.bytes_freed += w.size;
            // The segment's index goes with it (deleting a missing key succeeds).
            if let Some(WalObject::Segment(seg)) = parse_wal_key(&w.key, seg_size) {
                for k in [
                    wal_index_key(&seg),
                    restore_points_key(&seg),
                    drops_key(&seg),
                ] {
                    let _ = remove(storage.as_ref(), &k, &mut report.skipped).await?;
                }
            }
        }
    }
    for g in &report.plan.gaps {
        let _ = remove(storage.as_ref(), g, &mut report.skipped).await?;
    }
    for k in &stale {
        if remove(storage.as_ref(), k, &mut report.skipped)
            .await?
            .is_ok()
        {
            report.removed_relmaps += 1;
        }
    }
    info!(
        backups = report.removed_backups.len(),
        wal_objects = report.removed_wal_objects,
        bytes = report.bytes_freed,
        skipped = report.skipped.len(),
        "expire done"
    );
    Ok(report)
}

/// The relation-name snapshots among `keys` (`relmaps/<LSN, 16 hex>.zst`) that no WAL from
/// `oldest_wal` on (the plan's WAL cutoff: everything before it goes) can use. A file removed at LSN L is named by the newest snapshot taken before
/// L ([`crate::repo::relmap`]), so of the snapshots taken before the oldest kept WAL only
/// the newest is still needed; without kept WAL (`None`) nothing is stale. Keys that are not
/// snapshots are left alone.
pub(crate) fn stale_relmaps(keys: &[String], oldest_wal: Option<Lsn>) -> Vec<String> {
    let Some(oldest) = oldest_wal else {
        return Vec::new();
    };
    let mut before: Vec<(u64, &String)> = keys
        .iter()
        .filter_map(|k| {
            let hex = k.strip_prefix(RELMAP_PREFIX)?.strip_suffix(".zst")?;
            let lsn = u64::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.len() == 16)?;
            (lsn < oldest.0).then_some((lsn, k))
        })
        .collect();
    before.sort();
    before.pop();
    before.into_iter().map(|(_, k)| k.clone()).collect()
}

/// Deletes `key`. A permanent refusal (an object under Object Lock, a permission) is recorded in
/// `skipped` and returned as the inner error; a transient one (after the storage's retries)
/// ends the expire.
async fn remove(
    storage: &dyn crate::storage::Storage,
    key: &str,
    skipped: &mut Vec<String>,
) -> Result<Result<(), StorageError>, ExpireError> {
    match storage.delete(key).await {
        Ok(()) => Ok(Ok(())),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => {
            skipped.push(format!("{key}: {e}"));
            Ok(Err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_snapshots_no_kept_wal_can_use_are_stale() {
        let key = |lsn: u64| format!("{RELMAP_PREFIX}{lsn:016X}.zst");
        let keys: Vec<String> = [0x1000u64, 0x5000, 0x9000, 0xA000]
            .iter()
            .map(|&l| key(l))
            .chain([
                "relmaps/notes.txt".to_string(),
                "relmaps/12.zst".to_string(),
            ])
            .collect();
        let cases: [(Option<u64>, Vec<u64>); 7] = [
            // (oldest kept WAL, snapshots that go)
            (None, vec![]),
            (Some(0x0800), vec![]),
            (Some(0x1000), vec![]),
            (Some(0x5000), vec![]),
            (Some(0x5001), vec![0x1000]),
            (Some(0x9FFF), vec![0x1000, 0x5000]),
            (Some(u64::MAX), vec![0x1000, 0x5000, 0x9000]),
        ];
        for (oldest, want) in cases {
            let got = stale_relmaps(&keys, oldest.map(Lsn));
            let want: Vec<String> = want.into_iter().map(key).collect();
            assert_eq!(got, want, "oldest kept WAL {oldest:x?}");
        }
    }
}
