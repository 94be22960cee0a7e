//! `archiver stream`: continuous WAL streaming into a repository.

use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::info;

use super::{connect_replication, report, RepoArg, EXIT_ERROR, EXIT_WAL_GONE};
use crate::pg::conninfo::{ConnInfo, ProcessEnv};
use crate::pg::replication::validate_slot_name;
use crate::repo::lock::RepoLock;
use crate::repo::{Repo, SPOOL_DIR};
use crate::retry::RetryPolicy;
use crate::stream::spool::Spool;
use crate::stream::{StreamConfig, StreamError};

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Connection string: a postgresql:// URI or key=value pairs; PG* environment variables and
    /// ~/.pgpass apply as in libpq.
    #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
    dbname: Option<String>,
    /// Physical replication slot to use (created if missing).
    #[arg(long, default_value = "archiver")]
    slot: String,
    /// fsync every received batch before acknowledging it, for use as a synchronous standby
    /// (synchronous_standby_names = 'archiver' gives RPO 0).
    #[arg(long)]
    synchronous: bool,
    /// application_name reported to the server [default: the conninfo's, else archiver].
    #[arg(long)]
    application_name: Option<String>,
    /// Without --synchronous, fsync at least this often (and at every segment end).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    fsync_interval: Duration,
    /// Send a status update to the server at least this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    status_interval: Duration,
    /// Log a progress line this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    progress_interval: Duration,
    /// zstd level for archived segments.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    compress_level: i32,
    /// After a lost connection, keep reconnecting for this long before giving up.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    reconnect_timeout: Duration,
}

pub async fn run(args: StreamArgs) -> u8 {
    match stream(args).await {
        Ok(()) => 0,
        Err(e) => {
            let code = match e.downcast_ref::<StreamError>() {
                Some(StreamError::WalGone(_)) => EXIT_WAL_GONE,
                _ => EXIT_ERROR,
            };
            report(&e, code)
        }
    }
}

async fn stream(args: StreamArgs) -> anyhow::Result<()> {
    args.repo.local_dir("stream")?;
    validate_slot_name(&args.slot).map_err(anyhow::Error::msg)?;
    let conninfo = ConnInfo::parse(args.dbname.as_deref(), &ProcessEnv)?;
    let storage = args.repo.storage().await?;
    let application_name = args
        .application_name
        .clone()
        .or_else(|| conninfo.application_name.clone())
        .unwrap_or_else(|| "archiver".to_string());

    info!(server = %conninfo.display_target(), repo = %args.repo.name(), "connecting");
    let (conn, server) = connect_replication(&conninfo, &application_name).await?;
    info!(
        system_identifier = server.system.system_identifier,
        timeline = server.system.timeline,
        xlogpos = %server.system.xlogpos,
        version = server.version_num,
        wal_segment_size = server.wal_segment_size,
        "connected"
    );
    if server.major() < 15 {
        anyhow::bail!(
            "PostgreSQL {} is not supported yet by `archiver stream` (needs 15 or newer)",
            server.major()
        );
    }

    let repo = Repo::open_or_init(storage, &args.repo.name(), &server)
        .await
        .with_context(|| format!("cannot use repository {}", args.repo.name()))?;
    let spool_dir = args.repo.local_dir("stream")?.join(SPOOL_DIR);
    let spool = Spool::open(&spool_dir, repo.seg_size())
        .with_context(|| format!("cannot create the spool directory {}", spool_dir.display()))?;
    let _lock = RepoLock::acquire(&spool_dir.join("stream.lock"))?;

    let (tx, rx) = watch::channel(false);
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => info!("SIGINT received; stopping"),
            _ = term.recv() => info!("SIGTERM received; stopping"),
        }
        let _ = tx.send(true);
        // Keep the sender alive: the receivers must see the request, not a closed channel.
        std::future::pending::<()>().await;
    });

    let cfg = StreamConfig {
        slot: args.slot.clone(),
        application_name,
        synchronous: args.synchronous,
        fsync_interval: args.fsync_interval,
        status_interval: args.status_interval,
        progress_interval: args.progress_interval,
        compress_level: args.compress_level,
        retry: RetryPolicy {
            give_up_after: args.reconnect_timeout,
            ..RetryPolicy::default()
        },
    };
    // On a runtime worker (not the block_on thread) the task is polled by the thread that
    // drives the I/O reactor, saving a thread hop on every WAL batch: lower commit latency as a
    // synchronous standby.
    tokio::spawn(crate::stream::run(
        conn, server, repo, spool, conninfo, cfg, rx,
    ))
    .await
    .context("the streaming task panicked")??;
    info!("stream stopped cleanly");
    Ok(())
}
