//! `archiver wal-fetch --repo R WALFILE DEST`: PostgreSQL's `restore_command`
//! (`archiver wal-fetch --repo R %f %p`). Verifies every byte, writes DEST atomically.
//!
//! Prefetch: after serving segment S, a detached worker (one at a time, under a flock) fetches
//! S+1…S+N, verified, into `.archiver-prefetch/` next to DEST (in `pg_wal/`, which base backups
//! leave out). When PostgreSQL then asks for S+1 it is renamed into place: replay does not wait
//! on the repository or on decompression. A file there is only ever a complete, verified segment
//! (written under a temporary name, then renamed); anything older than the segment just asked
//! for is removed.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{report, RepoArg, EXIT_NOT_IN_ARCHIVE, EXIT_UNSERVABLE};
use crate::repo::layout::{history_key, partial_segment_key, wal_segment_key};
use crate::repo::local_wal::WalSource;
use crate::repo::{object, Repo, RepoError};
use crate::storage::StorageError;
use crate::wal::segment::parse_history_file_name;
use crate::wal::SegmentName;

#[derive(clap::Args, Debug)]
pub struct WalFetchArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// File name PostgreSQL asks for (%f): a segment, `<segment>.partial` or `<tli>.history`.
    walfile: String,
    /// Where to write it (%p).
    dest: PathBuf,
    /// Segments to fetch ahead in the background (0: off).
    #[arg(long, default_value_t = 8)]
    prefetch: u32,
    /// Internal: run as the prefetch worker for the segments after WALFILE, into this directory.
    #[arg(long, hide = true)]
    prefetch_worker: Option<PathBuf>,
}

/// The prefetch directory for a destination.
fn prefetch_dir(dest: &Path) -> PathBuf {
    dest.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".archiver-prefetch")
}

/// How many segments the worker fetches at once.
const PREFETCH_PARALLEL: usize = 2;

enum Outcome {
    Missing(String),
}

pub async fn run(args: WalFetchArgs) -> u8 {
    if let Some(dir) = &args.prefetch_worker {
        if let Err(e) = prefetch_worker(&args, dir).await {
            tracing::warn!(error = %format!("{e:#}"), "prefetch stopped");
        }
        return 0;
    }
    if let Some(seg) = prefetched(&args) {
        start_prefetch(&args, seg);
        return 0;
    }
    match fetch(&args).await {
        Ok(None) => 0,
        Ok(Some(Outcome::Missing(msg))) => {
            eprintln!("archiver: {msg}");
            EXIT_NOT_IN_ARCHIVE
        }
        Err(e) => report(&e, EXIT_UNSERVABLE),
    }
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

/// Serves the segment from the prefetch directory if it is there (renamed into place).
fn prefetched(args: &WalFetchArgs) -> Option<SegmentName> {
    if args.prefetch == 0 {
        return None;
    }
    // Any segment size parses the name's fields; the worker wrote it for the right one.
    let seg = SegmentName::parse(&args.walfile, 16 << 20)?;
    let src = prefetch_dir(&args.dest).join(&args.walfile);
    std::fs::rename(&src, &args.dest).ok()?;
    let dir = args
        .dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::storage::fs::fsync_dir(dir).ok()?;
    tracing::debug!(walfile = %args.walfile, "served from the prefetch directory");
    Some(seg)
}

/// Starts a detached prefetch worker for the segments after `seg`, unless one is running.
fn start_prefetch(args: &WalFetchArgs, seg: SegmentName) {
    if args.prefetch == 0 {
        return;
    }
    let dir = prefetch_dir(&args.dest);
    if crate::repo::lock::RepoLock::is_held(&dir.join(".lock")) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let Ok(repo_args) = args.repo.for_restore_command() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("wal-fetch");
    for (flag, v) in repo_args {
        cmd.arg(flag).arg(v);
    }
    cmd.arg("--prefetch")
        .arg(args.prefetch.to_string())
        .arg("--prefetch-worker")
        .arg(&dir)
        .arg(seg.to_string())
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; the worker leaves PostgreSQL's process group so it
    // outlives this restore_command invocation and is not signalled with it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let _ = cmd.spawn();
}

/// The worker: fetches the segments after WALFILE into `dir`, verified, a few at a time; stops
/// at the archive's end.
async fn prefetch_worker(args: &WalFetchArgs, dir: &Path) -> anyhow::Result<()> {
    crate::storage::fs::create_dir_all_durable(dir)?;
    let _lock = match crate::repo::lock::RepoLock::acquire(&dir.join(".lock")) {
        Ok(l) => l,
        Err(_) => return Ok(()), // another worker is at it
    };
    let repo = args.repo.open_for_reading(false).await?;
    let seg_size = repo.seg_size();
    let cur = SegmentName::parse(&args.walfile, seg_size).context("prefetch start")?;
    // Consumed or skipped segments, and leftovers of an interrupted worker, go.
    for e in std::fs::read_dir(dir)?.flatten() {
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
    for _ in 0..args.prefetch {
        next = next.next();
        let path = dir.join(next.to_string());
        if path.exists() {
            continue;
        }
        let key = wal_segment_key(&next);
        if !repo.storage().exists(&key).await? {
            break; // the end of the archive (for now)
        }
        while running.len() >= PREFETCH_PARALLEL {
            running.join_next().await;
        }
        let repo = repo.clone();
        running.spawn(async move {
            let tmp = path.with_extension("tmp");
            let f = crate::storage::fs::create_private(&tmp)?;
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

async fn fetch(args: &WalFetchArgs) -> anyhow::Result<Option<Outcome>> {
    let repo = args.repo.open_for_reading(false).await?;
    let seg_size = repo.seg_size();
    let asked_partial = args.walfile.ends_with(".partial");
    let stem = args.walfile.trim_end_matches(".partial");
    if let Some(seg) = SegmentName::parse(stem, seg_size) {
        let Some(src) = source_for(&repo, seg, asked_partial).await? else {
            return Ok(Some(Outcome::Missing(format!(
                "{} is not in the archive",
                args.walfile
            ))));
        };
        if src != WalSource::Object {
            tracing::info!(walfile = %args.walfile, source = ?src, "serving a partial or not yet published segment");
        }
        let raw = repo.read_wal(seg, src).await.map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "archived {} is unusable; refusing to restore it",
                args.walfile
            ))
        })?;
        let dest = args.dest.clone();
        tokio::task::spawn_blocking(move || write_raw(&raw, &dest, seg_size))
            .await
            .expect("wal-fetch task panicked")?;
        if !asked_partial {
            start_prefetch(args, seg);
        }
        return Ok(None);
    }
    let Some(key) = key_for(&args.walfile, seg_size) else {
        return Ok(Some(Outcome::Missing(format!(
            "{} is not a WAL segment or history file name; nothing fetched",
            args.walfile
        ))));
    };
    let obj = match repo.storage().get(&key).await {
        Ok(o) => o,
        Err(StorageError::NotFound(_)) => {
            return Ok(Some(Outcome::Missing(format!(
                "{} is not in the archive",
                args.walfile
            ))))
        }
        Err(e) => {
            return Err(anyhow::Error::new(RepoError::from(e)).context(format!("reading {key}")))
        }
    };
    let dest = args.dest.clone();
    let walfile = args.walfile.clone();
    tokio::task::spawn_blocking(move || write_verified(&obj, &dest, &walfile, &key, seg_size))
        .await
        .expect("wal-fetch task panicked")?;
    Ok(None)
}

/// Where segment `seg` is served from: the complete object; else a complete segment in the
/// local spool not yet published; else its durable prefix, the segment being received (zero-
/// filled, as PostgreSQL's own `.partial` files are: recovery replays up to where the WAL ends
/// and no further); else a partial object. Asked for `<segment>.partial`: only the partial ones.
async fn source_for(
    repo: &Repo,
    seg: SegmentName,
    partial: bool,
) -> anyhow::Result<Option<WalSource>> {
    let storage = repo.storage();
    if !partial && storage.exists(&wal_segment_key(&seg)).await? {
        return Ok(Some(WalSource::Object));
    }
    let spool = repo.spool_wal();
    if !partial && spool.complete.contains(&seg) {
        return Ok(Some(WalSource::SpoolSegment));
    }
    if let Some((s, bytes)) = spool.tail.filter(|(s, _)| *s == seg) {
        debug_assert_eq!(s, seg);
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

/// Writes verified segment bytes to `dest` atomically, zero-filled to the segment size.
fn write_raw(raw: &[u8], dest: &Path, seg_size: u64) -> anyhow::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dir.join(format!(".{name}.archiver-tmp-{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = crate::storage::fs::create_private(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(raw)?;
        if (raw.len() as u64) < seg_size {
            f.set_len(seg_size)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
        crate::storage::fs::fsync_dir(dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Decodes into a temporary file next to `dest`, verifying all checksums, then renames it.
fn write_verified(
    obj: &[u8],
    dest: &Path,
    walfile: &str,
    key: &str,
    seg_size: u64,
) -> anyhow::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dir.join(format!(".{name}.archiver-tmp-{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = crate::storage::fs::create_private(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
        let info = object::decode(obj, &mut w).map_err(|e| {
            anyhow::anyhow!("archived {walfile} ({key}) is corrupt: {e}; refusing to restore it")
        })?;
        w.flush()?;
        drop(w);
        if info.kind == object::ObjectKind::WalSegment && info.raw_size != seg_size {
            anyhow::bail!(
                "archived {walfile} has {} bytes, expected {seg_size}; refusing to restore it",
                info.raw_size
            );
        }
        if info.kind == object::ObjectKind::PartialWalSegment {
            // A partial segment is served full-size, zero-filled after the received prefix, as
            // PostgreSQL writes its own `.partial` files.
            f.set_len(seg_size)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
        crate::storage::fs::fsync_dir(dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
