//! `archiver verify`: the arguments, the call into [`crate::restore::verify`] (once for the
//! repository, and for a tiered one once more per remote tier), the report as text or JSON, and
//! the exit code (0 whole, 1 something damaged, missing or broken).

use super::text::print_tiers_json;
use super::{report, RepoArg, EXIT_ERROR};
use crate::open::RepoLocation;
use crate::repo::Repo;
use crate::restore::verify::{self, describe_hole, VerifyOptions, VerifyReport};

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Only this backup, and the WAL from its start to the archive's head.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Objects read back at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: VerifyArgs) -> u8 {
    let run = async {
        let location = args.repo.location()?;
        let o = VerifyOptions {
            backup: args.backup.clone(),
            jobs: args.jobs as usize,
        };
        // Every object as reads see it (a tiered repository: the hot tier, else the remote
        // ones), then, for a tiered repository, each remote tier on its own.
        let mut reports = vec![(
            "repository".to_string(),
            verify::verify(&location.open_for_reading(true).await?, &o).await?,
        )];
        if matches!(location, RepoLocation::Tiered { .. }) {
            for (name, storage) in location.each_tier().await?.into_iter().skip(1) {
                let repo = Repo::open(storage, &name).await?;
                reports.push((name, verify::verify(&repo, &o).await?));
            }
        }
        if args.json && reports.len() == 1 {
            println!("{}", serde_json::to_string_pretty(&reports[0].1)?);
        } else if args.json {
            print_tiers_json(&reports)?;
        } else {
            for (tier, r) in &reports {
                if reports.len() > 1 {
                    println!("{tier}:");
                }
                print_report(r);
            }
        }
        anyhow::Ok(reports.iter().all(|(_, r)| r.ok))
    };
    match run.await {
        Ok(true) => 0,
        Ok(false) => EXIT_ERROR,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

fn print_report(r: &VerifyReport) {
    for b in &r.backups {
        if b.ok {
            println!("backup {}: ok", b.id);
        }
        for p in &b.problems {
            println!("backup {}: FAILED: {p}", b.id);
        }
    }
    for d in &r.damaged {
        println!("damaged: {}: {}", d.key, d.problem);
    }
    for h in &r.wal_holes {
        println!("missing: {}", describe_hole(h));
    }
    for p in &r.wal_problems {
        println!("WAL: {p}");
    }
    println!(
        "{}: {} objects, {:.1} MB read back in {:.1} s",
        if r.ok { "ok" } else { "FAILED" },
        r.objects_checked,
        r.bytes_checked as f64 / 1e6,
        r.seconds
    );
}
