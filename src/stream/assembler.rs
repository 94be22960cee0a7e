//! The segment assembler: turns the server's XLogData into spool segment files. Used by the
//! stream session and by a backup fetching its own WAL, so both write byte-identical segments
//! by the same rules.
//!
//! Invariants:
//! - WAL is accepted only in stream order (no gap: each chunk starts where the last ended) and
//!   only once its page headers validate ([`PageValidator`]); nothing invalid is written;
//! - a segment file is opened only at its start (streaming starts at segment boundaries);
//! - a segment is handed back as complete only after [`Spool::complete`] (fsync, durable rename);
//! - the partial tail of a segment leaves the spool only as a `<segment>.partial` object
//!   ([`Assembler::archive_partial`]), never as a complete segment.

use std::io;

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::StreamError;
use crate::repo::layout::partial_segment_key;
use crate::repo::object::ObjectKind;
use crate::repo::Repo;
use crate::spool::{SegmentFile, Spool};
use crate::wal::page::{page_magic_for_major, PageValidator};
use crate::wal::{Lsn, SegmentName, TimeLineId};

fn io(context: &str) -> impl FnOnce(io::Error) -> StreamError + '_ {
    move |e| StreamError::io(context, e)
}

pub(crate) struct Assembler {
    spool: Spool,
    seg_size: u64,
    sysid: u64,
    magic: Option<u16>,
    tli: TimeLineId,
    validator: PageValidator,
    cur: Option<SegmentFile>,
    /// Next byte expected from the server.
    received: Lsn,
    /// WAL at or after this is validated but not written (a backup's last segment's end).
    end: Option<Lsn>,
    /// Zero-fill the next segment's file in the background (the streamer; a backup's private
    /// spool is left empty instead).
    preallocate: bool,
    prealloc: Option<JoinHandle<io::Result<()>>>,
}

impl Assembler {
    /// An assembler expecting WAL of `tli` from `start` (a segment boundary).
    pub(crate) fn new(
        spool: Spool,
        seg_size: u64,
        sysid: u64,
        major: u32,
        tli: TimeLineId,
        start: Lsn,
    ) -> Self {
        let magic = page_magic_for_major(major);
        Assembler {
            spool,
            seg_size,
            sysid,
            magic,
            tli,
            validator: PageValidator::new(seg_size, sysid, magic, start, tli),
            cur: None,
            received: start,
            end: None,
            preallocate: false,
            prealloc: None,
        }
    }

    /// Prepares each next segment file in the background.
    pub(crate) fn preallocating(mut self) -> Self {
        self.preallocate = true;
        self
    }

    /// Writes nothing at or after `end`.
    pub(crate) fn ending_at(mut self, end: Lsn) -> Self {
        self.end = Some(end);
        self
    }

    /// Continues on `tli` from `start` (a segment boundary), after a (re)start of replication.
    pub(crate) fn restart(&mut self, tli: TimeLineId, start: Lsn) -> Result<(), StreamError> {
        if self.cur.is_some() || start.segment_offset(self.seg_size) != 0 {
            return Err(StreamError::Invariant(format!(
                "restarting WAL assembly at {start} with a segment open or mid-segment"
            )));
        }
        self.tli = tli;
        self.received = start;
        self.validator = PageValidator::new(self.seg_size, self.sysid, self.magic, start, tli);
        Ok(())
    }

    pub(crate) fn tli(&self) -> TimeLineId {
        self.tli
    }

    /// The next byte expected: everything before it was received (written or validated).
    pub(crate) fn received(&self) -> Lsn {
        self.received
    }

    /// Whether the segment being written has bytes not yet fsync'd.
    pub(crate) fn dirty(&self) -> bool {
        self.cur.as_ref().is_some_and(|c| c.synced < c.written)
    }

    /// Validates `data` (WAL from `start`) and writes it into the spool; returns the segments it
    /// completed, in order, each durable in the spool and ready to publish.
    pub(crate) async fn write(
        &mut self,
        start: Lsn,
        data: &[u8],
    ) -> Result<Vec<SegmentName>, StreamError> {
        if start != self.received {
            return Err(crate::pg::PgError::Protocol(format!(
                "WAL arrived at {start}, expected {}: the stream has a gap",
                self.received
            ))
            .into());
        }
        self.validator.feed(start, data)?;
        let mut done = Vec::new();
        let end = self.end.map_or(u64::MAX, |e| e.0);
        let mut off = 0usize;
        while off < data.len() && start.0 + (off as u64) < end {
            let pos = Lsn(start.0 + off as u64);
            let seg_off = pos.segment_offset(self.seg_size);
            if self.cur.is_none() {
                if seg_off != 0 {
                    return Err(StreamError::Invariant(format!(
                        "segment file opened mid-segment at {pos}"
                    )));
                }
                let seg = SegmentName::containing(self.tli, pos, self.seg_size);
                let spool = &self.spool;
                let f = tokio::task::block_in_place(|| spool.open_partial(seg))
                    .map_err(io("creating the spool segment"))?;
                self.cur = Some(f);
                if self.preallocate {
                    self.prepare_next_segment().await?;
                }
            }
            let cur = self.cur.as_mut().expect("opened above");
            let n = (data.len() - off).min((self.seg_size - seg_off) as usize);
            cur.write_at(seg_off, &data[off..off + n])
                .map_err(io("writing the spool segment"))?;
            off += n;
            if cur.written == self.seg_size {
                let f = self.cur.take().expect("present");
                let spool = &self.spool;
                let seg = tokio::task::block_in_place(|| spool.complete(f))
                    .map_err(io("completing a spool segment"))?;
                done.push(seg);
            }
        }
        self.received = Lsn(start.0 + data.len() as u64);
        Ok(done)
    }

    /// fsyncs the segment being written; returns it and its durable length, if it has any.
    pub(crate) fn sync(&mut self) -> Result<Option<(SegmentName, u64)>, StreamError> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(None);
        };
        // Called directly on the runtime worker, not through `block_in_place`: handing the
        // worker's core to another thread around every fsync cost a thread wake-up and a CPU
        // migration per commit as a synchronous standby (profiled; see docs/benchmarks.md).
        // The fsync has to finish before this task can do anything else anyway.
        cur.sync().map_err(io("fsync of the spool segment"))?;
        Ok((cur.synced > 0).then_some((cur.seg, cur.synced)))
    }

    /// Archives the segment being written, as far as it was received, as the object
    /// `<segment>.partial` (a timeline's last segment, a backup's unfinished stop segment) and
    /// removes its spool file. Returns the segment and the bytes archived.
    pub(crate) async fn archive_partial(
        &mut self,
        repo: &Repo,
        compress_level: i32,
    ) -> Result<Option<(SegmentName, u64)>, StreamError> {
        let Some(cur) = self.cur.take() else {
            return Ok(None);
        };
        let path = self.spool.partial_path(&cur.seg);
        let archived = if cur.written > 0 {
            let raw = match cur.in_memory() {
                Some(b) => b.to_vec(),
                None => self
                    .spool
                    .read_prefix(&path, cur.written)
                    .map_err(io("reading the partial segment"))?,
            };
            repo.put_raw(
                &partial_segment_key(&cur.seg),
                Bytes::from(raw),
                ObjectKind::PartialWalSegment,
                compress_level,
            )
            .await?;
            Some((cur.seg, cur.written))
        } else {
            None
        };
        drop(cur);
        self.spool
            .remove(&path)
            .map_err(io("removing the partial segment"))?;
        Ok(archived)
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
}
