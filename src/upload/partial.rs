//! Offsite RPO in seconds: the segment being received is shipped to every remote tier as
//! `wal/<tli>/<segment>.partial.zst` every `partial_upload_interval` while it grows.
//!
//! Only the durable prefix is shipped: the streamer publishes its flush position (fsync'd in
//! the spool) on a watch channel, and this task reads exactly that many bytes of the spool's
//! `.partial` file. A restore that finds no complete segment uses the partial one
//! (zero-filled by `wal-fetch`, as PostgreSQL's own `.partial` files are). Once a tier holds
//! the complete segment, the superseded partial is deleted from it; the partial of a
//! timeline's last segment (no complete segment on that timeline follows) stays.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Queue, WalPoint};
use crate::repo::layout::{partial_segment_key, wal_segment_key};
use crate::repo::object::{self, ObjectKind};
use crate::spool::Spool;
use crate::storage::tiered::RemoteTier;
use crate::wal::SegmentName;

pub struct PartialShipper {
    pub queue: Arc<Queue>,
    pub remotes: Vec<RemoteTier>,
    pub spool: Spool,
    pub seg_size: u64,
    pub interval: Duration,
    pub level: i32,
}

impl PartialShipper {
    /// Runs until `stop` is set.
    pub async fn run(
        self,
        mut flushed: watch::Receiver<Option<WalPoint>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<WalPoint> = None;
        let mut shipped: BTreeSet<SegmentName> = BTreeSet::new();
        for t in &self.remotes {
            if let Err(e) = delete_superseded(t, self.seg_size).await {
                warn!(tier = %t.name, error = %e, "cannot look for superseded partial segments");
            }
        }
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let point = *flushed.borrow_and_update();
            let Some(p) = point else { continue };
            let seg = SegmentName::containing(p.tli, p.lsn, self.seg_size);
            if Some(p) != last && p.lsn > seg.start_lsn() && self.ship(seg, p).await {
                shipped.insert(seg);
                last = Some(p);
            }
            self.clean(&mut shipped, seg).await;
        }
    }

    /// Uploads the durable prefix of `seg` (up to `p`) to every tier. False if there was
    /// nothing to read (the segment completed meanwhile: its complete object follows).
    async fn ship(&self, seg: SegmentName, p: WalPoint) -> bool {
        let path = self.spool.partial_path(&seg);
        let len = p.lsn.0 - seg.start_lsn().0;
        let (spool, level) = (self.spool.clone(), self.level);
        let encoded = tokio::task::spawn_blocking(move || {
            let raw = spool.read_prefix(&path, len)?;
            object::encode_bytes(&raw, ObjectKind::PartialWalSegment, level)
                .map_err(std::io::Error::other)
        })
        .await
        .expect("partial encoding task panicked");
        let obj = match encoded {
            Ok((obj, _)) => Bytes::from(obj),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                warn!(segment = %seg, error = %e, "cannot read the partial segment to upload it");
                return false;
            }
        };
        let key = partial_segment_key(&seg);
        let mut uploads = tokio::task::JoinSet::new();
        for (i, t) in self.remotes.iter().enumerate() {
            let (s, key, obj) = (t.storage.clone(), key.clone(), obj.clone());
            uploads.spawn(async move { (i, s.put(&key, obj).await) });
        }
        while let Some(Ok((i, r))) = uploads.join_next().await {
            match r {
                Ok(()) => {
                    debug!(tier = %self.remotes[i].name, segment = %seg, lsn = %p.lsn, "partial segment uploaded");
                    self.queue.record_partial(i, p);
                }
                Err(e) => {
                    warn!(tier = %self.remotes[i].name, segment = %seg, error = %e, "partial segment upload failed");
                    self.queue
                        .with_tier(i, |t| t.last_error = Some(e.to_string()));
                }
            }
        }
        true
    }

    /// Deletes shipped partials that every tier now holds complete; forgets those of an
    /// earlier timeline (they are that timeline's last segment).
    async fn clean(&self, shipped: &mut BTreeSet<SegmentName>, current: SegmentName) {
        for s in shipped.clone() {
            if s == current {
                continue;
            }
            if s.tli != current.tli {
                shipped.remove(&s);
                continue;
            }
            let mut all = true;
            for t in &self.remotes {
                match t.storage.exists(&wal_segment_key(&s)).await {
                    Ok(true) => {
                        if let Err(e) = t.storage.delete(&partial_segment_key(&s)).await {
                            warn!(tier = %t.name, segment = %s, error = %e, "cannot delete a superseded partial segment");
                            all = false;
                        }
                    }
                    _ => all = false,
                }
            }
            if all {
                shipped.remove(&s);
            }
        }
    }
}

/// Deletes a tier's partial segments for which it holds the complete segment (same timeline):
/// left by an earlier run that stopped before cleaning up.
pub async fn delete_superseded(
    t: &RemoteTier,
    seg_size: u64,
) -> Result<usize, crate::storage::StorageError> {
    use crate::repo::layout::{parse_wal_key, WalObject, WAL_PREFIX};
    let objs: Vec<WalObject> = t
        .storage
        .list(WAL_PREFIX)
        .await?
        .into_iter()
        .filter_map(|m| parse_wal_key(&m.key, seg_size))
        .collect();
    let complete: BTreeSet<SegmentName> = objs
        .iter()
        .filter_map(|o| match o {
            WalObject::Segment(s) => Some(*s),
            _ => None,
        })
        .collect();
    let mut n = 0;
    for o in &objs {
        if let WalObject::Partial(s) = o {
            if complete.contains(s) {
                t.storage.delete(&partial_segment_key(s)).await?;
                n += 1;
            }
        }
    }
    Ok(n)
}
