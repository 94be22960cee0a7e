//! `archiver wal-fetch --repo R WALFILE DEST`: PostgreSQL's `restore_command`
//! (`archiver wal-fetch --repo R %f %p`): the arguments, the call into
//! [`crate::restore::wal_fetch`], the detached prefetch worker and the exit codes (0 served,
//! 1 not in the archive, 126 present but unusable).

use std::path::PathBuf;

use super::{report, RepoArg, EXIT_NOT_IN_ARCHIVE, EXIT_UNSERVABLE};
use crate::restore::wal_fetch::{self, Fetched};
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

pub async fn run(args: WalFetchArgs) -> u8 {
    if let Some(dir) = &args.prefetch_worker {
        if let Err(e) = prefetch_worker(&args, dir).await {
            tracing::warn!(error = %format!("{e:#}"), "prefetch stopped");
        }
        return 0;
    }
    if args.prefetch > 0 {
        if let Some(seg) = wal_fetch::take_prefetched(&args.walfile, &args.dest) {
            start_prefetch(&args, seg);
            return 0;
        }
    }
    let fetched = async {
        let repo = args.repo.open_for_reading(false).await?;
        anyhow::Ok(wal_fetch::fetch(&repo, &args.walfile, &args.dest).await?)
    };
    match fetched.await {
        Ok(Fetched::Served(seg)) => {
            if let Some(seg) = seg {
                start_prefetch(&args, seg);
            }
            0
        }
        Ok(Fetched::Missing(msg)) => {
            eprintln!("archiver: {msg}");
            EXIT_NOT_IN_ARCHIVE
        }
        Err(e) => report(&e, EXIT_UNSERVABLE),
    }
}

/// Starts a detached prefetch worker for the segments after `seg`, unless one is running.
fn start_prefetch(args: &WalFetchArgs, seg: SegmentName) {
    if args.prefetch == 0 {
        return;
    }
    let dir = wal_fetch::prefetch_dir(&args.dest);
    wal_fetch::note_wanted(&dir, seg);
    if wal_fetch::prefetch_running(&dir) {
        return; // it goes on from `seg` when done
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

/// The worker process: one per prefetch directory (under its lock). When done it looks at
/// the segment recovery asked for last ([`wal_fetch::wanted`]), after dropping its lock: if
/// recovery moved on meanwhile (the fetches found this worker running and started none), it
/// takes the lock again and goes on from there.
async fn prefetch_worker(args: &WalFetchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut repo = None;
    let mut from = args.walfile.clone();
    loop {
        let Some(lock) = wal_fetch::lock_prefetch_dir(dir)? else {
            return Ok(()); // another worker is at it
        };
        let repo = match &repo {
            Some(r) => r,
            None => repo.insert(args.repo.open_for_reading(false).await?),
        };
        wal_fetch::prefetch(repo, &from, dir, args.prefetch).await?;
        drop(lock);
        let seg_size = repo.seg_size();
        let done = SegmentName::parse(&from, seg_size);
        match wal_fetch::wanted(dir, seg_size) {
            Some(w) if done.is_some_and(|d| w.segno > d.segno) => from = w.to_string(),
            _ => return Ok(()),
        }
    }
}
