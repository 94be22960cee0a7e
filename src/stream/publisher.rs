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
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

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
    let mut taken = indexer.take();
    if let Some(ix) = taken.as_mut().filter(|ix| !ix.continues(&seg)) {
        repo.prime_indexer(ix, &seg).await;
    }
    let t = Instant::now();
    let resident = spool.take_resident(&seg);
    let class = CompressClass::now();
    // What the indexer was before this segment: the retry's, if the first try is starved.
    let before = (class == CompressClass::Idle)
        .then(|| taken.clone())
        .flatten();
    let seg_size = repo.seg_size();
    let job = |resident, indexer| EncodeJob {
        resident,
        path: path.clone(),
        seg,
        level,
        indexer,
        seg_size,
    };
    let mut encoded = encode_in_background(class, IdleRule::REAL, job(resident, taken)).await?;
    if encoded.is_none() {
        CompressClass::suspend_idle();
        info!(segment = %seg, suspended_for = ?IDLE_SUSPENSION,
            "compression at idle priority was starved of CPU; compressing at nice +10 for a while");
        encoded =
            encode_in_background(CompressClass::Nice, IdleRule::REAL, job(None, before)).await?;
    }
    let (obj, info, taken, index) = encoded.ok_or_else(|| {
        StreamError::Invariant("compression at nice +10 has no bound to give up at".into())
    })?;
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
    bound: &Bound,
) -> Result<Encoded, StreamError> {
    // Pages further behind than zstd's window are dropped from the mapping as the encoder
    // moves on: zstd does not read them again, and the mapping holds at most this much (plus
    // a step) whatever the segment size.
    let lag = object::zstd_window(level) + object::CONTIGUOUS_STEP;
    encode_contiguous(m.bytes(), seg, level, taken, |off, step| {
        bound.check()?;
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
    bound: &Bound,
) -> Result<Encoded, StreamError> {
    let file = std::fs::File::open(p)
        .map_err(|e| StreamError::io(format!("reading {}", p.display()), e))?;
    let mut f = Bounded { inner: file, bound };
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

/// How much lower than the rest of the process the compression thread runs (`nice`) when it
/// does not run at idle priority ([`CompressClass`]): a fair share of a busy machine, below the
/// receive loop's.
const COMPRESS_NICE: libc::c_int = 10;

/// When a compression at idle priority counts as starved: its thread got under a quarter of a
/// CPU over a whole [`IdleRule::window`] of wall time. Compressing a 16 MB segment takes tens
/// of milliseconds of CPU, so on a machine with CPU to spare a window never closes starved,
/// whatever the segment size; on one whose CPUs are all busy, one does within about a second.
#[derive(Clone, Copy)]
struct IdleRule {
    window: Duration,
    /// The calling thread's CPU time so far.
    cpu: fn() -> Duration,
}

impl IdleRule {
    const REAL: IdleRule = IdleRule {
        window: Duration::from_secs(1),
        cpu: thread_cpu,
    };
}

/// `CLOCK_THREAD_CPUTIME_ID`: the CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; it cannot fail for this clock.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// How long compression stays at [`COMPRESS_NICE`] after a compression at idle priority was
/// starved (a machine whose CPUs are full).
const IDLE_SUSPENSION: Duration = Duration::from_secs(60);

/// Until when idle priority is not used (process-wide: a starved CPU is the machine's state).
static IDLE_SUSPENDED_UNTIL: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// The priority a segment's compression runs at. Compression is deferrable work (a bounded
/// queue of complete segments, already durable in the spool), while the receive loop — and,
/// next to it, PostgreSQL's backends waiting for a synchronous standby's acknowledgement — must
/// not wait behind a 16 MB compression burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CompressClass {
    /// `SCHED_IDLE` (sched(7)): the thread runs on CPU time nothing else wants and gives way at
    /// once to any other thread that wakes, where a nice thread keeps its slice. A starved
    /// compression ([`IdleRule`]) gives up and runs again as [`CompressClass::Nice`] (an
    /// unprivileged thread cannot leave `SCHED_IDLE`), and idle priority is suspended for
    /// [`IDLE_SUSPENSION`].
    Idle,
    /// `nice` + [`COMPRESS_NICE`], without a bound.
    Nice,
}

impl CompressClass {
    /// Idle, unless a starved compression suspended it lately.
    fn now() -> CompressClass {
        match *IDLE_SUSPENDED_UNTIL.lock().unwrap() {
            Some(until) if Instant::now() < until => CompressClass::Nice,
            _ => CompressClass::Idle,
        }
    }

    fn suspend_idle() {
        *IDLE_SUSPENDED_UNTIL.lock().unwrap() = Some(Instant::now() + IDLE_SUSPENSION);
    }

    /// Sets the calling thread's priority; returns the bound it must keep to: `idle` at idle
    /// priority, none at nice or if idle priority could not be set (e.g. under a seccomp
    /// filter: the nice value holds all the same).
    fn enter(self, idle: IdleRule) -> Bound {
        // SAFETY: setpriority and sched_setscheduler on this thread's own id (Linux: both are
        // per thread); failure (not permitted) leaves the priority as it was.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let prio = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, prio.saturating_add(COMPRESS_NICE));
            if self == CompressClass::Idle {
                let param = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 {
                    return Bound::by(idle);
                }
            }
        }
        Bound::none()
    }
}

/// Whether a compression at idle priority gives up ([`IdleRule`]), checked before each step it
/// reads.
struct Bound {
    rule: Option<IdleRule>,
    /// Where the current window began: wall time and the thread's CPU time.
    since: std::cell::Cell<(Instant, Duration)>,
    passed: std::cell::Cell<bool>,
}

impl Bound {
    fn none() -> Bound {
        Bound {
            rule: None,
            since: std::cell::Cell::new((Instant::now(), Duration::ZERO)),
            passed: std::cell::Cell::new(false),
        }
    }

    /// Kept by the calling thread from now on.
    fn by(rule: IdleRule) -> Bound {
        Bound {
            rule: Some(rule),
            since: std::cell::Cell::new((Instant::now(), (rule.cpu)())),
            passed: std::cell::Cell::new(false),
        }
    }

    /// An error (remembered: [`Bound::passed`]) once a whole window has gone by with the
    /// thread starved.
    fn check(&self) -> std::io::Result<()> {
        let Some(rule) = self.rule else {
            return Ok(());
        };
        let (t0, c0) = self.since.get();
        let wall = t0.elapsed();
        if wall < rule.window {
            return Ok(());
        }
        let cpu = (rule.cpu)();
        if cpu.saturating_sub(c0) * 4 <= wall {
            self.passed.set(true);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "compression starved of CPU at idle priority",
            ));
        }
        self.since.set((Instant::now(), cpu));
        Ok(())
    }

    fn passed(&self) -> bool {
        self.passed.get()
    }
}

/// A reader that fails once its [`Bound`] gives up.
struct Bounded<'a, R> {
    inner: R,
    bound: &'a Bound,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.bound.check()?;
        self.inner.read(buf)
    }
}

/// A complete segment to encode: from its resident buffer if there is one, else its spool file.
struct EncodeJob {
    resident: Option<crate::spool::ResidentSegment>,
    path: std::path::PathBuf,
    seg: SegmentName,
    level: i32,
    indexer: Option<Indexer>,
    seg_size: u64,
}

/// Encodes `job` on a new thread at `class`'s priority (one thread per segment: ~50 µs against
/// tens of milliseconds of compression). `None`: the compression was starved at idle priority
/// and gave up (`idle`: [`IdleRule::REAL`]); the indexer it took is spent.
async fn encode_in_background(
    class: CompressClass,
    idle: IdleRule,
    job: EncodeJob,
) -> Result<Option<Encoded>, StreamError> {
    in_background_thread(move || -> Result<_, StreamError> {
        let bound = class.enter(idle);
        let EncodeJob {
            resident,
            path,
            seg,
            level,
            indexer,
            seg_size,
        } = job;
        let encoded = if let Some(r) = resident {
            encode_contiguous(r.bytes(), seg, level, indexer, |_, _| bound.check())
        } else {
            let mapped = MappedSegment::open(&path)
                .map_err(|e| StreamError::io(format!("reading {}", path.display()), e))?;
            match mapped {
                Some(m) => encode_mapped(&m, seg, level, indexer, &bound),
                None => encode_read(&path, seg, level, indexer, seg_size, &bound),
            }
        };
        match encoded {
            Err(_) if bound.passed() => Ok(None),
            e => e.map(Some),
        }
    })
    .await
}

/// Runs `f` on a new thread and awaits its result.
async fn in_background_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StreamError> + Send + 'static,
) -> Result<T, StreamError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("archiver-compress".into())
        .spawn(move || {
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

    /// A 1 MiB segment of pgbench-like WAL at segment number `segno`.
    fn synthetic_segment(segno: u64) -> (SegmentName, Vec<u8>) {
        use crate::wal::synth::{lay_out, pgbench_like};
        use crate::wal::Lsn;
        let start = Lsn(segno * SYNTH_SEG);
        let (wal, _) = lay_out(
            start,
            SYNTH_SEG as usize,
            1,
            7,
            SYNTH_SEG,
            0xD110,
            pgbench_like(1000, 800_000_000_000_000),
        );
        (SegmentName::containing(1, start, SYNTH_SEG), wal)
    }
    const SYNTH_SEG: u64 = 1 << 20;

    #[test]
    fn mapped_and_read_segments_encode_and_index_alike() {
        const SEG: u64 = SYNTH_SEG;
        let (seg, wal) = synthetic_segment(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(seg.to_string());
        let both = |raw: &[u8]| {
            std::fs::write(&path, raw).unwrap();
            let m = MappedSegment::open(&path)
                .unwrap()
                .expect("Linux 5.14+ maps");
            let mapped =
                encode_mapped(&m, seg, 1, Some(Indexer::new(SEG, 15)), &Bound::none()).unwrap();
            let read = encode_read(
                &path,
                seg,
                1,
                Some(Indexer::new(SEG, 15)),
                SEG,
                &Bound::none(),
            )
            .unwrap();
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
        assert!(encode_mapped(&m, seg, 1, None, &Bound::none())
            .unwrap()
            .3
            .is_none());
        drop(m);

        // A damaged record: archived all the same, without an index, saying why, either way.
        let mut bad = wal.clone();
        bad[SEG as usize / 2 + 100] ^= 0x40;
        let (mapped, read) = both(&bad);
        let (m, r) = (mapped.unwrap_err(), read.unwrap_err());
        assert_eq!(m.to_string(), r.to_string());
    }

    fn own_policy() -> libc::c_int {
        // SAFETY: sched_getscheduler of the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[tokio::test]
    async fn compression_runs_below_the_receive_loop_and_returns_its_result() {
        let base = own_nice();
        let base_policy = own_policy();
        // Nice: COMPRESS_NICE lower, the normal policy, no bound.
        let (nice, policy, bounded) = in_background_thread(|| {
            let b = CompressClass::Nice.enter(IdleRule::REAL);
            Ok((own_nice(), own_policy(), b.rule.is_some()))
        })
        .await
        .unwrap();
        assert_eq!(nice, (base + COMPRESS_NICE).min(19));
        assert_eq!((policy, bounded), (libc::SCHED_OTHER, false));
        // Idle: SCHED_IDLE (nice as well, should it ever leave it), and bounded.
        let (nice, policy, bounded) = in_background_thread(|| {
            let b = CompressClass::Idle.enter(IdleRule::REAL);
            Ok((own_nice(), own_policy(), b.rule.is_some()))
        })
        .await
        .unwrap();
        assert_eq!(nice, (base + COMPRESS_NICE).min(19));
        assert_eq!((policy, bounded), (libc::SCHED_IDLE, true));
        // The caller's own priority is untouched.
        assert_eq!((own_nice(), own_policy()), (base, base_policy));
        // Errors come back as they are.
        let e = in_background_thread::<()>(|| Err(StreamError::Invariant("x".into())))
            .await
            .unwrap_err();
        assert!(e.to_string().contains('x'), "{e}");
    }

    fn no_cpu() -> Duration {
        Duration::ZERO
    }

    /// A second of CPU more at each call.
    fn a_second_more() -> Duration {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SECS: AtomicU64 = AtomicU64::new(0);
        Duration::from_secs(SECS.fetch_add(1, Ordering::Relaxed))
    }

    /// A thread that never gets the CPU, judged at once.
    const STARVED: IdleRule = IdleRule {
        window: Duration::ZERO,
        cpu: no_cpu,
    };
    /// A window that never closes.
    const NEVER: IdleRule = IdleRule {
        window: Duration::from_secs(3600),
        cpu: thread_cpu,
    };

    #[test]
    fn a_bound_gives_up_only_on_a_window_starved_of_cpu() {
        let b = Bound::by(STARVED);
        assert!(b.check().is_err() && b.passed());
        // CPU keeping pace with the wall clock: never, however often it is judged.
        let fed = Bound::by(IdleRule {
            window: Duration::ZERO,
            cpu: a_second_more,
        });
        for _ in 0..5 {
            fed.check().unwrap();
        }
        assert!(!fed.passed());
        // A window still open, or no rule: not judged.
        let open = Bound::by(IdleRule {
            window: Duration::from_secs(3600),
            cpu: no_cpu,
        });
        let none = Bound::none();
        for b in [&open, &none] {
            b.check().unwrap();
            assert!(!b.passed());
        }
        // The real rule: a thread's own CPU time, which grows as it works.
        let t0 = (IdleRule::REAL.cpu)();
        let mut x = 0u64;
        while (IdleRule::REAL.cpu)() == t0 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!((IdleRule::REAL.cpu)() > t0);
    }

    #[tokio::test]
    async fn a_starved_compression_gives_up_and_the_retry_encodes_the_same() {
        const SEG: u64 = SYNTH_SEG;
        let (seg, wal) = synthetic_segment(6);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(seg.to_string());
        std::fs::write(&path, &wal).unwrap();
        let job = || EncodeJob {
            resident: None,
            path: path.clone(),
            seg,
            level: 1,
            indexer: Some(Indexer::new(SEG, 15)),
            seg_size: SEG,
        };
        // Starved from the first step: gives up, whichever way it reads.
        let gave_up = encode_in_background(CompressClass::Idle, STARVED, job()).await;
        assert!(gave_up.unwrap().is_none());
        let starved = Bound::by(STARVED);
        let e = encode_read(&path, seg, 1, Some(Indexer::new(SEG, 15)), SEG, &starved);
        assert!(e.is_err() && starved.passed());
        let starved = Bound::by(STARVED);
        let e = encode_contiguous(&wal, seg, 1, None, |_, _| starved.check());
        assert!(e.is_err() && starved.passed());
        // An error that is not the bound's is an error, not a give-up.
        let missing = EncodeJob {
            path: dir.path().join("gone"),
            ..job()
        };
        let e = encode_in_background(CompressClass::Idle, NEVER, missing).await;
        assert!(e.is_err());

        // The retry at nice, and an idle one not starved, make what an unbounded encoding
        // makes: the same object, the same index.
        let m = MappedSegment::open(&path).unwrap().unwrap();
        let (obj, info, _, index) =
            encode_mapped(&m, seg, 1, Some(Indexer::new(SEG, 15)), &Bound::none()).unwrap();
        let index = index.unwrap().unwrap();
        assert!(!index.xacts.is_empty());
        for (class, rule) in [(CompressClass::Nice, STARVED), (CompressClass::Idle, NEVER)] {
            let (o, i, ix, idx) = encode_in_background(class, rule, job())
                .await
                .unwrap()
                .expect("not starved");
            assert!(o == obj, "{class:?}");
            assert_eq!(i, info);
            assert!(ix.is_some(), "the indexer comes back");
            assert_eq!(idx.unwrap().unwrap(), index);
        }
    }

    #[test]
    fn a_starved_compression_suspends_idle_priority_for_a_while() {
        *IDLE_SUSPENDED_UNTIL.lock().unwrap() = None;
        assert_eq!(CompressClass::now(), CompressClass::Idle);
        CompressClass::suspend_idle();
        assert_eq!(CompressClass::now(), CompressClass::Nice);
        let until = IDLE_SUSPENDED_UNTIL.lock().unwrap().unwrap();
        assert!(until > Instant::now() + IDLE_SUSPENSION - Duration::from_secs(5));
        // Once it is over, idle again.
        *IDLE_SUSPENDED_UNTIL.lock().unwrap() = Some(Instant::now());
        assert_eq!(CompressClass::now(), CompressClass::Idle);
        *IDLE_SUSPENDED_UNTIL.lock().unwrap() = None;
    }
}
