//! The local spool: the WAL segment being received, written in place as `<segment>.partial`,
//! and complete segments waiting to be compressed and published, named `<segment>`.
//!
//! Invariants: bytes reach a spool file in stream order; a segment is renamed from `.partial` to
//! its final name only once it is complete and fsync'd, with the directory fsync'd after the
//! rename (`durable_rename`); a complete spool file is removed only after its object is durable
//! in storage. The spool is always on local disk, whatever the storage backend.
//!
//! A published segment's file may be recycled ([`Spool::recycling`]) as a later segment's
//! `.partial`, as PostgreSQL recycles its own WAL files: its old bytes stay after the new
//! segment's write position, so no reader takes bytes past the flush record, and a read that
//! can race with a recycling checks that the file it read still has its name
//! ([`read_unrecycled`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::storage::fs::{
    create_dir_all_durable, create_private, durable_rename, fsync_dir, open_private,
};
use crate::wal::SegmentName;

mod resident;
pub use resident::ResidentSegment;
#[cfg(test)]
use resident::MAX_BUFFERS as MAX_RESIDENT;
use resident::{DirectWriter, Resident};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolEntry {
    /// `<segment>.partial`: being received.
    Partial(SegmentName),
    /// `<segment>`: complete and durable, not yet published.
    Complete(SegmentName),
}

/// A zero-filled, fsync'd segment-sized file waiting to become the next `.partial`.
const PREALLOC_NAME: &str = ".next-segment.prealloc";
/// The same, its blocks allocated but not written (`fallocate`; [`Spool::allocate_only`]).
const ALLOCATED_NAME: &str = ".next-segment.allocated";
/// A published segment's file, written through, waiting to become the next `.partial` before
/// either prepared file ([`Spool::recycling`]).
const RECYCLED_NAME: &str = ".next-segment.recycled";

/// The segment the streamer needs next, recorded each time it publishes one: where it resumes
/// even when the stop fell on a segment boundary (no `.partial`) and segments further ahead were
/// archived by someone else (a backup fetching its own WAL).
const NEXT_NAME: &str = "stream.next";

/// The durable prefix of the segment being received: `<segment> <length, 16 hex> <crc, 8 hex>\n`,
/// rewritten in place (one 51-byte `pwrite`, inside one sector) after every fsync of the
/// segment and before the flush position is reported. Readers (restore, `wal-fetch`) read
/// exactly that many bytes of `<segment>.partial` and nothing after it: never a torn page.
/// It needs no fsync of its own: any value of it that can be seen, before or after a crash,
/// was written after the bytes it counts were fdatasync'd.
pub const FLUSHED_NAME: &str = "stream.flushed";
const FLUSHED_LEN: usize = 24 + 1 + 16 + 1 + 8 + 1;

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    seg_size: u64,
    /// Prepare segment files with `fallocate` instead of writing zeros.
    allocate_only: bool,
    /// Keep a published segment's file for reuse instead of removing it.
    recycle: bool,
    /// Hold the segment being received in memory ([`Spool::resident`]).
    resident: Option<Resident>,
}

/// The segment file being written.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    pub seg: SegmentName,
    /// Bytes written from the segment start.
    pub written: u64,
    /// Bytes known durable (fsync'd) from the segment start.
    pub synced: u64,
    /// The segment held in memory, reaching the file at each sync ([`Spool::resident`]).
    direct: Option<DirectWriter>,
}

impl SegmentFile {
    /// Writes `data` at `offset` from the segment start; must continue where the last write ended.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(offset, self.written);
        match &mut self.direct {
            Some(d) => d.write(offset, data),
            None => self.file.write_all_at(data, offset)?,
        }
        self.written = offset + data.len() as u64;
        Ok(())
    }

    /// The bytes written so far, when the segment is held in memory.
    pub fn in_memory(&self) -> Option<&[u8]> {
        self.direct.as_ref().map(|d| d.prefix(self.written))
    }

    /// fdatasync if anything is unsynced. Returns whether a sync happened.
    pub fn sync(&mut self) -> std::io::Result<bool> {
        if self.synced == self.written {
            return Ok(false);
        }
        if let Some(d) = &mut self.direct {
            d.write_out(&self.file, self.synced, self.written)?;
        }
        self.file.sync_data()?;
        self.synced = self.written;
        Ok(true)
    }
}

/// The record of the durable prefix, held open by the streamer.
#[derive(Debug)]
pub struct FlushRecord {
    file: File,
    last: Option<(SegmentName, u64)>,
}

impl FlushRecord {
    /// Records that the first `len` bytes of `seg`'s `.partial` are fsync'd.
    pub fn record(&mut self, seg: SegmentName, len: u64) -> std::io::Result<()> {
        if self.last == Some((seg, len)) {
            return Ok(());
        }
        self.file.write_all_at(&encode_flushed(seg, len), 0)?;
        self.last = Some((seg, len));
        Ok(())
    }
}

/// Written after every fsync of a synchronous standby, so built on the stack and without
/// `core::fmt`: formatting was a tenth of the receive loop's user CPU in a profile.
fn encode_flushed(seg: SegmentName, len: u64) -> [u8; FLUSHED_LEN] {
    let mut out = [b' '; FLUSHED_LEN];
    let (log, id) = seg.log_and_id();
    put_hex(&mut out[0..8], u64::from(seg.tli), b"0123456789ABCDEF");
    put_hex(&mut out[8..16], log, b"0123456789ABCDEF");
    put_hex(&mut out[16..24], id, b"0123456789ABCDEF");
    put_hex(&mut out[25..41], len, b"0123456789abcdef");
    let crc = crc32fast::hash(&out[..41]);
    put_hex(&mut out[42..50], u64::from(crc), b"0123456789abcdef");
    out[50] = b'\n';
    out
}

/// Writes the low `4 * out.len()` bits of `v` as fixed-width hex digits.
fn put_hex(out: &mut [u8], mut v: u64, digits: &[u8; 16]) {
    for b in out.iter_mut().rev() {
        *b = digits[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn decode_flushed(raw: &[u8], seg_size: u64) -> Option<(SegmentName, u64)> {
    let text = std::str::from_utf8(raw.get(..FLUSHED_LEN)?).ok()?;
    let (body, crc) = text.trim_end_matches('\n').rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    let (seg, len) = body.split_once(' ')?;
    let seg = SegmentName::parse(seg, seg_size)?;
    let len = u64::from_str_radix(len, 16).ok()?;
    (len <= seg_size).then_some((seg, len))
}

/// What a reader can take from a spool while a streamer may be writing it: the complete
/// segments not yet published, and the durable prefix of the segment being received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpoolWal {
    pub complete: Vec<SegmentName>,
    /// The segment being received and how many of its bytes are durable (> 0).
    pub tail: Option<(SegmentName, u64)>,
    /// When the newest of these was last written (file mtimes).
    pub modified: Option<std::time::SystemTime>,
}

impl Spool {
    /// A spool to read, if the directory exists (never created by a reader).
    pub fn existing(dir: &Path, seg_size: u64) -> Option<Spool> {
        dir.is_dir().then(|| Spool {
            allocate_only: false,
            recycle: false,
            resident: None,
            dir: dir.to_path_buf(),
            seg_size,
        })
    }

    /// Opens the durable-prefix record for writing (created if missing; an existing record
    /// stays valid: a resumed streamer rewrites the same bytes in place).
    pub fn open_flush_record(&self) -> std::io::Result<FlushRecord> {
        let path = self.dir.join(FLUSHED_NAME);
        let file = open_private(&path)?;
        Ok(FlushRecord { file, last: None })
    }

    /// Forgets the durable-prefix record (the spool's partial segments are being discarded).
    pub fn clear_flush_record(&self) -> std::io::Result<()> {
        self.remove(&self.dir.join(FLUSHED_NAME))
    }

    /// When the streamer last recorded a durable prefix (the record's mtime: one `pwrite` after
    /// each fsync that advanced it): when WAL was last received.
    pub fn last_flush_time(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.dir.join(FLUSHED_NAME))
            .and_then(|m| m.modified())
            .ok()
    }

    /// The durable prefix recorded by the streamer, if its `.partial` file is still there.
    pub fn durable_tail(&self) -> Option<(SegmentName, u64)> {
        let raw = std::fs::read(self.dir.join(FLUSHED_NAME)).ok()?;
        let (seg, len) = decode_flushed(&raw, self.seg_size)?;
        (len > 0 && self.partial_path(&seg).exists()).then_some((seg, len))
    }

    /// A snapshot of what a reader may use.
    pub fn readable(&self) -> std::io::Result<SpoolWal> {
        let complete: Vec<SegmentName> = self
            .scan()?
            .into_iter()
            .filter_map(|e| match e {
                SpoolEntry::Complete(s) => Some(s),
                SpoolEntry::Partial(_) => None,
            })
            .collect();
        let tail = self.durable_tail();
        let mtime = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let modified = complete
            .iter()
            .filter_map(|s| mtime(self.complete_path(s)))
            .chain(tail.and_then(|(s, _)| mtime(self.partial_path(&s))))
            .max();
        Ok(SpoolWal {
            complete,
            tail,
            modified,
        })
    }

    /// Reads the durable prefix of `seg` (at most `len` bytes, as recorded): NotFound once the
    /// segment has completed meanwhile (it is then a complete spool file or object).
    pub fn read_tail(&self, seg: SegmentName, len: u64) -> std::io::Result<Vec<u8>> {
        let recorded = self.durable_tail();
        match recorded {
            Some((s, l)) if s == seg && l >= len => self.read_prefix(&self.partial_path(&seg), len),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{seg} is no longer the segment being received"),
            )),
        }
    }

    pub fn open(dir: &Path, seg_size: u64) -> std::io::Result<Spool> {
        create_dir_all_durable(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            seg_size,
            allocate_only: false,
            recycle: false,
            resident: None,
        })
    }

    /// Holds the segment being received in memory and writes it to its file by direct I/O at
    /// each sync, then hands the complete segment to the publisher from memory
    /// ([`Spool::take_resident`]; `spool::resident`). For segments up to 16 MiB.
    ///
    /// A buffered write copies the WAL into the page cache and pays the filesystem's per-page
    /// bookkeeping, and the publisher then maps the file and faults those pages in again: 0.62
    /// CPU-s per GB of WAL, against 0.26–0.29 for a copy into memory and direct writes of the
    /// same bytes at the same syncs (a throwaway benchmark; docs/benchmarks.md).
    pub fn resident(mut self, yes: bool) -> Self {
        self.resident = (yes && self.seg_size <= resident::MAX_SEGMENT).then(Resident::default);
        self
    }

    /// The complete segment `seg` from memory, if the spool still holds it there (else read
    /// its file).
    pub fn take_resident(&self, seg: &SegmentName) -> Option<ResidentSegment> {
        self.resident.as_ref()?.take_done(seg)
    }

    /// Prepares new segment files by allocating their blocks (`fallocate`) rather than writing
    /// 16 MB of zeros into each — where the filesystem can; it falls back to zeros where not.
    ///
    /// For a stream that fsyncs once a second or at a segment's end: writing zeros costs as
    /// much CPU as writing the WAL (a tenth of an asynchronous stream's CPU, profiled), while
    /// the cost of allocated-but-unwritten blocks (the filesystem records, at the next fsync,
    /// which were written since) is paid once per fsync. A synchronous standby fsyncs every
    /// commit and keeps the zeros (as PostgreSQL does for its own WAL, `wal_init_zero`).
    pub fn allocate_only(mut self, yes: bool) -> Self {
        self.allocate_only = yes;
        self
    }

    /// Reuses each published segment's file as a later segment's `.partial` (renamed to
    /// [`RECYCLED_NAME`] by [`Spool::retire`]) instead of removing it.
    ///
    /// A recycled file's blocks are allocated and written, so neither the zeros of a prepared
    /// file (16 MB of writes and an fsync per segment, as much as the WAL itself) nor the
    /// filesystem's bookkeeping for allocated-but-unwritten blocks is paid again, and no
    /// unlink hands 16 MB back to the device (`discard`) between a standby's fsyncs. A
    /// streamer's spool recycles; a backup's private spool, removed at its end, does not.
    pub fn recycling(mut self, yes: bool) -> Self {
        self.recycle = yes;
        self
    }

    /// Done with a published segment's spool file: recycled ([`Spool::recycling`]) or removed.
    /// A recycled file replaces an older one still waiting.
    pub fn retire(&self, path: &Path) -> std::io::Result<()> {
        if !self.recycle {
            return self.remove(path);
        }
        match std::fs::rename(path, self.dir.join(RECYCLED_NAME)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn prealloc_name(&self) -> &'static str {
        if self.allocate_only {
            ALLOCATED_NAME
        } else {
            PREALLOC_NAME
        }
    }

    /// Makes `f` (`from` bytes long) a whole segment long, its new blocks allocated.
    fn fill(&self, f: &File, from: u64) -> std::io::Result<()> {
        if self.allocate_only && allocate(f, from, self.seg_size)? {
            return Ok(());
        }
        zero_fill(f, from, self.seg_size)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn partial_path(&self, seg: &SegmentName) -> PathBuf {
        self.dir.join(format!("{seg}.partial"))
    }

    pub fn complete_path(&self, seg: &SegmentName) -> PathBuf {
        self.dir.join(seg.to_string())
    }

    /// Everything in the spool, sorted by position then timeline.
    pub fn scan(&self) -> std::io::Result<Vec<SpoolEntry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(stem) = name.strip_suffix(".partial") {
                if let Some(s) = SegmentName::parse(stem, self.seg_size) {
                    out.push(SpoolEntry::Partial(s));
                }
            } else if let Some(s) = SegmentName::parse(name, self.seg_size) {
                out.push(SpoolEntry::Complete(s));
            }
        }
        out.sort_by_key(|e| match e {
            SpoolEntry::Partial(s) => (s.segno, s.tli, 1),
            SpoolEntry::Complete(s) => (s.segno, s.tli, 0),
        });
        Ok(out)
    }

    /// Opens (creating if needed) the `.partial` file for `seg`, to be written from its start.
    /// An existing file is rewritten in place: WAL of one timeline never changes, so the bytes
    /// that were durable stay durable.
    pub fn open_partial(&self, seg: SegmentName) -> std::io::Result<SegmentFile> {
        let path = self.partial_path(&seg);
        let existed = path.exists();
        if !existed {
            for name in [RECYCLED_NAME, self.prealloc_name()] {
                let prepared = self.dir.join(name);
                if std::fs::metadata(&prepared).is_ok_and(|m| m.len() == self.seg_size) {
                    std::fs::rename(&prepared, &path)?;
                    break;
                }
            }
        }
        let file = open_private(&path)?;
        let len = file.metadata()?.len();
        if len < self.seg_size {
            self.fill(&file, len)?;
            file.sync_all()?;
        }
        fsync_dir(&self.dir)?;
        let direct = self
            .resident
            .as_ref()
            .and_then(|r| DirectWriter::open(&path, r, self.seg_size));
        Ok(SegmentFile {
            file,
            seg,
            written: 0,
            synced: 0,
            direct,
        })
    }

    /// Prepares the next segment's file (zero-filled or allocated, fsync'd) unless one is
    /// ready. Blocking; run it off the receive path.
    pub fn prepare_next(&self) -> std::io::Result<()> {
        let name = self.prealloc_name();
        let prealloc = self.dir.join(name);
        if std::fs::metadata(&prealloc).is_ok_and(|m| m.len() == self.seg_size) {
            return Ok(());
        }
        // One prepared file at a time: drop one of the other kind (the mode changed).
        for other in [PREALLOC_NAME, ALLOCATED_NAME] {
            if other != name {
                match std::fs::remove_file(self.dir.join(other)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        let tmp = self.dir.join(format!("{name}.tmp"));
        let f = create_private(&tmp)?;
        self.fill(&f, 0)?;
        f.sync_all()?;
        drop(f);
        durable_rename(&tmp, &prealloc)
    }

    /// Finishes a full segment: fsync, trim anything beyond the segment, rename to its final
    /// name and fsync the directory.
    pub fn complete(&self, mut f: SegmentFile) -> std::io::Result<SegmentName> {
        assert_eq!(
            f.written, self.seg_size,
            "only a full segment can be completed"
        );
        f.file.set_len(self.seg_size)?;
        f.sync()?;
        f.file.sync_all()?;
        durable_rename(&self.partial_path(&f.seg), &self.complete_path(&f.seg))?;
        if let Some(d) = f.direct.take() {
            d.completed(f.seg);
        }
        Ok(f.seg)
    }

    /// Durably records that everything before `seg` is archived by this streamer.
    pub fn record_next(&self, seg: SegmentName) -> std::io::Result<()> {
        crate::storage::fs::write_atomic(&self.dir.join(NEXT_NAME), format!("{seg}\n").as_bytes())
    }

    /// The segment recorded by [`Spool::record_next`], if any.
    pub fn recorded_next(&self) -> Option<SegmentName> {
        let s = std::fs::read_to_string(self.dir.join(NEXT_NAME)).ok()?;
        SegmentName::parse(s.trim(), self.seg_size)
    }

    /// Reads the first `len` bytes of a spool file: NotFound if the file lost its name before
    /// the read ended ([`read_unrecycled`]).
    pub fn read_prefix(&self, path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
        read_unrecycled(path, Some(len))
    }

    /// Reads a complete spool segment: NotFound once it is published ([`read_unrecycled`]).
    pub fn read_complete(&self, seg: &SegmentName) -> std::io::Result<Vec<u8>> {
        read_unrecycled(&self.complete_path(seg), None)
    }

    pub fn remove(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Reads `path` (its first `len` bytes, or all of it), then checks that `path` still names the
/// file that was read: NotFound if not. A spool file's bytes change only after it lost its name
/// (published, renamed to [`RECYCLED_NAME`], renamed to a later segment's `.partial`), so a
/// file that still has its name after the read was not rewritten during it.
fn read_unrecycled(path: &Path, len: Option<u64>) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let buf = match len {
        Some(len) => {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, 0)?;
            buf
        }
        None => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            buf
        }
    };
    still_named(path, &f)?;
    Ok(buf)
}

/// Ok if `path` names the file `f` is open on; NotFound if it names another file or none.
fn still_named(path: &Path, f: &File) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (open, named) = (f.metadata()?, std::fs::metadata(path)?);
    if named.ino() == open.ino() && named.dev() == open.dev() {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} was replaced while being read", path.display()),
    ))
}

/// Allocates `f`'s blocks from `from` to `to` and extends it to `to`; `false` where the
/// filesystem cannot (the caller writes zeros instead).
fn allocate(f: &File, from: u64, to: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let len = to.saturating_sub(from);
    // SAFETY: a plain system call on an open file descriptor.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, from as i64, len as i64) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

/// Writes zeros over `[from, to)` (real blocks, not a hole: later fdatasyncs must not
/// allocate), a page at a time: written in larger pieces, the kernel
/// builds large page-cache folios, and every later small write of WAL into one walks all of
/// its buffers (`ext4_block_write_begin` took 8.6% of a stream's CPU with 1 MiB pieces, 1%
/// with 8 KiB ones; Linux 6.18).
fn zero_fill(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 8192];
    let mut pos = from;
    while pos < to {
        let n = ((to - pos) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// A complete spool segment mapped read-only, for compressing it where it lies
/// (`repo::object::encode_contiguous`) instead of reading it into a buffer first.
///
/// Sound because of the spool's invariants: a complete segment's bytes never change while it
/// has its name, and only the streamer that owns the spool (under the repository lock) retires
/// it — after publishing it, once this mapping is gone. Pages are made resident with
/// `MADV_POPULATE_READ` before they are read ([`MappedSegment::populate`]), so a failing disk
/// shows as an I/O error there, not as a `SIGBUS` when the bytes are touched; and pages well
/// behind the reader are dropped from the mapping ([`MappedSegment::release_before`]), so what
/// the mapping adds to the process's memory stays bounded whatever the segment size.
pub struct MappedSegment {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Pages before this offset were dropped already ([`MappedSegment::release_before`]).
    released: std::cell::Cell<usize>,
}

// SAFETY: the mapping is read-only and owned by this value; nothing else refers to it.
unsafe impl Send for MappedSegment {}

impl MappedSegment {
    /// Maps the complete spool segment `path`. `None` where mapping does not apply: an empty
    /// file, or a kernel without `MADV_POPULATE_READ` (before Linux 5.14) — read it instead.
    pub fn open(path: &Path) -> std::io::Result<Option<MappedSegment>> {
        use std::os::fd::AsRawFd;
        let f = File::open(path)?;
        let len = f.metadata()?.len() as usize;
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a fresh read-only private mapping of an open file; the pointer is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let m = MappedSegment {
            ptr: std::ptr::NonNull::new(p.cast()).expect("mmap returned null"),
            len,
            released: std::cell::Cell::new(0),
        };
        match m.populate(0, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
            Ok(()) => Ok(Some(m)),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for as long as `self` lives, and never written
        // (see the type's comment).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Makes `len` bytes from `offset` resident (reading them from disk where they are not in
    /// the page cache): an I/O error comes back here.
    pub fn populate(&self, offset: usize, len: usize) -> std::io::Result<()> {
        let (start, end) = self.pages(offset, offset.saturating_add(len));
        self.advise(start, end, libc::MADV_POPULATE_READ)
    }

    /// Drops the mapping's pages before `offset` (page cache pages stay where they are: read
    /// again, they are mapped again). Bounds the memory the mapping holds. Each page is
    /// dropped once, however often this is called.
    pub fn release_before(&self, offset: usize) {
        let (start, end) = (
            self.released.get(),
            offset.min(self.len) & !(page_size() - 1),
        );
        if end > start {
            // Advisory: a failure leaves pages mapped, nothing else.
            let _ = self.advise(start, end, libc::MADV_DONTNEED);
            self.released.set(end);
        }
    }

    /// The page-aligned span of the mapping covering `[from, to)`, clamped to it.
    fn pages(&self, from: usize, to: usize) -> (usize, usize) {
        let page = page_size();
        let to = to.min(self.len).div_ceil(page) * page;
        (from.min(self.len) & !(page - 1), to)
    }

    fn advise(&self, start: usize, end: usize, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: `[start, end)` lies in the mapping (page-aligned, clamped by `pages`); a
        // zero length is accepted and checks only that the advice is known.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end.saturating_sub(start),
                advice,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for MappedSegment {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: a plain query.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn a_mapped_segment_reads_as_the_file_and_releases_what_it_passed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000003");
        let raw: Vec<u8> = (0..(3 << 20) + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &raw).unwrap();
        let m = MappedSegment::open(&path)
            .unwrap()
            .expect("Linux 5.14+ maps");
        m.populate(0, raw.len()).unwrap();
        assert!(m.bytes() == raw);
        // Released pages read back the same (mapped again from the page cache), as do
        // unaligned and out-of-range requests.
        m.release_before(2 << 20);
        m.release_before(1 << 20);
        assert_eq!(m.released.get(), 2 << 20, "dropped once, never moved back");
        m.release_before(raw.len() + 5000);
        m.populate(raw.len() - 10, 5000).unwrap();
        assert!(m.bytes() == raw);
        drop(m);
        // An empty file is not mapped; a missing one is an error.
        std::fs::write(&path, b"").unwrap();
        assert!(MappedSegment::open(&path).unwrap().is_none());
        assert!(MappedSegment::open(&dir.path().join("none")).is_err());
    }

    #[test]
    fn segment_files_are_prepared_by_allocation_or_zeros_one_kind_at_a_time() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let seg_size = 1 << 20;
        let zeros = Spool::open(dir.path(), seg_size).unwrap();
        let allocating = zeros.clone().allocate_only(true);
        let seg = SegmentName::new(1, 3, seg_size);

        allocating.prepare_next().unwrap();
        let allocated = dir.path().join(ALLOCATED_NAME);
        let meta = std::fs::metadata(&allocated).unwrap();
        assert_eq!(meta.len(), seg_size);
        // Its blocks are reserved (512-byte units), whichever way the filesystem did it.
        assert!(meta.blocks() * 512 >= seg_size, "{} blocks", meta.blocks());
        // Switching to zeros replaces it rather than keeping both.
        zeros.prepare_next().unwrap();
        assert!(!allocated.exists());
        assert_eq!(
            std::fs::metadata(dir.path().join(PREALLOC_NAME))
                .unwrap()
                .len(),
            seg_size
        );
        allocating.prepare_next().unwrap();
        assert!(allocated.exists() && !dir.path().join(PREALLOC_NAME).exists());

        // The prepared file becomes the segment: full length, reading as zeros past the WAL.
        let mut f = allocating.open_partial(seg).unwrap();
        assert!(!allocated.exists(), "the prepared file was taken");
        f.write_at(0, &[0x5A; 100]).unwrap();
        f.sync().unwrap();
        let bytes = std::fs::read(allocating.partial_path(&seg)).unwrap();
        assert_eq!(bytes.len() as u64, seg_size);
        assert!(bytes[..100].iter().all(|&b| b == 0x5A));
        assert!(bytes[100..].iter().all(|&b| b == 0));

        // Without a prepared file, a segment is still made full length.
        let next = SegmentName::new(1, 4, seg_size);
        let g = allocating.open_partial(next).unwrap();
        drop(g);
        assert_eq!(
            std::fs::metadata(allocating.partial_path(&next))
                .unwrap()
                .len(),
            seg_size
        );
    }

    #[test]
    fn the_flush_record_is_the_segment_name_the_length_and_a_crc_in_hex() {
        let cases = [
            (SegmentName::new(1, 0, SEG), 0),
            (SegmentName::new(0xA, 0x1_2345, SEG), 0x00AB_CDEF),
            (SegmentName::new(u32::MAX, 3 * 256 + 255, SEG), SEG),
            (SegmentName::new(7, 5 * 4096 + 9, 1 << 20), u64::MAX),
        ];
        for (seg, len) in cases {
            let body = format!("{seg} {len:016x}");
            let want = format!("{body} {:08x}\n", crc32fast::hash(body.as_bytes()));
            let got = encode_flushed(seg, len);
            assert_eq!(std::str::from_utf8(&got).unwrap(), want, "{seg} {len}");
            if len <= seg.seg_size {
                assert_eq!(decode_flushed(&got, seg.seg_size), Some((seg, len)));
            }
        }
    }

    #[test]
    fn the_flush_record_bounds_what_readers_take() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SEG).unwrap();
        let seg = SegmentName::new(1, 7, SEG);
        assert_eq!(spool.durable_tail(), None);
        let mut f = spool.open_partial(seg).unwrap();
        f.write_at(0, &[0xAB; 8192]).unwrap();
        f.sync().unwrap();
        let mut rec = spool.open_flush_record().unwrap();
        rec.record(seg, 8000).unwrap();
        assert_eq!(spool.durable_tail(), Some((seg, 8000)));
        // Only the recorded bytes are read, however many were written.
        assert_eq!(spool.read_tail(seg, 8000).unwrap(), vec![0xAB; 8000]);
        assert!(spool.read_tail(seg, 8001).is_err());
        assert_eq!(spool.readable().unwrap().tail, Some((seg, 8000)));
        // A damaged record is no record.
        let path = dir.path().join(FLUSHED_NAME);
        let mut raw = std::fs::read(&path).unwrap();
        raw[30] = if raw[30] == b'0' { b'1' } else { b'0' };
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(spool.durable_tail(), None);
        // Once the segment completes, the tail is gone (it is a complete spool file).
        rec.record(seg, 8192).unwrap();
        f.write_at(8192, &vec![0u8; SEG as usize - 8192]).unwrap();
        spool.complete(f).unwrap();
        assert_eq!(spool.durable_tail(), None);
        let r = spool.readable().unwrap();
        assert_eq!((r.complete, r.tail), (vec![seg], None));
        assert_eq!(
            spool.read_tail(seg, 10).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }

    /// Completes `seg` in `spool` with every byte `fill`.
    fn complete_segment(spool: &Spool, seg: SegmentName, seg_size: u64, fill: u8) {
        let mut f = spool.open_partial(seg).unwrap();
        f.write_at(0, &vec![fill; seg_size as usize]).unwrap();
        spool.complete(f).unwrap();
    }

    #[test]
    fn a_published_segment_file_becomes_the_next_partial_when_recycling() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let seg_size = 1 << 20;
        let spool = Spool::open(dir.path(), seg_size).unwrap().recycling(true);
        let (a, b, c) = (
            SegmentName::new(1, 3, seg_size),
            SegmentName::new(1, 4, seg_size),
            SegmentName::new(1, 5, seg_size),
        );
        complete_segment(&spool, a, seg_size, 0xA1);
        spool.prepare_next().unwrap();
        let ino = std::fs::metadata(spool.complete_path(&a)).unwrap().ino();
        spool.retire(&spool.complete_path(&a)).unwrap();
        assert!(!spool.complete_path(&a).exists());
        assert_eq!(
            spool.scan().unwrap(),
            vec![],
            "a recycled file is no segment"
        );

        // The recycled file is taken before the prepared one, which stays as a spare.
        let mut f = spool.open_partial(b).unwrap();
        assert_eq!(
            std::fs::metadata(spool.partial_path(&b)).unwrap().ino(),
            ino
        );
        assert!(dir.path().join(PREALLOC_NAME).exists());
        // Its old bytes stay past the write position; readers take only the recorded prefix.
        f.write_at(0, &[0xB2; 4096]).unwrap();
        f.sync().unwrap();
        spool.open_flush_record().unwrap().record(b, 4096).unwrap();
        assert_eq!(spool.read_tail(b, 4096).unwrap(), vec![0xB2; 4096]);
        drop(f);

        // Retiring again replaces a recycled file still waiting: one at a time.
        complete_segment(&spool, c, seg_size, 0xC3);
        spool.retire(&spool.complete_path(&c)).unwrap();
        let waiting: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() == RECYCLED_NAME)
            .collect();
        assert_eq!(waiting.len(), 1);
        // Retiring a file already gone is no error (a publish repeated after a crash).
        spool.retire(&spool.complete_path(&c)).unwrap();

        // Without recycling, a retired file is removed.
        let plain = Spool::open(dir.path(), seg_size).unwrap();
        complete_segment(&plain, a, seg_size, 0xA1);
        assert!(
            !dir.path().join(RECYCLED_NAME).exists(),
            "taken by the segment"
        );
        plain.retire(&plain.complete_path(&a)).unwrap();
        assert!(!plain.complete_path(&a).exists());
        assert!(!dir.path().join(RECYCLED_NAME).exists());
    }

    #[test]
    fn a_read_of_a_file_that_lost_its_name_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let seg_size = 1 << 20;
        let spool = Spool::open(dir.path(), seg_size).unwrap().recycling(true);
        let seg = SegmentName::new(1, 3, seg_size);
        complete_segment(&spool, seg, seg_size, 0x11);
        let path = spool.complete_path(&seg);
        assert_eq!(
            spool.read_complete(&seg).unwrap(),
            vec![0x11; seg_size as usize]
        );
        // A reader holding the file open while it is recycled and a new file takes the name
        // (here: the same name, the hardest case) must not take what it read.
        let f = File::open(&path).unwrap();
        spool.retire(&path).unwrap();
        std::fs::write(&path, b"other").unwrap();
        assert_eq!(
            still_named(&path, &f).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            still_named(&path, &f).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        assert_eq!(
            spool.read_complete(&seg).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_resident_segment_reaches_its_file_at_each_sync_and_the_publisher_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let seg_size = 1 << 20;
        let spool = Spool::open(dir.path(), seg_size)
            .unwrap()
            .recycling(true)
            .resident(true);
        let data: Vec<u8> = (0..seg_size as usize)
            .map(|i| (i % 239) as u8 | 1)
            .collect();
        // Direct I/O where the filesystem takes it, and through the page cache where not.
        for (n, direct) in [(7, true), (9, false)] {
            resident_segment_round(&spool, SegmentName::new(1, n, seg_size), &data, direct);
        }
    }

    fn resident_segment_round(spool: &Spool, seg: SegmentName, data: &[u8], direct: bool) {
        let seg_size = spool.seg_size;
        let mut f = spool.open_partial(seg).unwrap();
        let d = f.direct.as_mut().expect("a free buffer holds the segment");
        if !direct {
            d.refuse_direct();
        }
        eprintln!("direct I/O: {}", d.is_direct());
        let path = spool.partial_path(&seg);
        let mut off = 0usize;
        // Writes of every alignment, a sync after some: the file holds exactly the synced
        // prefix, then zeros to the end of its last block (the prepared file's zeros beyond).
        for (i, n) in [1000, 5000, 3, 70_000, 4096, 1, 8191, 300_000]
            .into_iter()
            .enumerate()
        {
            f.write_at(off as u64, &data[off..off + n]).unwrap();
            off += n;
            assert_eq!(f.in_memory().unwrap(), &data[..off]);
            if i % 3 == 2 {
                continue;
            }
            let before = std::fs::read(&path).unwrap();
            assert!(
                before[f.synced as usize..off].iter().all(|&b| b == 0),
                "unsynced bytes reached the file before the sync"
            );
            assert!(f.sync().unwrap());
            assert_eq!(f.synced, off as u64);
            let file = std::fs::read(&path).unwrap();
            assert_eq!(file.len(), seg_size as usize);
            assert!(file[..off] == data[..off], "after {off} bytes");
            assert!(file[off..].iter().all(|&b| b == 0), "after {off} bytes");
        }
        assert!(!f.sync().unwrap(), "nothing left to sync");
        f.write_at(off as u64, &data[off..]).unwrap();
        assert_eq!(spool.complete(f).unwrap(), seg);
        assert!(std::fs::read(spool.complete_path(&seg)).unwrap() == data);
        // The publisher takes the segment from memory, once.
        let other = SegmentName::new(1, 8, seg_size);
        assert!(spool.take_resident(&other).is_none());
        let r = spool.take_resident(&seg).expect("held in memory");
        assert!(r.bytes() == data);
        assert!(spool.take_resident(&seg).is_none());
        drop(r);
        std::fs::remove_file(spool.complete_path(&seg)).unwrap();
    }

    #[test]
    fn resident_buffers_are_bounded_and_a_segment_without_one_is_written_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let seg_size = 1 << 20;
        let spool = Spool::open(dir.path(), seg_size).unwrap().resident(true);
        let pool = spool.resident.clone().unwrap();
        let segs: Vec<_> = (3..7).map(|n| SegmentName::new(1, n, seg_size)).collect();
        // Segment 3 completes into memory; the publisher takes it and is still compressing
        // when 4 completes (held for the publisher) and 5 starts: 5 gets no buffer.
        complete_segment(&spool, segs[0], seg_size, 0xA3);
        let compressing = spool.take_resident(&segs[0]).unwrap();
        complete_segment(&spool, segs[1], seg_size, 0xA4);
        let mut f = spool.open_partial(segs[2]).unwrap();
        assert!(f.in_memory().is_none(), "no third buffer");
        assert_eq!(pool.allocated(), MAX_RESIDENT);
        f.write_at(0, &[0xA5; 4096]).unwrap();
        f.sync().unwrap();
        assert!(std::fs::read(spool.partial_path(&segs[2])).unwrap()[..4096] == [0xA5; 4096]);
        f.write_at(4096, &vec![0xA5; seg_size as usize - 4096])
            .unwrap();
        spool.complete(f).unwrap();
        assert!(
            spool.take_resident(&segs[2]).is_none(),
            "read from its file"
        );
        assert!(spool.read_complete(&segs[2]).unwrap() == vec![0xA5; seg_size as usize]);
        // Once the publisher is done with 3, its buffer serves the next segment.
        drop(compressing);
        let f = spool.open_partial(segs[3]).unwrap();
        assert!(f.in_memory().is_some());
        assert_eq!(pool.allocated(), MAX_RESIDENT);
        drop(f);
        assert!(spool.take_resident(&segs[1]).unwrap().bytes() == vec![0xA4; seg_size as usize]);
        // Segments larger than 16 MiB are never held in memory.
        let big = Spool::open(dir.path(), 64 << 20).unwrap().resident(true);
        assert!(big.resident.is_none());
    }
}
