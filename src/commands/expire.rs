//! `archiver expire`: the retention policy's flags, the call into [`crate::retention`] and
//! the plan as text or JSON.

use std::time::Duration;

use super::text::{human_bytes, print_tiers_json};
use super::{report, RepoArg, EXIT_ERROR};
use crate::open::RepoLocation;
use crate::retention::{self, ExpireReport, Policy};

#[derive(clap::Args, Debug)]
pub struct ExpireArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Keep the N newest complete backups.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_last: u32,
    /// Keep the recovery window: PITR to any instant of the last DURATION (e.g. 30d) stays
    /// possible (every backup started in it, and the newest one before it).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
    /// Keep the newest backup of each of the last N hours that have one (UTC).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_hourly: u32,
    /// … of each of the last N days that have one (UTC).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_daily: u32,
    /// … of each of the last N ISO weeks that have one.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_weekly: u32,
    /// … of each of the last N months that have one.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_monthly: u32,
    /// … of each of the last N quarters that have one.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_quarterly: u32,
    /// … of each of the last N years that have one.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    keep_yearly: u32,
    /// Failed backups are removed once this old.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = humantime::parse_duration)]
    failed_grace: Duration,
    /// Print the plan; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan and what was done as JSON.
    #[arg(long)]
    json: bool,
}

impl ExpireArgs {
    fn policy(&self) -> Policy {
        Policy {
            keep_last: self.keep_last,
            keep_within: self.keep_within,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_quarterly: self.keep_quarterly,
            keep_yearly: self.keep_yearly,
            failed_grace: self.failed_grace,
        }
    }
}

pub async fn run(args: ExpireArgs) -> u8 {
    let run = async {
        let location = args.repo.location()?;
        let now = crate::time::now();
        let local = location.local_dir("expire")?;
        if let RepoLocation::Tiered { config, .. } = &location {
            let flags = Some(args.policy()).filter(|p| !p.is_empty());
            let tiers =
                retention::tier_policies(config, location.each_tier().await?, flags).await?;
            let done = retention::expire_tiers(&tiers, &local, now, args.dry_run).await?;
            if args.json {
                print_tiers_json(&done)?;
            }
            for (tier, r) in done.iter().filter(|_| !args.json) {
                println!("tier {tier}:");
                match r {
                    Some(r) => print_report(r),
                    None => println!("no retention policy: nothing expired"),
                }
            }
            return anyhow::Ok(());
        }
        let policy = args.policy();
        if policy.is_empty() {
            return Err(retention::PolicyError::Empty.into());
        }
        let repo = location.open_for_reading(true).await?;
        let done = retention::expire(&repo, &local, &policy, now, args.dry_run).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&done)?);
        } else {
            print_report(&done);
        }
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

fn print_report(r: &ExpireReport) {
    for v in &r.plan.backups {
        println!(
            "{} {:<24} {:<9} {}",
            if v.keep { "keep  " } else { "remove" },
            v.id,
            format!("{:?}", v.status).to_lowercase(),
            v.reasons.join("; ")
        );
    }
    for w in &r.plan.wal_ranges {
        println!(
            "remove WAL timeline {}: {} … {} ({} object(s), {})",
            w.timeline,
            w.first,
            w.last,
            w.objects,
            human_bytes(w.bytes)
        );
    }
    match r.plan.wal_cutoff {
        Some(cut) => println!("WAL before {cut}: {} object(s) to remove", r.plan.wal.len()),
        None => println!("WAL: nothing removed (no backup holds a start point)"),
    }
    let verb = if r.dry_run { "would free" } else { "freed" };
    println!(
        "{} backup(s), {} WAL object(s): {verb} {}{}",
        if r.dry_run {
            r.plan.removed_backups().count()
        } else {
            r.removed_backups.len()
        },
        if r.dry_run {
            r.plan.wal.len()
        } else {
            r.removed_wal_objects
        },
        human_bytes(if r.dry_run {
            r.plan.bytes_freed()
        } else {
            r.bytes_freed
        }),
        if r.dry_run {
            " (dry run: nothing removed)"
        } else {
            ""
        }
    );
    for s in &r.skipped {
        println!("skipped: {s}");
    }
}
