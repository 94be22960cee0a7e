//! `archiver verify`: proof that what is stored is whole. Every WAL object (or, for one backup,
//! those from its start on) is read back and checked against its checksums, several at a time
//! with bounded memory; every backup's archives are read and each file checked against its
//! manifest; the WAL is checked unbroken from every backup to the archive's head on every
//! timeline ([`continuity`]). Each damaged or missing object and each hole is named, and each
//! backup's result is recorded in its catalog record.

use std::time::Instant;

use serde::Serialize;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::plan::{continuity, Hole};
use super::run::{inventory, verify_backup, RestoreError};
use crate::progress::Progress;
use crate::repo::catalog::{BackupRecord, BackupStatus, Verification};
use crate::repo::layout::{
    parse_index_key, parse_wal_key, IndexObject, WalObject, INDEX_PREFIX, WAL_PREFIX,
};
use crate::repo::relmap::RELMAP_PREFIX;
use crate::repo::Repo;

pub struct VerifyOptions {
    /// Only this backup (and the WAL from its start on).
    pub backup: Option<String>,
    /// Objects read at once.
    pub jobs: usize,
}

/// An object that could not be read back whole.
#[derive(Clone, Debug, Serialize)]
pub struct Damaged {
    pub key: String,
    pub problem: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackupResult {
    pub id: String,
    pub ok: bool,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Nothing damaged, missing or broken.
    pub ok: bool,
    pub objects_checked: usize,
    pub bytes_checked: u64,
    pub seconds: f64,
    pub backups: Vec<BackupResult>,
    /// WAL objects damaged or unreadable.
    pub damaged: Vec<Damaged>,
    /// WAL a restore would need that the archive does not hold.
    pub wal_holes: Vec<Hole>,
    /// Other problems of the WAL (a timeline whose history file is missing).
    pub wal_problems: Vec<String>,
}

pub async fn verify(repo: &Repo, o: &VerifyOptions) -> Result<VerifyReport, RestoreError> {
    let t0 = Instant::now();
    let seg_size = repo.seg_size();
    let backups: Vec<BackupRecord> = match &o.backup {
        Some(id) => vec![repo.get_backup(id).await?],
        None => repo
            .list_backups()
            .await?
            .into_iter()
            .filter(|b| b.status == BackupStatus::Complete)
            .collect(),
    };
    let from_seg = match &o.backup {
        Some(_) => backups[0].start_lsn.0 / seg_size,
        None => 0,
    };
    let wal: Vec<(String, u64, Option<u64>)> = repo
        .storage()
        .list(WAL_PREFIX)
        .await
        .map_err(crate::repo::RepoError::from)?
        .into_iter()
        .filter_map(|m| match parse_wal_key(&m.key, seg_size)? {
            WalObject::History(_) => Some((m.key, m.size, None)),
            WalObject::Segment(s) | WalObject::Partial(s) => {
                (s.segno >= from_seg).then_some((m.key, m.size, Some(s.segno)))
            }
        })
        .collect();
    // The WAL index and the relation-name snapshots: damaged ones are reported (restores do
    // without them: they read the WAL instead), never counted against a backup.
    let mut wal = wal;
    for prefix in [INDEX_PREFIX, RELMAP_PREFIX] {
        for m in repo
            .storage()
            .list(prefix)
            .await
            .map_err(crate::repo::RepoError::from)?
        {
            let wanted = match parse_index_key(&m.key, seg_size) {
                Some(IndexObject::Index(s) | IndexObject::Points(s) | IndexObject::Drops(s)) => {
                    s.segno >= from_seg
                }
                None => prefix == RELMAP_PREFIX && m.key.ends_with(".zst"),
            };
            if wanted {
                wal.push((m.key, m.size, None));
            }
        }
    }
    let total: u64 =
        wal.iter().map(|w| w.1).sum::<u64>() + backups.iter().map(|b| b.stored_bytes).sum::<u64>();
    let mut progress = Progress::new("verify");
    progress.set_total(total);
    let (damaged, mut objects, mut bytes) = check_objects(repo, &wal, o.jobs, &mut progress).await;
    let mut results = Vec::new();
    for b in &backups {
        let mut problems = Vec::new();
        if b.status != BackupStatus::Complete {
            problems.push(format!("its status is {:?}", b.status).to_lowercase());
        }
        match verify_backup(repo, b).await {
            Ok(n) => objects += n,
            Err(e) => problems.push(crate::retry::error_chain(&e)),
        }
        bytes += b.stored_bytes;
        progress.set(bytes);
        results.push((b, problems));
    }
    progress.finish();
    let inv = inventory(repo).await?;
    let cont = continuity(&inv, &backups, seg_size);
    // A backup is whole when its own objects are, and the WAL after its start is.
    let segno_of = |key: &str| wal.iter().find(|w| w.0 == key).and_then(|w| w.2);
    for (b, problems) in &mut results {
        let start = b.start_lsn.segment_start(seg_size);
        for d in &damaged {
            if segno_of(&d.key).is_some_and(|s| s >= start.0 / seg_size) {
                problems.push(format!("WAL object {}: {}", d.key, d.problem));
            }
        }
        for h in cont.holes.iter().filter(|h| h.to > start) {
            problems.push(describe_hole(h));
        }
    }
    let at = crate::time::now();
    let mut backup_results = Vec::new();
    for (b, problems) in results {
        let ok = problems.is_empty();
        let mut rec = b.clone();
        rec.verified = Some(Verification {
            at,
            ok,
            problems: problems.clone(),
        });
        if let Err(e) = repo.put_backup(&rec).await {
            warn!(backup = %b.id, error = %e, "could not record the verification");
        }
        backup_results.push(BackupResult {
            id: b.id.clone(),
            ok,
            problems,
        });
    }
    let ok = damaged.is_empty()
        && cont.holes.is_empty()
        && cont.problems.is_empty()
        && backup_results.iter().all(|b| b.ok);
    let report = VerifyReport {
        ok,
        objects_checked: objects,
        bytes_checked: bytes,
        seconds: t0.elapsed().as_secs_f64(),
        backups: backup_results,
        damaged,
        wal_holes: cont.holes,
        wal_problems: cont.problems,
    };
    info!(
        ok,
        objects = report.objects_checked,
        bytes = report.bytes_checked,
        seconds = format!("{:.1}", report.seconds),
        "verify done"
    );
    Ok(report)
}

/// "WAL from 0/5000000 to 0/7000000 on timeline 1 is missing".
pub fn describe_hole(h: &Hole) -> String {
    format!(
        "WAL from {} to {} on timeline {} is missing",
        h.from, h.to, h.timeline
    )
}

/// Reads each object back whole, `jobs` at a time; returns the damaged ones, how many were
/// read and their stored bytes.
async fn check_objects(
    repo: &Repo,
    objects: &[(String, u64, Option<u64>)],
    jobs: usize,
    progress: &mut Progress,
) -> (Vec<Damaged>, usize, u64) {
    type Checked = (String, u64, Result<(), crate::repo::RepoError>);
    let mut set: JoinSet<Checked> = JoinSet::new();
    let (mut damaged, mut n, mut bytes) = (Vec::new(), 0, 0);
    let mut collect = |done: Checked, progress: &mut Progress| {
        let (key, size, r) = done;
        n += 1;
        bytes += size;
        progress.set(bytes);
        if let Err(e) = r {
            damaged.push(Damaged {
                key,
                problem: crate::retry::error_chain(&e),
            });
        }
    };
    for (key, size, _) in objects {
        if set.len() >= jobs.max(1) {
            let done = set.join_next().await.expect("not empty");
            collect(done.expect("verify task panicked"), progress);
        }
        let (repo, key, size) = (repo.clone(), key.clone(), *size);
        set.spawn(async move {
            let r = repo.stream_verified(&key, std::io::sink()).await;
            (key, size, r.map(|_| ()))
        });
    }
    while let Some(done) = set.join_next().await {
        collect(done.expect("verify task panicked"), progress);
    }
    damaged.sort_by(|a, b| a.key.cmp(&b.key));
    (damaged, n, bytes)
}
