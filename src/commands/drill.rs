//! `archiver drill`: the arguments, the call into [`crate::restore::drill`] and what is
//! printed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::restore::TargetArgs;
use super::{report, RepoArg, EXIT_ERROR};
use crate::restore::drill::DrillOptions;
use crate::restore::extract::Owner;

#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    repo: RepoArg,
    #[command(flatten)]
    target: TargetArgs,
    /// SQL whose statements must all succeed on the restored cluster.
    #[arg(long, value_name = "FILE")]
    check_sql: Option<PathBuf>,
    /// PostgreSQL's binaries [default: pg_ctl on PATH, else /usr/lib/postgresql/<major>/bin].
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
    /// Where the scratch directory is made [default: the temporary directory].
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// The OS user to run PostgreSQL as when archiver runs as root.
    #[arg(long, default_value = "postgres")]
    os_user: String,
    /// The database role to check with (the restored cluster's superuser).
    #[arg(long, default_value = "postgres")]
    pg_user: String,
    /// Give up when the cluster is not usable after this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: DrillArgs) -> u8 {
    match drill(args).await {
        Ok(true) => 0,
        Ok(false) => EXIT_ERROR,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

fn os_user(args: &DrillArgs) -> anyhow::Result<Owner> {
    if !crate::storage::fs::is_root() {
        return Ok(None);
    }
    match crate::storage::fs::user_ids(&args.os_user) {
        Some(ids) => Ok(Some(ids)),
        None => anyhow::bail!("--os-user: no user {:?} to run PostgreSQL as", args.os_user),
    }
}

async fn drill(args: DrillArgs) -> anyhow::Result<bool> {
    let repo = args.repo.open_for_reading(true).await?;
    let owner = os_user(&args)?;
    args.repo.check_readable_by(owner, &args.os_user)?;
    let check_sql = match &args.check_sql {
        Some(f) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        None => None,
    };
    let opts = DrillOptions {
        target: args.target.resolve(&repo).await?,
        check_sql,
        pg_bin: args.pg_bin.clone(),
        scratch: args.scratch.clone(),
        owner,
        pg_user: args.pg_user.clone(),
        timeout: args.timeout,
        repo_args: args.repo.for_restore_command()?,
    };
    let out = crate::restore::drill::drill(&repo, &opts).await?;
    let result = &out.result;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if result.passed {
        println!(
            "drill passed: backup {} restored to {} and usable in {:.1} s (restore {:.1} s, recovery {:.1} s), replay ended at {}; checks: {}",
            out.backup_id,
            result.target,
            result.seconds,
            out.restore_seconds,
            out.recovery_seconds,
            result.achieved_lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            if result.checks.is_empty() { "none".to_string() } else { result.checks.join(", ") }
        );
        for s in &result.checks_skipped {
            println!("  not checked: {s}");
        }
    }
    match &result.error {
        None => Ok(true),
        Some(e) => {
            Err(anyhow::anyhow!("{e}").context(format!("drill of backup {} failed", out.backup_id)))
        }
    }
}
