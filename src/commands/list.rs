//! `archiver list` and `archiver info`: the backup catalog, as a table or JSON.

use super::{report, RepoArg, EXIT_ERROR};
use crate::repo::catalog::BackupRecord;
use crate::repo::gaps::{Gap, SlotRecord};
use crate::repo::Repo;
use crate::restore::plan::{recovery_windows, Window};

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Print a JSON array of the backup records, oldest first.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// The backup id (as `archiver list` shows it); without it, the repository: its cluster,
    /// the gaps in its WAL and the recovery windows between them.
    id: Option<String>,
    /// Print the record as JSON.
    #[arg(long)]
    json: bool,
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The readable table `list` prints.
pub fn table(records: &[BackupRecord]) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "STATUS".into(),
        "LABEL".into(),
        "TLI".into(),
        "START LSN".into(),
        "STOP LSN".into(),
        "START TIME".into(),
        "SIZE".into(),
        "STORED".into(),
        "LAST DRILL".into(),
    ]];
    for r in records {
        rows.push([
            r.id.clone(),
            serde_json::to_value(r.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            r.label.clone(),
            r.timeline.to_string(),
            r.start_lsn.to_string(),
            r.stop_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            crate::time::short(r.start_time),
            human_bytes(r.size_bytes),
            human_bytes(r.stored_bytes),
            r.drills.last().map_or_else(
                || "-".to_string(),
                |d| {
                    format!(
                        "{} {} ({:.1} s)",
                        if d.passed { "passed" } else { "FAILED" },
                        d.at,
                        d.seconds
                    )
                },
            ),
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn list(args: ListArgs) -> u8 {
    let run = async {
        let repo = Repo::open(args.repo.storage_checked().await?, &args.repo.name()).await?;
        let records = repo.list_backups().await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&records)?);
        } else if records.is_empty() {
            println!("no backups in {}", args.repo.name());
        } else {
            println!("{}", table(&records));
        }
        if !args.json {
            let gaps = repo.list_gaps().await?;
            if !gaps.is_empty() {
                println!();
                print!("{}", gaps_text(&records, &gaps));
            }
        }
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

/// The gaps in the WAL and the recovery windows around them, one per line.
fn gaps_text(records: &[BackupRecord], gaps: &[Gap]) -> String {
    let mut out = String::new();
    for g in gaps {
        out.push_str(&format!("gap:               {}\n", g.describe()));
    }
    for (i, w) in recovery_windows(records, gaps).iter().enumerate() {
        out.push_str(&format!("recovery window {}: {}\n", i + 1, w.describe()));
    }
    out
}

/// What `info` without an id shows.
#[derive(serde::Serialize)]
struct RepoInfo<'a> {
    repository: &'a str,
    system_identifier: &'a str,
    pg_version: u32,
    wal_segment_size: u64,
    created_at: crate::time::Timestamp,
    backups: usize,
    complete_backups: usize,
    /// Holes in the WAL accepted with `stream --accept-gap`; no restore crosses one.
    gaps: Vec<Gap>,
    /// The stretches a restore can reach, oldest first (one more than there are gaps).
    recovery_windows: Vec<Window>,
    /// The replication slots archiver created for this repository.
    replication_slots: Vec<SlotRecord>,
}

async fn repo_info(repo: &Repo, json: bool) -> anyhow::Result<()> {
    let records = repo.list_backups().await?;
    let gaps = repo.list_gaps().await?;
    let meta = repo.meta();
    let info = RepoInfo {
        repository: repo.name(),
        system_identifier: &meta.system_identifier,
        pg_version: meta.pg_version_num,
        wal_segment_size: meta.wal_segment_size,
        created_at: meta.created_at,
        backups: records.len(),
        complete_backups: records
            .iter()
            .filter(|r| r.status == crate::repo::catalog::BackupStatus::Complete)
            .count(),
        recovery_windows: recovery_windows(&records, &gaps),
        gaps,
        replication_slots: repo.list_slots().await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("repository:        {}", info.repository);
    println!("system identifier: {}", info.system_identifier);
    println!("pg version:        {}", info.pg_version);
    println!("created at:        {}", info.created_at);
    println!(
        "backups:           {} ({} complete)",
        info.backups, info.complete_backups
    );
    for s in &info.replication_slots {
        println!("replication slot:  {} (created {})", s.name, s.created_at);
    }
    if info.gaps.is_empty() {
        println!("gaps:              none");
        for w in &info.recovery_windows {
            println!("recovery window:   {}", w.describe());
        }
    } else {
        print!("{}", gaps_text(&records, &info.gaps));
    }
    Ok(())
}

pub async fn info(args: InfoArgs) -> u8 {
    let run = async {
        let repo = Repo::open(args.repo.storage_checked().await?, &args.repo.name()).await?;
        let Some(id) = &args.id else {
            return repo_info(&repo, args.json).await;
        };
        let r = repo.get_backup(id).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!("{}", table(std::slice::from_ref(&r)));
            println!();
            println!(
                "stop time:         {}",
                r.stop_time.map_or_else(|| "-".into(), |t| t.to_string())
            );
            println!("system identifier: {}", r.system_identifier);
            println!("pg version:        {}", r.pg_version);
            println!("archiver version:  {}", r.archiver_version);
            for t in &r.tablespaces {
                println!("tablespace:        {} at {}", t.oid, t.location);
            }
            for o in &r.objects {
                println!(
                    "object:            {} ({} → {}, sha256 {})",
                    o.key,
                    human_bytes(o.size_bytes),
                    human_bytes(o.stored_bytes),
                    o.sha256
                );
            }
            if let Some(e) = &r.error {
                println!("error:             {e}");
            }
            if let Some(l) = &r.backup_label {
                println!("backup_label:\n{l}");
            }
        }
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(3 << 30), "3.0 GB");
    }
}
