//! `archiver events`: the timeline of what happened, from the WAL index — commits per
//! interval, restore points, and each table dropped, truncated or rewritten, with its name,
//! time, transaction and WAL position.

use std::time::Duration;

use super::{report, RepoArg, EXIT_ERROR};
use crate::restore::events::{events, EventsQuery};
use crate::time::Timestamp;

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// From this time (RFC 3339; without a zone: local time).
    #[arg(long, value_parser = crate::time::parse, value_name = "TIME")]
    from: Option<Timestamp>,
    /// Up to this time.
    #[arg(long, value_parser = crate::time::parse, value_name = "TIME")]
    to: Option<Timestamp>,
    /// Only the tables of this database.
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Commits are counted per this interval.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Print the events as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: EventsArgs) -> u8 {
    let run = async {
        let repo = args.repo.open_for_reading(true).await?;
        let q = EventsQuery {
            from: args.from,
            to: args.to,
            database: args.database.clone(),
            interval: args.interval,
        };
        let r = events(&repo, &q).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return anyhow::Ok(());
        }
        println!(
            "{} commits, {} aborts ({} segments read: {} index objects, {} decoded from WAL)",
            r.commits, r.aborts, r.segments_read, r.index_objects_read, r.wal_segments_decoded
        );
        for b in &r.buckets {
            println!(
                "{}  {:>8} commits {:>6} aborts",
                crate::time::short(b.start),
                b.commits,
                b.aborts
            );
        }
        for p in &r.restore_points {
            println!("restore point {:?} at {} (WAL {})", p.name, p.time, p.end);
        }
        for e in &r.relations {
            println!("{}", e.describe());
        }
        for d in &r.databases {
            println!("{}", d.describe());
        }
        Ok(())
    };
    match run.await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}
