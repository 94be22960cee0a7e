//! One replication session: `START_REPLICATION`, then the CopyBoth loop — validate, write in
//! place, fsync per policy, report status — and timeline switches.
//!
//! Durability rule (invariant 1): `flushed` only moves after an fsync of the spool file (or the
//! completion of a segment, which fsyncs), and status updates report at most `flushed`.
//! Reported positions never go backwards.

use std::time::Instant;

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;
use tracing::{debug, info, warn};

use super::publisher::Publisher;
use super::{StartPoint, StreamConfig, StreamError};
use crate::pg::conn::{parse_error_fields, Backend};
use crate::pg::replication::{self, ReplicationMessage, ServerInfo, StartOutcome};
use crate::pg::{Connection, PgError};
use crate::repo::layout::{history_key, partial_segment_key};
use crate::repo::object::ObjectKind;
use crate::repo::Repo;
use crate::spool::{FlushRecord, SegmentFile, Spool};
use crate::wal::page::{page_magic_for_major, PageValidator};
use crate::wal::timeline::parse_history;
use crate::wal::{Lsn, SegmentName, TimeLineId};

pub struct Session<'a> {
    conn: Connection,
    repo: &'a Repo,
    spool: &'a Spool,
    cfg: &'a StreamConfig,
    publisher: &'a mut Publisher,
    seg_size: u64,
    sysid: u64,
    magic: Option<u16>,
    tli: TimeLineId,
    validator: PageValidator,
    cur: Option<SegmentFile>,
    /// Where readers learn the durable prefix of `cur` (opened at the first fsync).
    flush_record: Option<FlushRecord>,
    /// Next byte expected from the server.
    received: Lsn,
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
    /// Background preparation of the next segment file.
    prealloc: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Slots archiver created that nobody streams from (named in every progress line).
    pub(crate) abandoned_slots: String,
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
        let sysid = repo.system_identifier();
        let magic = page_magic_for_major(server.major());
        let now = Instant::now();
        Session {
            conn,
            repo,
            spool,
            cfg,
            publisher,
            seg_size,
            sysid,
            magic,
            tli,
            validator: PageValidator::new(seg_size, sysid, magic, Lsn(0), tli),
            cur: None,
            flush_record: None,
            received: Lsn(0),
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
            prealloc: None,
            abandoned_slots: String::new(),
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
        loop {
            if *shutdown.borrow() {
                return self.stop().await;
            }
            let deadline = TokioInstant::from_std(self.next_deadline());
            let msg = tokio::select! {
                biased;
                _ = shutdown_requested(shutdown) => continue,
                m = self.conn.next_message() => m?,
                _ = tokio::time::sleep_until(deadline) => {
                    self.on_timer().await?;
                    continue;
                }
            };
            self.handle(msg).await?;
            while let Some(m) = self.conn.try_next_message()? {
                self.handle(m).await?;
            }
            self.after_batch().await?;
        }
    }

    /// Issues `START_REPLICATION` at `start` (a segment boundary) on the current timeline,
    /// following timelines that end exactly there.
    async fn start_streaming(&mut self, mut start: Lsn) -> Result<(), StreamError> {
        debug_assert_eq!(start.segment_offset(self.seg_size), 0);
        loop {
            let slot = Some(self.cfg.slot.as_str());
            match replication::start_replication(&mut self.conn, slot, start, self.tli).await? {
                StartOutcome::Streaming => {
                    info!(tli = self.tli, %start, "streaming started");
                    self.received = start;
                    self.flushed = self.flushed.max(start);
                    self.validator =
                        PageValidator::new(self.seg_size, self.sysid, self.magic, start, self.tli);
                    return Ok(());
                }
                StartOutcome::TimelineEnded { next_tli, switch } => {
                    info!(tli = self.tli, next_tli, %switch, "timeline ends at the start point; following it");
                    self.archive_history(next_tli).await?;
                    self.tli = next_tli;
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
        if self.dirty() {
            d = d.min(self.last_sync + self.cfg.fsync_interval);
        }
        d
    }

    fn dirty(&self) -> bool {
        self.cur.as_ref().is_some_and(|c| c.synced < c.written)
    }

    async fn on_timer(&mut self) -> Result<(), StreamError> {
        self.publisher.check().await?;
        if self.dirty() && self.last_sync.elapsed() >= self.cfg.fsync_interval {
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
            tli = self.tli,
            received = %self.received,
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

    async fn after_batch(&mut self) -> Result<(), StreamError> {
        let due = self.cfg.synchronous || self.last_sync.elapsed() >= self.cfg.fsync_interval;
        if due && self.dirty() {
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
        if let Some(cur) = self.cur.as_mut() {
            tokio::task::block_in_place(|| cur.sync()).map_err(io("fsync of the spool segment"))?;
            if cur.synced > 0 {
                if self.flush_record.is_none() {
                    self.flush_record = Some(
                        self.spool
                            .open_flush_record()
                            .map_err(io("opening the spool's flush record"))?,
                    );
                }
                let rec = self.flush_record.as_mut().expect("opened above");
                rec.record(cur.seg, cur.synced)
                    .map_err(io("writing the spool's flush record"))?;
            }
        }
        self.flushed = self.flushed.max(self.received);
        self.last_sync = Instant::now();
        Ok(())
    }

    async fn send_status(&mut self, reply_requested: bool) -> Result<(), StreamError> {
        self.sent_write = self.sent_write.max(self.received);
        self.sent_flush = self.sent_flush.max(self.flushed);
        replication::encode_status_update(
            self.conn.write_buf(),
            self.sent_write,
            self.sent_flush,
            Lsn::INVALID,
            replication::pg_now(),
            reply_requested,
        );
        self.conn.flush().await?;
        debug!(write = %self.sent_write, flush = %self.sent_flush, "status update sent");
        if let Some(tx) = &self.cfg.flushed {
            let p = crate::wal::WalPoint {
                tli: self.tli,
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
        match msg {
            Backend::Msg(Message::CopyData(body)) => {
                match replication::decode_copy_data(body.into_bytes())? {
                    ReplicationMessage::XLogData {
                        start,
                        server_end,
                        data,
                        ..
                    } => {
                        self.server_end = self.server_end.max(server_end);
                        self.on_wal(start, data).await
                    }
                    ReplicationMessage::Keepalive {
                        server_end,
                        reply_requested,
                        ..
                    } => {
                        self.server_end = self.server_end.max(server_end);
                        self.reply_due |= reply_requested;
                        Ok(())
                    }
                }
            }
            Backend::Msg(Message::CopyDone) => self.end_of_timeline().await,
            Backend::Msg(Message::ErrorResponse(body)) => {
                Err(PgError::Server(parse_error_fields(&mut body.fields())).into())
            }
            Backend::Msg(Message::NoticeResponse(body)) => {
                let n = parse_error_fields(&mut body.fields());
                info!(code = %n.code, "server notice: {}", n.message);
                Ok(())
            }
            _ => {
                Err(PgError::Protocol("unexpected message in the replication stream".into()).into())
            }
        }
    }

    /// Validates and writes WAL; completes and hands off segments as they fill.
    async fn on_wal(&mut self, start: Lsn, data: Bytes) -> Result<(), StreamError> {
        if start != self.received {
            return Err(PgError::Protocol(format!(
                "WAL arrived at {start}, expected {}: the stream has a gap",
                self.received
            ))
            .into());
        }
        self.validator.feed(start, &data)?;
        let mut off = 0usize;
        while off < data.len() {
            let pos = Lsn(start.0 + off as u64);
            let seg_off = pos.segment_offset(self.seg_size);
            if self.cur.is_none() {
                if seg_off != 0 {
                    return Err(StreamError::Invariant(format!(
                        "segment file opened mid-segment at {pos}"
                    )));
                }
                let seg = SegmentName::containing(self.tli, pos, self.seg_size);
                let spool = self.spool;
                let f = tokio::task::block_in_place(|| spool.open_partial(seg))
                    .map_err(io("creating the spool segment"))?;
                self.cur = Some(f);
                self.prepare_next_segment().await?;
            }
            let cur = self.cur.as_mut().expect("opened above");
            let n = (data.len() - off).min((self.seg_size - seg_off) as usize);
            cur.write_at(seg_off, &data[off..off + n])
                .map_err(io("writing the spool segment"))?;
            off += n;
            if cur.written == self.seg_size {
                let f = self.cur.take().expect("present");
                let spool = self.spool;
                let seg = tokio::task::block_in_place(|| spool.complete(f))
                    .map_err(io("completing a spool segment"))?;
                self.flushed = self.flushed.max(seg.end_lsn());
                self.last_sync = Instant::now();
                self.reply_due = true;
                debug!(segment = %seg, "segment complete");
                self.publisher.submit(seg).await?;
            }
        }
        self.received = Lsn(start.0 + data.len() as u64);
        self.bytes_received += data.len() as u64;
        self.progress_bytes += data.len() as u64;
        Ok(())
    }

    /// Starts zero-filling the next segment's file in the background, if not already under way.
    async fn prepare_next_segment(&mut self) -> Result<(), StreamError> {
        if let Some(h) = self.prealloc.take() {
            if !h.is_finished() {
                self.prealloc = Some(h);
                return Ok(());
            }
            h.await
                .expect("preallocation task panicked")
                .map_err(io("preparing the next spool segment"))?;
        }
        let spool = self.spool.clone();
        self.prealloc = Some(tokio::task::spawn_blocking(move || spool.prepare_next()));
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
        info!(old_tli = self.tli, next_tli, %switch, received = %self.received, "end of timeline");
        if self.received != switch {
            warn!(received = %self.received, %switch, "the old timeline's WAL does not end at the switch point");
        }
        if let Some(cur) = self.cur.take() {
            let path = self.spool.partial_path(&cur.seg);
            if cur.written > 0 {
                let raw = self
                    .spool
                    .read_prefix(&path, cur.written)
                    .map_err(io("reading the partial segment"))?;
                self.repo
                    .put_raw(
                        &partial_segment_key(&cur.seg),
                        Bytes::from(raw),
                        ObjectKind::PartialWalSegment,
                        self.cfg.compress_level,
                    )
                    .await?;
                info!(segment = %cur.seg, bytes = cur.written, "archived the old timeline's last segment as partial");
            }
            drop(cur);
            self.spool
                .remove(&path)
                .map_err(io("removing the partial segment"))?;
        }
        self.archive_history(next_tli).await?;
        self.tli = next_tli;
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
