//! Where a streamer's time goes, stage by stage: totals kept by the session (receive batches,
//! spool writes, fsyncs, status updates) and by the publisher (compress + checksum + index, the
//! object writes), logged once when streaming stops (`stage totals`) so a benchmark or an
//! operator can see each stage's own cost next to the process's CPU time.
//!
//! Counters only ever grow; reading them races benignly with the writers (relaxed atomics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::info;

#[derive(Debug, Default)]
pub(crate) struct Stages {
    /// WAL payload bytes received (XLogData).
    pub bytes: AtomicU64,
    /// XLogData messages received.
    pub messages: AtomicU64,
    /// Batches: messages handled between two waits on the socket (each ends in at most one
    /// fsync and one status update).
    pub batches: AtomicU64,
    /// Validating pages and writing them into the spool (`pwrite`; at a segment's end also its
    /// fsync and durable rename), nanoseconds.
    pub write_ns: AtomicU64,
    /// fsyncs of the segment being received (synchronous mode: one per batch with new WAL).
    pub fsyncs: AtomicU64,
    pub fsync_ns: AtomicU64,
    pub status_updates: AtomicU64,
    pub segments: AtomicU64,
    /// Reading a complete segment back, compressing, hashing and indexing it (one pass, on a
    /// blocking thread), nanoseconds.
    pub encode_ns: AtomicU64,
    /// Writing the index and segment objects (durably), nanoseconds.
    pub put_ns: AtomicU64,
    pub stored_bytes: AtomicU64,
}

/// Adds the time since `t` to `counter`.
pub(crate) fn add_since(counter: &AtomicU64, t: Instant) {
    counter.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stages {
    /// Logs the totals (milliseconds, counts, bytes).
    pub(crate) fn log(&self) {
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) / 1_000_000;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        info!(
            wal_bytes = n(&self.bytes),
            messages = n(&self.messages),
            batches = n(&self.batches),
            write_ms = ms(&self.write_ns),
            fsyncs = n(&self.fsyncs),
            fsync_ms = ms(&self.fsync_ns),
            status_updates = n(&self.status_updates),
            segments = n(&self.segments),
            encode_ms = ms(&self.encode_ns),
            put_ms = ms(&self.put_ns),
            stored_bytes = n(&self.stored_bytes),
            "stage totals"
        );
    }
}
