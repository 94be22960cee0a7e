//! `archiver backup`: a full base backup over the replication protocol into the repository,
//! recorded in the catalog. The record says `running` while it runs, `failed` (with the reason)
//! if anything goes wrong, and `complete` only once every object is durable, the manifest's
//! per-file checksums match the bytes received, and the repository holds the WAL from the
//! backup's start to its stop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use super::{connect_replication, report, RepoArg, EXIT_ERROR};
use crate::basebackup::manifest::Manifest;
use crate::basebackup::protocol::{BaseBackupOptions, Checkpoint};
use crate::basebackup::run::base_backup;
use crate::basebackup::store::StoreSink;
use crate::basebackup::wal::{create_temporary_slot, fetch_wal, WalFetch};
use crate::pg::conninfo::{ConnInfo, ProcessEnv};
use crate::pg::replication::ServerInfo;
use crate::pg::PgError;
use crate::repo::catalog::{BackupRecord, BackupStatus, Tablespace};
use crate::repo::layout::wal_segment_key;
use crate::repo::lock::{LockError, RepoLock};
use crate::repo::{now_rfc3339, Repo, SPOOL_DIR};
use crate::upload::{UploadSettings, Uploader};
use crate::wal::{Lsn, SegmentName};

#[derive(Copy, Clone, Debug, ValueEnum)]
enum CheckpointArg {
    Fast,
    Spread,
}

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Connection string (as for `stream`).
    #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
    dbname: Option<String>,
    /// Backup label [default: archiver backup <id>].
    #[arg(long)]
    label: Option<String>,
    /// Checkpoint the server starts the backup with.
    #[arg(long, value_enum, default_value_t = CheckpointArg::Spread)]
    checkpoint: CheckpointArg,
    /// Limit the server's send rate, in kB/s (32 to 1048576).
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=1_048_576))]
    max_rate: Option<u32>,
    /// zstd level for the stored archives.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    compress: i32,
    /// Have the server compress the archives with zstd (at `--compress`'s level) and store its
    /// output as it comes: less network traffic, the compression on the server's CPUs. archiver
    /// still decompresses on the side to check every file against the manifest.
    #[arg(long)]
    server_compress: bool,
    /// How long to wait for the repository to hold the backup's WAL.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    wal_timeout: Duration,
    /// With a tiered repository: how long to wait, once the backup is complete, for every
    /// remote tier to hold it.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    upload_timeout: Duration,
    /// Print the backup's record as JSON instead of its id.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BackupArgs) -> u8 {
    match backup(args).await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

/// Converts backup_label's `START TIME: 2026-11-22 22:40:00 UTC` to RFC 3339 when it is UTC.
fn label_time(label: &str) -> Option<String> {
    let v = label.lines().find_map(|l| l.strip_prefix("START TIME: "))?;
    let (dt, zone) = v.rsplit_once(' ')?;
    (zone == "UTC" || zone == "GMT").then(|| format!("{}Z", dt.replace(' ', "T")))
}

async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let local = args.repo.local_dir("backup")?;
    let conninfo = ConnInfo::parse(args.dbname.as_deref(), &ProcessEnv)?;
    let (storage, tiers) = args.repo.storage_for_writing().await?;
    let app = conninfo
        .application_name
        .clone()
        .unwrap_or_else(|| "archiver backup".into());
    let (mut conn, server) = connect_replication(&conninfo, &app).await?;
    if server.major() < 13 {
        anyhow::bail!(
            "PostgreSQL {} is not supported by `archiver backup` (needs 13 or newer: backup manifests)",
            server.major()
        );
    }
    if args.server_compress && server.major() < 15 {
        anyhow::bail!(
            "--server-compress needs PostgreSQL 15 or newer (the server is {})",
            server.major()
        );
    }
    let repo = Repo::open_or_init(storage, &args.repo.name(), &server)
        .await
        .with_context(|| format!("cannot use repository {}", args.repo.name()))?;

    // A tiered repository: this backup's objects are shipped to the remote tiers as they are
    // written, and the backup returns once every tier holds them.
    let uploader = tiers.map(|t| {
        t.queue.set_seg_size(repo.seg_size());
        Uploader::start(
            t.queue,
            t.hot,
            t.remotes,
            UploadSettings {
                concurrency: t.config.upload.concurrency,
                max_rate: t.config.upload.max_rate,
                reconcile: false,
            },
        )
    });
    let spool = local.join(SPOOL_DIR);
    mark_interrupted(&repo, &spool).await;
    let (id, _claim) = claim_backup_id(&repo, &spool).await?;
    let mut rec = BackupRecord {
        id: id.clone(),
        label: args
            .label
            .clone()
            .unwrap_or_else(|| format!("archiver backup {id}")),
        status: BackupStatus::Running,
        start_lsn: Lsn::INVALID,
        stop_lsn: None,
        timeline: server.system.timeline,
        start_time: now_rfc3339(),
        stop_time: None,
        pg_version: server.version_num,
        system_identifier: server.system.system_identifier.to_string(),
        size_bytes: 0,
        stored_bytes: 0,
        objects: vec![],
        tablespaces: vec![],
        backup_label: None,
        archiver_version: env!("CARGO_PKG_VERSION").to_string(),
        error: None,
        drills: vec![],
    };
    repo.put_backup(&rec).await?;
    info!(id = %id, "backup started");
    // SIGINT/SIGTERM: the backup stops and is recorded failed ("interrupted") before the
    // process exits, not left `running` until the next backup notices.
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let result = tokio::select! {
        r = take(&args, &repo, &mut conn, &server, &mut rec) => r,
        _ = int.recv() => Err(anyhow::anyhow!("interrupted by SIGINT")),
        _ = term.recv() => Err(anyhow::anyhow!("interrupted by SIGTERM")),
    };
    conn.close().await;
    let _ = std::fs::remove_dir_all(backup_spool(&spool, &id));
    match result {
        Ok(()) => {
            rec.status = BackupStatus::Complete;
            // Microseconds: restore compares target times with it, and a truncated time could
            // make a backup look finished before a target it cannot reach.
            rec.stop_time =
                Some(humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string());
            repo.put_backup(&rec).await?;
            info!(id = %id, stop_lsn = %rec.stop_lsn.unwrap_or_default(), "backup complete");
            if let Some(u) = uploader {
                let drained = u.drain(args.upload_timeout).await;
                let states = u.queue().states();
                u.stop().await;
                if let Err(behind) = drained {
                    anyhow::bail!(
                        "backup {id} is complete in the hot tier but not yet in every remote tier ({behind}); `archiver stream` ships it when it next compares the tiers"
                    );
                }
                for t in states {
                    info!(tier = %t.name, objects = t.uploaded_objects, bytes = t.uploaded_bytes, "backup uploaded to the remote tier");
                }
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                println!("{id}");
            }
            Ok(())
        }
        Err(e) => {
            rec.status = BackupStatus::Failed;
            rec.error = Some(format!("{e:#}"));
            rec.stop_time = Some(now_rfc3339());
            if let Err(e2) = repo.put_backup(&rec).await {
                tracing::warn!(error = %e2, "could not record the failure");
            }
            Err(e.context(format!("backup {id} failed")))
        }
    }
}

/// The private spool directory of a running backup; it holds the `lock` that says the backup's
/// process is alive, and the WAL the backup fetches itself.
fn backup_spool(spool: &Path, id: &str) -> PathBuf {
    spool.join(format!("backup-{id}"))
}

/// Picks an unused id and locks it for this process (two backups starting in the same second
/// never share one).
async fn claim_backup_id(repo: &Repo, spool: &Path) -> anyhow::Result<(String, RepoLock)> {
    loop {
        let id = repo
            .new_backup_id(std::time::SystemTime::now(), |id| {
                RepoLock::is_held(&backup_spool(spool, id).join("lock"))
            })
            .await?;
        let dir = backup_spool(spool, &id);
        crate::storage::fs::create_dir_all_durable(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        match RepoLock::acquire(&dir.join("lock")) {
            Ok(lock) => return Ok((id, lock)),
            Err(LockError::Busy { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Records marked `running` whose process is gone (killed, host crash) become `failed`; their
/// spool directories are removed.
async fn mark_interrupted(repo: &Repo, spool: &Path) {
    let Ok(backups) = repo.list_backups().await else {
        return;
    };
    for mut rec in backups {
        let dir = backup_spool(spool, &rec.id);
        if rec.status != BackupStatus::Running || RepoLock::is_held(&dir.join("lock")) {
            continue;
        }
        rec.status = BackupStatus::Failed;
        rec.error = Some("interrupted: the backup's process ended before it finished".into());
        match repo.put_backup(&rec).await {
            Ok(()) => {
                tracing::warn!(id = %rec.id, "an earlier backup was interrupted; recorded as failed")
            }
            Err(e) => {
                tracing::warn!(id = %rec.id, error = %e, "could not record an interrupted backup")
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

async fn take(
    args: &BackupArgs,
    repo: &Repo,
    conn: &mut crate::pg::Connection,
    server: &ServerInfo,
    rec: &mut BackupRecord,
) -> anyhow::Result<()> {
    // Keeps the server's WAL from before the backup's checkpoint until we hold it, in case no
    // streamer archives it.
    let slot = format!("archiver_backup_{}", std::process::id());
    let slot = match create_temporary_slot(conn, &slot, server.major()).await {
        Ok(()) => Some(slot),
        Err(e @ PgError::Server(_)) => {
            warn!(error = %e, "could not create a temporary replication slot; the backup's WAL is not reserved on the server");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let opts = BaseBackupOptions {
        label: rec.label.clone(),
        checkpoint: match args.checkpoint {
            CheckpointArg::Fast => Checkpoint::Fast,
            CheckpointArg::Spread => Checkpoint::Spread,
        },
        max_rate_kb: args.max_rate,
        server_zstd_level: args.server_compress.then_some(args.compress),
        manifest_checksums: crate::basebackup::store::MANIFEST_CHECKSUMS,
        legacy: server.major() < 15,
    };
    let mut sink = StoreSink::new(repo.clone(), &rec.id, args.compress, args.server_compress);
    let r = base_backup(conn, &opts, &mut sink)
        .await
        .context("BASE_BACKUP")?;
    sink.close().await?;
    rec.start_lsn = r.start_lsn;
    rec.stop_lsn = Some(r.stop_lsn);
    rec.timeline = r.start_tli;
    rec.tablespaces = r
        .tablespaces
        .iter()
        .filter_map(|t| {
            Some(Tablespace {
                oid: t.oid?,
                location: t.location.clone()?,
            })
        })
        .collect();
    let label = String::from_utf8_lossy(&sink.backup_label).into_owned();
    if let Some(t) = label_time(&label) {
        rec.start_time = t;
    }
    rec.backup_label = Some(label);
    rec.objects = std::mem::take(&mut sink.objects);
    rec.size_bytes = rec.objects.iter().map(|o| o.size_bytes).sum();
    rec.stored_bytes = rec.objects.iter().map(|o| o.stored_bytes).sum();
    repo.put_backup(rec).await?;

    let manifest = Manifest::parse(&sink.manifest).context("the server's backup manifest")?;
    let n = manifest
        .verify(&sink.digests)
        .context("verifying the archives against the backup manifest")?;
    info!(files = n, "all files match the backup manifest");

    let fetch = WalFetch {
        tli: r.start_tli,
        start: r.start_lsn,
        stop: r.stop_lsn,
        slot: slot.as_deref(),
        sysid: server.system.system_identifier,
        major: server.major(),
        compress_level: args.compress,
        partial_grace: Duration::from_secs(10).min(args.wal_timeout / 3),
    };
    wait_for_wal(args, repo, conn, &fetch, &rec.id).await
}

/// How long a running streamer gets to archive the backup's WAL before the backup fetches it.
const STREAMER_GRACE: Duration = Duration::from_secs(30);

/// The backup is usable only with the WAL from its start to its stop. If `archiver stream` runs
/// into the repository, wait for it to archive that WAL (for [`STREAMER_GRACE`]); otherwise, or
/// then, fetch it over `conn`.
async fn wait_for_wal(
    args: &BackupArgs,
    repo: &Repo,
    conn: &mut crate::pg::Connection,
    f: &WalFetch<'_>,
    id: &str,
) -> anyhow::Result<()> {
    let seg = repo.seg_size();
    let first = SegmentName::containing(f.tli, f.start, seg);
    let last = SegmentName::containing(f.tli, Lsn(f.stop.0.saturating_sub(1)), seg);
    let deadline = Instant::now() + args.wal_timeout;
    let spool = args.repo.local_dir("backup")?.join(SPOOL_DIR);
    let lock_path = spool.join("stream.lock");
    let mut next = first;
    let mut fetched_once = false;
    let waiting_since = Instant::now();
    loop {
        while next.segno <= last.segno && repo.storage().exists(&wal_segment_key(&next)).await? {
            next = next.next();
        }
        if next.segno > last.segno {
            info!(from = %first, to = %last, "the repository holds the backup's WAL");
            return Ok(());
        }
        let streaming = RepoLock::is_held(&lock_path);
        // A streamer that has not delivered within the grace period (lagging, reconnecting, or
        // on a standby whose primary has not finished the stop segment) gets help: the fetch
        // publishes the same objects, and the temporary slot still holds the WAL.
        let grace = STREAMER_GRACE.min(args.wal_timeout / 2);
        let streamer_slow = streaming && waiting_since.elapsed() > grace;
        if !fetched_once && (!streaming || streamer_slow) {
            fetched_once = true;
            if streaming {
                info!(missing = %next, waited = ?grace, "`archiver stream` has not archived the backup's WAL yet; fetching it");
            } else {
                info!(missing = %next, "no `archiver stream` runs into this repository; fetching the backup's WAL");
            }
            let fetched = tokio::time::timeout(
                args.wal_timeout,
                fetch_wal(conn, repo, &backup_spool(&spool, id), f),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "timed out after {:?} fetching the backup's WAL (up to {})",
                    args.wal_timeout,
                    f.stop
                )
            })?
            .context("fetching the backup's WAL")?;
            if fetched.partial == Some(last) {
                info!(from = %first, to = %last, "the repository holds the backup's WAL (the last segment partial)");
                return Ok(());
            }
            continue;
        }
        if !streaming {
            anyhow::bail!("WAL segment {next} is still missing after fetching the backup's WAL");
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "timed out after {:?} waiting for WAL segment {next} to be archived",
                args.wal_timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_times() {
        let l = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIME: 2026-11-22 22:40:00 UTC\nLABEL: x\n";
        assert_eq!(
            super::label_time(l).as_deref(),
            Some("2026-11-22T22:40:00Z")
        );
        assert_eq!(
            super::label_time("START TIME: 2026-11-22 22:40:00 CET\n"),
            None
        );
    }
}
