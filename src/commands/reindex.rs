//! `archiver reindex`: builds the WAL index (`wal::index`) of every archived segment that has
//! none — WAL archived before the index existed, or by `stream --no-index` — or of every one
//! (`--force`). A tiered repository is indexed tier by tier, each from its own WAL.

use super::text::print_tiers_json;
use super::{report, RepoArg, EXIT_ERROR};
use crate::progress::Progress;
use crate::repo::wal_index::ReindexReport;
use crate::repo::Repo;

#[derive(clap::Args, Debug)]
pub struct ReindexArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Rebuild every segment's index, not only the missing ones.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ReindexArgs) -> u8 {
    let run = async {
        let location = args.repo.location()?;
        let mut reports: Vec<(String, ReindexReport)> = Vec::new();
        for (name, storage) in location.each_tier().await? {
            let repo = Repo::open(storage, &name).await?;
            let mut progress = Progress::new("reindex");
            reports.push((name, repo.reindex(args.force, &mut progress).await?));
        }
        if args.json && reports.len() == 1 {
            println!("{}", serde_json::to_string_pretty(&reports[0].1)?);
        } else if args.json {
            print_tiers_json(&reports)?;
        } else {
            for (tier, r) in &reports {
                println!(
                    "{tier}: {} segments indexed ({} already were), {} commits, {} restore points",
                    r.indexed, r.skipped_indexed, r.commits, r.restore_points
                );
                for u in &r.unreadable {
                    println!("{tier}: NOT INDEXED: {u}");
                }
            }
        }
        anyhow::Ok(reports.iter().all(|(_, r)| r.unreadable.is_empty()))
    };
    match run.await {
        Ok(true) => 0,
        Ok(false) => EXIT_ERROR,
        Err(e) => report(&e, EXIT_ERROR),
    }
}
