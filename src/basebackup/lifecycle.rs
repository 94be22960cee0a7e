//! A base backup's life in the repository: an id claimed and locked for this process, a
//! catalog record `running` while it runs, the backup taken and checked against the server's
//! manifest, the WAL from its start to its stop waited for (archived by `archiver stream`) or
//! fetched over the backup's own connection, then `complete` — or `failed` with the reason,
//! also when interrupted. Commands and the daemon call [`take_backup`] with plain options.
//!
//! Invariants: a record says `complete` only once every object is durable, every file matches
//! the manifest and the repository holds the backup's WAL; a record left `running` by a process
//! that died is marked `failed` by the next backup (its lock is gone).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::protocol::{BaseBackupOptions, Checkpoint};
use super::run::{base_backup, BackupError};
use super::store::StoreSink;
use super::wal::{create_temporary_slot, fetch_wal, WalFetch};
use crate::format::manifest::{Manifest, ManifestError};
use crate::pg::conninfo::ConnInfo;
use crate::pg::replication::ServerInfo;
use crate::pg::{Connection, PgError};
use crate::repo::catalog::{BackupRecord, BackupStatus, Tablespace};
use crate::repo::layout::wal_segment_key;
use crate::repo::lock::{LockError, RepoLock};
use crate::repo::{Repo, RepoError};
use crate::stream::StreamError;
use crate::time::Timestamp;
use crate::wal::{Lsn, SegmentName};

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// The server or the options cannot make this backup; nothing was written.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lock(LockError),
    #[error("BASE_BACKUP")]
    BaseBackup(#[source] BackupError),
    #[error("{context}")]
    Manifest {
        context: &'static str,
        #[source]
        cause: ManifestError,
    },
    #[error("fetching the backup's WAL")]
    Wal(#[source] StreamError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        cause: std::io::Error,
    },
    /// Timed out, WAL missing, interrupted.
    #[error("{0}")]
    Failed(String),
    /// The backup started (its record says `failed` now) and did not finish.
    #[error("backup {id} failed")]
    BackupFailed {
        id: String,
        #[source]
        cause: Box<TakeError>,
    },
}

/// How to take a backup.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Backup label [default: archiver backup <id>].
    pub label: Option<String>,
    pub checkpoint: Checkpoint,
    /// Limit the server's send rate, in kB/s.
    pub max_rate_kb: Option<u32>,
    /// zstd level for the stored archives.
    pub compress: i32,
    /// Have the server compress the archives (PostgreSQL 15+).
    pub server_compress: bool,
    /// With `server_compress`: the server's zstd worker threads (0: none).
    pub server_workers: u32,
    /// How long to wait for the repository to hold the backup's WAL.
    pub wal_timeout: Duration,
    /// An ordinary SQL connection to read what the cluster holds into the record
    /// ([`super::contents`]); `None`: not read.
    pub sql: Option<ConnInfo>,
    /// The operator's label for where this cluster runs, kept in the record.
    pub environment: Option<String>,
    /// Take an incremental backup (PostgreSQL 17+) on top of this one; `None`: a full backup.
    pub incremental: Option<Incremental>,
}

/// Which backup an incremental backup builds on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incremental {
    /// The newest complete backup of the server's cluster, major and timeline.
    Newest,
    /// This backup (`--from ID`).
    From(String),
}

/// Why a full backup is the way on, appended to every refusal of an incremental one.
const TAKE_FULL: &str = "take a full backup (archiver backup without --incremental)";

impl TakeError {
    /// An incremental backup that cannot be taken (server, settings, parent, WAL summaries),
    /// where a full backup can.
    pub fn wants_full_backup(&self) -> bool {
        matches!(self, TakeError::Refused(m) | TakeError::Failed(m) if m.contains(TAKE_FULL))
    }
}

/// The backup an incremental backup of `server` builds on, or why none can be. The parent
/// must be complete, of the same cluster, major and timeline, and its own chain whole.
pub fn choose_parent<'a>(
    backups: &'a [BackupRecord],
    server: &ServerInfo,
    want: &Incremental,
) -> Result<&'a BackupRecord, String> {
    let sysid = server.system.system_identifier.to_string();
    let tli = server.system.timeline;
    let usable = |b: &BackupRecord| -> Result<(), String> {
        if b.system_identifier != sysid {
            return Err(format!("backup {} is of another cluster", b.id));
        }
        if b.pg_version / 10000 != server.major() {
            return Err(format!(
                "backup {} is of PostgreSQL {}, the server is {}",
                b.id,
                b.pg_version / 10000,
                server.major()
            ));
        }
        if b.timeline != tli {
            return Err(format!(
                "backup {} is on timeline {}, the server on timeline {tli}",
                b.id, b.timeline
            ));
        }
        crate::repo::catalog::chain(backups, &b.id).map(|_| ())
    };
    match want {
        Incremental::From(id) => {
            let b = backups.iter().find(|b| &b.id == id).ok_or_else(|| {
                format!("no backup {id} to build on (archiver list shows them); {TAKE_FULL}")
            })?;
            usable(b).map_err(|e| format!("backup {id} cannot be built on: {e}; {TAKE_FULL}"))?;
            Ok(b)
        }
        Incremental::Newest => backups
            .iter()
            .filter(|b| b.status == BackupStatus::Complete && usable(b).is_ok())
            .max_by_key(|b| (b.start_time, b.start_lsn))
            .ok_or_else(|| {
                format!(
                    "no complete backup of this cluster on timeline {tli} to build on; {TAKE_FULL}"
                )
            }),
    }
}

/// Whether the server's WAL summaries (`pg_available_wal_summaries()`: timeline, start, end)
/// cover timeline `tli` without a hole from `from` (the parent's start) onwards — what
/// `BASE_BACKUP (INCREMENTAL)` needs. The summarizer trails the server: summaries that stop
/// at or before `from` are fine (the server waits for the rest); a hole is not.
pub fn summaries_cover(rows: &[(u32, Lsn, Lsn)], tli: u32, from: Lsn) -> Result<(), String> {
    let mut ranges: Vec<(Lsn, Lsn)> = rows
        .iter()
        .filter(|r| r.0 == tli)
        .map(|r| (r.1, r.2))
        .collect();
    if ranges.is_empty() {
        return Err(format!(
            "the server holds no WAL summary of timeline {tli} (removed after wal_summary_keep_time, or summarize_wal was off)"
        ));
    }
    ranges.sort();
    let mut pos: Option<Lsn> = None;
    for (start, end) in ranges.into_iter().filter(|r| r.1 >= from) {
        match pos {
            None if start > from => {
                return Err(format!(
                    "the server's WAL summaries of timeline {tli} begin at {start}, after the parent's start {from} (removed after wal_summary_keep_time, or summarize_wal was off then)"
                ))
            }
            None => pos = Some(end),
            Some(p) if start > p => {
                return Err(format!(
                    "the server's WAL summaries of timeline {tli} have a hole from {p} to {start}"
                ))
            }
            Some(p) => pos = Some(p.max(end)),
        }
    }
    Ok(())
}

/// Refuses a server this backup cannot be taken from (before anything is written).
pub fn check_server(server: &ServerInfo, o: &BackupOptions) -> Result<(), TakeError> {
    if server.major() < 13 {
        return Err(TakeError::Refused(format!(
            "PostgreSQL {} is not supported by `archiver backup` (needs 13 or newer: backup manifests)",
            server.major()
        )));
    }
    if o.server_compress && server.major() < 15 {
        return Err(TakeError::Refused(format!(
            "--server-compress needs PostgreSQL 15 or newer (the server is {})",
            server.major()
        )));
    }
    Ok(())
}

/// Refuses a backup the repository's file system has no room for: less free space than the
/// databases' size (read over an ordinary SQL connection; when that cannot be read, the check
/// is skipped with a warning). `dir`: the repository's local directory (`None`: S3).
pub async fn check_space(ci: &ConnInfo, dir: Option<&Path>) -> Result<(), TakeError> {
    let Some(dir) = dir else { return Ok(()) };
    let db = match crate::pg::database_bytes(ci).await {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot read the databases' size over SQL; the free-space check is skipped");
            return Ok(());
        }
    };
    match crate::storage::fs::free_bytes(dir) {
        Some(free) if free < db => Err(TakeError::Refused(format!(
            "{} has {:.1} GB free, less than the databases' {:.1} GB: free at least {:.1} GB (or expire old backups) before taking a backup",
            dir.display(),
            free as f64 / 1e9,
            db as f64 / 1e9,
            (db - free) as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

/// backup_label's `START TIME: 2026-11-22 22:40:00 UTC`, when it is UTC.
pub(crate) fn label_time(label: &str) -> Option<Timestamp> {
    let v = label.lines().find_map(|l| l.strip_prefix("START TIME: "))?;
    crate::time::parse_label_time(v)
}

/// Takes a backup over `conn` into `repo`, recorded in the catalog from start to end. `spool`
/// is the repository's local spool directory (the locks, the WAL the backup fetches itself).
/// When `interrupted` resolves (to the reason) first, the backup stops and is recorded failed.
pub async fn take_backup(
    repo: &Repo,
    conn: &mut Connection,
    server: &ServerInfo,
    spool: &Path,
    o: &BackupOptions,
    interrupted: impl Future<Output = String>,
) -> Result<BackupRecord, TakeError> {
    check_server(server, o)?;
    // An incremental backup's parent and its manifest, or the refusal (nothing written yet).
    let parent = match &o.incremental {
        Some(want) => Some(prepare_incremental(repo, conn, server, o, want).await?),
        None => None,
    };
    mark_interrupted(repo, spool).await;
    let (id, _claim) = claim_backup_id(repo, spool).await?;
    let mut rec = BackupRecord {
        id: id.clone(),
        label: o
            .label
            .clone()
            .unwrap_or_else(|| format!("archiver backup {id}")),
        status: BackupStatus::Running,
        start_lsn: Lsn::INVALID,
        stop_lsn: None,
        timeline: server.system.timeline,
        start_time: crate::time::now(),
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
        verified: None,
        contents: None,
        environment: o.environment.clone(),
        parent: parent.as_ref().map(|(id, _)| id.clone()),
    };
    repo.put_backup(&rec).await?;
    info!(id = %id, "backup started");
    let result = tokio::select! {
        r = take(o, spool, repo, conn, server, &mut rec, parent.as_ref().map(|(_, m)| m.as_slice())) => r,
        why = interrupted => Err(TakeError::Failed(why)),
    };
    let _ = std::fs::remove_dir_all(backup_spool(spool, &id));
    match result {
        Ok(()) => {
            rec.status = BackupStatus::Complete;
            rec.stop_time = Some(crate::time::now());
            repo.put_backup(&rec).await?;
            info!(id = %id, stop_lsn = %rec.stop_lsn.unwrap_or_default(), "backup complete");
            Ok(rec)
        }
        Err(e) => {
            rec.status = BackupStatus::Failed;
            rec.error = Some(crate::retry::error_chain(&e));
            rec.stop_time = Some(crate::time::now());
            if let Err(e2) = repo.put_backup(&rec).await {
                warn!(error = %e2, "could not record the failure");
            }
            Err(TakeError::BackupFailed {
                id,
                cause: Box::new(e),
            })
        }
    }
}

/// The private spool directory of a running backup; it holds the `lock` that says the backup's
/// process is alive, and the WAL the backup fetches itself.
pub(crate) fn backup_spool(spool: &Path, id: &str) -> PathBuf {
    spool.join(format!("backup-{id}"))
}

/// Picks an unused id and locks it for this process (two backups starting in the same second
/// never share one).
async fn claim_backup_id(repo: &Repo, spool: &Path) -> Result<(String, RepoLock), TakeError> {
    loop {
        let id = repo
            .new_backup_id(crate::time::now(), |id| {
                RepoLock::is_held(&backup_spool(spool, id).join("lock"))
            })
            .await?;
        let dir = backup_spool(spool, &id);
        crate::storage::fs::create_dir_all_durable(&dir).map_err(|cause| TakeError::Io {
            context: format!("cannot create {}", dir.display()),
            cause,
        })?;
        match RepoLock::acquire(&dir.join("lock")) {
            Ok(lock) => return Ok((id, lock)),
            Err(LockError::Busy { .. }) => continue,
            Err(e) => return Err(TakeError::Lock(e)),
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

/// Checks that an incremental backup can be taken from `server` on top of `want`: PostgreSQL
/// 17+, `summarize_wal = on`, a usable parent, and (over SQL, when there is a connection) WAL
/// summaries from the parent's start on. Returns the parent's id and its manifest, read back
/// and verified, for `UPLOAD_MANIFEST`.
async fn prepare_incremental(
    repo: &Repo,
    conn: &mut Connection,
    server: &ServerInfo,
    o: &BackupOptions,
    want: &Incremental,
) -> Result<(String, Vec<u8>), TakeError> {
    if server.major() < 17 {
        return Err(TakeError::Refused(format!(
            "incremental backups need PostgreSQL 17 or newer (the server is {}); {TAKE_FULL}",
            server.major()
        )));
    }
    let summarize = crate::pg::replication::show(conn, "summarize_wal").await?;
    if summarize != "on" {
        return Err(TakeError::Refused(format!(
            "the server has summarize_wal = {summarize}: incremental backups need WAL summaries (ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf(); then a full backup to build on); {TAKE_FULL}"
        )));
    }
    let backups = repo.list_backups().await?;
    let parent = choose_parent(&backups, server, want).map_err(TakeError::Refused)?;
    if let Some(ci) = &o.sql {
        match crate::pg::wal_summaries(ci).await {
            Ok(rows) => summaries_cover(&rows, parent.timeline, parent.start_lsn).map_err(|e| {
                TakeError::Refused(format!(
                    "backup {} cannot be built on: {e}; {TAKE_FULL}",
                    parent.id
                ))
            })?,
            Err(e) => {
                warn!(error = %e, "cannot read the server's WAL summaries over SQL; the server checks them when the backup starts")
            }
        }
    }
    let (manifest, _) = repo
        .get_verified(&crate::repo::layout::backup_object_key(
            &parent.id,
            "backup_manifest",
        ))
        .await?;
    info!(parent = %parent.id, kind = parent.kind(), "incremental backup on top of");
    Ok((parent.id.clone(), manifest))
}

async fn take(
    args: &BackupOptions,
    spool: &Path,
    repo: &Repo,
    conn: &mut crate::pg::Connection,
    server: &ServerInfo,
    rec: &mut BackupRecord,
    parent_manifest: Option<&[u8]>,
) -> Result<(), TakeError> {
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
        checkpoint: args.checkpoint,
        max_rate_kb: args.max_rate_kb,
        server_zstd_level: args.server_compress.then_some(args.compress),
        server_zstd_workers: args.server_workers,
        manifest_checksums: crate::basebackup::store::MANIFEST_CHECKSUMS,
        legacy: server.major() < 15,
        incremental: parent_manifest.is_some(),
    };
    if let Some(m) = parent_manifest {
        conn.copy_in("UPLOAD_MANIFEST", m).await?;
    }
    let mut sink = StoreSink::new(repo.clone(), &rec.id, args.compress, args.server_compress);
    let r = base_backup(conn, &opts, &mut sink).await.map_err(|e| {
        let chain = crate::retry::error_chain(&e);
        if opts.incremental && chain.contains("WAL summar") {
            TakeError::Failed(format!("{chain}; {TAKE_FULL}"))
        } else {
            TakeError::BaseBackup(e)
        }
    })?;
    sink.close().await.map_err(TakeError::BaseBackup)?;
    sink.stages.log();
    if let Some(ci) = &args.sql {
        crate::repo::relmap::snapshot(repo, ci, "archiver backup").await;
        match super::contents::read_contents(ci).await {
            Ok(c) => rec.contents = Some(c),
            Err(e) => {
                warn!(error = %e, "cannot read the cluster's databases over SQL; the record will not list them")
            }
        }
    }
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

    let manifest = Manifest::parse(&sink.manifest).map_err(|cause| TakeError::Manifest {
        context: "the server's backup manifest",
        cause,
    })?;
    let n = manifest
        .verify(&sink.digests)
        .map_err(|cause| TakeError::Manifest {
            context: "verifying the archives against the backup manifest",
            cause,
        })?;
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
    wait_for_wal(args, spool, repo, conn, &fetch, &rec.id).await
}

/// How long a running streamer gets to archive the backup's WAL before the backup fetches it.
const STREAMER_GRACE: Duration = Duration::from_secs(30);

/// How soon the backup looks again for WAL the streamer has yet to archive. The streamer
/// usually publishes the stop segment (which the server's switch at the backup's end completes)
/// tens of milliseconds after the backup ends, so the first looks come quickly; the interval
/// then grows by half each time up to [`WAL_POLL_MAX`], which bounds the requests a slow streamer
/// costs (an `exists` is a HEAD request on S3).
const WAL_POLL_FIRST: Duration = Duration::from_millis(10);
const WAL_POLL_MAX: Duration = Duration::from_millis(200);

/// The wait after `poll`: half again, at most [`WAL_POLL_MAX`].
fn next_poll(poll: Duration) -> Duration {
    (poll * 3 / 2).min(WAL_POLL_MAX)
}

/// The backup is usable only with the WAL from its start to its stop. If `archiver stream` runs
/// into the repository, wait for it to archive that WAL (for [`STREAMER_GRACE`]); otherwise, or
/// then, fetch it over `conn`.
async fn wait_for_wal(
    args: &BackupOptions,
    spool: &Path,
    repo: &Repo,
    conn: &mut crate::pg::Connection,
    f: &WalFetch<'_>,
    id: &str,
) -> Result<(), TakeError> {
    let seg = repo.seg_size();
    let first = SegmentName::containing(f.tli, f.start, seg);
    let last = SegmentName::containing(f.tli, Lsn(f.stop.0.saturating_sub(1)), seg);
    let deadline = Instant::now() + args.wal_timeout;
    let lock_path = spool.join("stream.lock");
    let mut next = first;
    let mut fetched_once = false;
    let waiting_since = Instant::now();
    let mut poll = WAL_POLL_FIRST;
    loop {
        while next.segno <= last.segno
            && repo
                .storage()
                .exists(&wal_segment_key(&next))
                .await
                .map_err(RepoError::from)?
        {
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
                fetch_wal(conn, repo, &backup_spool(spool, id), f),
            )
            .await
            .map_err(|_| {
                TakeError::Failed(format!(
                    "timed out after {:?} fetching the backup's WAL (up to {})",
                    args.wal_timeout, f.stop
                ))
            })?
            .map_err(TakeError::Wal)?;
            if fetched.partial == Some(last) {
                info!(from = %first, to = %last, "the repository holds the backup's WAL (the last segment partial)");
                return Ok(());
            }
            continue;
        }
        if !streaming {
            return Err(TakeError::Failed(format!(
                "WAL segment {next} is still missing after fetching the backup's WAL"
            )));
        }
        if Instant::now() > deadline {
            return Err(TakeError::Failed(format!(
                "timed out after {:?} waiting for WAL segment {next} to be archived",
                args.wal_timeout
            )));
        }
        tokio::time::sleep(poll).await;
        poll = next_poll(poll);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn wal_polls_start_fast_and_settle_at_the_bound() {
        let mut p = super::WAL_POLL_FIRST;
        let mut waited = Duration::ZERO;
        let mut polls = Vec::new();
        for _ in 0..12 {
            waited += p;
            polls.push(waited);
            p = super::next_poll(p);
        }
        // The stop segment, published some 30 ms after the backup ended, is seen by 50 ms.
        assert!(
            polls
                .iter()
                .any(|w| *w >= Duration::from_millis(30) && *w <= Duration::from_millis(50)),
            "{polls:?}"
        );
        // Never more than the bound between two looks, and the bound is reached.
        assert_eq!(p, super::WAL_POLL_MAX);
        assert!(polls.windows(2).all(|w| w[1] - w[0] <= super::WAL_POLL_MAX));
    }
    #[test]
    fn label_times() {
        let l = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIME: 2026-11-22 22:40:00 UTC\nLABEL: x\n";
        assert_eq!(
            super::label_time(l).map(|t| t.to_string()).as_deref(),
            Some("2026-11-22T22:40:00Z")
        );
        assert_eq!(
            super::label_time("START TIME: 2026-11-22 22:40:00 CET\n"),
            None
        );
    }
}

#[cfg(test)]
mod incremental_tests {
    use super::*;
    use crate::pg::replication::SystemInfo;

    fn l(x: u64) -> Lsn {
        Lsn(x)
    }

    #[test]
    fn which_failures_call_for_a_full_backup_instead() {
        let refused = |m: &str| TakeError::Refused(m.to_string());
        let cases = [
            (refused(&format!("summarize_wal = off; {TAKE_FULL}")), true),
            (
                TakeError::Failed(format!("WAL summaries gone; {TAKE_FULL}")),
                true,
            ),
            // Refusals a full backup would meet just the same.
            (refused("not enough free space for the backup"), false),
            (
                TakeError::Failed("timed out waiting for the WAL".into()),
                false,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.wants_full_backup(), want, "{e}");
        }
    }

    #[test]
    fn summaries() {
        let rows = [(1, l(10), l(20)), (1, l(20), l(30)), (2, l(30), l(40))];
        assert_eq!(summaries_cover(&rows, 1, l(15)), Ok(()));
        assert_eq!(
            summaries_cover(&rows, 1, l(30)),
            Ok(()),
            "ends at the start: trailing"
        );
        assert_eq!(
            summaries_cover(&rows, 1, l(50)),
            Ok(()),
            "summarizer behind"
        );
        assert!(summaries_cover(&rows, 1, l(5))
            .unwrap_err()
            .contains("begin at 0/A"));
        assert!(summaries_cover(&rows, 3, l(5))
            .unwrap_err()
            .contains("no WAL summary"));
        let holed = [(1, l(10), l(20)), (1, l(25), l(30))];
        assert!(summaries_cover(&holed, 1, l(12))
            .unwrap_err()
            .contains("hole from 0/14 to 0/19"));
        assert_eq!(summaries_cover(&holed, 1, l(26)), Ok(()));
    }

    fn server(tli: u32) -> ServerInfo {
        ServerInfo {
            system: SystemInfo {
                system_identifier: 7,
                timeline: tli,
                xlogpos: l(0),
            },
            version_num: 170_002,
            wal_segment_size: 16 << 20,
        }
    }

    fn rec(
        id: &str,
        status: BackupStatus,
        tli: u32,
        parent: Option<&str>,
        secs: i64,
    ) -> BackupRecord {
        let mut r = BackupRecord::for_test(
            id,
            status,
            l(secs as u64),
            Timestamp::from_second(secs).unwrap(),
        );
        r.system_identifier = "7".into();
        r.pg_version = 170_002;
        r.timeline = tli;
        r.parent = parent.map(String::from);
        r
    }

    #[test]
    fn parents() {
        use BackupStatus::*;
        let all = vec![
            rec("full", Complete, 1, None, 10),
            rec("inc", Complete, 1, Some("full"), 20),
            rec("failed", Failed, 1, None, 30),
            rec("tli2", Complete, 2, None, 5),
        ];
        let s1 = server(1);
        assert_eq!(
            choose_parent(&all, &s1, &Incremental::Newest).unwrap().id,
            "inc"
        );
        assert_eq!(
            choose_parent(&all, &s1, &Incremental::From("full".into()))
                .unwrap()
                .id,
            "full"
        );
        let e = choose_parent(&all, &s1, &Incremental::From("failed".into())).unwrap_err();
        assert!(
            e.contains("failed, not complete") && e.contains(TAKE_FULL),
            "{e}"
        );
        let e = choose_parent(&all, &s1, &Incremental::From("tli2".into())).unwrap_err();
        assert!(e.contains("on timeline 2, the server on timeline 1"), "{e}");
        assert!(choose_parent(&all, &s1, &Incremental::From("nope".into()))
            .unwrap_err()
            .contains("no backup nope"));
        assert_eq!(
            choose_parent(&all, &server(2), &Incremental::Newest)
                .unwrap()
                .id,
            "tli2"
        );
        assert!(choose_parent(&all, &server(3), &Incremental::Newest)
            .unwrap_err()
            .contains("timeline 3"));
        // Another cluster's or major's backups are never parents.
        let mut other = all.clone();
        other[1].system_identifier = "8".into();
        assert_eq!(
            choose_parent(&other, &s1, &Incremental::Newest).unwrap().id,
            "full"
        );
        other[0].pg_version = 160_000;
        let e = choose_parent(&other, &s1, &Incremental::From("full".into())).unwrap_err();
        assert!(e.contains("PostgreSQL 16, the server is 17"), "{e}");
    }
}
