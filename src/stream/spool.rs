//! The local spool: the WAL segment being received, written in place as `<segment>.partial`,
//! and complete segments waiting to be compressed and published, named `<segment>`.
//!
//! Invariants: bytes reach a spool file in stream order; a segment is renamed from `.partial` to
//! its final name only once it is complete and fsync'd, with the directory fsync'd after the
//! rename (`durable_rename`); a complete spool file is removed only after its object is durable
//! in storage. The spool is always on local disk, whatever the storage backend.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::storage::fs::{create_dir_all_durable, fsync_dir};
use crate::wal::SegmentName;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolEntry {
    /// `<segment>.partial`: being received.
    Partial(SegmentName),
    /// `<segment>`: complete and durable, not yet published.
    Complete(SegmentName),
}

/// A zero-filled, fsync'd segment-sized file waiting to become the next `.partial`.
const PREALLOC_NAME: &str = ".next-segment.prealloc";

/// The segment the streamer needs next, recorded each time it publishes one: where it resumes
/// even when the stop fell on a segment boundary (no `.partial`) and segments further ahead were
/// archived by someone else (a backup fetching its own WAL).
const NEXT_NAME: &str = "stream.next";

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    seg_size: u64,
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
}

impl SegmentFile {
    /// Writes `data` at `offset` from the segment start; must continue where the last write ended.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(offset, self.written);
        self.file.write_all_at(data, offset)?;
        self.written = offset + data.len() as u64;
        Ok(())
    }

    /// fdatasync if anything is unsynced. Returns whether a sync happened.
    pub fn sync(&mut self) -> std::io::Result<bool> {
        if self.synced == self.written {
            return Ok(false);
        }
        self.file.sync_data()?;
        self.synced = self.written;
        Ok(true)
    }
}

impl Spool {
    pub fn open(dir: &Path, seg_size: u64) -> std::io::Result<Spool> {
        create_dir_all_durable(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            seg_size,
        })
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
            let prealloc = self.dir.join(PREALLOC_NAME);
            let ready = std::fs::metadata(&prealloc).is_ok_and(|m| m.len() == self.seg_size);
            if ready {
                std::fs::rename(&prealloc, &path)?;
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        if len < self.seg_size {
            zero_fill(&file, len, self.seg_size)?;
            file.sync_all()?;
        }
        fsync_dir(&self.dir)?;
        Ok(SegmentFile {
            file,
            seg,
            written: 0,
            synced: 0,
        })
    }

    /// Prepares the next segment's file (zero-filled, fsync'd) unless one is ready. Blocking;
    /// run it off the receive path.
    pub fn prepare_next(&self) -> std::io::Result<()> {
        let prealloc = self.dir.join(PREALLOC_NAME);
        if std::fs::metadata(&prealloc).is_ok_and(|m| m.len() == self.seg_size) {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{PREALLOC_NAME}.tmp"));
        let f = File::create(&tmp)?;
        zero_fill(&f, 0, self.seg_size)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &prealloc)?;
        fsync_dir(&self.dir)
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
        std::fs::rename(self.partial_path(&f.seg), self.complete_path(&f.seg))?;
        fsync_dir(&self.dir)?;
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

    /// Reads the first `len` bytes of a spool file.
    pub fn read_prefix(&self, path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
        let f = File::open(path)?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    pub fn remove(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Writes zeros over `[from, to)` (real blocks, not a hole: later fdatasyncs must not allocate).
fn zero_fill(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let n = ((to - pos) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
