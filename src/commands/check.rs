//! `archiver check`: the pre-flight checks, one line each (ok / warning / failed, the value
//! found and what is needed), or JSON; exit 0 when nothing failed, 1 otherwise.

use super::{report, RepoArg, EXIT_ERROR};
use crate::check::{self, Status};
use crate::pg::conninfo::{ConnInfo, ProcessEnv};

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Connection string (as for `stream`).
    #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
    dbname: Option<String>,
    /// The replication slot `stream` uses.
    #[arg(long, default_value = "archiver")]
    slot: String,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: CheckArgs) -> u8 {
    let run = async {
        let ci = ConnInfo::parse(args.dbname.as_deref(), &ProcessEnv)?;
        let location = args.repo.location()?;
        let checks = check::run(&ci, &location, &args.slot).await;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&checks)?);
        } else {
            for c in &checks {
                let s = match c.status {
                    Status::Ok => "ok     ",
                    Status::Warning => "warning",
                    Status::Failed => "FAILED ",
                };
                println!("{s} {:<24} {} (needed: {})", c.name, c.found, c.needed);
            }
        }
        anyhow::Ok(checks.iter().all(|c| c.status != Status::Failed))
    };
    match run.await {
        Ok(true) => 0,
        Ok(false) => EXIT_ERROR,
        Err(e) => report(&e, EXIT_ERROR),
    }
}
