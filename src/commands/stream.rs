//! `archiver stream`: continuous WAL streaming into a repository.

use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::info;

use super::{connect_replication, report, RepoArg, EXIT_ERROR, EXIT_WAL_GONE};
use crate::config::UploadConfig;
use crate::pg::conninfo::{ConnInfo, ProcessEnv};
use crate::pg::replication::validate_slot_name;
use crate::repo::lock::RepoLock;
use crate::repo::{Repo, SPOOL_DIR};
use crate::retry::RetryPolicy;
use crate::spool::Spool;
use crate::storage::tiered::RemoteTier;
use crate::stream::{StreamConfig, StreamError};
use crate::upload::tasks::{TierPlan, TierTasks};

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
    /// zstd level for archived segments: 1 to 19, or a fast level, -1 to -7 (less CPU, larger
    /// objects).
    #[arg(
        long,
        default_value_t = 1,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(-7..=19)
    )]
    compress_level: i32,
    /// With --repo s3://…: ship the segment being received this often (the offsite RPO; a
    /// tiered repository sets it in its configuration file).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    partial_upload_interval: Duration,
    /// After a lost connection, keep reconnecting for this long before giving up.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    reconnect_timeout: Duration,
    /// When the WAL this repository needs next is gone from the server (dropped slot, recycled
    /// WAL): record the gap in the catalog and continue from the oldest WAL the server still
    /// has, instead of exiting 3. Restores stay on either side of the gap; take a base backup
    /// at once afterwards.
    #[arg(long)]
    accept_gap: bool,
    /// Do not index the WAL's records (commit times, restore points, dropped relations) as
    /// segments are archived; restores then read the WAL to find their targets.
    #[arg(long)]
    no_index: bool,
}

/// SQLSTATE `55006` (object_in_use): "replication slot … is active for PID …".
const SQLSTATE_OBJECT_IN_USE: &str = "55006";

pub async fn run(args: StreamArgs) -> u8 {
    let slot = args.slot.clone();
    match stream(args).await {
        Ok(()) => 0,
        Err(e) => {
            let in_use = e.chain().any(|c| {
                c.downcast_ref::<crate::pg::PgError>()
                    .or_else(|| match c.downcast_ref::<StreamError>() {
                        Some(StreamError::Pg(p)) => Some(p),
                        _ => None,
                    })
                    .is_some_and(|p| p.sqlstate() == Some(SQLSTATE_OBJECT_IN_USE))
            });
            let e = if in_use {
                e.context(format!(
                    "replication slot \"{slot}\" is in use by another process (another `archiver stream`, or a standby): stop it, or give this stream a slot of its own with --slot NAME"
                ))
            } else {
                e
            };
            let code = match e.downcast_ref::<StreamError>() {
                Some(StreamError::WalGone(_)) => EXIT_WAL_GONE,
                _ => EXIT_ERROR,
            };
            report(&e, code)
        }
    }
}

async fn stream(args: StreamArgs) -> anyhow::Result<()> {
    let local = args.repo.local_dir("stream")?;
    if args.partial_upload_interval < Duration::from_millis(100) {
        anyhow::bail!("--partial-upload-interval must be at least 100ms");
    }
    validate_slot_name(&args.slot).map_err(anyhow::Error::msg)?;
    let conninfo = ConnInfo::parse(args.dbname.as_deref(), &ProcessEnv)?;
    let (storage, tiers) = args.repo.storage_for_writing().await?;
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
    server.check_supported().map_err(anyhow::Error::msg)?;

    let repo = Repo::open_or_init(storage, &args.repo.name(), &server)
        .await
        .with_context(|| format!("cannot use repository {}", args.repo.name()))?;
    let spool_dir = local.join(SPOOL_DIR);
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
        flushed: None,
        status: None,
        accept_gap: args.accept_gap,
        index: !args.no_index,
    };
    let mut cfg = cfg;
    // Straight into S3 there is no hot tier to ship from, but the segment being received is
    // still shipped as it grows: the same offsite RPO.
    let plan = match (tiers, args.repo.s3_url()) {
        (Some(t), _) => Some(t.plan()),
        (None, Some(url)) => {
            let remotes = vec![RemoteTier {
                name: "s3".into(),
                url: url.to_string(),
                storage: repo.storage().clone(),
            }];
            Some(TierPlan {
                queue: crate::upload::Queue::new(&remotes),
                hot: None,
                remotes,
                upload: UploadConfig {
                    partial_upload_interval: args.partial_upload_interval,
                    ..UploadConfig::default()
                },
                retention: None,
            })
        }
        (None, None) => None,
    };
    let background = plan.map(|p| {
        p.queue.set_seg_size(repo.seg_size());
        let (flushed_tx, flushed_rx) = watch::channel(None);
        cfg.flushed = Some(std::sync::Arc::new(flushed_tx));
        TierTasks::start(p, spool.clone(), flushed_rx, args.compress_level)
    });
    let result =
        crate::stream::run_where_cheapest(conn, server, repo, spool, conninfo, cfg, rx).await;
    if let Some(b) = background {
        b.shutdown(SHUTDOWN_DRAIN).await;
    }
    result?;
    info!("stream stopped cleanly");
    Ok(())
}

/// On a clean stop, how long the uploader may finish what is queued (the rest is shipped by
/// the next start's reconciliation).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(15);
