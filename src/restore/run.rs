//! The restore as library calls: plan against the repository (with its I/O: history files,
//! transaction and restore-point lookup in the archived WAL, the last transaction of a time
//! target), check the destination, write the data directory with its recovery settings, or
//! verify everything a restore would read (the dry run). Commands and the daemon call these
//! with plain option structs.
//!
//! Invariants: nothing is written before the plan holds and every destination is checked
//! (absent or empty); a failed write removes what it wrote; every object read is verified.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tracing::info;

use super::extract::{extract_all, Archive, ExtractError, Layer, Owner};
use super::locate::{ChainIndex, Located};
use super::plan::{describe_windows, gap_after, plan, Plan, PlanError, Request, WalInventory};
use super::recovery::{self, TargetAction};
use super::target::{Target, TimelineChoice};
use crate::format::manifest::{ChecksumAlgorithm, FileDigests, Manifest, ManifestError};
use crate::format::tar::TarReader;
use crate::repo::catalog::{BackupRecord, BackupStatus};
use crate::repo::layout::{backup_object_key, history_key, WalObject};
use crate::repo::local_wal::WalSource;
use crate::repo::{Repo, RepoError};
use crate::wal::timeline::parse_history;
use crate::wal::Lsn;

/// Rough rates for the time estimate of a plan (this machine class: docs/benchmarks.md).
const EST_EXTRACT_BYTES_PER_S: f64 = 400e6;
const EST_REPLAY_BYTES_PER_S: f64 = 150e6;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no restore can reach the target")]
    Plan(#[from] PlanError),
    /// The target lies outside what the archive holds (found by reading it).
    #[error("no restore can reach the target: {0}")]
    Unreachable(String),
    /// Bad input: a destination that is not empty, a mapping that names nothing.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error("{context}")]
    Manifest {
        context: &'static str,
        #[source]
        cause: ManifestError,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        cause: std::io::Error,
    },
    /// A repository object read for the plan is damaged.
    #[error("{what}")]
    Damaged {
        what: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The write failed; what it had written is removed.
    #[error("restore failed; what it had written is removed")]
    Failed(#[source] Box<RestoreError>),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RestoreError {
    let context = context.into();
    move |cause| RestoreError::Io { context, cause }
}

/// What the operator asks a restore to reach, and how the server behaves there.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    pub target: Target,
    pub timeline: TimelineChoice,
    pub action: TargetAction,
    /// Stop just before the target instead of just after it.
    pub exclusive: bool,
    /// Restore this backup instead of the newest one that can reach the target.
    pub backup: Option<String>,
}

/// The repository's WAL as the planner sees it (history files read and verified).
pub async fn inventory(repo: &Repo) -> Result<WalInventory, RestoreError> {
    let objects = repo.wal_objects().await?;
    let mut histories = BTreeMap::new();
    for o in &objects {
        if let WalObject::History(tli) = o {
            let (raw, _) = repo.get_verified(&history_key(*tli)).await?;
            let text = String::from_utf8_lossy(&raw);
            let entries = parse_history(&text).map_err(|e| RestoreError::Damaged {
                what: format!("history file of timeline {tli}"),
                cause: Box::new(e),
            })?;
            histories.insert(*tli, entries);
        }
    }
    let mut inv = WalInventory::new(&objects, histories);
    let spool = repo.spool_wal();
    inv.add_spool(&spool);
    inv.gaps = repo.list_gaps().await?;
    inv.newest_segment_time = repo
        .newest_segment_time()
        .await?
        .max(spool.modified.map(crate::time::from_system));
    Ok(inv)
}

/// Builds the plan for `t` against the repository: the plan and its backup's record.
pub async fn make_plan(repo: &Repo, t: &TargetSpec) -> Result<(Plan, BackupRecord), RestoreError> {
    let backups = repo.list_backups().await?;
    let inv = inventory(repo).await?;
    let mut req = Request {
        target: t.target.clone(),
        timeline: t.timeline,
        backup: t.backup.clone(),
    };
    // A time, transaction or restore point: found through the WAL index (or the WAL), then
    // a transaction or restore point is planned for as its position.
    let located = locate(repo, &backups, &inv, &req, t.exclusive).await?;
    if let Some(end) = located.as_ref().and_then(|l| l.target_end) {
        info!(%end, "{} found in the archived WAL", req.target.describe());
        req.target = Target::Lsn(end);
    }
    let mut p = plan(&backups, &inv, &req, repo.seg_size())?;
    // A partial object: how far its prefix reaches, from its trailer.
    if let Some(last) = p
        .segments
        .last()
        .filter(|s| s.source == WalSource::PartialObject)
    {
        let seg = last.segment(repo.seg_size());
        let info = repo
            .object_info(&crate::repo::layout::partial_segment_key(&seg))
            .await?;
        p.partial_reaches = Some(Lsn(seg.start_lsn().0 + info.raw_size));
    }
    let rec = backups
        .iter()
        .find(|b| b.id == p.backup_id)
        .cloned()
        .expect("the plan's backup is in the catalog");
    // Recovery to a time stops at the first transaction after it: there must be one.
    if let (Target::Time(_), Some(l)) = (&req.target, &located) {
        if l.first_not_applied.is_none() {
            let why = match l.last_applied {
                Some(x) if x.end > rec.start_lsn => {
                    format!("its last transaction ended at {} (WAL {})", x.time, x.end)
                }
                _ => format!("no transaction ended after backup {} began", p.backup_id),
            };
            // The chain ends at a gap: say so, and where a restore can go.
            if let Some(g) = gap_after(&inv.gaps, rec.start_lsn) {
                return Err(RestoreError::Unreachable(format!(
                    "{} cannot be reached from backup {} — {why}, and the archive has a gap after it ({}); no restore crosses a gap. Recovery windows: {}",
                    req.target.describe(),
                    p.backup_id,
                    g.describe(),
                    describe_windows(&backups, &inv.gaps)
                )));
            }
            return Err(RestoreError::Unreachable(format!(
                "{} lies beyond the archive — {why}, and recovery stops only at a transaction after the target",
                req.target.describe()
            )));
        }
    }
    p.located = located;
    Ok((p, rec))
}

/// The longest chain of WAL the archive holds: from the oldest backup that has one along the
/// requested timeline to the archive's end; None when no backup has one.
pub(crate) fn longest_chain(
    backups: &[BackupRecord],
    inv: &WalInventory,
    timeline: TimelineChoice,
    seg_size: u64,
) -> Option<Plan> {
    let mut complete: Vec<&BackupRecord> = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Complete)
        .collect();
    complete.sort_by_key(|b| b.stop_lsn);
    complete.iter().find_map(|b| {
        let r = Request {
            target: Target::Latest,
            timeline,
            backup: Some(b.id.clone()),
        };
        plan(backups, inv, &r, seg_size).ok()
    })
}

/// Where recovery to a time, transaction or restore point stops in the archived WAL, found
/// along the longest chain (from the oldest usable backup) through the WAL index; None for
/// other targets. Refuses a transaction or restore point the archive does not hold.
async fn locate(
    repo: &Repo,
    backups: &[BackupRecord],
    inv: &WalInventory,
    req: &Request,
    exclusive: bool,
) -> Result<Option<Located>, RestoreError> {
    if !matches!(
        req.target,
        Target::Xid(_) | Target::Name(_) | Target::Time(_)
    ) {
        return Ok(None);
    }
    let seg_size = repo.seg_size();
    let Some(chain) = longest_chain(backups, inv, req.timeline, seg_size) else {
        return Ok(None); // the planner explains why nothing serves
    };
    let segs = chain
        .segments
        .iter()
        .map(|s| (s.segment(seg_size), s.source))
        .collect();
    let mut ix = ChainIndex::new(repo, segs).await?;
    let found = ix.locate(&req.target, exclusive).await?;
    if let Some(l) = &found {
        info!(
            index_objects = l.index_objects_read,
            wal_segments = l.wal_segments_decoded,
            seconds = l.search_seconds,
            "target searched"
        );
        if matches!(req.target, Target::Xid(_) | Target::Name(_)) && l.target_end.is_none() {
            return Err(RestoreError::Unreachable(format!(
                "{} is not in the archived WAL (searched from {} to {}): the archive cannot reach it",
                match &req.target {
                    Target::Xid(x) => format!("the end (commit or abort) of transaction {x}"),
                    t => t.describe(),
                },
                chain.segments.first().map_or("-", |s| s.name.as_str()),
                chain.wal_end
            )));
        }
    }
    Ok(found)
}

/// A WAL record that fails its CRC: the archive is damaged there, refused like a bad object.
pub(crate) fn damaged_wal(
    name: crate::wal::SegmentName,
) -> impl FnOnce(crate::wal::record::RecordError) -> RestoreError {
    move |e| RestoreError::Damaged {
        what: format!("WAL segment {name}"),
        cause: Box::new(e),
    }
}

/// Who owns a restore's files: the current user unless run as root; as root, `user` (by name)
/// or else the owner of the directory `pgdata` is created in.
pub fn restore_owner(user: Option<&str>, pgdata: &Path) -> Result<Owner, RestoreError> {
    use crate::storage::fs::{is_root, owner_of, user_ids};
    match user {
        _ if !is_root() && user.is_some() => {
            Err(RestoreError::Refused("--owner needs root".into()))
        }
        _ if !is_root() => Ok(None),
        Some(u) => user_ids(u)
            .map(Some)
            .ok_or_else(|| RestoreError::Refused(format!("--owner: no user {u:?}"))),
        None => {
            let parent = pgdata
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            owner_of(parent)
                .map(Some)
                .map_err(|cause| RestoreError::Io {
                    context: format!("cannot read {}", parent.display()),
                    cause,
                })
        }
    }
}

/// A directory we may write into: absent (its parent must exist) or empty. Whether it existed.
pub fn check_empty_dir(dir: &Path, what: &str) -> Result<bool, RestoreError> {
    if dir.exists() && !dir.is_dir() {
        return Err(RestoreError::Refused(format!(
            "{what} {} exists and is not a directory",
            dir.display()
        )));
    }
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(RestoreError::Refused(format!(
                    "{what} {} exists and is not empty; refusing to touch it",
                    dir.display()
                )));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(RestoreError::Refused(format!(
                    "{what} {}: its parent directory does not exist",
                    dir.display()
                )));
            }
            Ok(false)
        }
        Err(e) => Err(io(format!("cannot read {}", dir.display()))(e)),
    }
}

/// Removes what a failed restore wrote: directories it created go, ones that were empty are
/// emptied again.
pub fn remove_written(archives: &[Archive], existed: &[bool]) {
    for (a, was) in archives.iter().zip(existed) {
        if *was {
            if let Ok(rd) = std::fs::read_dir(&a.dest) {
                for e in rd.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&a.dest);
        }
    }
}

/// Where each archive of `rec` goes: the base archive to `pgdata`, each tablespace to its
/// location or to where `mapping` moves it.
pub fn archives(
    rec: &BackupRecord,
    pgdata: &Path,
    mapping: &[(PathBuf, PathBuf)],
) -> Result<Vec<Archive>, RestoreError> {
    for (old, _) in mapping {
        if !rec
            .tablespaces
            .iter()
            .any(|t| Path::new(&t.location) == old)
        {
            return Err(RestoreError::Refused(format!(
                "--tablespace-mapping: backup {} has no tablespace at {} (it has: {})",
                rec.id,
                old.display(),
                rec.tablespaces
                    .iter()
                    .map(|t| t.location.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let size_of = |key: &str| {
        rec.objects
            .iter()
            .find(|o| o.key == key)
            .map_or(0, |o| o.size_bytes)
    };
    let key = backup_object_key(&rec.id, "base.tar");
    let mut out = vec![Archive {
        size: size_of(&key),
        key,
        dest: pgdata.to_path_buf(),
        tablespace: None,
    }];
    for t in &rec.tablespaces {
        let dest = mapping
            .iter()
            .find(|(old, _)| Path::new(&t.location) == old)
            .map_or_else(|| PathBuf::from(&t.location), |(_, new)| new.clone());
        let key = backup_object_key(&rec.id, &format!("{}.tar", t.oid));
        out.push(Archive {
            size: size_of(&key),
            key,
            dest,
            tablespace: Some(t.oid),
        });
    }
    Ok(out)
}

/// What `write_restore` needs besides the plan.
pub struct WriteSpec<'a> {
    /// The repository as restore_command names it (absolute paths, or its S3 URL).
    pub repo_args: &'a [(&'static str, PathBuf)],
    pub target: &'a TargetSpec,
    pub mapping: &'a [(PathBuf, PathBuf)],
    /// More settings for postgresql.auto.conf (a drill's port and socket).
    pub extra: Vec<(String, String)>,
}

/// The backup's manifest (read and verified): its bytes, parsed, and its checksum algorithm.
async fn backup_manifest(
    repo: &Repo,
    rec: &BackupRecord,
) -> Result<(Vec<u8>, Manifest, ChecksumAlgorithm), RestoreError> {
    let (raw, _) = repo
        .get_verified(&backup_object_key(&rec.id, "backup_manifest"))
        .await?;
    let manifest = Manifest::parse(&raw).map_err(|cause| RestoreError::Manifest {
        context: "the backup's manifest",
        cause,
    })?;
    let algo = manifest.algorithm().unwrap_or(ChecksumAlgorithm::Crc32c);
    Ok((raw, manifest, algo))
}

/// What a restore wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Written {
    pub files: usize,
    pub bytes: u64,
    /// The recovery settings written to postgresql.auto.conf.
    pub recovery_settings: Vec<String>,
}

/// The tablespace a manifest path lies in (`pg_tblspc/<oid>/…`), if any.
fn tablespace_of(path: &str) -> Option<u32> {
    path.strip_prefix("pg_tblspc/")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// The backups a restore of `rec` writes, the full one first: `rec` alone, or the chain of an
/// incremental backup (refused when a link is missing or not complete).
async fn chain_of(repo: &Repo, rec: &BackupRecord) -> Result<Vec<BackupRecord>, RestoreError> {
    if rec.parent.is_none() {
        return Ok(vec![rec.clone()]);
    }
    let all = repo.list_backups().await?;
    Ok(crate::repo::catalog::chain(&all, &rec.id)
        .map_err(RestoreError::Refused)?
        .into_iter()
        .cloned()
        .collect())
}

/// Writes the backup's archives (verified, every file against the manifest) and the recovery
/// settings. The destinations must have been checked ([`check_empty_dir`]).
pub async fn write_restore(
    w: &WriteSpec<'_>,
    repo: &Repo,
    rec: &BackupRecord,
    archives: &[Archive],
    owner: Owner,
) -> Result<Written, RestoreError> {
    let started = std::time::Instant::now();
    let stages = std::sync::Arc::new(super::extract::Stages::default());
    for a in archives {
        std::fs::create_dir_all(&a.dest)
            .map_err(io(format!("cannot create {}", a.dest.display())))?;
        std::fs::set_permissions(&a.dest, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(format!("cannot set the mode of {}", a.dest.display())))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&a.dest, Some(uid), Some(gid))
                .map_err(io(format!("cannot chown {}", a.dest.display())))?;
        }
    }
    let pgdata = &archives[0].dest;
    // An incremental backup restores as its chain: the full backup, then each incremental
    // over it ([`super::combine`]).
    let chain = chain_of(repo, rec).await?;
    let mut files = 0;
    let mut bytes = 0u64;
    let mut manifest_raw = Vec::new();
    for (i, layer) in chain.iter().enumerate() {
        let layer_archives = if i + 1 == chain.len() {
            archives.to_vec()
        } else {
            // (A tablespace mapped for the newest backup may not exist yet in an older one.)
            let mapping: Vec<(PathBuf, PathBuf)> = w
                .mapping
                .iter()
                .filter(|(old, _)| {
                    layer
                        .tablespaces
                        .iter()
                        .any(|t| Path::new(&t.location) == old)
                })
                .cloned()
                .collect();
            // Tablespaces the newest backup no longer has are not restored at all.
            self::archives(layer, pgdata, &mapping)?
                .into_iter()
                .filter(|a| {
                    a.tablespace
                        .is_none_or(|oid| rec.tablespaces.iter().any(|t| t.oid == oid))
                })
                .collect()
        };
        for a in &layer_archives {
            std::fs::create_dir_all(&a.dest)
                .map_err(io(format!("cannot create {}", a.dest.display())))?;
        }
        let (raw, mut manifest, algo) = backup_manifest(repo, layer).await?;
        if i + 1 < chain.len() {
            // Nor are their files checked against this link's manifest.
            manifest.files.retain(|path, _| {
                tablespace_of(path)
                    .is_none_or(|oid| layer_archives.iter().any(|a| a.tablespace == Some(oid)))
            });
        }
        let mode = match i {
            0 => Layer::Fresh,
            _ => Layer::Over {
                checksums: i + 1 == chain.len(),
            },
        };
        if chain.len() > 1 {
            info!(backup = %layer.id, kind = layer.kind(), "restoring link {} of {} of the chain", i + 1, chain.len());
        }
        let (digests, mut rebuilt) =
            extract_all(repo, &layer_archives, owner, algo, mode, &stages).await?;
        files = manifest
            .verify(&digests)
            .map_err(|cause| RestoreError::Manifest {
                context: "the restored files do not match the backup manifest",
                cause,
            })?;
        bytes += layer_archives.iter().map(|a| a.size).sum::<u64>();
        manifest_raw = raw;
        if i > 0 {
            let removed = super::combine::remove_unlisted(&layer_archives, &manifest)
                .map_err(io("removing files the newer backup no longer has"))?;
            if removed > 0 {
                info!(backup = %layer.id, removed, "files gone since the previous backup removed");
            }
        }
        if i + 1 == chain.len() && i > 0 {
            let label = super::combine::make_label_full(pgdata, algo)
                .map_err(io("rewriting backup_label"))?;
            rebuilt.insert("backup_label".into(), label);
            manifest_raw = super::combine::rewrite_manifest(&manifest_raw, &rebuilt, algo)
                .map_err(RestoreError::Refused)?;
            info!(
                reconstructed = rebuilt.len(),
                "files reconstructed from the incremental chain; the restored manifest lists them as they are now"
            );
        }
    }
    info!(files, "every restored file matches the backup manifest");

    crate::storage::fs::write_private(&pgdata.join("backup_manifest"), &manifest_raw)
        .map_err(io("writing backup_manifest"))?;
    // Tablespaces moved with --tablespace-mapping: PostgreSQL makes its pg_tblspc links from
    // tablespace_map at startup, so point it at the new places.
    if !w.mapping.is_empty() {
        let map = pgdata.join("tablespace_map");
        let text = std::fs::read_to_string(&map).map_err(io("reading tablespace_map"))?;
        let mut out = String::new();
        for line in text.lines() {
            let (oid, path) = line.split_once(' ').unwrap_or((line, ""));
            let new = w
                .mapping
                .iter()
                .find(|(old, _)| Path::new(path) == old)
                .map_or(path.to_string(), |(_, n)| n.display().to_string());
            out.push_str(&format!("{oid} {new}\n"));
        }
        crate::storage::fs::write_private(&map, out.as_bytes())
            .map_err(io("writing tablespace_map"))?;
    }
    let exe = std::env::current_exe().map_err(io("locating the archiver binary"))?;
    let cmd = recovery::restore_command(&exe, w.repo_args);
    let target = &w.target.target;
    let mut lines = recovery::settings(
        &cmd,
        target,
        w.target.exclusive,
        w.target.timeline,
        w.target.action,
    );
    lines.extend(w.extra.iter().cloned());
    recovery::write(
        pgdata,
        &lines,
        &format!(
            "added by archiver restore of backup {} to {}",
            rec.id,
            target.describe()
        ),
    )
    .map_err(io("writing the recovery settings"))?;
    for f in [
        "backup_manifest",
        "postgresql.auto.conf",
        "recovery.signal",
        "tablespace_map",
    ] {
        let path = pgdata.join(f);
        if let (Some((uid, gid)), true) = (owner, path.exists()) {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(io(format!("cannot chown {}", path.display())))?;
        }
    }
    // One syncfs per filesystem instead of an fsync per file.
    let synced = std::time::Instant::now();
    for a in archives {
        let d =
            std::fs::File::open(&a.dest).map_err(io(format!("opening {}", a.dest.display())))?;
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io("syncfs")(std::io::Error::last_os_error()));
        }
    }
    stages.log(synced.elapsed(), started.elapsed());
    Ok(Written {
        files,
        bytes,
        recovery_settings: lines.iter().map(|(k, v)| format!("{k} = {v}")).collect(),
    })
}

/// When the plan's WAL ends in a partial segment: a sentence saying so and how far it reaches.
pub fn partial_end_note(p: &Plan) -> Option<String> {
    let last = p.segments.last().filter(|s| s.partial)?;
    let reach = p
        .partial_reaches
        .map_or_else(|| "an unknown position".to_string(), |l| l.to_string());
    Some(format!(
        "The WAL ends in partial segment {} ({}): recovery can replay up to {reach}.",
        last.name,
        match last.source {
            WalSource::SpoolTail { .. } =>
                "being received by the stream, read from the local spool",
            _ => "its archived prefix",
        }
    ))
}

/// Reads and verifies every WAL segment and history file of the plan; how many.
pub async fn verify_wal(repo: &Repo, p: &Plan) -> Result<usize, RestoreError> {
    let seg_size = repo.seg_size();
    // Every record's CRC-32C as well as each object's checksums: the segments follow one
    // another along the path, so records crossing segments are checked too.
    let mut records = crate::wal::index::Indexer::new(seg_size, repo.meta().pg_major);
    for s in &p.segments {
        let seg = s.segment(seg_size);
        let raw = repo
            .read_wal(seg, s.source)
            .await
            .map_err(|e| RestoreError::Damaged {
                what: format!("WAL segment {} of the plan", s.name),
                cause: Box::new(e),
            })?;
        let (back, r) = tokio::task::spawn_blocking(move || {
            let r = records.index(&seg, &raw).map(|_| ());
            (records, r)
        })
        .await
        .expect("record check panicked");
        records = back;
        r.map_err(damaged_wal(seg))?;
    }
    for t in &p.history_files {
        repo.get_verified(&history_key(*t))
            .await
            .map_err(|e| RestoreError::Damaged {
                what: format!("the history file of timeline {t}"),
                cause: Box::new(e),
            })?;
    }
    Ok(p.segments.len() + p.history_files.len())
}

/// Feeds a backup archive's bytes to a tar reader that only computes digests.
struct DigestSink {
    tar: TarReader,
    digests: FileDigests,
}

impl Write for DigestSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let d = &mut self.digests;
        self.tar
            .feed(b, &mut |e| {
                d.event(&e);
                Ok(())
            })
            .map_err(std::io::Error::other)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a dry run found: the plan, what it would restore, how long it would take.
#[derive(Serialize)]
pub struct DryRun {
    pub dry_run: bool,
    pub target: String,
    #[serde(flatten)]
    pub plan: Plan,
    pub backup_start_lsn: Lsn,
    pub backup_bytes: u64,
    pub wal_bytes: u64,
    pub bytes_to_restore: u64,
    pub estimated_seconds: f64,
    pub objects_verified: usize,
    /// The backups restored, the full one first: the chain of an incremental backup, each
    /// link read and checked against its own manifest; just the backup for a full one.
    pub chain: Vec<ChainLink>,
}

/// One backup of a restore's chain.
#[derive(Clone, Debug, Serialize)]
pub struct ChainLink {
    pub id: String,
    pub kind: &'static str,
    pub size_bytes: u64,
}

/// Reads and verifies everything the restore of `p` would read (the backup's archives against
/// its manifest, every WAL segment, history files); writes nothing.
pub async fn dry_run(
    repo: &Repo,
    p: Plan,
    rec: &BackupRecord,
    target: &Target,
    pgdata: &Path,
    mapping: &[(PathBuf, PathBuf)],
) -> Result<DryRun, RestoreError> {
    archives(rec, pgdata, mapping)?;
    let chain = chain_of(repo, rec).await?;
    let mut verified = 0;
    for link in &chain {
        verified += verify_backup(repo, link).await?;
    }
    verified += verify_wal(repo, &p).await?;
    let backup_bytes: u64 = chain.iter().map(|b| b.size_bytes).sum();
    let wal_bytes = p.segments.len() as u64 * repo.seg_size();
    Ok(DryRun {
        dry_run: true,
        target: target.describe(),
        plan: p,
        backup_start_lsn: rec.start_lsn,
        backup_bytes,
        wal_bytes,
        bytes_to_restore: backup_bytes + wal_bytes,
        estimated_seconds: backup_bytes as f64 / EST_EXTRACT_BYTES_PER_S
            + wal_bytes as f64 / EST_REPLAY_BYTES_PER_S,
        objects_verified: verified,
        chain: chain
            .iter()
            .map(|b| ChainLink {
                id: b.id.clone(),
                kind: b.kind(),
                size_bytes: b.size_bytes,
            })
            .collect(),
    })
}

/// Reads back every object of backup `rec`, checked against its checksums, and every file in
/// its archives against its manifest. Returns how many objects were read.
pub async fn verify_backup(repo: &Repo, rec: &BackupRecord) -> Result<usize, RestoreError> {
    let (_, manifest, algo) = backup_manifest(repo, rec).await?;
    let mut all = FileDigests::new(algo);
    let mut verified = 1;
    for a in archives(rec, Path::new("/"), &[])? {
        let mut digests = FileDigests::new(algo);
        digests.start_archive(a.tablespace);
        let sink = DigestSink {
            tar: TarReader::new(),
            digests,
        };
        let (_, sink) = repo.stream_verified(&a.key, sink).await?;
        all.merge(sink.digests);
        verified += 1;
    }
    manifest
        .verify(&all)
        .map_err(|cause| RestoreError::Manifest {
            context: "the backup's archives do not match its manifest",
            cause,
        })?;
    Ok(verified)
}

/// A restore to write.
pub struct RestoreOptions {
    /// The data directory to create (absent, or empty).
    pub pgdata: PathBuf,
    pub target: TargetSpec,
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    /// Who owns what is written (root only).
    pub owner: Owner,
    /// Read and verify every WAL segment of the plan before writing.
    pub verify_wal: bool,
    /// The repository as the restored cluster's restore_command names it.
    pub repo_args: Vec<(&'static str, PathBuf)>,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    pub pgdata: PathBuf,
    pub backup_id: String,
    pub target: String,
    pub timeline: u32,
    pub segments: usize,
    pub bytes_written: u64,
    pub files: usize,
    pub seconds: f64,
    /// What was checked of the WAL before writing: "present" or "verified" (--verify-wal).
    pub wal_checked: &'static str,
    pub recovery_settings: Vec<String>,
}

/// Where each archive goes, each destination checked (absent or empty), and whether it existed.
pub fn check_destinations(
    rec: &BackupRecord,
    pgdata: &Path,
    mapping: &[(PathBuf, PathBuf)],
) -> Result<(Vec<Archive>, Vec<bool>), RestoreError> {
    let archives = archives(rec, pgdata, mapping)?;
    // An existing cluster of another major: say so, naming both (it is refused below anyway,
    // not being empty, but this is the mistake worth naming).
    let backup_major = rec.pg_version / 10000;
    if let Some(m) = super::binaries::data_dir_major(pgdata).filter(|&m| m != backup_major) {
        return Err(RestoreError::Refused(format!(
            "--pgdata {} holds a PostgreSQL {m} cluster; the backup is PostgreSQL {backup_major} (restore into an empty directory)",
            pgdata.display()
        )));
    }
    let mut existed = Vec::new();
    for a in &archives {
        let what = if a.tablespace.is_some() {
            "tablespace directory"
        } else {
            "--pgdata"
        };
        existed.push(check_empty_dir(&a.dest, what)?);
    }
    Ok((archives, existed))
}

/// Checks the destinations (nothing written when one is not empty), then writes the restore of
/// plan `p`; on failure, removes what it wrote.
pub async fn restore(
    repo: &Repo,
    p: &Plan,
    rec: &BackupRecord,
    o: &RestoreOptions,
) -> Result<Restored, RestoreError> {
    let pgdata = std::path::absolute(&o.pgdata).map_err(io("--pgdata"))?;
    let (archives, existed) = check_destinations(rec, &pgdata, &o.tablespace_mapping)?;
    // The plan was built from the repository's listing: every segment of the chain from the
    // backup to the target is present (a missing one ends the chain, and a target beyond it
    // is refused). With verify_wal, each is also read and verified now.
    if o.verify_wal {
        let n = verify_wal(repo, p).await?;
        info!(
            objects = n,
            "every WAL segment and history file of the plan verified"
        );
    }
    let started = Instant::now();
    let spec = WriteSpec {
        repo_args: &o.repo_args,
        target: &o.target,
        mapping: &o.tablespace_mapping,
        extra: vec![],
    };
    match write_restore(&spec, repo, rec, &archives, o.owner).await {
        Ok(w) => Ok(Restored {
            pgdata,
            backup_id: p.backup_id.clone(),
            target: o.target.target.describe(),
            timeline: p.timeline,
            segments: p.segments.len(),
            bytes_written: w.bytes,
            files: w.files,
            seconds: started.elapsed().as_secs_f64(),
            wal_checked: if o.verify_wal { "verified" } else { "present" },
            recovery_settings: w.recovery_settings,
        }),
        Err(e) => {
            remove_written(&archives, &existed);
            Err(RestoreError::Failed(Box::new(e)))
        }
    }
}
