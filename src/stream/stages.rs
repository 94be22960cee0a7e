//! Where a streamer's time goes, stage by stage: totals kept by the session (receive batches,
//! spool writes, fsyncs, status updates) and by the publisher (compress + checksum + index, the
//! object writes), logged once when streaming stops (`stage totals`) so a benchmark or an
//! operator can see each stage's own cost next to the process's CPU time.
//!
//! Counters only ever grow; reading them races benignly with the writers (relaxed atomics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// The longest single write step (one message's pages; a segment's end included) and the
    /// longest single fsync, nanoseconds.
    pub slowest_write_ns: AtomicU64,
    pub slowest_fsync_ns: AtomicU64,
    /// Waiting for room in the publisher's queue (complete segments not yet compressed), in
    /// all and the longest wait, nanoseconds.
    pub queue_ns: AtomicU64,
    pub slowest_queue_ns: AtomicU64,
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

/// Adds `took` to `total` and raises `slowest` to it if longer.
pub(crate) fn add_step(total: &AtomicU64, slowest: &AtomicU64, took: Duration) {
    let ns = took.as_nanos() as u64;
    total.fetch_add(ns, Ordering::Relaxed);
    slowest.fetch_max(ns, Ordering::Relaxed);
}

/// A step of the receive loop (a write, an fsync, a wait for the publisher) that took at least
/// this long is logged: a synchronous standby's commits wait through it.
pub(crate) const SLOW_STEP: Duration = Duration::from_millis(100);

/// At most one slow-step line per this long; the steps in between are counted in the next.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(10);

/// Decides which slow steps are logged ([`SLOW_STEP`], [`SLOW_LOG_EVERY`]).
#[derive(Debug, Default)]
pub(crate) struct SlowSteps {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl SlowSteps {
    /// A step that took `took`, ending at `now`: `Some(n)` to log it now, with `n` slow steps
    /// not logged since the last line.
    pub(crate) fn note(&mut self, now: Instant, took: Duration) -> Option<u64> {
        if took < SLOW_STEP {
            return None;
        }
        if self
            .last_logged
            .is_some_and(|t| now.saturating_duration_since(t) < SLOW_LOG_EVERY)
        {
            self.unlogged += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
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
            slowest_write_ms = ms(&self.slowest_write_ns),
            slowest_fsync_ms = ms(&self.slowest_fsync_ns),
            queue_ms = ms(&self.queue_ns),
            slowest_queue_ms = ms(&self.slowest_queue_ns),
            status_updates = n(&self.status_updates),
            segments = n(&self.segments),
            encode_ms = ms(&self.encode_ns),
            put_ms = ms(&self.put_ns),
            stored_bytes = n(&self.stored_bytes),
            "stage totals"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_steps_are_logged_at_most_once_per_interval_and_counted_between() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = SlowSteps::default();
        // (seconds after t0, the step's duration, what is logged)
        let cases: &[(u64, Duration, Option<u64>)] = &[
            (0, ms(99), None),       // under the threshold: never
            (1, SLOW_STEP, Some(0)), // the first slow step: logged
            (2, ms(500), None),      // within the interval: counted
            (5, ms(150), None),      // counted
            (6, ms(20), None),       // not slow: not counted
            (11, ms(120), Some(2)),  // the interval is over: logged, with the two between
            (12, ms(3000), None),    // counted again
            (30, ms(100), Some(1)),
        ];
        for &(at, took, want) in cases {
            assert_eq!(
                s.note(t0 + Duration::from_secs(at), took),
                want,
                "at {at} s, {took:?}"
            );
        }
    }

    #[test]
    fn steps_add_up_and_keep_the_longest() {
        let st = Stages::default();
        for ms in [3, 40, 7] {
            add_step(
                &st.fsync_ns,
                &st.slowest_fsync_ns,
                Duration::from_millis(ms),
            );
        }
        assert_eq!(st.fsync_ns.load(Ordering::Relaxed), 50_000_000);
        assert_eq!(st.slowest_fsync_ns.load(Ordering::Relaxed), 40_000_000);
    }
}
