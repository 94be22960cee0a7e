//! `archiver backup`: the arguments, the connection, the call into
//! [`crate::basebackup::lifecycle`] (a full or incremental base backup recorded in the catalog), the upload to
//! a tiered repository's remote tiers, and what is printed.

use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use super::{connect_replication, report, RepoArg, EXIT_ERROR};
use crate::basebackup::lifecycle::{
    check_server, check_space, take_backup, BackupOptions, Incremental,
};
use crate::basebackup::protocol::Checkpoint;
use crate::pg::conninfo::{ConnInfo, ProcessEnv};
use crate::repo::{Repo, SPOOL_DIR};
use crate::upload::{UploadSettings, Uploader};

#[derive(Copy, Clone, Debug, ValueEnum)]
enum CheckpointArg {
    Fast,
    Spread,
}

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Connection string (as for `stream`).
    #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
    dbname: Option<String>,
    /// Backup label [default: archiver backup <id>].
    #[arg(long)]
    label: Option<String>,
    /// Checkpoint the server starts the backup with.
    #[arg(long, value_enum, default_value_t = CheckpointArg::Spread)]
    checkpoint: CheckpointArg,
    /// Limit the server's send rate, in kB/s (32 to 1048576).
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=1_048_576))]
    max_rate: Option<u32>,
    /// zstd level for the stored archives. 1 (the default) is the fastest, as for the WAL; 3
    /// (pg_basebackup's and pgBackRest's default) or more store a little less for more CPU
    /// time (docs/operations.md, "Compression").
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    compress: i32,
    /// Have the server compress the archives with zstd (at `--compress`'s level) and store its
    /// output as it comes: less network traffic, the compression on the server's CPUs. archiver
    /// still decompresses on the side to check every file against the manifest.
    #[arg(long)]
    server_compress: bool,
    /// With --server-compress: zstd worker threads on the server (0: the walsender compresses
    /// itself, between reads). A server whose zstd has no thread support needs 0.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    server_compress_workers: u32,
    /// How long to wait for the repository to hold the backup's WAL.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    wal_timeout: Duration,
    /// With a tiered repository: how long to wait, once the backup is complete, for every
    /// remote tier to hold it.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    upload_timeout: Duration,
    /// A label for where this cluster runs (e.g. prod), kept in the backup's record [default:
    /// `environment` in the --config file].
    #[arg(long)]
    environment: Option<String>,
    /// Skip the check that the repository's file system has at least the databases' size
    /// free (for file systems whose free space says nothing, e.g. with quotas elsewhere).
    #[arg(long)]
    skip_space_check: bool,
    /// An incremental backup (PostgreSQL 17+, `summarize_wal = on`): only the blocks changed
    /// since its parent, which restores then combine with. The parent is the newest complete
    /// backup of the cluster's timeline unless `--from` names one.
    #[arg(long)]
    incremental: bool,
    /// The backup an incremental backup builds on (full or incremental).
    #[arg(long, value_name = "ID", requires = "incremental")]
    from: Option<String>,
    /// Print the backup's record as JSON instead of its id.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BackupArgs) -> u8 {
    match backup(args).await {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let local = args.repo.local_dir("backup")?;
    let conninfo = ConnInfo::parse(args.dbname.as_deref(), &ProcessEnv)?;
    let (storage, tiers) = args.repo.storage_for_writing().await?;
    let config_environment = tiers.as_ref().and_then(|t| t.config.environment.clone());
    let app = conninfo
        .application_name
        .clone()
        .unwrap_or_else(|| "archiver backup".into());
    let (mut conn, server) = connect_replication(&conninfo, &app).await?;
    let opts = BackupOptions {
        label: args.label.clone(),
        checkpoint: match args.checkpoint {
            CheckpointArg::Fast => Checkpoint::Fast,
            CheckpointArg::Spread => Checkpoint::Spread,
        },
        max_rate_kb: args.max_rate,
        compress: args.compress,
        server_compress: args.server_compress,
        server_workers: args.server_compress_workers,
        wal_timeout: args.wal_timeout,
        sql: Some(conninfo.clone()),
        environment: args.environment.clone().or(config_environment),
        incremental: args.incremental.then(|| match &args.from {
            Some(id) => Incremental::From(id.clone()),
            None => Incremental::Newest,
        }),
    };
    check_server(&server, &opts)?;
    // An S3 repository keeps only its spool locally.
    let data_dir = args.repo.s3_url().is_none().then_some(local.as_path());
    if !args.skip_space_check {
        check_space(&conninfo, data_dir).await?;
    }
    // An incremental backup builds on what the repository holds: it never initialises one.
    let repo = if args.incremental {
        Repo::open(storage, &args.repo.name()).await.and_then(|r| {
            Repo::check_compatible(r.meta(), &server)?;
            Ok(r)
        })
    } else {
        Repo::open_or_init(storage, &args.repo.name(), &server).await
    }
    .with_context(|| format!("cannot use repository {}", args.repo.name()))?;

    // A tiered repository: this backup's objects are shipped to the remote tiers as they are
    // written, and the backup returns once every tier holds them.
    let uploader = tiers.map(|t| {
        t.queue.set_seg_size(repo.seg_size());
        Uploader::start(
            t.queue,
            t.hot,
            t.remotes,
            UploadSettings {
                concurrency: t.config.upload.concurrency,
                max_rate: t.config.upload.max_rate,
                reconcile: false,
            },
        )
    });
    // SIGINT/SIGTERM: the backup stops and is recorded failed ("interrupted") before the
    // process exits, not left `running` until the next backup notices.
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let interrupted = async {
        tokio::select! {
            _ = int.recv() => "interrupted by SIGINT".to_string(),
            _ = term.recv() => "interrupted by SIGTERM".to_string(),
        }
    };
    let spool = local.join(SPOOL_DIR);
    let result = take_backup(&repo, &mut conn, &server, &spool, &opts, interrupted).await;
    conn.close().await;
    let rec = result?;
    let id = &rec.id;
    if let Some(u) = uploader {
        let drained = u.drain(args.upload_timeout).await;
        let states = u.queue().states();
        u.stop().await;
        if let Err(behind) = drained {
            anyhow::bail!(
                "backup {id} is complete in the hot tier but not yet in every remote tier ({behind}); `archiver stream` ships it when it next compares the tiers"
            );
        }
        for t in states {
            info!(tier = %t.name, objects = t.uploaded_objects, bytes = t.uploaded_bytes, "backup uploaded to the remote tier");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        println!("{id}");
    }
    Ok(())
}
