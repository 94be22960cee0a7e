//! Compresses complete spool segments into objects and publishes them, off the receive path,
//! indexing their records on the way (`wal::index`, one pass over the bytes).
//!
//! The receiver hands each completed segment over a bounded channel (back-pressure, never an
//! unbounded queue). Publication order: encode (zstd + checksums) and index → put the index
//! objects → `Storage::put` of the segment (atomic and durable) → remove the spool file. A
//! crash at any point leaves the spool file, and the next start publishes it again (identical
//! objects). A segment whose records cannot be read (a record CRC fails) is still archived —
//! it is what the server wrote — but gets no index, and the error is logged: a restore that
//! has to read it refuses it as damaged.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error};

use super::stages::{add, add_since, Stages};
use super::StreamError;
use crate::repo::layout::wal_segment_key;
use crate::repo::object::{self, ObjectKind};
use crate::repo::Repo;
use crate::spool::{MappedSegment, Spool};
use crate::wal::index::{Indexer, SegmentIndex};
use crate::wal::page::XLOG_BLCKSZ;
use crate::wal::SegmentName;

/// Reads a segment file for the encoder and feeds the indexer whole pages as they go by.
struct IndexingReader<'a, R> {
    inner: R,
    indexer: &'a mut Indexer,
    ix: SegmentIndex,
    seg: SegmentName,
    /// Bytes read but not yet fed (less than a page).
    carry: Vec<u8>,
    /// Where in the segment the next fed byte lies.
    fed: u64,
    failed: Option<crate::wal::record::RecordError>,
}

impl<R: Read> IndexingReader<'_, R> {
    fn feed(&mut self, pages: &[u8]) {
        if self.failed.is_none() && !pages.is_empty() {
            if let Err(e) = self.indexer.feed(&mut self.ix, &self.seg, self.fed, pages) {
                self.failed = Some(e);
            }
        }
        self.fed += pages.len() as u64;
    }
}

impl<R: Read> Read for IndexingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let page = XLOG_BLCKSZ as usize;
        let mut b = &buf[..n];
        if !self.carry.is_empty() {
            let take = (page - self.carry.len()).min(b.len());
            self.carry.extend_from_slice(&b[..take]);
            b = &b[take..];
            if self.carry.len() == page || n == 0 {
                let c = std::mem::take(&mut self.carry);
                self.feed(&c);
            }
        }
        let whole = b.len() / page * page;
        self.feed(&b[..whole]);
        self.carry.extend_from_slice(&b[whole..]);
        Ok(n)
    }
}

/// What the index of a published segment showed.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    Plain,
    /// Relation files were created (names to learn).
    Created,
    /// Its records did not read back (why): archived without an index.
    Damaged(String),
}

/// Publishes one complete spool segment, with its index when `indexer` is given.
pub async fn publish_segment(
    repo: &Repo,
    spool: &Spool,
    seg: SegmentName,
    level: i32,
    indexer: &mut Option<Indexer>,
) -> Result<Published, StreamError> {
    publish_segment_timed(repo, spool, seg, level, indexer, &Stages::default()).await
}

/// [`publish_segment`], adding each stage's time to `stages`.
pub(crate) async fn publish_segment_timed(
    repo: &Repo,
    spool: &Spool,
    seg: SegmentName,
    level: i32,
    indexer: &mut Option<Indexer>,
    stages: &Stages,
) -> Result<Published, StreamError> {
    let path = spool.complete_path(&seg);
    let seg_size = repo.seg_size();
    let p = path.clone();
    let mut taken = indexer.take();
    if let Some(ix) = taken.as_mut().filter(|ix| !ix.continues(&seg)) {
        repo.prime_indexer(ix, &seg).await;
    }
    let t = Instant::now();
    let resident = spool.take_resident(&seg);
    let (obj, info, taken, index) = in_background_thread(move || -> Result<_, StreamError> {
        if let Some(r) = resident {
            return encode_contiguous(r.bytes(), seg, level, taken, |_, _| Ok(()));
        }
        let mapped = MappedSegment::open(&p)
            .map_err(|e| StreamError::io(format!("reading {}", p.display()), e))?;
        match mapped {
            Some(m) => encode_mapped(&m, seg, level, taken),
            None => encode_read(&p, seg, level, taken, seg_size),
        }
    })
    .await?;
    add_since(&stages.encode_ns, t);
    *indexer = taken;
    if info.raw_size != seg_size {
        return Err(StreamError::Invariant(format!(
            "spool segment {seg} has {} bytes, expected {seg_size}",
            info.raw_size
        )));
    }
    let t = Instant::now();
    let outcome = match index {
        Some(Ok(ix)) => {
            repo.put_segment_index(&seg, &ix).await?;
            if ix.created.is_empty() {
                Published::Plain
            } else {
                Published::Created
            }
        }
        Some(Err(e)) => {
            error!(segment = %seg, error = %e, "the segment's WAL records do not read back; archived without an index");
            Published::Damaged(e.to_string())
        }
        None => Published::Plain,
    };
    let stored = obj.len();
    repo.put_encoded(&wal_segment_key(&seg), obj).await?;
    add_since(&stages.put_ns, t);
    add(&stages.segments, 1);
    add(&stages.stored_bytes, stored as u64);
    spool
        .retire(&path)
        .map_err(|e| StreamError::io(format!("retiring {}", path.display()), e))?;
    debug!(segment = %seg, stored_bytes = stored, sha256 = %info.sha256_hex(), "segment published");
    Ok(outcome)
}

/// What encoding a segment yields: the object, what its trailer records, the indexer back, and
/// the segment's index (or why its records did not read back).
type Encoded = (
    Vec<u8>,
    object::ObjectInfo,
    Option<Indexer>,
    Option<Result<SegmentIndex, crate::wal::record::RecordError>>,
);

/// Encodes a mapped spool segment in place ([`encode_contiguous`]), its pages faulted in ahead
/// of the encoder and dropped behind it.
fn encode_mapped(
    m: &MappedSegment,
    seg: SegmentName,
    level: i32,
    taken: Option<Indexer>,
) -> Result<Encoded, StreamError> {
    // Pages further behind than zstd's window are dropped from the mapping as the encoder
    // moves on: zstd does not read them again, and the mapping holds at most this much (plus
    // a step) whatever the segment size.
    let lag = object::zstd_window(level) + object::CONTIGUOUS_STEP;
    encode_contiguous(m.bytes(), seg, level, taken, |off, step| {
        m.populate(off, step.len())?;
        m.release_before(off.saturating_sub(lag));
        Ok(())
    })
}

/// Encodes a segment's bytes in place ([`object::encode_contiguous`]), indexing its pages on
/// the way when given an indexer; `prepare` runs before each step is read (a mapping faults
/// it in).
fn encode_contiguous(
    bytes: &[u8],
    seg: SegmentName,
    level: i32,
    mut taken: Option<Indexer>,
    mut prepare: impl FnMut(usize, &[u8]) -> std::io::Result<()>,
) -> Result<Encoded, StreamError> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    let mut ix = taken.as_mut().map(|ixr| ixr.begin(&seg));
    let mut failed = None;
    let info = object::encode_contiguous(
        bytes,
        &mut out,
        ObjectKind::WalSegment,
        level,
        |off, step| {
            prepare(off, step)?;
            if let (Some(ixr), Some(ix), None) = (taken.as_mut(), ix.as_mut(), failed.as_ref()) {
                if let Err(e) = ixr.feed(ix, &seg, off as u64, step) {
                    failed = Some(e);
                }
            }
            Ok(())
        },
    )
    .map_err(|e| StreamError::io(format!("compressing {seg}"), std::io::Error::other(e)))?;
    let index = match (taken.as_mut(), ix, failed) {
        (Some(ixr), Some(ix), None) => {
            ixr.finish(&seg);
            Some(Ok(ix))
        }
        (_, _, Some(e)) => Some(Err(e)),
        _ => None,
    };
    Ok((out, info, taken, index))
}

/// Encodes a spool segment read through a buffer, indexing its pages on the way when given an
/// indexer: where it cannot be mapped ([`MappedSegment::open`]).
fn encode_read(
    p: &std::path::Path,
    seg: SegmentName,
    level: i32,
    mut taken: Option<Indexer>,
    seg_size: u64,
) -> Result<Encoded, StreamError> {
    let mut f = std::fs::File::open(p)
        .map_err(|e| StreamError::io(format!("reading {}", p.display()), e))?;
    let mut out = Vec::with_capacity(seg_size as usize / 4);
    let encode = |r: &mut dyn Read, out: &mut Vec<u8>| {
        object::encode(r, out, ObjectKind::WalSegment, level).map_err(|e| {
            StreamError::io(
                format!("compressing {}", p.display()),
                std::io::Error::other(e),
            )
        })
    };
    let (info, index) = match taken {
        None => (encode(&mut f, &mut out)?, None),
        Some(ref mut ixr) => {
            let ix = ixr.begin(&seg);
            let mut r = IndexingReader {
                inner: f,
                indexer: ixr,
                ix,
                seg,
                carry: Vec::with_capacity(XLOG_BLCKSZ as usize),
                fed: 0,
                failed: None,
            };
            let info = encode(&mut r, &mut out)?;
            let rest = std::mem::take(&mut r.carry);
            r.feed(&rest);
            let IndexingReader { ix, failed, .. } = r;
            match failed {
                None => {
                    ixr.finish(&seg);
                    (info, Some(Ok(ix)))
                }
                Some(e) => (info, Some(Err(e))),
            }
        }
    };
    Ok((out, info, taken, index))
}

/// How much lower than the rest of the process the compression thread runs (`nice`): it
/// is deferrable work (a bounded queue of complete segments, already durable in the spool),
/// while the receive loop — and, next to it, PostgreSQL's backends waiting for a synchronous
/// standby's acknowledgement — must not wait behind a 16 MB compression burst.
const COMPRESS_NICE: libc::c_int = 10;

/// Runs `f` on a new thread of lower priority ([`COMPRESS_NICE`]; one per segment: ~50 µs
/// against tens of milliseconds of compression) and awaits its result.
async fn in_background_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StreamError> + Send + 'static,
) -> Result<T, StreamError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("archiver-compress".into())
        .spawn(move || {
            // SAFETY: setpriority on this thread's own id (Linux: the nice value is per thread);
            // failure (not permitted) leaves the priority as it was.
            unsafe {
                let tid = libc::gettid() as libc::id_t;
                let prio = libc::getpriority(libc::PRIO_PROCESS, tid);
                libc::setpriority(libc::PRIO_PROCESS, tid, prio.saturating_add(COMPRESS_NICE));
            }
            let _ = tx.send(f());
        })
        .map_err(|e| StreamError::io("starting the compression thread", e))?;
    rx.await.unwrap_or_else(|_| {
        Err(StreamError::Invariant(
            "the compression thread panicked".into(),
        ))
    })
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
    /// Stage totals of this stream (the session adds its own).
    pub(crate) stages: Arc<Stages>,
}

/// An indexer for the repository's WAL, if indexing is on.
pub fn indexer_for(repo: &Repo, on: bool) -> Option<Indexer> {
    on.then(|| Indexer::new(repo.seg_size(), repo.meta().pg_major))
}

impl Publisher {
    /// `names`: poked when a published segment's index shows relation files created (the
    /// name keeper then takes a snapshot, `repo::relmap::keep_names`).
    pub fn start(
        repo: Repo,
        spool: Spool,
        level: i32,
        names: Option<std::sync::Arc<tokio::sync::Notify>>,
        status: Option<std::sync::Arc<super::StreamStatus>>,
        index: bool,
    ) -> Publisher {
        let (tx, mut rx) = mpsc::channel::<SegmentName>(2);
        let stages = Arc::new(Stages::default());
        let st = stages.clone();
        let handle = tokio::spawn(async move {
            let mut n = 0;
            let mut indexer = indexer_for(&repo, index);
            while let Some(seg) = rx.recv().await {
                let outcome =
                    publish_segment_timed(&repo, &spool, seg, level, &mut indexer, &st).await?;
                match outcome {
                    Published::Created => {
                        if let Some(p) = &names {
                            p.notify_one();
                        }
                    }
                    Published::Damaged(why) => {
                        if let Some(st) = &status {
                            st.damaged_segments
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            *st.last_damage.lock().unwrap() = Some(format!("{seg}: {why}"));
                        }
                    }
                    Published::Plain => {}
                }
                record_next(&spool, seg).await?;
                n += 1;
            }
            Ok(n)
        });
        Publisher { tx, handle, stages }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> libc::c_int {
        // SAFETY: getpriority on this thread's own id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn mapped_and_read_segments_encode_and_index_alike() {
        use crate::wal::synth::{lay_out, pgbench_like};
        use crate::wal::Lsn;
        const SEG: u64 = 1 << 20;
        let start = Lsn(4 * SEG);
        let seg = SegmentName::containing(1, start, SEG);
        let (wal, _) = lay_out(
            start,
            SEG as usize,
            1,
            7,
            SEG,
            0xD110,
            pgbench_like(1000, 800_000_000_000_000),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(seg.to_string());
        let both = |raw: &[u8]| {
            std::fs::write(&path, raw).unwrap();
            let m = MappedSegment::open(&path)
                .unwrap()
                .expect("Linux 5.14+ maps");
            let mapped = encode_mapped(&m, seg, 1, Some(Indexer::new(SEG, 15))).unwrap();
            let read = encode_read(&path, seg, 1, Some(Indexer::new(SEG, 15)), SEG).unwrap();
            for (obj, info) in [(&mapped.0, &mapped.1), (&read.0, &read.1)] {
                let (back, got) = object::decode_bytes(obj).unwrap();
                assert!(back == raw);
                assert_eq!(&got, info);
            }
            assert_eq!(
                (mapped.1.raw_size, mapped.1.crc32),
                (read.1.raw_size, read.1.crc32)
            );
            assert!(
                mapped.2.is_some() && read.2.is_some(),
                "the indexer comes back"
            );
            (mapped.3.unwrap(), read.3.unwrap())
        };
        let (mapped, read) = both(&wal);
        let ix = mapped.unwrap();
        assert!(!ix.xacts.is_empty(), "{ix:?}");
        assert_eq!(read.unwrap(), ix);

        // Without an indexer, no index.
        let m = MappedSegment::open(&path).unwrap().unwrap();
        assert!(encode_mapped(&m, seg, 1, None).unwrap().3.is_none());
        drop(m);

        // A damaged record: archived all the same, without an index, saying why, either way.
        let mut bad = wal.clone();
        bad[SEG as usize / 2 + 100] ^= 0x40;
        let (mapped, read) = both(&bad);
        let (m, r) = (mapped.unwrap_err(), read.unwrap_err());
        assert_eq!(m.to_string(), r.to_string());
    }

    #[tokio::test]
    async fn compression_runs_at_lower_priority_and_returns_its_result() {
        let base = own_nice();
        let nice = in_background_thread(|| Ok(own_nice())).await.unwrap();
        assert_eq!(nice, (base + COMPRESS_NICE).min(19));
        // The caller's own priority is untouched.
        assert_eq!(own_nice(), base);
        // Errors come back as they are.
        let e = in_background_thread::<()>(|| Err(StreamError::Invariant("x".into())))
            .await
            .unwrap_err();
        assert!(e.to_string().contains('x'), "{e}");
    }
}
