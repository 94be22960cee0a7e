//! `archiver wal-fetch --repo R WALFILE DEST`: PostgreSQL's `restore_command`
//! (`archiver wal-fetch --repo R %f %p`). Verifies every byte, writes DEST atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{report, RepoArg, EXIT_NOT_IN_ARCHIVE, EXIT_UNSERVABLE};
use crate::repo::layout::{history_key, partial_segment_key, wal_segment_key};
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
}

enum Outcome {
    Missing(String),
}

pub async fn run(args: WalFetchArgs) -> u8 {
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

async fn fetch(args: &WalFetchArgs) -> anyhow::Result<Option<Outcome>> {
    let storage = args.repo.storage()?;
    let repo = Repo::open(storage, &args.repo.name()).await?;
    let Some(mut key) = key_for(&args.walfile, repo.seg_size()) else {
        return Ok(Some(Outcome::Missing(format!(
            "{} is not a WAL segment or history file name; nothing fetched",
            args.walfile
        ))));
    };
    let mut obj = repo.storage().get(&key).await;
    if matches!(obj, Err(StorageError::NotFound(_))) {
        // Only the first part of the segment is archived (a timeline's or a standby backup's
        // last segment): serve it zero-filled, as PostgreSQL's own `.partial` files are. Recovery
        // replays up to where the WAL ends and no further.
        if let Some(seg) = SegmentName::parse(&args.walfile, repo.seg_size()) {
            let pkey = partial_segment_key(&seg);
            if let Ok(o) = repo.storage().get(&pkey).await {
                tracing::info!(walfile = %args.walfile, "serving the archived partial segment");
                obj = Ok(o);
                key = pkey;
            }
        }
    }
    let obj = match obj {
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
    let seg_size = repo.seg_size();
    tokio::task::spawn_blocking(move || write_verified(&obj, &dest, &walfile, &key, seg_size))
        .await
        .expect("wal-fetch task panicked")?;
    Ok(None)
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
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
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
