//! Segment-sized, page-aligned buffers that hold the WAL segment being received: the segment
//! reaches its spool file by direct I/O (`O_DIRECT`: no copy into the page cache and none of
//! the filesystem's per-page work), and reaches the publisher's compressor from memory, without
//! reading the file back.
//!
//! Invariants:
//! - a buffer holds exactly the bytes written to its segment, from the segment's start;
//! - bytes reach the file only at a sync ([`DirectWriter::write_out`]), as whole 4 KiB blocks,
//!   and the caller fdatasyncs after: what a flush position counts is on disk, as with buffered
//!   writes. Bytes past the written length in the last block are zeros;
//! - at most [`MAX_BUFFERS`] buffers exist per spool. When none is free, a segment is written
//!   with buffered writes as before, and the publisher reads any segment no buffer holds from
//!   its file. Where the filesystem refuses `O_DIRECT`, the buffer's blocks are written
//!   through the page cache instead (the same bytes, the same fdatasync).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::wal::SegmentName;

/// Buffers per spool: the segment being received and the last complete one, which the
/// publisher compresses meanwhile.
pub(crate) const MAX_BUFFERS: usize = 2;

/// Larger segments (`wal_segment_size` up to 1 GB) are written as before: two buffers of them
/// would break the stream's memory bound.
pub(crate) const MAX_SEGMENT: u64 = 16 << 20;

/// Direct I/O's alignment of memory, offsets and lengths: the largest logical block size.
const BLOCK: usize = 4096;

/// A zeroed, [`BLOCK`]-aligned heap buffer.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory; `&AlignedBuf` only reads it.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, BLOCK).expect("a segment size is a valid layout")
    }

    fn new(len: usize) -> Option<AlignedBuf> {
        if len == 0 || len % BLOCK != 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        NonNull::new(ptr).map(|ptr| AlignedBuf { ptr, len })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[derive(Default)]
struct Pool {
    free: Vec<AlignedBuf>,
    /// The last segment completed from a buffer, until the publisher takes it.
    done: Option<(SegmentName, AlignedBuf)>,
    allocated: usize,
}

/// A spool's buffers, shared by its clones (the receive loop's and the publisher's).
#[derive(Clone, Default)]
pub(crate) struct Resident(Arc<Mutex<Pool>>);

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.0.lock().expect("pool lock");
        f.debug_struct("Resident")
            .field("allocated", &p.allocated)
            .field("free", &p.free.len())
            .field("done", &p.done.as_ref().map(|(s, _)| *s))
            .finish()
    }
}

impl Resident {
    fn take_free(&self, len: usize) -> Option<Lease> {
        let mut p = self.0.lock().expect("pool lock");
        let buf = match p.free.pop() {
            Some(b) if b.len == len => b,
            popped => {
                if popped.is_some() {
                    p.allocated -= 1;
                }
                if p.allocated >= MAX_BUFFERS {
                    return None;
                }
                let b = AlignedBuf::new(len)?;
                p.allocated += 1;
                b
            }
        };
        Some(self.lease(buf))
    }

    fn lease(&self, buf: AlignedBuf) -> Lease {
        Lease {
            buf: Some(buf),
            pool: self.clone(),
        }
    }

    fn completed(&self, seg: SegmentName, buf: AlignedBuf) {
        let mut p = self.0.lock().expect("pool lock");
        if let Some((_, old)) = p.done.replace((seg, buf)) {
            p.free.push(old);
        }
    }

    /// The complete segment `seg`, if a buffer holds it.
    pub(crate) fn take_done(&self, seg: &SegmentName) -> Option<ResidentSegment> {
        let mut p = self.0.lock().expect("pool lock");
        if p.done.as_ref().is_some_and(|(s, _)| s == seg) {
            let (_, buf) = p.done.take().expect("checked above");
            return Some(ResidentSegment(self.lease(buf)));
        }
        None
    }

    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.0.lock().expect("pool lock").allocated
    }
}

/// A buffer out of the pool: back in its free list when dropped, unless handed on whole
/// ([`Lease::into_inner`]).
struct Lease {
    buf: Option<AlignedBuf>,
    pool: Resident,
}

impl Lease {
    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().expect("present until drop").as_slice()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf
            .as_mut()
            .expect("present until drop")
            .as_mut_slice()
    }

    fn into_inner(mut self) -> (AlignedBuf, Resident) {
        let buf = self.buf.take().expect("present until drop");
        (buf, self.pool.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.0.lock().expect("pool lock").free.push(b);
        }
    }
}

/// A complete segment in memory, as its spool file holds it; the buffer goes back to the pool
/// when this is dropped.
pub struct ResidentSegment(Lease);

impl ResidentSegment {
    pub fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// The segment being received, held in a buffer and written to its file at each sync.
pub(crate) struct DirectWriter {
    buf: Lease,
    /// The file opened with `O_DIRECT`; `None` once the filesystem refused a direct write.
    direct: Option<File>,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl DirectWriter {
    /// A writer for the segment file `path`, if a buffer is free (a pool exists only for
    /// segments up to [`MAX_SEGMENT`]: `Spool::resident`). The file is opened again with
    /// `O_DIRECT` where the filesystem allows it.
    pub(crate) fn open(path: &Path, pool: &Resident, seg_size: u64) -> Option<DirectWriter> {
        let buf = pool.take_free(seg_size as usize)?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Some(DirectWriter { buf, direct })
    }

    /// Places `data` at `offset` of the segment (not yet in the file).
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.buf.bytes_mut()[o..o + data.len()].copy_from_slice(data);
    }

    /// Writes bytes `[synced, written)` of the segment to `file` (the blocks that hold them,
    /// the last one's tail zeroed). The caller fdatasyncs after.
    pub(crate) fn write_out(
        &mut self,
        file: &File,
        synced: u64,
        written: u64,
    ) -> std::io::Result<()> {
        let (from, to) = (synced as usize / BLOCK * BLOCK, written as usize);
        let end = to.div_ceil(BLOCK) * BLOCK;
        self.buf.bytes_mut()[to..end].fill(0);
        let bytes = &self.buf.bytes()[from..end];
        if let Some(d) = &self.direct {
            match d.write_all_at(bytes, from as u64) {
                Ok(()) => return Ok(()),
                // Opened with O_DIRECT but not written that way (alignment the device wants
                // larger, a filesystem that only pretends): through the page cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        file.write_all_at(bytes, from as u64)
    }

    /// The first `len` bytes of the segment.
    pub(crate) fn prefix(&self, len: u64) -> &[u8] {
        &self.buf.bytes()[..len as usize]
    }

    /// Hands the complete segment's buffer to the publisher ([`Resident::take_done`]).
    pub(crate) fn completed(self, seg: SegmentName) {
        let (buf, pool) = self.buf.into_inner();
        pool.completed(seg, buf);
    }

    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Tests: writes go through the page cache, as after a refused direct write.
    #[cfg(test)]
    pub(crate) fn refuse_direct(&mut self) {
        self.direct = None;
    }
}
