//! `archiver restore`: the arguments, the call into [`crate::restore::run`] and what is
//! printed. `--dry-run` builds the same plan and verifies every object it needs, writing
//! nothing.

use std::path::PathBuf;

use anyhow::Context;
use tracing::info;

use super::{report, RepoArg, EXIT_ERROR};
use crate::repo::local_wal::WalSource;
use crate::restore::recovery::TargetAction;
use crate::restore::run::{self, RestoreOptions, TargetSpec};
use crate::restore::target::{Target, TimelineChoice};
use crate::time::Timestamp;
use crate::wal::Lsn;

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("target").multiple(false)))]
pub struct TargetArgs {
    /// Recover up to this time: RFC 3339 (2026-11-23T01:30:00Z, '2026-11-23 02:30:00+01:00'); a
    /// time without a zone is the machine's local time (TZ); plans print the instant in UTC.
    #[arg(long, group = "target", value_parser = crate::time::parse, value_name = "TIME")]
    target_time: Option<Timestamp>,
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
    /// Recover to the instant just before the transaction that dropped (or truncated, or
    /// rewrote) this table — the newest such, found in the WAL index and named through the
    /// relation-name snapshots; the others are listed. A bare name means `public.NAME`.
    #[arg(long, group = "target", value_name = "SCHEMA.TABLE")]
    before_drop: Option<String>,
    /// With --before-drop: the table's database (default: any).
    #[arg(long, requires = "before_drop", value_name = "NAME")]
    database: Option<String>,
    /// Recover to the instant just before the transaction that dropped this database (the
    /// newest such drop).
    #[arg(long, group = "target", value_name = "NAME")]
    before_drop_database: Option<String>,
    /// Recover to just before the end of this transaction (--target-xid XID --exclusive).
    #[arg(long, group = "target", value_name = "XID")]
    before_xid: Option<u64>,
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
    /// The library's view of these arguments (`--before-drop` is looked up in `repo`'s WAL
    /// index, and what was chosen is printed on stderr).
    pub async fn resolve(&self, repo: &crate::repo::Repo) -> anyhow::Result<TargetSpec> {
        let mut spec = TargetSpec {
            target: self.target(),
            timeline: self.target_timeline,
            action: self.target_action,
            exclusive: self.exclusive || self.before_xid.is_some(),
            backup: self.backup.clone(),
        };
        if let Some(table) = &self.before_drop {
            let drops = crate::restore::events::all_drops(repo, self.database.as_deref()).await?;
            let Some((chosen, others)) =
                crate::restore::events::pick_drop(&drops.tables, table, self.database.as_deref())
            else {
                anyhow::bail!(
                    "no drop, truncate or rewrite of {table}{} is in the archived WAL's index (archiver events lists what is; WAL archived before the index needs archiver reindex)",
                    self.database
                        .as_ref()
                        .map(|d| format!(" in database {d}"))
                        .unwrap_or_default()
                );
            };
            let others: Vec<String> = others.iter().map(|o| o.describe()).collect();
            spec.target = before(table, chosen.describe(), chosen.xid, &others);
            spec.exclusive = true;
        }
        if let Some(name) = &self.before_drop_database {
            let drops = crate::restore::events::all_drops(repo, None).await?;
            let mut hits: Vec<_> = drops
                .databases
                .iter()
                .filter(|d| d.database.as_deref() == Some(name.as_str()))
                .collect();
            hits.sort_by_key(|d| d.start);
            let Some(chosen) = hits.pop() else {
                anyhow::bail!(
                    "no DROP DATABASE {name} is in the archived WAL's index (archiver events lists what is)"
                );
            };
            let others: Vec<String> = hits.iter().map(|o| o.describe()).collect();
            spec.target = before(name, chosen.describe(), chosen.xid, &others);
            spec.exclusive = true;
            // DROP DATABASE first marks the database invalid (an in-place, non-transactional
            // update): stop before that, or the database comes back unusable.
            match chosen.invalidated {
                Some(lsn) => {
                    eprintln!("  (before {lsn}, where the drop first marked the database invalid: recovery_target_lsn = '{lsn}', recovery_target_inclusive = off)");
                    spec.target = Target::Lsn(lsn);
                }
                None => eprintln!(
                    "  warning: where the drop marked the database invalid is not in the index; it may come back invalid (connections refused), though its files are there"
                ),
            }
        }
        Ok(spec)
    }

    pub fn target(&self) -> Target {
        if let Some(t) = self.target_time {
            Target::Time(t)
        } else if let Some(l) = self.target_lsn {
            Target::Lsn(l)
        } else if let Some(x) = self.target_xid.or(self.before_xid) {
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

/// The target just before transaction `xid` (what `--before-drop*` chose), said on stderr.
fn before(what: &str, chosen: String, xid: u32, others: &[String]) -> Target {
    eprintln!(
        "--before-drop {what}: recovering to just before {chosen} (recovery_target_xid = {xid}, recovery_target_inclusive = off)"
    );
    for o in others {
        eprintln!("  earlier: {o}");
    }
    Target::Xid(xid as u64)
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
    /// The PostgreSQL binaries that will start the restored directory: refused, before
    /// anything is written, when they are of another major version than the backup.
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
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

async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let repo = args.repo.open_for_reading(true).await?;
    let spec = args.target.resolve(&repo).await?;
    let (p, rec) = run::make_plan(&repo, &spec).await?;
    info!(backup = %p.backup_id, timeline = p.timeline, segments = p.segments.len(), wal_end = %p.wal_end, "plan: {}", spec.target.describe());
    if let Some(note) = run::partial_end_note(&p) {
        info!("{note}");
    }
    // Bad input changes nothing: every check before the first write.
    let pgdata = std::path::absolute(&args.pgdata).context("--pgdata")?;
    run::check_destinations(&rec, &pgdata, &args.tablespace_mapping)?;
    let major = rec.pg_version / 10000;
    if let Some(bin) = &args.pg_bin {
        crate::restore::binaries::check_binaries(bin, major).map_err(anyhow::Error::msg)?;
    }
    let owner = run::restore_owner(args.owner.as_deref(), &args.pgdata)?;
    args.repo.check_readable_by(
        owner,
        &args
            .owner
            .clone()
            .unwrap_or_else(|| "the data directory's owner".into()),
    )?;
    if args.dry_run {
        let d = run::dry_run(
            &repo,
            p,
            &rec,
            &spec.target,
            &args.pgdata,
            &args.tablespace_mapping,
        )
        .await?;
        print_dry_run(&d, &rec, args.json)?;
        return Ok(());
    }
    let opts = RestoreOptions {
        pgdata,
        target: spec,
        tablespace_mapping: args.tablespace_mapping.clone(),
        owner,
        verify_wal: args.verify_wal,
        repo_args: args.repo.for_restore_command()?,
    };
    let done = run::restore(&repo, &p, &rec, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!(
            "restored backup {} into {} ({} files, {:.1} MB in {:.1} s, every file checked against the backup manifest); recovery will replay {} WAL segment(s) to {} ({}). Start it with PostgreSQL {major}'s binaries: {} -D {} start",
            done.backup_id,
            done.pgdata.display(),
            done.files,
            done.bytes_written as f64 / 1e6,
            done.seconds,
            done.segments,
            done.target,
            if args.verify_wal {
                "each read and verified before writing"
            } else {
                "each present in the archive; verified as recovery fetches it, or before writing with --verify-wal"
            },
            args.pg_bin
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")))
                .join("pg_ctl")
                .display(),
            done.pgdata.display()
        );
    }
    Ok(())
}

/// The transactions on either side of the target, as the WAL index found them.
pub(crate) fn print_located(l: &crate::restore::locate::Located) {
    let x = |x: &Option<crate::wal::index::XactRef>| match x {
        Some(x) => format!(
            "transaction {} {} at {} (WAL {})",
            x.xid,
            if x.committed { "committed" } else { "aborted" },
            x.time,
            x.end
        ),
        None => "none in the archive".to_string(),
    };
    if let Some(rp) = &l.restore_point {
        println!(
            "restore point {:?} made at {} (WAL {})",
            rp.name, rp.time, rp.end
        );
    }
    println!("last applied:      {}", x(&l.last_applied));
    println!("first not applied: {}", x(&l.first_not_applied));
    println!(
        "(found in {:.3} s: {} index object(s) read, {} WAL segment(s) decoded)",
        l.search_seconds, l.index_objects_read, l.wal_segments_decoded
    );
}

fn print_dry_run(
    d: &run::DryRun,
    rec: &crate::repo::catalog::BackupRecord,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(d)?);
        return Ok(());
    }
    let p = &d.plan;
    println!(
        "dry run: restoring backup {} (start {}, consistent at {}) and replaying {} WAL segment(s) on timeline {} reaches {}; the archive's WAL reaches {}.",
        p.backup_id,
        rec.start_lsn,
        p.backup_stop_lsn,
        p.segments.len(),
        p.timeline,
        d.target,
        p.wal_end
    );
    if d.chain.len() > 1 {
        println!(
            "chain (every link read and checked against its own manifest): {}",
            d.chain
                .iter()
                .map(|l| format!("{} ({})", l.id, l.kind))
                .collect::<Vec<_>>()
                .join(" ← ")
        );
    }
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
    if let Some(end) = run::partial_end_note(p) {
        println!("{end}");
    }
    if let Some(l) = &p.located {
        print_located(l);
    }
    println!(
        "{} objects verified; {:.1} MB to restore, about {:.0} s. Nothing was written.",
        d.objects_verified,
        d.bytes_to_restore as f64 / 1e6,
        d.estimated_seconds.ceil()
    );
    Ok(())
}
