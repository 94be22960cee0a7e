//! Index objects of the repository: each complete WAL segment's [`SegmentIndex`] and, beside
//! it where the segment has any, its restore points and its removed relation files. Stored like every object (zstd, CRC-32C
//! and SHA-256 in the trailer, encrypted where the repository is), shipped to the remote tiers
//! by the uploader as any other key.
//!
//! Invariant: the restore points and drops are written before the index, and all before the segment
//! they describe is published, so a segment object never has an index that hides a restore
//! point; a crash in between leaves the spool segment, whose next publication rewrites the
//! same objects.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::Serialize;
use tracing::{info, warn};

use super::layout::{
    drops_key, parse_index_key, restore_points_key, wal_index_key, IndexObject, INDEX_PREFIX,
};
use super::local_wal::WalSource;
use super::object::ObjectKind;
use super::{Repo, RepoError};
use crate::storage::StorageError;
use crate::wal::index::{
    DatabaseDrop, DropEntry, FileEntry, Indexer, RestorePointEntry, SegmentIndex,
};
use crate::wal::SegmentName;

/// zstd level of index objects (small, read often: the columns compress well at 3).
const INDEX_LEVEL: i32 = 3;

/// Which segments have index objects.
#[derive(Clone, Debug, Default)]
pub struct IndexListing {
    pub indexed: BTreeSet<SegmentName>,
    /// Segments with restore points.
    pub points: BTreeSet<SegmentName>,
    /// Segments whose transactions removed relation files.
    pub drops: BTreeSet<SegmentName>,
}

/// A segment's removed relation files and the files its records created (`<segment>.drops`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SegmentDrops {
    pub drops: Vec<DropEntry>,
    pub created: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseDrop>,
}

impl SegmentDrops {
    /// What of `ix` goes into its drops object; None when it removed nothing.
    pub fn of(ix: &SegmentIndex) -> Option<SegmentDrops> {
        (!ix.drops.is_empty() || !ix.databases_dropped.is_empty()).then(|| SegmentDrops {
            drops: ix.drops.clone(),
            created: ix.created.clone(),
            databases: ix.databases_dropped.clone(),
        })
    }
}

/// What `archiver reindex` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReindexReport {
    pub segments: usize,
    pub indexed: usize,
    pub skipped_indexed: usize,
    /// Segments whose records do not read back (a record CRC fails): no index, named here.
    pub unreadable: Vec<String>,
    pub commits: usize,
    pub restore_points: usize,
}

impl Repo {
    /// Primes `indexer` with the segment before `seg`, when the archive has it, so that the
    /// record crossing into `seg` is indexed too. Best effort: without it, that one record is
    /// not (it began in WAL the archive does not hold).
    pub async fn prime_indexer(&self, indexer: &mut Indexer, seg: &SegmentName) {
        if seg.segno == 0 {
            return;
        }
        // The previous segment on this timeline, or on the newest older one that has it.
        let prev = match self.complete_segments().await {
            Ok(segs) => segs
                .into_iter()
                .filter(|s| s.segno + 1 == seg.segno && s.tli <= seg.tli)
                .max_by_key(|s| s.tli),
            Err(e) => {
                warn!(error = %e, "cannot list the archive to prime the WAL index");
                None
            }
        };
        let Some(prev) = prev else {
            return;
        };
        match self.read_wal(prev, WalSource::Object).await {
            Ok(raw) => {
                if let Err(e) = indexer.prime(&prev, &raw) {
                    warn!(segment = %prev, error = %e, "cannot read the records of the previous segment");
                }
            }
            Err(e) => warn!(segment = %prev, error = %e, "cannot read the previous segment"),
        }
    }

    /// Indexes every complete segment of the archive that has no index (`force`: every one),
    /// timeline by timeline in WAL order. A segment whose records do not read back is reported,
    /// not indexed; the rest go on.
    pub async fn reindex(
        &self,
        force: bool,
        progress: &mut crate::progress::Progress,
    ) -> Result<ReindexReport, RepoError> {
        let listing = self.index_listing().await?;
        let mut segs = self.complete_segments().await?;
        segs.sort_by_key(|s| (s.tli, s.segno));
        let mut report = ReindexReport {
            segments: segs.len(),
            ..Default::default()
        };
        let todo: Vec<SegmentName> = segs
            .iter()
            .filter(|s| force || !listing.indexed.contains(s))
            .copied()
            .collect();
        report.skipped_indexed = segs.len() - todo.len();
        progress.set_total(todo.len() as u64 * self.seg_size());
        let mut indexer = Indexer::new(self.seg_size(), self.meta().pg_major);
        for (n, seg) in todo.iter().enumerate() {
            if !indexer.continues(seg) {
                self.prime_indexer(&mut indexer, seg).await;
            }
            let raw = self.read_wal(*seg, WalSource::Object).await?;
            let ix = {
                let mut taken = std::mem::replace(&mut indexer, Indexer::new(1, 0));
                let seg = *seg;
                let (back, ix) = tokio::task::spawn_blocking(move || {
                    let r = taken.index(&seg, &raw);
                    (taken, r)
                })
                .await
                .expect("index task panicked");
                indexer = back;
                ix
            };
            match ix {
                Ok(ix) => {
                    report.commits += ix.xacts.iter().filter(|x| x.committed).count();
                    report.restore_points += ix.restore_points.len();
                    if ix.restore_points.is_empty() && listing.points.contains(seg) {
                        self.storage().delete(&restore_points_key(seg)).await?;
                    }
                    if SegmentDrops::of(&ix).is_none() && listing.drops.contains(seg) {
                        self.storage().delete(&drops_key(seg)).await?;
                    }
                    self.put_segment_index(seg, &ix).await?;
                    report.indexed += 1;
                }
                Err(e) => {
                    warn!(segment = %seg, error = %e, "the segment's records do not read back; not indexed");
                    report.unreadable.push(format!("{seg}: {e}"));
                }
            }
            progress.set((n as u64 + 1) * self.seg_size());
        }
        progress.finish();
        info!(
            indexed = report.indexed,
            already = report.skipped_indexed,
            unreadable = report.unreadable.len(),
            "reindex done"
        );
        Ok(report)
    }

    /// Stores `seg`'s index (its restore points and drops first).
    pub async fn put_segment_index(
        &self,
        seg: &SegmentName,
        ix: &SegmentIndex,
    ) -> Result<(), RepoError> {
        if let Some(d) = SegmentDrops::of(ix) {
            let raw = serde_json::to_vec(&d).expect("serializes");
            self.put_raw(
                &drops_key(seg),
                Bytes::from(raw),
                ObjectKind::WalIndex,
                INDEX_LEVEL,
            )
            .await?;
        }
        if !ix.restore_points.is_empty() {
            let raw = serde_json::to_vec(&ix.restore_points).expect("serializes");
            self.put_raw(
                &restore_points_key(seg),
                Bytes::from(raw),
                ObjectKind::WalIndex,
                INDEX_LEVEL,
            )
            .await?;
        }
        self.put_raw(
            &wal_index_key(seg),
            Bytes::from(ix.encode()),
            ObjectKind::WalIndex,
            INDEX_LEVEL,
        )
        .await?;
        Ok(())
    }

    /// `seg`'s index, verified; None if it has none.
    pub async fn get_segment_index(
        &self,
        seg: &SegmentName,
    ) -> Result<Option<SegmentIndex>, RepoError> {
        let key = wal_index_key(seg);
        let raw = match self.get_verified(&key).await {
            Ok((raw, _)) => raw,
            Err(RepoError::Storage(StorageError::NotFound(_))) => return Ok(None),
            Err(e) => return Err(e),
        };
        SegmentIndex::decode(&raw, seg)
            .map(Some)
            .map_err(|e| RepoError::Corrupt {
                key,
                reason: e.to_string(),
            })
    }

    /// The restore points of `seg`, verified.
    pub async fn get_restore_points(
        &self,
        seg: &SegmentName,
    ) -> Result<Vec<RestorePointEntry>, RepoError> {
        let key = restore_points_key(seg);
        let (raw, _) = self.get_verified(&key).await?;
        serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt {
            key,
            reason: e.to_string(),
        })
    }

    /// The removed and created relation files of `seg`, verified.
    pub async fn get_drops(&self, seg: &SegmentName) -> Result<SegmentDrops, RepoError> {
        let key = drops_key(seg);
        let (raw, _) = self.get_verified(&key).await?;
        serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt {
            key,
            reason: e.to_string(),
        })
    }

    /// Every index object, by kind.
    pub async fn index_listing(&self) -> Result<IndexListing, RepoError> {
        let seg_size = self.seg_size();
        let mut out = IndexListing::default();
        for m in self.storage().list(INDEX_PREFIX).await? {
            match parse_index_key(&m.key, seg_size) {
                Some(IndexObject::Index(s)) => {
                    out.indexed.insert(s);
                }
                Some(IndexObject::Points(s)) => {
                    out.points.insert(s);
                }
                Some(IndexObject::Drops(s)) => {
                    out.drops.insert(s);
                }
                None => {}
            }
        }
        Ok(out)
    }
}
