//! Compresses complete spool segments into objects and publishes them, off the receive path.
//!
//! The receiver hands each completed segment over a bounded channel (back-pressure, never an
//! unbounded queue). Publication order: encode (zstd + checksums) → `Storage::put` (atomic and
//! durable) → remove the spool file. A crash at any point leaves the spool file, and the next
//! start publishes it again (an identical object).

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::StreamError;
use crate::repo::layout::wal_segment_key;
use crate::repo::object::{self, ObjectKind};
use crate::repo::Repo;
use crate::spool::Spool;
use crate::wal::SegmentName;

/// Publishes one complete spool segment.
pub async fn publish_segment(
    repo: &Repo,
    spool: &Spool,
    seg: SegmentName,
    level: i32,
) -> Result<(), StreamError> {
    let path = spool.complete_path(&seg);
    let seg_size = repo.seg_size();
    let p = path.clone();
    let (obj, info) = tokio::task::spawn_blocking(move || -> Result<_, StreamError> {
        let f = std::fs::File::open(&p)
            .map_err(|e| StreamError::io(format!("reading {}", p.display()), e))?;
        let mut out = Vec::with_capacity(seg_size as usize / 4);
        let info = object::encode(f, &mut out, ObjectKind::WalSegment, level).map_err(|e| {
            StreamError::io(
                format!("compressing {}", p.display()),
                std::io::Error::other(e),
            )
        })?;
        Ok((out, info))
    })
    .await
    .expect("compression task panicked")?;
    if info.raw_size != seg_size {
        return Err(StreamError::Invariant(format!(
            "spool segment {seg} has {} bytes, expected {seg_size}",
            info.raw_size
        )));
    }
    let stored = obj.len();
    repo.put_encoded(&wal_segment_key(&seg), obj).await?;
    spool
        .remove(&path)
        .map_err(|e| StreamError::io(format!("removing {}", path.display()), e))?;
    debug!(segment = %seg, stored_bytes = stored, sha256 = %info.sha256_hex(), "segment published");
    Ok(())
}

/// Records (durably) that the streamer's next segment follows `seg`.
pub async fn record_next(spool: &Spool, seg: SegmentName) -> Result<(), StreamError> {
    let s = spool.clone();
    tokio::task::spawn_blocking(move || s.record_next(seg.next()))
        .await
        .expect("spool task panicked")
        .map_err(|e| StreamError::io("recording the stream position", e))
}

/// A background publisher fed through a bounded channel.
pub struct Publisher {
    tx: mpsc::Sender<SegmentName>,
    handle: JoinHandle<Result<u64, StreamError>>,
}

impl Publisher {
    pub fn start(repo: Repo, spool: Spool, level: i32) -> Publisher {
        let (tx, mut rx) = mpsc::channel::<SegmentName>(2);
        let handle = tokio::spawn(async move {
            let mut n = 0;
            while let Some(seg) = rx.recv().await {
                publish_segment(&repo, &spool, seg, level).await?;
                record_next(&spool, seg).await?;
                n += 1;
            }
            Ok(n)
        });
        Publisher { tx, handle }
    }

    /// Queues a complete segment; waits while the queue is full. Fails if the publisher died.
    pub async fn submit(&mut self, seg: SegmentName) -> Result<(), StreamError> {
        if self.tx.send(seg).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn failure(&mut self) -> StreamError {
        match (&mut self.handle).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => StreamError::Invariant("publisher stopped unexpectedly".into()),
            Err(e) => StreamError::Invariant(format!("publisher panicked: {e}")),
        }
    }

    /// Fails fast if the publisher has already stopped with an error.
    pub async fn check(&mut self) -> Result<(), StreamError> {
        if self.handle.is_finished() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Publishes everything queued and stops. Returns how many segments it published.
    pub async fn finish(self) -> Result<u64, StreamError> {
        drop(self.tx);
        self.handle
            .await
            .map_err(|e| StreamError::Invariant(format!("publisher panicked: {e}")))?
    }
}
