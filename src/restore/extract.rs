//! Writes a backup's archives into directories, verifying every byte on the way.
//!
//! Per archive, three stages overlap: ranged reads of the object (async), zstd decompression
//! with the object's checksums ([`Repo::stream_verified`], one blocking thread) and the tar
//! writer (another blocking thread) that creates the files and computes each file's manifest
//! checksum. Archives (the data directory and each tablespace) run in parallel. Paths are
//! confined to their destination (no absolute paths, no `..`). Files get the archive's modes
//! (data files 0600, directories 0700 at most) and, when asked, an owner.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::format::manifest::{ChecksumAlgorithm, FileDigests};
use crate::format::tar::{EntryKind, TarEvent, TarReader};
use crate::progress::Progress;
use crate::repo::{Repo, RepoError};
use crate::stream::stages::add_since;

/// One archive of a backup and where it goes.
#[derive(Clone, Debug)]
pub struct Archive {
    /// Object key (`backups/<id>/base.tar.zst`, `backups/<id>/<oid>.tar.zst`).
    pub key: String,
    pub dest: PathBuf,
    /// The tablespace's OID (its files are `pg_tblspc/<oid>/…` in the manifest).
    pub tablespace: Option<u32>,
    /// Uncompressed size, for progress.
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error("archive {key} is not a valid tar stream: {reason}")]
    Tar { key: String, reason: String },
    #[error("archive {key} holds an entry outside its directory: {path:?}")]
    UnsafePath { key: String, path: String },
    #[error("archive {key}: combining an incremental backup: {reason}")]
    Combine { key: String, reason: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExtractError {
    let context = context.into();
    move |cause| ExtractError::Io { context, cause }
}

/// Who should own what is written (`None`: the current user).
pub type Owner = Option<(u32, u32)>;

/// Raw archive bytes travel from the decompressor to the tar writer in chunks of this size
/// (bounded: at most [`PIPE_DEPTH`] in flight per archive).
const PIPE_DEPTH: usize = 16;

/// Where a restore's time goes, stage by stage, summed over archives (which run in
/// parallel, so the sums can exceed the wall time); logged as `restore stage totals`.
#[derive(Debug, Default)]
pub struct Stages {
    /// Reading objects, decompressing them and checking their checksums, less the time the
    /// decompressor waited for the file writer, nanoseconds.
    pub decode_ns: AtomicU64,
    /// The file writer's busy time: creating files and directories, writing them, and the
    /// manifest's per-file checksums, nanoseconds.
    pub write_ns: AtomicU64,
    /// Raw archive bytes restored.
    pub bytes: AtomicU64,
}

impl Stages {
    /// Logs the totals, with the final flush (`sync`) and the whole restore's wall time.
    pub fn log(&self, sync: Duration, wall: Duration) {
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) / 1_000_000;
        tracing::info!(
            raw_bytes = self.bytes.load(Ordering::Relaxed),
            decode_ms = ms(&self.decode_ns),
            write_ms = ms(&self.write_ns),
            sync_ms = sync.as_millis() as u64,
            wall_ms = wall.as_millis() as u64,
            "restore stage totals"
        );
    }
}

/// The decompressor's `Write` end: hands raw chunks to the tar writer, and counts the time it
/// waits for it.
struct Pipe {
    tx: SyncSender<Vec<u8>>,
    waited: Duration,
}

impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let t = Instant::now();
        self.tx
            .send(b.to_vec())
            .map_err(|_| std::io::Error::other("the archive writer stopped"))?;
        self.waited += t.elapsed();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A path inside `root` for a tar entry, or None if it would leave it.
fn confined(root: &Path, entry: &str) -> Option<PathBuf> {
    let rel = Path::new(entry.trim_end_matches('/'));
    if rel.as_os_str().is_empty() {
        return Some(root.to_path_buf());
    }
    let mut out = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn chown(path: &Path, owner: Owner) -> std::io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// How an archive is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Into empty directories (a full backup, or the first of a chain).
    Fresh,
    /// Over what earlier backups of an incremental chain wrote ([`super::combine`]): whole
    /// files replace theirs, `INCREMENTAL.*` files are applied to them. `checksums`: compute
    /// the reconstructed files' manifest checksums (the newest layer).
    Over { checksums: bool },
}

/// Where the current entry's bytes go.
enum Sink {
    File(Written, PathBuf),
    Incremental(Box<super::combine::Applier>, String, PathBuf),
}

/// Dirty bytes of a file after which their writeback is started (as PostgreSQL's
/// `backend_flush_after` does): the disk writes while the next bytes are decompressed, and the
/// final `syncfs` has little left to wait for.
const FLUSH_AFTER: u64 = 1 << 20;

/// A file being written, and how much of it has been handed to writeback.
struct Written {
    f: File,
    len: u64,
    kicked: u64,
}

impl Written {
    fn write(&mut self, d: &[u8]) -> std::io::Result<()> {
        self.f.write_all(d)?;
        self.len += d.len() as u64;
        if self.len - self.kicked >= FLUSH_AFTER {
            self.start_writeback();
        }
        Ok(())
    }

    /// Starts (does not wait for) the writeback of what was written since the last call. Only
    /// a hint: the durability comes from the restore's final `syncfs`.
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        if self.len > self.kicked {
            // SAFETY: a plain system call on a descriptor we own; failure only loses the hint.
            unsafe {
                libc::sync_file_range(
                    self.f.as_raw_fd(),
                    self.kicked as libc::off64_t,
                    (self.len - self.kicked) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.kicked = self.len;
        }
    }
}

/// The tar writer of one archive: creates entries under `root`, feeding `digests`.
struct TarWriter<'a> {
    key: &'a str,
    root: &'a Path,
    owner: Owner,
    layer: Layer,
    algo: ChecksumAlgorithm,
    prefix: String,
    digests: &'a mut FileDigests,
    file: Option<Sink>,
    /// Reconstructed files (manifest path) with their final size and checksum.
    rebuilt: &'a mut std::collections::HashMap<String, (u64, String)>,
    written: &'a std::sync::atomic::AtomicU64,
}

impl TarWriter<'_> {
    fn event(&mut self, e: &TarEvent<'_>) -> Result<(), ExtractError> {
        self.digests.event(e);
        match e {
            TarEvent::Entry {
                path,
                kind,
                link,
                mode,
                ..
            } => {
                let target = confined(self.root, path).ok_or_else(|| ExtractError::UnsafePath {
                    key: self.key.to_string(),
                    path: path.clone(),
                })?;
                match kind {
                    EntryKind::Directory => {
                        std::fs::create_dir_all(&target)
                            .map_err(io(format!("creating {}", target.display())))?;
                        let m = if *mode == 0 { 0o700 } else { mode & 0o750 };
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(m))
                            .map_err(io(format!("setting the mode of {}", target.display())))?;
                        chown(&target, self.owner)
                            .map_err(io(format!("changing the owner of {}", target.display())))?;
                    }
                    EntryKind::File => {
                        if let (Layer::Over { .. }, Some(name)) =
                            (self.layer, super::combine::reconstructed_name(path))
                        {
                            let dest = confined(self.root, &name).ok_or_else(|| {
                                ExtractError::UnsafePath {
                                    key: self.key.to_string(),
                                    path: path.clone(),
                                }
                            })?;
                            let a = super::combine::Applier::open(&dest).map_err(|e| {
                                ExtractError::Combine {
                                    key: self.key.to_string(),
                                    reason: e,
                                }
                            })?;
                            self.file = Some(Sink::Incremental(
                                Box::new(a),
                                format!("{}{name}", self.prefix),
                                dest,
                            ));
                            return Ok(());
                        }
                        let m = if *mode == 0 { 0o600 } else { mode & 0o640 };
                        let mut o = OpenOptions::new();
                        match self.layer {
                            Layer::Fresh => o.write(true).create_new(true),
                            Layer::Over { .. } => o.write(true).create(true).truncate(true),
                        };
                        let f = o
                            .mode(m)
                            .open(&target)
                            .map_err(io(format!("creating {}", target.display())))?;
                        if let Some((uid, gid)) = self.owner {
                            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io(
                                format!("changing the owner of {}", target.display()),
                            ))?;
                        }
                        self.file = Some(Sink::File(
                            Written {
                                f,
                                len: 0,
                                kicked: 0,
                            },
                            target,
                        ));
                    }
                    EntryKind::Symlink => {
                        if self.layer != Layer::Fresh && target.symlink_metadata().is_ok() {
                            std::fs::remove_file(&target)
                                .map_err(io(format!("replacing {}", target.display())))?;
                        }
                        std::os::unix::fs::symlink(link, &target)
                            .map_err(io(format!("creating the symlink {}", target.display())))?;
                        chown(&target, self.owner)
                            .map_err(io(format!("changing the owner of {}", target.display())))?;
                    }
                    EntryKind::Other(_) => {}
                }
            }
            TarEvent::Data(d) => {
                match self.file.as_mut() {
                    Some(Sink::File(f, p)) => {
                        f.write(d).map_err(io(format!("writing {}", p.display())))?
                    }
                    Some(Sink::Incremental(a, _, _)) => {
                        a.feed(d).map_err(|reason| ExtractError::Combine {
                            key: self.key.to_string(),
                            reason,
                        })?
                    }
                    None => {}
                }
                self.written
                    .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            TarEvent::EntryEnd => {
                if let Some(Sink::File(f, _)) = self.file.as_mut() {
                    f.start_writeback();
                }
                if let Some(Sink::Incremental(a, name, dest)) = self.file.take() {
                    let combine = |reason| ExtractError::Combine {
                        key: self.key.to_string(),
                        reason,
                    };
                    let len = a.finish().map_err(combine)?;
                    if self.layer == (Layer::Over { checksums: true }) {
                        let (size, sum) = super::combine::file_digest(&dest, self.algo)
                            .map_err(io(format!("reading back {}", dest.display())))?;
                        debug_assert_eq!(size, len);
                        self.rebuilt.insert(name, (size, sum));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs the tar writer of one archive until the decompressor's pipe closes.
#[allow(clippy::too_many_arguments)]
fn write_archive(
    key: &str,
    root: &Path,
    owner: Owner,
    algo: ChecksumAlgorithm,
    layer: Layer,
    tablespace: Option<u32>,
    rx: Receiver<Vec<u8>>,
    written: &AtomicU64,
    stages: &Stages,
) -> Result<(FileDigests, Rebuilt), ExtractError> {
    let mut digests = FileDigests::new(algo);
    digests.start_archive(tablespace);
    let mut rebuilt = Rebuilt::new();
    let mut reader = TarReader::new();
    let mut w = TarWriter {
        key,
        root,
        owner,
        layer,
        algo,
        prefix: tablespace
            .map(|o| format!("pg_tblspc/{o}/"))
            .unwrap_or_default(),
        digests: &mut digests,
        file: None,
        rebuilt: &mut rebuilt,
        written,
    };
    let mut failed: Option<ExtractError> = None;
    for chunk in rx {
        let t = Instant::now();
        stages
            .bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let r = reader.feed(&chunk, &mut |e| {
            w.event(&e).map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                crate::format::tar::TarError(msg)
            })
        });
        add_since(&stages.write_ns, t);
        if let Err(e) = r {
            return Err(failed.take().unwrap_or(ExtractError::Tar {
                key: key.to_string(),
                reason: e.to_string(),
            }));
        }
    }
    if !(reader.ended() || reader.at_boundary()) {
        return Err(ExtractError::Tar {
            key: key.to_string(),
            reason: "the archive ends inside an entry".into(),
        });
    }
    drop(w);
    Ok((digests, rebuilt))
}

/// Reconstructed files by manifest path: their final size and manifest checksum.
pub type Rebuilt = std::collections::HashMap<String, (u64, String)>;

/// Extracts every archive (in parallel), returning the digests of all files written and the
/// files reconstructed from incremental ones (with [`Layer::Over`]).
pub async fn extract_all(
    repo: &Repo,
    archives: &[Archive],
    owner: Owner,
    algo: ChecksumAlgorithm,
    layer: Layer,
    stages: &Arc<Stages>,
) -> Result<(FileDigests, Rebuilt), ExtractError> {
    let written = Arc::new(AtomicU64::new(0));
    let total: u64 = archives.iter().map(|a| a.size).sum();
    let mut tasks = Vec::new();
    for a in archives {
        let (tx, rx) = sync_channel::<Vec<u8>>(PIPE_DEPTH);
        let (key, dest, ts) = (a.key.clone(), a.dest.clone(), a.tablespace);
        let (w, st) = (written.clone(), stages.clone());
        let writer = tokio::task::spawn_blocking(move || {
            write_archive(&key, &dest, owner, algo, layer, ts, rx, &w, &st)
        });
        let (repo, st) = (repo.clone(), stages.clone());
        let key = a.key.clone();
        // The pipe is dropped as soon as the object is read, which ends the writer's input.
        let reader = tokio::spawn(async move {
            let t = Instant::now();
            let pipe = Pipe {
                tx,
                waited: Duration::ZERO,
            };
            let r = repo.stream_verified(&key, pipe).await;
            let waited = r.as_ref().map_or(Duration::ZERO, |(_, p)| p.waited);
            st.decode_ns.fetch_add(
                t.elapsed().saturating_sub(waited).as_nanos() as u64,
                Ordering::Relaxed,
            );
            r.map(|(info, _pipe)| info)
        });
        tasks.push((reader, writer));
    }
    // Progress while the archives stream.
    let mut progress = Progress::new("restore");
    progress.set_total(total);
    let mut all = FileDigests::new(algo);
    let mut rebuilt = Rebuilt::new();
    let mut first_error: Option<ExtractError> = None;
    for (reader, mut writer) in tasks {
        // Progress every 100 ms, and on at once when the writer ends.
        let w = loop {
            tokio::select! {
                w = &mut writer => break w.expect("archive writer panicked"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    progress.set(written.load(Ordering::Relaxed));
                }
            }
        };
        let r = reader.await.expect("archive reader panicked");
        // A corrupt object is the root cause even when the writer saw the pipe break first.
        let outcome = match (r, w) {
            (Err(e @ RepoError::Corrupt { .. }), _) => Err(e.into()),
            (_, Err(e)) => Err(e),
            (Err(e), _) => Err(e.into()),
            (Ok(_), Ok(d)) => Ok(d),
        };
        match outcome {
            Ok((d, r)) => {
                all.merge(d);
                rebuilt.extend(r);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    progress.set(written.load(Ordering::Relaxed));
    progress.finish();
    match first_error {
        Some(e) => Err(e),
        None => Ok((all, rebuilt)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_is_exact_and_handed_to_writeback_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = Written {
            f: File::create(&path).unwrap(),
            len: 0,
            kicked: 0,
        };
        let mut want = Vec::new();
        for (i, n) in [1usize, 4095, 600_000, FLUSH_AFTER as usize, 3, 2 << 20]
            .into_iter()
            .enumerate()
        {
            let chunk = vec![i as u8 + 1; n];
            w.write(&chunk).unwrap();
            want.extend_from_slice(&chunk);
            // Never more than FLUSH_AFTER bytes dirty without writeback started.
            assert!(w.len - w.kicked < FLUSH_AFTER, "after chunk {i}");
            assert_eq!(w.len, want.len() as u64);
        }
        w.start_writeback();
        assert_eq!(w.kicked, w.len);
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn paths_stay_inside() {
        let root = Path::new("/r");
        assert_eq!(
            confined(root, "base/1/123"),
            Some(PathBuf::from("/r/base/1/123"))
        );
        assert_eq!(
            confined(root, "./global/"),
            Some(PathBuf::from("/r/global"))
        );
        assert_eq!(confined(root, "../etc/passwd"), None);
        assert_eq!(confined(root, "a/../../b"), None);
        assert_eq!(confined(root, "/etc/passwd"), None);
    }
}
