//! What a repository holds and can restore, in one value: its cluster, its backups, the gaps
//! in its WAL and the recovery windows between them, the slots archiver created. `archiver
//! info` prints it; the daemon's health and metrics read it.

use serde::Serialize;

use super::plan::{recovery_windows, Window};
use crate::repo::catalog::BackupStatus;
use crate::repo::gaps::{Gap, SlotRecord};
use crate::repo::{Repo, RepoError};
use crate::time::Timestamp;

#[derive(Clone, Debug, Serialize)]
pub struct RepoInfo {
    pub repository: String,
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u64,
    pub created_at: Timestamp,
    pub backups: usize,
    pub complete_backups: usize,
    /// Holes in the WAL accepted with `stream --accept-gap`; no restore crosses one.
    pub gaps: Vec<Gap>,
    /// The stretches a restore can reach, oldest first (one more than there are gaps).
    pub recovery_windows: Vec<Window>,
    /// The replication slots archiver created for this repository.
    pub replication_slots: Vec<SlotRecord>,
}

/// Reads the catalog, the gaps and the slots of `repo`.
pub async fn repo_info(repo: &Repo) -> Result<RepoInfo, RepoError> {
    let records = repo.list_backups().await?;
    let gaps = repo.list_gaps().await?;
    let meta = repo.meta();
    Ok(RepoInfo {
        repository: repo.name().to_string(),
        system_identifier: meta.system_identifier.clone(),
        pg_version: meta.pg_version_num,
        wal_segment_size: meta.wal_segment_size,
        created_at: meta.created_at,
        backups: records.len(),
        complete_backups: records
            .iter()
            .filter(|r| r.status == BackupStatus::Complete)
            .count(),
        recovery_windows: recovery_windows(&records, &gaps),
        gaps,
        replication_slots: repo.list_slots().await?,
    })
}
