//! `archiver run`: the sidecar daemon ([`crate::daemon`]); signals become its controls.

use std::path::PathBuf;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tracing::info;

use super::{report, EXIT_ERROR};
use crate::config::Config;
use crate::open::RepoLocation;
use crate::pg::conninfo::{ConnInfo, ProcessEnv};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The configuration file: the repository's tiers and [server], [schedule], [http],
    /// [alerts], [[notify]] (see docs/operations.md).
    #[arg(long, value_name = "FILE", env = "ARCHIVER_CONFIG")]
    config: PathBuf,
    /// Connection string of the server to archive [default: [server] conninfo, then PG*
    /// environment variables].
    #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
    dbname: Option<String>,
}

pub async fn run(args: RunArgs) -> u8 {
    match daemon(args).await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

async fn daemon(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let conninfo = {
        let from_file = config
            .server
            .conninfo
            .as_ref()
            .map(|s| s.expose().to_string());
        ConnInfo::parse(args.dbname.as_deref().or(from_file.as_deref()), &ProcessEnv)
            .context("the server's connection string")?
    };
    let location = RepoLocation::Tiered {
        file: args.config.clone(),
        config: Box::new(config),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => { info!("SIGINT received; stopping"); break; }
                _ = term.recv() => { info!("SIGTERM received; stopping"); break; }
                _ = hup.recv() => {
                    info!("SIGHUP received; reloading the configuration");
                    let _ = reload_tx.try_send(());
                }
            }
        }
        let _ = stop_tx.send(true);
        // Keep the sender alive: the receivers must see the request, not a closed channel.
        std::future::pending::<()>().await;
    });
    crate::daemon::run(
        location,
        conninfo,
        crate::daemon::Control {
            shutdown: stop_rx,
            reload: reload_rx,
        },
    )
    .await?;
    Ok(())
}
