//! Serving WAL to PostgreSQL's `restore_command` (`archiver wal-fetch --repo R %f %p`): every
//! byte verified, the destination written atomically (temporary name, fsync, rename, fsync of
//! the directory), a partial segment served zero-filled to the segment size as PostgreSQL's own
//! `.partial` files are.
//!
//! Prefetch: after serving segment S, a worker (one at a time, under a flock) fetches S+1…S+N,
//! verified, into `.archiver-prefetch/` next to the destination (in `pg_wal/`, which base
//! backups leave out). When PostgreSQL then asks for S+1 it is renamed into place. A file there
//! is only ever a complete, verified segment; anything older than the segment just asked for is
//! removed.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::repo::layout::{history_key, partial_segment_key, wal_segment_key};
use crate::repo::local_wal::WalSource;
use crate::repo::lock::RepoLock;
use crate::repo::{object, Repo, RepoError};
use crate::storage::fs::{create_dir_all_durable, create_private, durable_rename, parent_dir};
use crate::storage::StorageError;
use crate::wal::segment::parse_history_file_name;
use crate::wal::SegmentName;

/// How many segments the prefetch worker fetches at once.
const PREFETCH_PARALLEL: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The archived file exists but cannot be served (damaged, wrong size).
    #[error("{0}")]
    Unusable(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        cause: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
    let context = context.into();
    move |cause| FetchError::Io { context, cause }
}

/// What a fetch did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Written; for a complete segment, which (prefetching may follow it).
    Served(Option<SegmentName>),
    /// Not in the archive (PostgreSQL's "no such file": the end of the archived WAL).
    Missing(String),
}

/// The prefetch directory for a destination.
pub fn prefetch_dir(dest: &Path) -> PathBuf {
    parent_dir(dest).join(".archiver-prefetch")
}

fn key_for(walfile: &str, seg_size: u64) -> Option<String> {
    if let Some(tli) = parse_history_file_name(walfile) {
        return Some(history_key(tli));
    }
    if let Some(stem) = walfile.strip_suffix(".partial") {
        return SegmentName::parse(stem, seg_size).map(|s| partial_segment_key(&s));
    }
    SegmentName::parse(walfile, seg_size).map(|s| wal_segment_key(&s))
}

/// Serves `walfile` from the prefetch directory if it is there (renamed into place): which.
pub fn take_prefetched(walfile: &str, dest: &Path) -> Option<SegmentName> {
    // Any segment size parses the name's fields; the worker wrote it for the right one.
    let seg = SegmentName::parse(walfile, 16 << 20)?;
    let src = prefetch_dir(dest).join(walfile);
    durable_rename(&src, dest).ok()?;
    tracing::debug!(%walfile, "served from the prefetch directory");
    Some(seg)
}

/// Whether a prefetch worker holds `dir`.
pub fn prefetch_running(dir: &Path) -> bool {
    RepoLock::is_held(&dir.join(".lock"))
}

/// Fetches `walfile` (a segment, `<segment>.partial` or `<tli>.history`) into `dest`.
pub async fn fetch(repo: &Repo, walfile: &str, dest: &Path) -> Result<Fetched, FetchError> {
    let seg_size = repo.seg_size();
    let asked_partial = walfile.ends_with(".partial");
    let stem = walfile.trim_end_matches(".partial");
    if let Some(seg) = SegmentName::parse(stem, seg_size) {
        let Some(src) = source_for(repo, seg, asked_partial).await? else {
            return Ok(Fetched::Missing(format!("{walfile} is not in the archive")));
        };
        if src != WalSource::Object {
            tracing::info!(%walfile, source = ?src, "serving a partial or not yet published segment");
        }
        let raw = repo.read_wal(seg, src).await.map_err(|e| {
            FetchError::Unusable(format!(
                "archived {walfile} is unusable; refusing to restore it: {e}"
            ))
        })?;
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            write_atomic_segment(&dest, seg_size, |f| {
                f.write_all(&raw).map_err(io("writing"))?;
                Ok(true)
            })
        })
        .await
        .expect("wal-fetch task panicked")?;
        return Ok(Fetched::Served((!asked_partial).then_some(seg)));
    }
    let Some(key) = key_for(walfile, seg_size) else {
        return Ok(Fetched::Missing(format!(
            "{walfile} is not a WAL segment or history file name; nothing fetched"
        )));
    };
    let obj = match repo.storage().get(&key).await {
        Ok(o) => o,
        Err(StorageError::NotFound(_)) => {
            return Ok(Fetched::Missing(format!("{walfile} is not in the archive")))
        }
        Err(e) => return Err(RepoError::from(e).into()),
    };
    let (dest, walfile) = (dest.to_path_buf(), walfile.to_string());
    tokio::task::spawn_blocking(move || {
        write_atomic_segment(&dest, seg_size, |f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            let info = object::decode(&obj, &mut w).map_err(|e| {
                FetchError::Unusable(format!(
                    "archived {walfile} ({key}) is corrupt: {e}; refusing to restore it"
                ))
            })?;
            w.flush().map_err(io("writing"))?;
            if info.kind == object::ObjectKind::WalSegment && info.raw_size != seg_size {
                return Err(FetchError::Unusable(format!(
                    "archived {walfile} has {} bytes, expected {seg_size}; refusing to restore it",
                    info.raw_size
                )));
            }
            // A partial segment is served full-size, zero-filled after the received prefix.
            Ok(info.kind == object::ObjectKind::PartialWalSegment)
        })
    })
    .await
    .expect("wal-fetch task panicked")?;
    Ok(Fetched::Served(None))
}

/// Writes `dest` atomically: `write` fills a temporary file next to it and says whether it is
/// a segment, which is then zero-filled to `seg_size` if shorter (a partial one).
fn write_atomic_segment(
    dest: &Path,
    seg_size: u64,
    write: impl FnOnce(&mut std::fs::File) -> Result<bool, FetchError>,
) -> Result<(), FetchError> {
    let dir = parent_dir(dest);
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dir.join(format!(".{name}.archiver-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = create_private(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let is_segment = write(&mut f)?;
        let len = f.metadata().map_err(io("reading the size written"))?.len();
        if is_segment && len < seg_size {
            f.set_len(seg_size)
                .map_err(io("zero-filling a partial segment"))?;
        }
        f.sync_all()
            .map_err(io(format!("fsync of {}", tmp.display())))?;
        durable_rename(&tmp, dest).map_err(io(format!("renaming into {}", dest.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where segment `seg` is served from: the complete object; else a complete segment in the
/// local spool not yet published; else its durable prefix, the segment being received (zero-
/// filled, as PostgreSQL's own `.partial` files are: recovery replays up to where the WAL ends
/// and no further); else a partial object. Asked for `<segment>.partial`: only the partial ones.
async fn source_for(
    repo: &Repo,
    seg: SegmentName,
    partial: bool,
) -> Result<Option<WalSource>, RepoError> {
    let storage = repo.storage();
    if !partial && storage.exists(&wal_segment_key(&seg)).await? {
        return Ok(Some(WalSource::Object));
    }
    let spool = repo.spool_wal();
    if !partial && spool.complete.contains(&seg) {
        return Ok(Some(WalSource::SpoolSegment));
    }
    if let Some((_, bytes)) = spool.tail.filter(|(s, _)| *s == seg) {
        return Ok(Some(WalSource::SpoolTail { bytes }));
    }
    if storage.exists(&partial_segment_key(&seg)).await? {
        return Ok(Some(WalSource::PartialObject));
    }
    // The streamer may have completed or published it between the looks above.
    if !partial && storage.exists(&wal_segment_key(&seg)).await? {
        return Ok(Some(WalSource::Object));
    }
    Ok(None)
}

/// The segment recovery asked for last, left in the prefetch directory by every fetch that
/// starts prefetching: a worker that was already running (so no new one started) goes on
/// from there once it is done ([`wanted`]). A hint, not a record: never fsync'd.
const WANTED_NAME: &str = ".wanted";

/// Notes that recovery asked for `seg` (best effort: a lost note costs prefetching, not
/// correctness). Called before looking for a running worker, which looks at the note after
/// dropping its lock, so a request is never missed by both.
pub fn note_wanted(dir: &Path, seg: SegmentName) {
    if create_dir_all_durable(dir).is_err() {
        return;
    }
    // Not `*.tmp`: a worker's cleanup removes those. Private, as everything archiver writes.
    let tmp = dir.join(".wanted.new");
    let written = create_private(&tmp).and_then(|mut f| f.write_all(seg.to_string().as_bytes()));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(WANTED_NAME));
    }
}

/// The segment last noted by [`note_wanted`], if any.
pub fn wanted(dir: &Path, seg_size: u64) -> Option<SegmentName> {
    let name = std::fs::read_to_string(dir.join(WANTED_NAME)).ok()?;
    SegmentName::parse(name.trim(), seg_size)
}

/// Takes the prefetch directory `dir` for this process (created if missing): `None` when
/// another worker holds it.
pub fn lock_prefetch_dir(dir: &Path) -> Result<Option<RepoLock>, FetchError> {
    create_dir_all_durable(dir).map_err(io(format!("creating {}", dir.display())))?;
    Ok(RepoLock::acquire(&dir.join(".lock")).ok())
}

/// The worker (holding [`lock_prefetch_dir`]): fetches the `n` segments after `walfile` into
/// `dir`, verified, a few at a time; stops at the archive's end.
pub async fn prefetch(repo: &Repo, walfile: &str, dir: &Path, n: u32) -> Result<(), FetchError> {
    let seg_size = repo.seg_size();
    let cur = SegmentName::parse(walfile, seg_size).ok_or_else(|| {
        FetchError::Unusable(format!("prefetch start: {walfile:?} is not a segment"))
    })?;
    // Consumed or skipped segments, and leftovers of an interrupted worker, go.
    for e in std::fs::read_dir(dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = match SegmentName::parse(&name, seg_size) {
            Some(s) => s.segno <= cur.segno,
            None => name.ends_with(".tmp"),
        };
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut next = cur;
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..n {
        next = next.next();
        let path = dir.join(next.to_string());
        if path.exists() {
            continue;
        }
        let key = wal_segment_key(&next);
        if !repo.storage().exists(&key).await.map_err(RepoError::from)? {
            break; // the end of the archive (for now)
        }
        while running.len() >= PREFETCH_PARALLEL {
            running.join_next().await;
        }
        let repo = repo.clone();
        running.spawn(async move {
            let tmp = path.with_extension("tmp");
            let f = create_private(&tmp)?;
            match repo.stream_verified(&key, f).await {
                Ok((info, f)) if info.raw_size == seg_size => {
                    f.sync_all()?;
                    std::fs::rename(&tmp, &path)?;
                }
                _ => {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Ok::<_, std::io::Error>(())
        });
    }
    while running.join_next().await.is_some() {}
    Ok(())
}
