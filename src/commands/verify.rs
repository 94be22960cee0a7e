//! `archiver verify`: the arguments, the call into [`crate::restore::verify`], the report as
//! text or JSON, and the exit code (0 whole, 1 something damaged, missing or broken).

use super::{report, RepoArg, EXIT_ERROR};
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
        let repo = args.repo.open_for_reading(true).await?;
        let o = VerifyOptions {
            backup: args.backup.clone(),
            jobs: args.jobs as usize,
        };
        let r = verify::verify(&repo, &o).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print_report(&r);
        }
        anyhow::Ok(r.ok)
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
