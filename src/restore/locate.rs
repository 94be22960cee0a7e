//! Finds a recovery target in the archived WAL through the WAL index (`wal::index`): a time by
//! binary search over the segments' commit times, a transaction id by binary search over the
//! running-transaction snapshots, a restore point through the listing of restore-point
//! objects — a few small objects read instead of whole segments. Segments without an index
//! (archived before it, `--no-index`, the partial tail, the spool) are decoded from the WAL
//! instead, with the same reader, so the answer never depends on whether an index exists.
//!
//! Every answer names the transaction end recovery applies last and the first it does not
//! (xid, time, LSN), which the dry run prints.
//!
//! Assumption, stated: commit times in WAL order are non-decreasing up to the clock skew
//! between backends (they are stamped just before the commit record is inserted), so a time
//! is searched for over segments by their newest commit time; the search then reads the
//! segment before the one found as well. A skew spanning a whole segment would be needed to
//! mislead it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tracing::warn;

use super::run::RestoreError;
use super::target::Target;
use crate::repo::local_wal::WalSource;
use crate::repo::wal_index::SegmentDrops;
use crate::repo::Repo;
use crate::time::Timestamp;
use crate::wal::index::{xid_precedes, Indexer, RestorePointEntry, SegmentIndex, XactRef};
use crate::wal::{Lsn, SegmentName};

/// How many decoded indexes a search keeps (binary searches touch a few dozen).
const CACHE: usize = 64;

/// What the search found, for the plan and the dry run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Located {
    /// The last transaction end recovery applies (commit or abort).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<XactRef>,
    /// The first transaction end it does not apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_not_applied: Option<XactRef>,
    /// The restore point found (a name target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_point: Option<RestorePointEntry>,
    /// The end of the target's record (xid and name targets): what the planner plans for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_end: Option<Lsn>,
    pub index_objects_read: usize,
    pub wal_segments_decoded: usize,
    pub search_seconds: f64,
}

/// The chain's segments as indexes: index objects where they exist, decoded WAL elsewhere.
pub struct ChainIndex<'a> {
    repo: &'a Repo,
    segs: Vec<(SegmentName, WalSource)>,
    indexed: BTreeSet<SegmentName>,
    points: BTreeSet<SegmentName>,
    drops: BTreeSet<SegmentName>,
    cache: HashMap<usize, Arc<SegmentIndex>>,
    indexer: Indexer,
    index_reads: usize,
    wal_reads: usize,
}

impl<'a> ChainIndex<'a> {
    /// The chain `segs` (in WAL order along the timeline path) of `repo`.
    pub async fn new(
        repo: &'a Repo,
        segs: Vec<(SegmentName, WalSource)>,
    ) -> Result<ChainIndex<'a>, RestoreError> {
        let listing = repo.index_listing().await?;
        Ok(ChainIndex {
            repo,
            segs,
            indexed: listing.indexed,
            points: listing.points,
            drops: listing.drops,
            cache: HashMap::new(),
            indexer: Indexer::new(repo.seg_size(), repo.meta().pg_major),
            index_reads: 0,
            wal_reads: 0,
        })
    }

    /// Index objects read and WAL segments decoded so far.
    pub fn reads(&self) -> (usize, usize) {
        (self.index_reads, self.wal_reads)
    }

    pub fn len(&self) -> usize {
        self.segs.len()
    }

    fn has_index(&self, k: usize) -> bool {
        let (seg, src) = &self.segs[k];
        *src == WalSource::Object && self.indexed.contains(seg)
    }

    /// Segment `k`'s index: its object, or its WAL decoded (primed with segment `k - 1`).
    pub async fn get(&mut self, k: usize) -> Result<Arc<SegmentIndex>, RestoreError> {
        if let Some(ix) = self.cache.get(&k) {
            return Ok(ix.clone());
        }
        let (seg, src) = self.segs[k];
        let mut ix = None;
        if self.has_index(k) {
            self.index_reads += 1;
            match self.repo.get_segment_index(&seg).await {
                Ok(Some(i)) => ix = Some(i),
                Ok(None) => {}
                Err(e) => {
                    warn!(segment = %seg, error = %e, "the segment's index is damaged; reading its WAL instead (archiver reindex --force rebuilds it)")
                }
            }
        }
        let ix = match ix {
            Some(i) => i,
            None => self.decode(k, seg, src).await?,
        };
        let ix = Arc::new(ix);
        if self.cache.len() >= CACHE {
            self.cache.clear();
        }
        self.cache.insert(k, ix.clone());
        Ok(ix)
    }

    async fn decode(
        &mut self,
        k: usize,
        seg: SegmentName,
        src: WalSource,
    ) -> Result<SegmentIndex, RestoreError> {
        if k > 0 && !self.indexer.continues(&seg) {
            let (prev, psrc) = self.segs[k - 1];
            let raw = self.repo.read_wal(prev, psrc).await?;
            self.wal_reads += 1;
            self.indexer
                .prime(&prev, &raw)
                .map_err(super::run::damaged_wal(prev))?;
        }
        let raw = self.repo.read_wal(seg, src).await?;
        self.wal_reads += 1;
        self.indexer
            .index(&seg, &raw)
            .map_err(super::run::damaged_wal(seg))
    }

    /// Segment `k`'s removed relation files and the files it created: from its drops object
    /// (None when an indexed segment has none), or from its WAL.
    pub(crate) async fn drops_of(
        &mut self,
        k: usize,
    ) -> Result<Option<SegmentDrops>, RestoreError> {
        let seg = self.segs[k].0;
        if self.has_index(k) {
            if !self.drops.contains(&seg) {
                return Ok(None);
            }
            self.index_reads += 1;
            return Ok(Some(self.repo.get_drops(&seg).await?));
        }
        let ix = self.get(k).await?;
        Ok(SegmentDrops::of(&ix))
    }

    /// The nearest segment at or before `k` (not before `lo`) whose index has an entry `has`.
    pub(crate) async fn nearest_before(
        &mut self,
        k: usize,
        lo: usize,
        has: fn(&SegmentIndex) -> bool,
    ) -> Result<Option<(usize, Arc<SegmentIndex>)>, RestoreError> {
        let mut j = k;
        loop {
            let ix = self.get(j).await?;
            if has(&ix) {
                return Ok(Some((j, ix)));
            }
            if j == lo {
                return Ok(None);
            }
            j -= 1;
        }
    }

    /// The first segment `k` whose nearest segment at or before it with an entry `has`
    /// satisfies `pred` (a predicate that holds from some segment on); `len()` if none.
    pub(crate) async fn first_where(
        &mut self,
        has: fn(&SegmentIndex) -> bool,
        pred: impl Fn(&SegmentIndex) -> bool,
    ) -> Result<usize, RestoreError> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.nearest_before(mid, lo, has).await? {
                Some((j, ix)) if pred(&ix) => hi = j,
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// The transaction ends just before and at/after position `at`, looking from segment `k`
    /// backwards and forwards.
    async fn around(
        &mut self,
        k: usize,
        at: Lsn,
    ) -> Result<(Option<XactRef>, Option<XactRef>), RestoreError> {
        let mut before = None;
        let mut j = k;
        loop {
            let ix = self.get(j).await?;
            if let Some(x) = ix.xacts.iter().rev().find(|x| x.end <= at) {
                before = Some(x);
                break;
            }
            if j == 0 {
                break;
            }
            j -= 1;
        }
        let mut after = None;
        for j in k..self.len() {
            let ix = self.get(j).await?;
            after = ix.xacts.iter().find(|x| x.end > at);
            if after.is_some() {
                break;
            }
        }
        Ok((before, after))
    }

    fn finish(&self, mut l: Located, t0: Instant) -> Located {
        l.index_objects_read = self.index_reads;
        l.wal_segments_decoded = self.wal_reads;
        l.search_seconds = t0.elapsed().as_secs_f64();
        l
    }

    /// Where recovery to `target` stops, and around it. `exclusive`: stop just before the
    /// target. `Ok(None)` for targets that name no record (latest, immediate, an LSN).
    /// An xid or restore point the chain does not hold is `Ok(Some)` with no `target_end`.
    pub async fn locate(
        &mut self,
        target: &Target,
        exclusive: bool,
    ) -> Result<Option<Located>, RestoreError> {
        let t0 = Instant::now();
        if self.segs.is_empty() {
            return Ok(None);
        }
        let l = match target {
            Target::Time(t) => self.find_time(*t, exclusive).await?,
            Target::Xid(x) => self.find_xid((*x & 0xFFFF_FFFF) as u32, exclusive).await?,
            Target::Name(n) => self.find_name(n).await?,
            _ => return Ok(None),
        };
        Ok(Some(self.finish(l, t0)))
    }

    /// Recovery to a time stops at the first transaction end, in WAL order, whose time is
    /// after it (at or after it, `exclusive`) — `recoveryStopsBefore` in xlogrecovery.c.
    async fn find_time(&mut self, t: Timestamp, exclusive: bool) -> Result<Located, RestoreError> {
        let stops = move |x: &XactRef| if exclusive { x.time >= t } else { x.time > t };
        let has_xacts: fn(&SegmentIndex) -> bool = |ix| !ix.xacts.is_empty();
        let b = self
            .first_where(has_xacts, |ix| ix.xacts.iter().any(|x| stops(&x)))
            .await?;
        // From the segment with transactions before it (commit times may be slightly out of
        // order across a boundary), the first that stops recovery.
        let from = match b.checked_sub(1) {
            Some(p) => self
                .nearest_before(p, 0, has_xacts)
                .await?
                .map_or(b, |(j, _)| j),
            None => b,
        };
        let mut last = None;
        for k in from..self.len() {
            let ix = self.get(k).await?;
            for x in ix.xacts.iter() {
                if stops(&x) {
                    if last.is_none() && from > 0 {
                        last = self.around(from - 1, x.start).await?.0;
                    }
                    return Ok(Located {
                        last_applied: last,
                        first_not_applied: Some(x),
                        ..Default::default()
                    });
                }
                last = Some(x);
            }
        }
        if last.is_none() && from > 0 {
            last = self.around(from - 1, Lsn(u64::MAX)).await?.0;
        }
        Ok(Located {
            last_applied: last,
            ..Default::default()
        })
    }

    /// The end of transaction `xid`. The running-transactions snapshots bound where it can
    /// be: not after the first snapshot that has it below `oldest_running` (it had ended),
    /// not before the snapshot preceding the last one that had not assigned it yet.
    async fn find_xid(&mut self, xid: u32, exclusive: bool) -> Result<Located, RestoreError> {
        let has_running: fn(&SegmentIndex) -> bool = |ix| !ix.running.is_empty();
        let ended = self
            .first_where(has_running, |ix| {
                ix.running
                    .iter()
                    .any(|r| xid_precedes(xid, r.oldest_running))
            })
            .await?;
        let assigned = self
            .first_where(has_running, |ix| {
                ix.running.iter().any(|r| xid_precedes(xid, r.next_xid))
            })
            .await?;
        // Two snapshots back from the first that had assigned it (the snapshot is taken before
        // its record is inserted, so a commit may precede the record of the snapshot that
        // missed it).
        let mut from = assigned.min(self.len() - 1);
        for _ in 0..2 {
            match from.checked_sub(1) {
                Some(p) => match self.nearest_before(p, 0, has_running).await? {
                    Some((j, _)) => from = j,
                    None => {
                        from = 0;
                        break;
                    }
                },
                None => break,
            }
        }
        let to = ended.min(self.len() - 1).max(from);
        // Only where the snapshots say (the whole chain when it has none): an xid the archive
        // does not hold is refused after reading a few segments, not all of them.
        for k in from..=to {
            let ix = self.get(k).await?;
            if let Some(x) = ix.find_xact(|x| x.xid == xid) {
                let (last_applied, first_not_applied) = if exclusive {
                    (self.around(k, x.start).await?.0, Some(x))
                } else {
                    (Some(x), self.around(k, x.end).await?.1)
                };
                return Ok(Located {
                    last_applied,
                    first_not_applied,
                    target_end: Some(x.end),
                    ..Default::default()
                });
            }
        }
        Ok(Located::default())
    }

    /// The first restore point named `name` on the chain: the restore-point objects of indexed
    /// segments (found by listing), the WAL of the others.
    async fn find_name(&mut self, name: &str) -> Result<Located, RestoreError> {
        for k in 0..self.len() {
            let seg = self.segs[k].0;
            let found = if self.has_index(k) {
                if !self.points.contains(&seg) {
                    continue;
                }
                self.index_reads += 1;
                self.repo
                    .get_restore_points(&seg)
                    .await?
                    .into_iter()
                    .find(|p| p.name == name)
            } else {
                self.get(k)
                    .await?
                    .restore_points
                    .iter()
                    .find(|p| p.name == name)
                    .cloned()
            };
            if let Some(p) = found {
                let (before, after) = self.around(k, p.end).await?;
                return Ok(Located {
                    last_applied: before,
                    first_not_applied: after,
                    target_end: Some(p.end),
                    restore_point: Some(p),
                    ..Default::default()
                });
            }
        }
        Ok(Located::default())
    }
}
