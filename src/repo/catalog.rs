//! The backup catalog: one small sealed-JSON record per backup at `catalog/<id>.json`.
//!
//! Invariants: a record is written atomically (the storage `put`), read back verified (sealed
//! checksum), and is marked `complete` only by the final write after every object it lists is
//! durable (publish, then record); a crash leaves `running` or `failed`, never a false `complete`.

use serde::{Deserialize, Serialize};

use super::layout::{catalog_key, CATALOG_PREFIX};
use super::{sealed, Repo, RepoError};
use crate::storage::StorageError;
use crate::time::Timestamp;
use crate::wal::{Lsn, TimeLineId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupStatus {
    Running,
    Complete,
    Failed,
    /// An expire is removing it: never restorable again; the next expire finishes the job.
    Expiring,
}

/// One stored object of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupObject {
    pub key: String,
    /// Bytes before compression.
    pub size_bytes: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    pub location: String,
}

/// A backup's record, as `list --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub label: String,
    pub status: BackupStatus,
    pub start_lsn: Lsn,
    pub stop_lsn: Option<Lsn>,
    pub timeline: TimeLineId,
    /// When the backup started (the server's `backup_label` time when it is UTC, else ours).
    pub start_time: Timestamp,
    pub stop_time: Option<Timestamp>,
    pub pg_version: u32,
    pub system_identifier: String,
    /// Uncompressed bytes of all objects.
    pub size_bytes: u64,
    pub stored_bytes: u64,
    pub objects: Vec<BackupObject>,
    pub tablespaces: Vec<Tablespace>,
    /// The server's `backup_label` content.
    pub backup_label: Option<String>,
    pub archiver_version: String,
    /// Why a failed backup failed.
    pub error: Option<String>,
    /// Restore drills of this backup, oldest first (the last [`MAX_DRILLS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drills: Vec<DrillResult>,
    /// The last `archiver verify` of this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verification>,
    /// What the cluster held at backup time (read over SQL; absent if it could not be).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contents: Option<ClusterContents>,
    /// The operator's label for where this cluster runs (`environment = "prod"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The backup this one is incremental to (PostgreSQL 17+ `BASE_BACKUP (INCREMENTAL)`):
    /// restoring it needs the whole chain down to a full backup. `None`: a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The chain a backup restores from, the full backup first and `id` last: `id` and each
/// parent in turn, every one complete. Why not, when a link is missing or not complete.
pub fn chain<'a>(backups: &'a [BackupRecord], id: &str) -> Result<Vec<&'a BackupRecord>, String> {
    let mut out: Vec<&BackupRecord> = Vec::new();
    let mut next = Some(id);
    while let Some(id) = next {
        if out.iter().any(|b| b.id == id) {
            return Err(format!("backup {id} is its own ancestor"));
        }
        let b = backups
            .iter()
            .find(|b| b.id == id)
            .ok_or_else(|| match out.last() {
                Some(child) => format!(
                    "backup {id}, the parent of incremental backup {}, is gone",
                    child.id
                ),
                None => format!("no backup {id}"),
            })?;
        if b.status != BackupStatus::Complete {
            let status = format!("{:?}", b.status).to_lowercase();
            return Err(match out.last() {
                Some(child) => format!(
                    "backup {id}, the parent of incremental backup {}, is {status}, not complete",
                    child.id
                ),
                None => format!("backup {id} is {status}, not complete"),
            });
        }
        out.push(b);
        next = b.parent.as_deref();
    }
    out.reverse();
    Ok(out)
}

impl BackupRecord {
    /// `full` or `incremental`.
    pub fn kind(&self) -> &'static str {
        if self.parent.is_some() {
            "incremental"
        } else {
            "full"
        }
    }
}

/// What the cluster held when a backup was taken: what a restore brings back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterContents {
    /// `version()`.
    pub server_version: String,
    pub databases: Vec<DatabaseContents>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseContents {
    pub name: String,
    pub size_bytes: u64,
    /// Ordinary and partitioned tables outside the system schemas.
    pub tables: u64,
    /// Their rows as the planner estimates them (`reltuples`).
    pub estimated_rows: u64,
    /// Installed extensions and their versions (e.g. `vector` 0.8.0).
    pub extensions: Vec<Extension>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    pub version: String,
}

/// One `archiver verify` of a backup: its objects read back and checked, its files against
/// its manifest, and the WAL from its start to the archive's head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub at: Timestamp,
    pub ok: bool,
    /// What was wrong, when not ok.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// How many drill results a record keeps.
pub const MAX_DRILLS: usize = 10;

/// One `archiver drill`: the backup restored into a scratch cluster and checked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillResult {
    /// When the drill ran.
    pub at: Timestamp,
    pub passed: bool,
    /// The target, as described to the operator.
    pub target: String,
    /// Where replay ended (`pg_last_wal_replay_lsn()`), when the cluster came up.
    pub achieved_lsn: Option<Lsn>,
    /// The last replayed transaction's commit time (`pg_last_xact_replay_timestamp()`).
    pub achieved_time: Option<Timestamp>,
    /// From the start of the drill to a promoted, checked cluster: the measured RTO.
    pub seconds: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// The checks that ran on the restored cluster.
    #[serde(default)]
    pub checks: Vec<String>,
    /// Checks that could not run, each with the reason (e.g. `pg_amcheck` not found).
    #[serde(default)]
    pub checks_skipped: Vec<String>,
}

/// A sortable backup id from a time: `20261122T223000Z`.
pub fn backup_id(t: Timestamp) -> String {
    t.strftime("%Y%m%dT%H%M%SZ").to_string()
}

/// Sort key of an id: its second, then its place among backups started in that second
/// (`20261122T223000Z`, `…Z-2`, …, `…Z-10`). Start times cannot order backups: a record's start
/// time becomes the server's (to the second) once the backup runs.
fn id_order(id: &str) -> (&str, u32) {
    match id.rsplit_once('-') {
        Some((base, n)) => (base, n.parse().unwrap_or(u32::MAX)),
        None => (id, 1),
    }
}

impl Repo {
    /// A backup id for `t` not used yet in this repository: `backup_id(t)`, or with `-2`, `-3`…
    /// appended when backups start within the same second (still sorting in start order).
    /// `reserved(id)` says an id is being claimed by another process that has no record yet.
    pub async fn new_backup_id(
        &self,
        t: Timestamp,
        reserved: impl Fn(&str) -> bool,
    ) -> Result<String, RepoError> {
        let base = backup_id(t);
        let mut n = 1;
        loop {
            let id = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if !reserved(&id) && !self.storage().exists(&catalog_key(&id)).await? {
                return Ok(id);
            }
            n += 1;
        }
    }

    /// Writes (or replaces) a backup's record.
    pub async fn put_backup(&self, rec: &BackupRecord) -> Result<(), RepoError> {
        let body = sealed::seal(rec).map_err(|e| RepoError::BadMeta(e.to_string()))?;
        Ok(self
            .storage()
            .put(&catalog_key(&rec.id), body.into())
            .await?)
    }

    /// Reads one record, verified.
    pub async fn get_backup(&self, id: &str) -> Result<BackupRecord, RepoError> {
        let key = catalog_key(id);
        let raw = match self.storage().get(&key).await {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => return Err(RepoError::UnknownBackup(id.to_string())),
            Err(e) => return Err(e.into()),
        };
        sealed::open(&raw).map_err(|e| RepoError::Corrupt {
            key,
            reason: e.to_string(),
        })
    }

    /// All records, oldest first (in the order they were started: by id).
    pub async fn list_backups(&self) -> Result<Vec<BackupRecord>, RepoError> {
        let mut out = Vec::new();
        for m in self.storage().list(CATALOG_PREFIX).await? {
            let Some(id) = m
                .key
                .strip_prefix(CATALOG_PREFIX)
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            match self.get_backup(id).await {
                Ok(r) => out.push(r),
                // Expired between the listing and the read (an expire runs beside us).
                Err(RepoError::UnknownBackup(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| id_order(&a.id).cmp(&id_order(&b.id)));
        Ok(out)
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    fn rec(id: &str, status: BackupStatus, parent: Option<&str>) -> BackupRecord {
        let mut r = BackupRecord::for_test(id, status, Lsn(0), Timestamp::UNIX_EPOCH);
        r.parent = parent.map(String::from);
        r
    }

    #[test]
    fn chains() {
        use BackupStatus::*;
        let all = vec![
            rec("f", Complete, None),
            rec("i1", Complete, Some("f")),
            rec("i2", Complete, Some("i1")),
            rec("bad", Failed, Some("i2")),
            rec("orphan", Complete, Some("gone")),
            rec("on-failed", Complete, Some("bad")),
        ];
        let ids = |id| chain(&all, id).map(|c| c.iter().map(|b| b.id.clone()).collect::<Vec<_>>());
        assert_eq!(ids("f").unwrap(), ["f"]);
        assert_eq!(ids("i2").unwrap(), ["f", "i1", "i2"]);
        assert!(ids("bad").unwrap_err().contains("not complete"));
        assert!(ids("orphan")
            .unwrap_err()
            .contains("backup gone, the parent of incremental backup orphan, is gone"));
        assert!(ids("on-failed")
            .unwrap_err()
            .contains("the parent of incremental backup on-failed, is failed"));
        assert!(ids("nope").unwrap_err().contains("no backup nope"));
    }
}

#[cfg(test)]
impl BackupRecord {
    /// A record for unit tests: `status`, started at `start_lsn` and `start_time`; the rest
    /// empty or neutral, for each test to set what it needs.
    pub(crate) fn for_test(
        id: &str,
        status: BackupStatus,
        start_lsn: Lsn,
        start_time: Timestamp,
    ) -> BackupRecord {
        BackupRecord {
            id: id.into(),
            label: id.into(),
            status,
            start_lsn,
            stop_lsn: None,
            timeline: 1,
            start_time,
            stop_time: None,
            pg_version: 150_000,
            system_identifier: "1".into(),
            size_bytes: 100,
            stored_bytes: 10,
            objects: vec![],
            tablespaces: vec![],
            backup_label: None,
            archiver_version: "test".into(),
            error: None,
            drills: vec![],
            verified: None,
            contents: None,
            environment: None,
            parent: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, start: &str) -> BackupRecord {
        let mut r = BackupRecord::for_test(
            id,
            BackupStatus::Running,
            Lsn(0x0300_0028),
            start.parse().unwrap(),
        );
        r.label = "nightly".into();
        r.tablespaces = vec![Tablespace {
            oid: 16384,
            location: "/srv/ts".into(),
        }];
        r
    }

    async fn repo(dir: &std::path::Path) -> Repo {
        crate::repo::test_repo(dir).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn records_round_trip_sorted_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).await;
        assert!(repo.list_backups().await.unwrap().is_empty());
        let mut b = record("20261122T100000Z", "2026-11-22T10:00:00Z");
        let a = record("20261121T100000Z", "2026-11-21T10:00:00Z");
        repo.put_backup(&b).await.unwrap();
        repo.put_backup(&a).await.unwrap();
        b.status = BackupStatus::Complete;
        b.stop_lsn = Some(Lsn(0x0400_0000));
        repo.put_backup(&b).await.unwrap();
        let all = repo.list_backups().await.unwrap();
        assert_eq!(all, vec![a.clone(), b.clone()]);
        assert_eq!(
            repo.get_backup(&b.id).await.unwrap().status,
            BackupStatus::Complete
        );
        assert!(matches!(
            repo.get_backup("nope").await,
            Err(RepoError::UnknownBackup(_))
        ));
        // JSON field names and values as documented.
        let json =
            std::fs::read_to_string(dir.path().join("catalog/20261122T100000Z.json")).unwrap();
        for needle in [
            "\"status\": \"complete\"",
            "\"stop_lsn\": \"0/4000000\"",
            "\"start_lsn\": \"0/3000028\"",
        ] {
            assert!(json.contains(needle), "{needle} in {json}");
        }
        // A tampered record is refused, not believed.
        std::fs::write(
            dir.path().join("catalog/20261122T100000Z.json"),
            json.replace("complete", "failed"),
        )
        .unwrap();
        assert!(matches!(
            repo.get_backup(&b.id).await,
            Err(RepoError::Corrupt { .. })
        ));
    }

    #[test]
    fn ids_sort_by_time() {
        let t: Timestamp = "2026-11-22T22:30:00.9Z".parse().unwrap();
        let id = backup_id(t);
        assert_eq!(id, "20261122T223000Z");
        assert!(backup_id(t + std::time::Duration::from_secs(1)) > id);
        let mut ids = [
            "20261122T223000Z-10",
            "20261122T223001Z",
            "20261122T223000Z-2",
            "20261122T223000Z",
        ];
        ids.sort_by_key(|i| id_order(i));
        assert_eq!(
            ids,
            [
                "20261122T223000Z",
                "20261122T223000Z-2",
                "20261122T223000Z-10",
                "20261122T223001Z"
            ]
        );
    }
}
