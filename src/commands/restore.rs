//! `archiver restore`: plan, check, then write a data directory that recovers to the target.
//! `--dry-run` builds the same plan and verifies every object it needs, writing nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tracing::info;

use super::{report, RepoArg, EXIT_ERROR};
use crate::basebackup::manifest::{ChecksumAlgorithm, FileDigests, Manifest};
use crate::basebackup::tar::TarReader;
use crate::repo::catalog::BackupRecord;
use crate::repo::layout::{backup_object_key, history_key, WalObject};
use crate::repo::local_wal::WalSource;
use crate::repo::Repo;
use crate::restore::extract::{extract_all, Archive, Owner};
use crate::restore::plan::{plan, Plan, Request, WalInventory};
use crate::restore::recovery::{self, TargetAction};
use crate::restore::target::{format_rfc3339, parse_time, Target, TimelineChoice};
use crate::wal::record::{Event, RecordReader};
use crate::wal::timeline::parse_history;
use crate::wal::Lsn;

/// Rough rates for the time estimate of a plan (this machine class: docs/benchmarks.md).
const EST_EXTRACT_BYTES_PER_S: f64 = 400e6;
const EST_REPLAY_BYTES_PER_S: f64 = 150e6;

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("target").multiple(false)))]
pub struct TargetArgs {
    /// Recover up to this time: RFC 3339 (2026-11-23T01:30:00Z, '2026-11-23 02:30:00+01:00'); a
    /// time without a zone is the machine's local time (TZ); plans print the instant in UTC.
    #[arg(long, group = "target", value_parser = parse_time, value_name = "TIME")]
    target_time: Option<i64>,
    /// Recover up to this WAL position (X/X).
    #[arg(long, group = "target", value_name = "LSN")]
    target_lsn: Option<Lsn>,
    /// Recover up to the commit of this transaction.
    #[arg(long, group = "target", value_name = "XID")]
    target_xid: Option<u64>,
    /// Recover up to this restore point (pg_create_restore_point).
    #[arg(long, group = "target", value_name = "NAME")]
    target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "target")]
    target_immediate: bool,
    /// Timeline to recover along: `latest` (default), `current` or a number.
    #[arg(long, default_value = "latest")]
    target_timeline: TimelineChoice,
    /// What the server does at the target.
    #[arg(long, value_enum, default_value_t = TargetAction::Promote)]
    pub(crate) target_action: TargetAction,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    exclusive: bool,
    /// Restore this backup instead of the newest one that can reach the target.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
}

impl TargetArgs {
    pub fn target(&self) -> Target {
        if let Some(t) = self.target_time {
            Target::Time(t)
        } else if let Some(l) = self.target_lsn {
            Target::Lsn(l)
        } else if let Some(x) = self.target_xid {
            Target::Xid(x)
        } else if let Some(n) = &self.target_name {
            Target::Name(n.clone())
        } else if self.target_immediate {
            Target::Immediate
        } else {
            Target::Latest
        }
    }
}

fn parse_mapping(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (old, new) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected OLDDIR=NEWDIR"))?;
    let (old, new) = (PathBuf::from(old), PathBuf::from(new));
    if !old.is_absolute() || !new.is_absolute() {
        return Err(format!("{s:?}: both directories must be absolute paths"));
    }
    Ok((old, new))
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// The data directory to create (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pgdata: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    /// Put a tablespace elsewhere (repeatable), like pg_basebackup -T.
    #[arg(long = "tablespace-mapping", value_name = "OLDDIR=NEWDIR", value_parser = parse_mapping)]
    tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    /// When run as root: the user to own the files [default: the owner of --pgdata's parent].
    #[arg(long)]
    owner: Option<String>,
    /// Build and verify the plan (every object it needs is read and checked); write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Before writing anything, read and verify every WAL segment and history file the
    /// recovery will replay (without it, their presence is checked; each is verified as
    /// recovery fetches it).
    #[arg(long)]
    verify_wal: bool,
    /// Print the plan / result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: RestoreArgs) -> u8 {
    match restore(args).await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

/// The repository's WAL as the planner sees it (history files read and verified).
pub(crate) async fn inventory(repo: &Repo) -> anyhow::Result<WalInventory> {
    let objects = repo.wal_objects().await?;
    let mut histories = BTreeMap::new();
    for o in &objects {
        if let WalObject::History(tli) = o {
            let (raw, _) = repo.get_verified(&history_key(*tli)).await?;
            let text = String::from_utf8_lossy(&raw);
            histories.insert(
                *tli,
                parse_history(&text).with_context(|| format!("history file of timeline {tli}"))?,
            );
        }
    }
    let mut inv = WalInventory::new(&objects, histories);
    let spool = repo.spool_wal();
    inv.add_spool(&spool);
    inv.gaps = repo.list_gaps().await?;
    inv.newest_segment_time = repo
        .newest_segment_time()
        .await?
        .max(spool.modified)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_micros() as i64);
    Ok(inv)
}

/// Builds the plan for `target` against the repository.
pub(crate) async fn make_plan(repo: &Repo, t: &TargetArgs) -> anyhow::Result<(Plan, BackupRecord)> {
    let backups = repo.list_backups().await?;
    let inv = inventory(repo).await?;
    let mut req = Request {
        target: t.target(),
        timeline: t.target_timeline,
        backup: t.backup.clone(),
    };
    // A transaction or restore point: find it in the WAL, then plan as for its position.
    if let Some(end) = locate(repo, &backups, &inv, &req).await? {
        info!(%end, "{} found in the archived WAL", req.target.describe());
        req.target = Target::Lsn(end);
    }
    let mut p =
        plan(&backups, &inv, &req, repo.seg_size()).context("no restore can reach the target")?;
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
    // Recovery to a time stops at the first transaction after it: there must be one.
    if let Target::Time(t) = req.target {
        let last = match last_transaction(repo, &p).await? {
            LastTransaction::At(time, lsn) if t > time => Some(format!(
                "its last transaction ended at {} (WAL {lsn})",
                format_rfc3339(time)
            )),
            LastTransaction::NoneAfterBackup => Some(format!(
                "no transaction ended after backup {} began",
                p.backup_id
            )),
            _ => None,
        };
        if let Some(why) = last {
            // The chain ends at a gap: say so, and where a restore can go.
            if let Some(g) = crate::restore::plan::gap_after(&inv.gaps, rec_start(&backups, &p)) {
                anyhow::bail!(
                    "no restore can reach the target: {} cannot be reached from backup {} — {why}, and the archive has a gap after it ({}); no restore crosses a gap. Recovery windows: {}",
                    req.target.describe(),
                    p.backup_id,
                    g.describe(),
                    crate::restore::plan::describe_windows(&backups, &inv.gaps)
                );
            }
            anyhow::bail!(
                "no restore can reach the target: {} lies beyond the archive — {why}, and recovery stops only at a transaction after the target",
                req.target.describe()
            );
        }
    }
    let rec = backups
        .into_iter()
        .find(|b| b.id == p.backup_id)
        .expect("the plan's backup is in the catalog");
    Ok((p, rec))
}

/// The start of the plan's backup.
fn rec_start(backups: &[BackupRecord], p: &Plan) -> Lsn {
    backups
        .iter()
        .find(|b| b.id == p.backup_id)
        .map_or(Lsn(0), |b| b.start_lsn)
}

/// Where a transaction's commit/abort or a restore point lies in the archived WAL (the end of
/// its record), scanning the chain from the oldest usable backup; None for other targets.
/// Refuses a target the archive does not hold.
async fn locate(
    repo: &Repo,
    backups: &[BackupRecord],
    inv: &WalInventory,
    req: &Request,
) -> anyhow::Result<Option<Lsn>> {
    let matches = |e: &Event| match (&req.target, e) {
        (Target::Xid(x), Event::XactEnd { xid, .. }) => *xid == (*x & 0xFFFF_FFFF) as u32,
        (Target::Name(n), Event::RestorePoint { name, .. }) => name == n,
        _ => false,
    };
    if !matches!(req.target, Target::Xid(_) | Target::Name(_)) {
        return Ok(None);
    }
    let mut complete: Vec<&BackupRecord> = backups
        .iter()
        .filter(|b| b.status == crate::repo::catalog::BackupStatus::Complete)
        .collect();
    complete.sort_by_key(|b| b.stop_lsn);
    let seg_size = repo.seg_size();
    // The longest chain: from the oldest backup that has one along the timeline.
    let chain = complete.iter().find_map(|b| {
        let r = Request {
            target: Target::Latest,
            timeline: req.timeline,
            backup: Some(b.id.clone()),
        };
        plan(backups, inv, &r, seg_size).ok()
    });
    let Some(chain) = chain else {
        return Ok(None); // the planner explains why nothing serves
    };
    let mut reader = RecordReader::new(seg_size, repo.meta().pg_major);
    let mut found = None;
    for s in &chain.segments {
        let name = s.segment(seg_size);
        let raw = repo.read_wal(name, s.source).await?;
        reader.feed_segment(name.start_lsn(), &raw, &mut |e| {
            if found.is_none() && matches(&e) {
                found = Some(match e {
                    Event::XactEnd { end, .. } | Event::RestorePoint { end, .. } => end,
                });
            }
        });
        if found.is_some() || reader.ended() {
            break;
        }
    }
    match found {
        Some(end) => Ok(Some(end)),
        None => anyhow::bail!(
            "{} is not in the archived WAL (searched from {} to {}): the archive cannot reach it",
            match &req.target {
                Target::Xid(x) => format!("the end (commit or abort) of transaction {x}"),
                t => t.describe(),
            },
            chain.segments.first().map_or("-", |s| s.name.as_str()),
            chain.wal_end
        ),
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's, 2000-01-01.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// What the end of a plan's WAL says about its last transaction.
enum LastTransaction {
    /// Its end time (Unix microseconds) and position.
    At(i64, Lsn),
    /// The whole chain from the backup on holds none.
    NoneAfterBackup,
    /// None in the segments read (the last 16); earlier ones were not read.
    Unknown,
}

/// Reads the plan's WAL backwards from its end (at most 16 segments) for the last transaction.
async fn last_transaction(repo: &Repo, p: &Plan) -> anyhow::Result<LastTransaction> {
    const MAX: usize = 16;
    let seg_size = repo.seg_size();
    for s in p.segments.iter().rev().take(MAX) {
        let name = s.segment(seg_size);
        let raw = repo.read_wal(name, s.source).await?;
        let mut reader = RecordReader::new(seg_size, repo.meta().pg_major);
        let mut last = None;
        reader.feed_segment(name.start_lsn(), &raw, &mut |e| {
            if let Event::XactEnd { time, end, .. } = e {
                last = Some(LastTransaction::At(time + PG_EPOCH_UNIX_MICROS, end));
            }
        });
        if let Some(l) = last {
            return Ok(l);
        }
    }
    Ok(if p.segments.len() <= MAX {
        LastTransaction::NoneAfterBackup
    } else {
        LastTransaction::Unknown
    })
}

/// A directory we may write into: absent (its parent must exist) or empty.
pub(crate) fn check_empty_dir(dir: &Path, what: &str) -> anyhow::Result<bool> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{what} {} exists and is not a directory", dir.display());
    }
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                anyhow::bail!(
                    "{what} {} exists and is not empty; refusing to touch it",
                    dir.display()
                );
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                anyhow::bail!(
                    "{what} {}: its parent directory does not exist",
                    dir.display()
                );
            }
            Ok(false)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", dir.display()))),
    }
}

/// Removes what a failed restore wrote: directories it created go, ones that were empty are
/// emptied again.
pub(crate) fn remove_written(archives: &[Archive], existed: &[bool]) {
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

/// Where each archive of `rec` goes.
pub(crate) fn archives(
    rec: &BackupRecord,
    pgdata: &Path,
    mapping: &[(PathBuf, PathBuf)],
) -> anyhow::Result<Vec<Archive>> {
    for (old, _) in mapping {
        if !rec
            .tablespaces
            .iter()
            .any(|t| Path::new(&t.location) == old)
        {
            anyhow::bail!(
                "--tablespace-mapping: backup {} has no tablespace at {} (it has: {})",
                rec.id,
                old.display(),
                rec.tablespaces
                    .iter()
                    .map(|t| t.location.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
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

fn owner_for(args: &RestoreArgs) -> anyhow::Result<Owner> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if args.owner.is_some() {
            anyhow::bail!("--owner needs root");
        }
        return Ok(None);
    }
    if let Some(user) = &args.owner {
        let name = std::ffi::CString::new(user.as_str()).context("--owner")?;
        // SAFETY: getpwnam with a valid C string; the result is copied out at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            anyhow::bail!("--owner: no user {user:?}");
        }
        // SAFETY: non-null result of getpwnam.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        return Ok(Some((uid, gid)));
    }
    let parent = args
        .pgdata
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let m =
        std::fs::metadata(parent).with_context(|| format!("cannot read {}", parent.display()))?;
    use std::os::unix::fs::MetadataExt;
    Ok(Some((m.uid(), m.gid())))
}

/// What `write_restore` needs besides the plan.
pub(crate) struct WriteSpec<'a> {
    /// The repository as restore_command names it (absolute paths, or its S3 URL).
    pub repo_args: &'a [(&'static str, PathBuf)],
    pub target: &'a TargetArgs,
    pub mapping: &'a [(PathBuf, PathBuf)],
    /// More settings for postgresql.auto.conf (a drill's port and socket).
    pub extra: Vec<(String, String)>,
}

#[derive(Serialize)]
struct DryRun<'a> {
    dry_run: bool,
    target: String,
    #[serde(flatten)]
    plan: &'a Plan,
    backup_start_lsn: Lsn,
    backup_bytes: u64,
    wal_bytes: u64,
    bytes_to_restore: u64,
    estimated_seconds: f64,
    objects_verified: usize,
}

#[derive(Serialize)]
struct Done<'a> {
    pgdata: &'a Path,
    backup_id: &'a str,
    target: String,
    timeline: u32,
    segments: usize,
    bytes_written: u64,
    files: usize,
    seconds: f64,
    /// What was checked of the WAL before writing: "present" or "verified" (--verify-wal).
    wal_checked: &'static str,
    recovery_settings: Vec<String>,
}

async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let repo = args.repo.open_for_reading(true).await?;
    let (p, rec) = make_plan(&repo, &args.target).await?;
    let target = args.target.target();
    info!(backup = %p.backup_id, timeline = p.timeline, segments = p.segments.len(), wal_end = %p.wal_end, "plan: {}", target.describe());
    if let Some(note) = partial_end_note(&p) {
        info!("{note}");
    }

    // Bad input changes nothing: every check before the first write.
    let pgdata = std::path::absolute(&args.pgdata).context("--pgdata")?;
    let archives = archives(&rec, &pgdata, &args.tablespace_mapping)?;
    let mut existed = Vec::new();
    for a in &archives {
        let what = if a.tablespace.is_some() {
            "tablespace directory"
        } else {
            "--pgdata"
        };
        existed.push(check_empty_dir(&a.dest, what)?);
    }
    let owner = owner_for(&args)?;
    args.repo.check_readable_by(
        owner,
        &args
            .owner
            .clone()
            .unwrap_or_else(|| "the data directory's owner".into()),
    )?;

    if args.dry_run {
        return dry_run(&args, &repo, &p, &rec, &target).await;
    }
    // The plan was built from the repository's listing: every segment of the chain from the
    // backup to the target is present (a missing one ends the chain, and a target beyond it
    // is refused). With --verify-wal, each is also read and verified now.
    if args.verify_wal {
        let n = verify_wal(&repo, &p).await?;
        info!(
            objects = n,
            "every WAL segment and history file of the plan verified"
        );
    }
    let started = Instant::now();
    let repo_for_cmd = args.repo.for_restore_command()?;
    let spec = WriteSpec {
        repo_args: &repo_for_cmd,
        target: &args.target,
        mapping: &args.tablespace_mapping,
        extra: vec![],
    };
    let result = write_restore(&spec, &repo, &rec, &target, &archives, owner).await;
    match result {
        Ok((files, bytes, lines)) => {
            let done = Done {
                pgdata: &pgdata,
                backup_id: &p.backup_id,
                target: target.describe(),
                timeline: p.timeline,
                segments: p.segments.len(),
                bytes_written: bytes,
                files,
                seconds: started.elapsed().as_secs_f64(),
                wal_checked: if args.verify_wal {
                    "verified"
                } else {
                    "present"
                },
                recovery_settings: lines,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!(
                    "restored backup {} into {} ({} files, {:.1} MB in {:.1} s, every file checked against the backup manifest); recovery will replay {} WAL segment(s) to {} ({}). Start it with: pg_ctl -D {} start",
                    p.backup_id,
                    pgdata.display(),
                    files,
                    bytes as f64 / 1e6,
                    done.seconds,
                    p.segments.len(),
                    target.describe(),
                    if args.verify_wal {
                        "each read and verified before writing"
                    } else {
                        "each present in the archive; verified as recovery fetches it, or before writing with --verify-wal"
                    },
                    pgdata.display()
                );
            }
            Ok(())
        }
        Err(e) => {
            remove_written(&archives, &existed);
            Err(e.context("restore failed; what it had written is removed"))
        }
    }
}

pub(crate) async fn write_restore(
    w: &WriteSpec<'_>,
    repo: &Repo,
    rec: &BackupRecord,
    target: &Target,
    archives: &[Archive],
    owner: Owner,
) -> anyhow::Result<(usize, u64, Vec<String>)> {
    for a in archives {
        std::fs::create_dir_all(&a.dest)
            .with_context(|| format!("cannot create {}", a.dest.display()))?;
        std::fs::set_permissions(&a.dest, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&a.dest, Some(uid), Some(gid))?;
        }
    }
    let pgdata = &archives[0].dest;
    let (manifest_raw, _) = repo
        .get_verified(&backup_object_key(&rec.id, "backup_manifest"))
        .await?;
    let manifest = Manifest::parse(&manifest_raw).context("the backup's manifest")?;
    let algo = manifest.algorithm().unwrap_or(ChecksumAlgorithm::Crc32c);
    let digests = extract_all(repo, archives, owner, algo).await?;
    let files = manifest
        .verify(&digests)
        .context("the restored files do not match the backup manifest")?;
    info!(files, "every restored file matches the backup manifest");
    let bytes: u64 = archives.iter().map(|a| a.size).sum();

    crate::storage::fs::write_private(&pgdata.join("backup_manifest"), &manifest_raw)?;
    // Tablespaces moved with --tablespace-mapping: PostgreSQL makes its pg_tblspc links from
    // tablespace_map at startup, so point it at the new places.
    if !w.mapping.is_empty() {
        let map = pgdata.join("tablespace_map");
        let text = std::fs::read_to_string(&map).context("reading tablespace_map")?;
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
        crate::storage::fs::write_private(&map, out.as_bytes())?;
    }
    let exe = std::env::current_exe().context("locating the archiver binary")?;
    let cmd = recovery::restore_command(&exe, w.repo_args);
    let mut lines = recovery::settings(
        &cmd,
        target,
        w.target.exclusive,
        w.target.target_timeline,
        w.target.target_action,
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
    )?;
    for f in [
        "backup_manifest",
        "postgresql.auto.conf",
        "recovery.signal",
        "tablespace_map",
    ] {
        let path = pgdata.join(f);
        if let (Some((uid, gid)), true) = (owner, path.exists()) {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
    }
    // One syncfs per filesystem instead of an fsync per file.
    for a in archives {
        let d = std::fs::File::open(&a.dest)?;
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("syncfs");
        }
    }
    Ok((
        files,
        bytes,
        lines.iter().map(|(k, v)| format!("{k} = {v}")).collect(),
    ))
}

/// When the plan's WAL ends in a partial segment: a sentence saying so and how far it reaches.
pub(crate) fn partial_end_note(p: &Plan) -> Option<String> {
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
pub(crate) async fn verify_wal(repo: &Repo, p: &Plan) -> anyhow::Result<usize> {
    let seg_size = repo.seg_size();
    for s in &p.segments {
        repo.read_wal(s.segment(seg_size), s.source)
            .await
            .with_context(|| format!("WAL segment {} of the plan", s.name))?;
    }
    for t in &p.history_files {
        repo.get_verified(&history_key(*t))
            .await
            .with_context(|| format!("the history file of timeline {t}"))?;
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

async fn dry_run(
    args: &RestoreArgs,
    repo: &Repo,
    p: &Plan,
    rec: &BackupRecord,
    target: &Target,
) -> anyhow::Result<()> {
    // Read and verify everything the restore would read.
    let (manifest_raw, _) = repo
        .get_verified(&backup_object_key(&rec.id, "backup_manifest"))
        .await?;
    let manifest = Manifest::parse(&manifest_raw).context("the backup's manifest")?;
    let algo = manifest.algorithm().unwrap_or(ChecksumAlgorithm::Crc32c);
    let mut all = FileDigests::new(algo);
    let mut verified = 1;
    for a in archives(rec, &args.pgdata, &args.tablespace_mapping)? {
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
        .context("the backup's archives do not match its manifest")?;
    let seg_size = repo.seg_size();
    verified += verify_wal(repo, p).await?;
    let backup_bytes = rec.size_bytes;
    let wal_bytes = p.segments.len() as u64 * seg_size;
    let out = DryRun {
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
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "dry run: restoring backup {} (start {}, consistent at {}) and replaying {} WAL segment(s) on timeline {} reaches {}; the archive's WAL reaches {}.",
            p.backup_id,
            rec.start_lsn,
            p.backup_stop_lsn,
            p.segments.len(),
            p.timeline,
            target.describe(),
            p.wal_end
        );
        for s in &p.segments {
            let note = match s.source {
                WalSource::Object => "",
                WalSource::PartialObject => " (partial: the archived prefix)",
                WalSource::SpoolSegment => " (complete in the local spool, not yet published)",
                WalSource::SpoolTail { .. } => {
                    " (partial: the durable prefix of the segment being received, in the local spool)"
                }
            };
            println!("  {}{note}", s.name);
        }
        if let Some(end) = partial_end_note(p) {
            println!("{end}");
        }
        println!(
            "{} objects verified; {:.1} MB to restore, about {:.0} s. Nothing was written.",
            out.objects_verified,
            out.bytes_to_restore as f64 / 1e6,
            out.estimated_seconds.ceil()
        );
    }
    Ok(())
}
