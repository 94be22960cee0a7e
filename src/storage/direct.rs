//! Writing a new object file around the page cache (`O_DIRECT`), for the filesystem backend.
//!
//! A backup or a WAL object written through the page cache costs a copy into newly allocated
//! cache pages (and, on a host that shares its cache with PostgreSQL, evicts the database's own
//! pages for data nobody reads soon). Written directly, the bytes go from one reused, aligned
//! buffer to the device.
//!
//! Invariants: the file ends with exactly the bytes written (the aligned tail's padding is
//! truncated away before the caller fsyncs); where the filesystem refuses `O_DIRECT` (tmpfs, some
//! network filesystems: `EINVAL` at open or at the first write) the same file is written through
//! the page cache instead, never failing for that reason. Durability stays with the caller's
//! fsync (file size and block allocation are metadata).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Alignment of buffer, offsets and lengths (covers 512-byte and 4 KiB logical blocks).
const ALIGN: usize = 4096;
/// Bytes gathered before each direct write.
const CHUNK: usize = 1 << 20;
/// Windows of finished files kept for the next ones, at most this many (1 MiB each). A fresh
/// window is new memory, which the kernel hands over a page at a time: ~260 page faults per
/// object, a third of a WAL stream's faults (`perf record -e page-faults`).
const POOLED: usize = 4;

static WINDOWS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A window of `CHUNK + ALIGN` bytes, reused when one is pooled. Its old bytes are never
/// written out: only what the next file gathers is, and its padding is zeroed first.
fn take_window() -> Vec<u8> {
    let pooled = WINDOWS.lock().map(|mut w| w.pop()).unwrap_or(None);
    pooled.unwrap_or_else(|| vec![0u8; CHUNK + ALIGN])
}

fn give_back(window: Vec<u8>) {
    if window.len() != CHUNK + ALIGN {
        return;
    }
    if let Ok(mut w) = WINDOWS.lock() {
        if w.len() < POOLED {
            w.push(window);
        }
    }
}

/// A new file written sequentially, directly where the filesystem allows.
pub(crate) struct DirectFile {
    file: File,
    /// `CHUNK + ALIGN` bytes, of which `[off, off + CHUNK)` is aligned (direct mode only).
    buf: Vec<u8>,
    off: usize,
    /// Bytes gathered in the aligned window.
    len: usize,
    /// File offset of the window's start: everything before it is written.
    pos: u64,
    direct: bool,
    /// Tests: the next direct write fails as a filesystem refusing `O_DIRECT` would.
    #[cfg(test)]
    refuse: bool,
}

impl DirectFile {
    /// Creates `path` (mode 0600, as [`super::fs::create_private`]), opened for direct writes
    /// when the filesystem allows.
    pub(crate) fn create(path: &Path) -> std::io::Result<DirectFile> {
        let (file, direct) = match super::fs::create_private_with(path, libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (super::fs::create_private(path)?, false)
            }
            Err(e) => return Err(e),
        };
        let (buf, off) = if direct {
            let buf = take_window();
            let off = buf.as_ptr().align_offset(ALIGN);
            (buf, off)
        } else {
            (Vec::new(), 0)
        };
        Ok(DirectFile {
            file,
            buf,
            off,
            len: 0,
            pos: 0,
            direct,
            #[cfg(test)]
            refuse: false,
        })
    }

    /// Whether writes still bypass the page cache.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `data`.
    pub(crate) fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if !self.direct {
                self.file.write_all_at(data, self.pos)?;
                self.pos += data.len() as u64;
                return Ok(());
            }
            let n = data.len().min(CHUNK - self.len);
            let at = self.off + self.len;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == CHUNK {
                self.write_window(CHUNK)?;
            }
        }
        Ok(())
    }

    /// Writes the window's first `n` bytes (a multiple of [`ALIGN`]) at `pos`, falling back to
    /// the page cache if the filesystem refuses.
    fn write_window(&mut self, n: usize) -> std::io::Result<()> {
        debug_assert_eq!(n % ALIGN, 0);
        let window = &self.buf[self.off..self.off + n];
        let written = self.file.write_all_at(window, self.pos);
        #[cfg(test)]
        let written = match std::mem::take(&mut self.refuse) {
            true => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            false => written,
        };
        match written {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.buffered()?;
                let window = &self.buf[self.off..self.off + n];
                self.file.write_all_at(window, self.pos)?;
            }
            r => r?,
        }
        self.pos += n as u64;
        self.len -= n.min(self.len);
        Ok(())
    }

    /// Turns `O_DIRECT` off for the rest of the file.
    fn buffered(&mut self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on an open descriptor, with no pointers.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.direct = false;
        Ok(())
    }

    /// Writes what is gathered and returns the file, exactly as long as what was written;
    /// not yet fsync'd.
    pub(crate) fn finish(mut self) -> std::io::Result<File> {
        if self.len > 0 {
            let size = self.pos + self.len as u64;
            let padded = self.len.div_ceil(ALIGN) * ALIGN;
            let (from, to) = (self.off + self.len, self.off + padded);
            self.buf[from..to].fill(0);
            self.write_window(padded)?;
            self.file.set_len(size)?;
        }
        give_back(std::mem::take(&mut self.buf));
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_file_holds_exactly_what_was_written_whatever_the_sizes() {
        let dir = tempfile::tempdir().unwrap();
        for (i, sizes) in [
            vec![],
            vec![1],
            vec![ALIGN],
            vec![CHUNK],
            vec![CHUNK + 1, 7],
            vec![300_000, 1_000_000, 2_500_001, 4096, 1],
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let mut f = DirectFile::create(&path).unwrap();
            // ext4 and xfs take O_DIRECT; a test directory elsewhere still checks the content.
            let mut want = Vec::new();
            for (j, n) in sizes.iter().enumerate() {
                let piece: Vec<u8> = (0..*n).map(|k| (k * 31 + j * 7) as u8).collect();
                f.write_all(&piece).unwrap();
                want.extend_from_slice(&piece);
            }
            let file = f.finish().unwrap();
            file.sync_all().unwrap();
            drop(file);
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), want.len(), "sizes {sizes:?}");
            assert!(got == want, "content differs for sizes {sizes:?}");
        }
    }

    #[test]
    fn a_reused_window_carries_nothing_into_the_next_file() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..3 {
            let big = dir.path().join(format!("big{round}"));
            let mut f = DirectFile::create(&big).unwrap();
            f.write_all(&vec![0xab; CHUNK - 1]).unwrap();
            f.finish().unwrap();
            let small = dir.path().join(format!("small{round}"));
            let mut f = DirectFile::create(&small).unwrap();
            f.write_all(b"0123456789").unwrap();
            f.finish().unwrap();
            assert_eq!(std::fs::read(&small).unwrap(), b"0123456789");
        }
    }

    #[test]
    fn a_file_that_falls_back_to_the_page_cache_midway_is_still_exact() {
        // What a filesystem that takes O_DIRECT at open but refuses a write leads to.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = DirectFile::create(&path).unwrap();
        let a: Vec<u8> = (0..CHUNK + 5000).map(|k| (k % 251) as u8).collect();
        let b: Vec<u8> = (0..70_000).map(|k| (k % 13) as u8).collect();
        let c: Vec<u8> = (0..CHUNK).map(|k| (k % 7) as u8).collect();
        f.write_all(&a).unwrap();
        if f.is_direct() {
            // The window holding the last 5000 bytes of `a` and the first of `c` is refused.
            f.refuse = true;
            f.write_all(&c).unwrap();
            assert!(!f.is_direct() && !f.refuse);
        } else {
            f.write_all(&c).unwrap();
        }
        f.write_all(&b).unwrap();
        f.finish().unwrap().sync_all().unwrap();
        let got = std::fs::read(&path).unwrap();
        let want = [a, c, b].concat();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
    }

    #[test]
    fn ext4_and_xfs_take_direct_writes_tmpfs_does_not() {
        // Without this the direct path could silently never run in the tests above.
        let dir = tempfile::tempdir().unwrap();
        let f = DirectFile::create(&dir.path().join("f")).unwrap();
        let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        const EXT4: i64 = 0xEF53;
        const XFS: i64 = 0x5846_5342;
        const TMPFS: i64 = 0x0102_1994;
        match st.f_type as i64 {
            EXT4 | XFS => assert!(f.is_direct()),
            TMPFS => assert!(!f.is_direct()),
            _ => {}
        }
    }
}
