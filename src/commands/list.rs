//! `archiver list` and `archiver info`: the backup catalog, as a table or JSON.

use super::text::{gaps_text, human_bytes, table};
use super::{report, RepoArg, EXIT_ERROR};
use crate::repo::Repo;
use crate::restore::info::repo_info;

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

async fn print_repo_info(repo: &Repo, json: bool) -> anyhow::Result<()> {
    let info = repo_info(repo).await?;
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
        print!("{}", gaps_text(&repo.list_backups().await?, &info.gaps));
    }
    Ok(())
}

pub async fn info(args: InfoArgs) -> u8 {
    let run = async {
        let repo = Repo::open(args.repo.storage_checked().await?, &args.repo.name()).await?;
        let Some(id) = &args.id else {
            return print_repo_info(&repo, args.json).await;
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
            match &r.parent {
                Some(p) => println!("type:              incremental, on top of {p}"),
                None => println!("type:              full"),
            }
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
            if let Some(env) = &r.environment {
                println!("environment:       {env}");
            }
            if let Some(c) = &r.contents {
                println!("server:            {}", c.server_version);
                for d in &c.databases {
                    let exts: Vec<String> = d
                        .extensions
                        .iter()
                        .map(|e| format!("{} {}", e.name, e.version))
                        .collect();
                    println!(
                        "database:          {} ({}, {} tables, ~{} rows; extensions: {})",
                        d.name,
                        human_bytes(d.size_bytes),
                        d.tables,
                        d.estimated_rows,
                        if exts.is_empty() {
                            "none".into()
                        } else {
                            exts.join(", ")
                        }
                    );
                }
            }
            if let Some(v) = &r.verified {
                let verdict = if v.ok { "ok" } else { "FAILED" };
                println!("verified:          {verdict} at {}", v.at);
                for p in &v.problems {
                    println!("  problem:         {p}");
                }
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
