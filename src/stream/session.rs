//! One replication session: `START_REPLICATION`, then the CopyBoth loop — validate, write in
//! place, fsync per policy, report status — and timeline switches.
//!
//! Durability rule (invariant 1): `flushed` only moves after an fsync of the spool file (or the
//! completion of a segment, which fsyncs), and status updates report at most `flushed`.
//! Reported positions never go backwards.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::assembler::Assembler;
use super::publisher::Publisher;
use super::stages::{add, add_step, SlowSteps, SLOW_STEP};
use super::{StartPoint, StreamConfig, StreamError};
use crate::pg::conn::Backend;
use crate::pg::replication::{self, ReplicationMessage, ServerInfo, StartOutcome, StreamEvent};
use crate::pg::{Connection, PgError};
use crate::repo::layout::history_key;
use crate::repo::object::ObjectKind;
use crate::repo::Repo;
use crate::spool::{FlushRecord, Spool};
use crate::wal::timeline::parse_history;
use crate::wal::{Lsn, TimeLineId};

/// What a blocking read of an asynchronous stream waits for (`SO_RCVLOWAT`), unless
/// [`BLOCKING_WAIT`](crate::pg::conn::BLOCKING_WAIT) passes first: one wake-up per 256 KiB of
/// WAL rather than one per message. As a runtime task that read every 5 ms at most, such a
/// stream cost 14-20% more CPU per GB of WAL, its wake-ups (context switches, `epoll_wait`)
/// a third of it (docs/benchmarks.md).
const ASYNC_BATCH: usize = 256 * 1024;

/// The low-water mark for an asynchronous stream's next read: [`ASYNC_BATCH`], but never more
/// than the bytes still missing from the segment being received (`to_end`, less what the
/// connection holds of a message already, `buffered`). A segment's last piece is often smaller
/// than a batch — always after a WAL switch, when the server sends the zeroed rest of the
/// segment and then nothing — and waiting for a full batch left it in the socket until
/// [`BLOCKING_WAIT`](crate::pg::conn::BLOCKING_WAIT) passed: 100 ms of every backup's wait
/// for its stop segment (docs/benchmarks.md). Message headers make the bytes on the wire a
/// little more than the WAL they carry, so this wakes at the latest when the segment is
/// complete, possibly once before.
fn low_water(to_end: u64, buffered: usize) -> usize {
    let missing = to_end.saturating_sub(buffered as u64);
    usize::try_from(missing).map_or(ASYNC_BATCH, |m| m.clamp(1, ASYNC_BATCH))
}

pub struct Session<'a> {
    conn: Connection,
    repo: &'a Repo,
    spool: &'a Spool,
    cfg: &'a StreamConfig,
    publisher: &'a mut Publisher,
    seg_size: u64,
    /// The spool segment being received, validated and written in place.
    wal: Assembler,
    /// Where readers learn the durable prefix of the segment being received (opened at the
    /// first fsync).
    flush_record: Option<FlushRecord>,
    /// Everything before this is fsync'd.
    flushed: Lsn,
    sent_write: Lsn,
    sent_flush: Lsn,
    server_end: Lsn,
    last_status: Instant,
    last_sync: Instant,
    last_progress: Instant,
    progress_bytes: u64,
    reply_due: bool,
    bytes_received: u64,
    /// Slots archiver created that nobody streams from (named in every progress line).
    pub(crate) abandoned_slots: String,
    slow_steps: SlowSteps,
    /// The socket's low-water mark as last set (an asynchronous stream; [`low_water`]).
    low_water: usize,
}

/// A step of the receive loop whose time is accounted ([`Session::end_step`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// One message's pages into the spool (a segment's end included).
    Write,
    /// One fsync of the segment being received.
    Fsync,
    /// Waiting for room in the publisher's queue.
    Queue,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Write => "write",
            Step::Fsync => "fsync",
            Step::Queue => "queue",
        }
    }
}

/// Resolves once shutdown is requested; never, if the sender is gone without requesting it.
pub(crate) async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> StreamError + '_ {
    move |e| StreamError::io(context, e)
}

impl<'a> Session<'a> {
    pub fn new(
        conn: Connection,
        server: &ServerInfo,
        repo: &'a Repo,
        spool: &'a Spool,
        cfg: &'a StreamConfig,
        publisher: &'a mut Publisher,
        tli: TimeLineId,
    ) -> Self {
        let seg_size = repo.seg_size();
        let wal = Assembler::new(
            spool.clone().allocate_only(!cfg.synchronous),
            seg_size,
            repo.system_identifier(),
            server.major(),
            tli,
            Lsn(0),
        )
        .preallocating();
        let now = Instant::now();
        Session {
            conn,
            repo,
            spool,
            cfg,
            publisher,
            seg_size,
            wal,
            flush_record: None,
            flushed: Lsn(0),
            sent_write: Lsn(0),
            sent_flush: Lsn(0),
            server_end: Lsn(0),
            last_status: now,
            last_sync: now,
            last_progress: now,
            progress_bytes: 0,
            reply_due: false,
            bytes_received: 0,
            abandoned_slots: String::new(),
            slow_steps: SlowSteps::default(),
            low_water: 1,
        }
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Streams from `start` until shutdown (Ok) or an error.
    pub async fn run(
        &mut self,
        start: StartPoint,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamError> {
        self.archive_history(start.tli).await?;
        self.start_streaming(start.lsn).await?;
        if !super::on_own_thread() {
            return Err(StreamError::Invariant(
                "a stream runs only on a thread of its own (run_where_cheapest)".into(),
            ));
        }
        if !self.conn.detach()? {
            return Err(PgError::Closed.into());
        }
        if self.cfg.synchronous {
            info!("synchronous stream: on a thread of its own, blocking on its socket");
        } else {
            // Nothing waits on each message here: wake per batch, not per packet.
            self.set_low_water()?;
            info!("stream: on a thread of its own, reading its socket in batches");
        }
        self.run_blocking(shutdown).await
    }

    /// The loop of a stream on a thread of its own, over a [detached](Connection::detach)
    /// connection: read (blocking), write, fsync (at once when synchronous, else on the
    /// interval), reply. An asynchronous stream's reads wait for [`ASYNC_BATCH`] bytes.
    ///
    /// Every commit of a synchronous standby waits on this loop's reply, and in the async
    /// loop each round trip also went through the runtime: an `epoll_wait` in the I/O
    /// driver, a waker, the scheduler and the `select!` over the stop request and the timer
    /// — over a third of the loop's user CPU in a profile, and several microseconds between
    /// the wake-up and the `recv`. Here the thread sleeps in `recv` itself. Timers and the
    /// stop request are looked at after each batch and at least every
    /// [`BLOCKING_WAIT`](crate::pg::conn::BLOCKING_WAIT).
    async fn run_blocking(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamError> {
        loop {
            if *shutdown.borrow() {
                return self.stop().await;
            }
            if let Some(msg) = self.conn.next_message_blocking()? {
                self.handle(msg).await?;
                while let Some(m) = self.conn.try_next_message()? {
                    self.handle(m).await?;
                }
                add(&self.publisher.stages.batches, 1);
                self.after_batch().await?;
                self.set_low_water()?;
            }
            if Instant::now() >= self.next_deadline() {
                self.on_timer().await?;
            }
        }
    }

    /// Issues `START_REPLICATION` at `start` (a segment boundary) on the current timeline,
    /// following timelines that end exactly there.
    async fn start_streaming(&mut self, mut start: Lsn) -> Result<(), StreamError> {
        debug_assert_eq!(start.segment_offset(self.seg_size), 0);
        let mut tli = self.wal.tli();
        loop {
            let slot = Some(self.cfg.slot.as_str());
            match replication::start_replication(&mut self.conn, slot, start, tli).await? {
                StartOutcome::Streaming => {
                    info!(tli, %start, "streaming started");
                    self.cfg.report(|st| {
                        st.timeline.store(tli, Ordering::Relaxed);
                        st.connected.store(true, Ordering::Relaxed);
                    });
                    self.wal.restart(tli, start)?;
                    self.flushed = self.flushed.max(start);
                    return Ok(());
                }
                StartOutcome::TimelineEnded { next_tli, switch } => {
                    info!(tli, next_tli, %switch, "timeline ends at the start point; following it");
                    self.archive_history(next_tli).await?;
                    tli = next_tli;
                    start = switch.segment_start(self.seg_size);
                }
            }
        }
    }

    /// Archives `0000000N.history` for `tli` (> 1) unless the repository has it.
    async fn archive_history(&mut self, tli: TimeLineId) -> Result<(), StreamError> {
        if tli <= 1
            || self
                .repo
                .storage()
                .exists(&history_key(tli))
                .await
                .map_err(crate::repo::RepoError::from)?
        {
            return Ok(());
        }
        let (name, content) = replication::timeline_history(&mut self.conn, tli).await?;
        let text = std::str::from_utf8(&content)
            .map_err(|_| PgError::Protocol(format!("history file {name} is not text")))?;
        parse_history(text).map_err(|e| PgError::Protocol(format!("history file {name}: {e}")))?;
        self.repo
            .put_raw(
                &history_key(tli),
                content,
                ObjectKind::History,
                self.cfg.compress_level,
            )
            .await?;
        info!(tli, file = %name, "archived timeline history");
        Ok(())
    }

    fn next_deadline(&self) -> Instant {
        let mut d = self.last_status + self.cfg.status_interval;
        d = d.min(self.last_progress + self.cfg.progress_interval);
        if self.wal.dirty() {
            d = d.min(self.last_sync + self.cfg.fsync_interval);
        }
        d
    }

    async fn on_timer(&mut self) -> Result<(), StreamError> {
        self.publisher.check().await?;
        if self.wal.dirty() && self.last_sync.elapsed() >= self.cfg.fsync_interval {
            self.sync()?;
            self.send_status(false).await?;
        }
        if self.last_status.elapsed() >= self.cfg.status_interval {
            self.send_status(false).await?;
        }
        if self.last_progress.elapsed() >= self.cfg.progress_interval {
            self.log_progress();
        }
        Ok(())
    }

    fn log_progress(&mut self) {
        let secs = self.last_progress.elapsed().as_secs_f64().max(0.001);
        let lag = self.server_end.0.saturating_sub(self.flushed.0);
        info!(
            tli = self.wal.tli(),
            received = %self.wal.received(),
            flushed = %self.flushed,
            server_end = %self.server_end,
            lag_bytes = lag,
            rate_mb_s = format!("{:.2}", self.progress_bytes as f64 / secs / 1e6),
            "progress"
        );
        if !self.abandoned_slots.is_empty() {
            warn!(
                abandoned_slots = %self.abandoned_slots,
                "progress: replication slots archiver created are not streamed from and retain WAL on the server"
            );
        }
        self.last_progress = Instant::now();
        self.progress_bytes = 0;
    }

    /// Sets the socket's low-water mark for the next read of an asynchronous stream, when it
    /// changes ([`low_water`]): a batch, or what the segment being received still misses. A
    /// synchronous stream keeps the default, 1: every commit waits on its reply.
    fn set_low_water(&mut self) -> Result<(), StreamError> {
        if self.cfg.synchronous {
            return Ok(());
        }
        let to_end = self.seg_size - self.wal.received().segment_offset(self.seg_size);
        let want = low_water(to_end, self.conn.buffered());
        if want != self.low_water {
            self.conn.set_recv_low_water(want)?;
            self.low_water = want;
        }
        Ok(())
    }

    async fn after_batch(&mut self) -> Result<(), StreamError> {
        let due = self.cfg.synchronous || self.last_sync.elapsed() >= self.cfg.fsync_interval;
        if due && self.wal.dirty() {
            self.sync()?;
            self.reply_due = true;
        }
        if self.reply_due {
            self.send_status(false).await?;
        }
        Ok(())
    }

    /// fsyncs the current segment file; everything received is then durable, and the durable
    /// prefix is recorded for readers (restore, `wal-fetch`) before any status reports it.
    fn sync(&mut self) -> Result<(), StreamError> {
        let (t, dirty) = (Instant::now(), self.wal.dirty());
        let synced = self.wal.sync()?;
        if dirty {
            add(&self.publisher.stages.fsyncs, 1);
            self.end_step(Step::Fsync, t);
        }
        if let Some((seg, synced)) = synced {
            if self.flush_record.is_none() {
                self.flush_record = Some(
                    self.spool
                        .open_flush_record()
                        .map_err(io("opening the spool's flush record"))?,
                );
            }
            let rec = self.flush_record.as_mut().expect("opened above");
            rec.record(seg, synced)
                .map_err(io("writing the spool's flush record"))?;
        }
        self.flushed = self.flushed.max(self.wal.received());
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Accounts a step of the receive loop that began at `t` (its stage's total and longest
    /// step) and logs it if it was slow ([`SlowSteps`]): any step when synchronous (the
    /// server's commits wait through it), otherwise only a wait for the publisher (an
    /// asynchronous stream's fsyncs cover a second of WAL or a whole segment, and may take that
    /// long on a busy disk without holding anything up).
    fn end_step(&mut self, step: Step, t: Instant) {
        let took = t.elapsed();
        let st = &self.publisher.stages;
        let (total, slowest) = match step {
            Step::Write => (&st.write_ns, &st.slowest_write_ns),
            Step::Fsync => (&st.fsync_ns, &st.slowest_fsync_ns),
            Step::Queue => (&st.queue_ns, &st.slowest_queue_ns),
        };
        add_step(total, slowest, took);
        if took < SLOW_STEP || (!self.cfg.synchronous && step != Step::Queue) {
            return;
        }
        if let Some(unlogged) = self.slow_steps.note(Instant::now(), took) {
            warn!(
                step = step.name(),
                took_ms = took.as_millis() as u64,
                slow_steps_not_logged = unlogged,
                synchronous = self.cfg.synchronous,
                "a step of the WAL receive loop was slow (write: the spool's disk; fsync: its \
                 flush; queue: compression falling behind); a synchronous standby's commits \
                 wait through it"
            );
        }
    }

    async fn send_status(&mut self, reply_requested: bool) -> Result<(), StreamError> {
        self.sent_write = self.sent_write.max(self.wal.received());
        self.sent_flush = self.sent_flush.max(self.flushed);
        replication::send_status(
            &mut self.conn,
            self.sent_write,
            self.sent_flush,
            reply_requested,
        )
        .await?;
        add(&self.publisher.stages.status_updates, 1);
        self.cfg.report(|st| {
            st.received.fetch_max(self.sent_write.0, Ordering::Relaxed);
            st.flushed.fetch_max(self.sent_flush.0, Ordering::Relaxed);
            st.server_end
                .fetch_max(self.server_end.0, Ordering::Relaxed);
            st.timeline.store(self.wal.tli(), Ordering::Relaxed);
        });
        if let Some(tx) = &self.cfg.flushed {
            let p = crate::wal::WalPoint {
                tli: self.wal.tli(),
                lsn: self.sent_flush,
            };
            tx.send_if_modified(|cur| {
                let changed = *cur != Some(p);
                *cur = Some(p);
                changed
            });
        }
        self.last_status = Instant::now();
        self.reply_due = false;
        Ok(())
    }

    async fn handle(&mut self, msg: Backend) -> Result<(), StreamError> {
        match replication::stream_event(msg)? {
            Some(StreamEvent::Message(ReplicationMessage::XLogData {
                start,
                server_end,
                data,
                ..
            })) => {
                self.server_end = self.server_end.max(server_end);
                self.on_wal(start, data).await
            }
            Some(StreamEvent::Message(ReplicationMessage::Keepalive {
                server_end,
                reply_requested,
                ..
            })) => {
                self.server_end = self.server_end.max(server_end);
                self.cfg
                    .report(|st| _ = st.server_end.fetch_max(server_end.0, Ordering::Relaxed));
                self.reply_due |= reply_requested;
                Ok(())
            }
            Some(StreamEvent::End) => self.end_of_timeline().await,
            None => Ok(()),
        }
    }

    /// Writes WAL through the assembler; hands off segments as they complete (each fsync'd).
    async fn on_wal(&mut self, start: Lsn, data: Bytes) -> Result<(), StreamError> {
        let t = Instant::now();
        let done = self.wal.write(start, &data).await?;
        self.end_step(Step::Write, t);
        add(&self.publisher.stages.messages, 1);
        add(&self.publisher.stages.bytes, data.len() as u64);
        for seg in done {
            self.flushed = self.flushed.max(seg.end_lsn());
            self.last_sync = Instant::now();
            self.reply_due = true;
            debug!(segment = %seg, "segment complete");
            let t = Instant::now();
            self.publisher.submit(seg).await?;
            self.end_step(Step::Queue, t);
        }
        self.bytes_received += data.len() as u64;
        self.progress_bytes += data.len() as u64;
        Ok(())
    }

    /// The server ended our timeline (CopyDone): archive the old timeline's last segment as a
    /// partial object and the new history file, then continue on the next timeline.
    async fn end_of_timeline(&mut self) -> Result<(), StreamError> {
        self.sync()?;
        self.send_status(false).await?;
        let (next_tli, switch) = match replication::finish_copy(&mut self.conn).await? {
            StartOutcome::TimelineEnded { next_tli, switch } => (next_tli, switch),
            StartOutcome::Streaming => unreachable!("finish_copy never returns Streaming"),
        };
        let received = self.wal.received();
        info!(old_tli = self.wal.tli(), next_tli, %switch, %received, "end of timeline");
        if received != switch {
            warn!(%received, %switch, "the old timeline's WAL does not end at the switch point");
        }
        let archived = self
            .wal
            .archive_partial(self.repo, self.cfg.compress_level)
            .await?;
        if let Some((segment, bytes)) = archived {
            info!(%segment, bytes, "archived the old timeline's last segment as partial");
        }
        self.archive_history(next_tli).await?;
        self.wal
            .restart(next_tli, switch.segment_start(self.seg_size))?;
        self.start_streaming(switch.segment_start(self.seg_size))
            .await
    }

    /// Graceful stop: fsync, final status update, close.
    async fn stop(&mut self) -> Result<(), StreamError> {
        self.sync()?;
        self.send_status(false).await?;
        info!(flushed = %self.flushed, "stopped; final status sent");
        self.conn.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_is_a_batch_or_what_the_segment_still_misses() {
        const SEG: u64 = 16 << 20;
        // (bytes to the segment's end, bytes of a message already buffered, low-water mark)
        let cases = [
            (SEG, 0, ASYNC_BATCH),
            (SEG, 100_000, ASYNC_BATCH),
            (ASYNC_BATCH as u64 + 1, 0, ASYNC_BATCH),
            (ASYNC_BATCH as u64, 0, ASYNC_BATCH),
            (ASYNC_BATCH as u64 - 1, 0, ASYNC_BATCH - 1),
            // The zeroed rest of a switched segment: its last 100 KiB, 30 KiB of it buffered.
            (100 * 1024, 30 * 1024, 70 * 1024),
            (8192, 0, 8192),
            // Already buffered all it misses (a message's header still to come): never 0,
            // which would make a read return at once, empty-handed.
            (8192, 8192, 1),
            (8192, 9000, 1),
            (1, 0, 1),
        ];
        for (to_end, buffered, want) in cases {
            assert_eq!(low_water(to_end, buffered), want, "{to_end} {buffered}");
        }
    }
}
