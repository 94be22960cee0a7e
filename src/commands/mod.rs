//! The command-line interface: one file per command, `anyhow` only at this layer, exit codes.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 the WAL needed to continue streaming is gone
//! from the server; `wal-fetch`: 1 the file is not in the archive, 126 the archive holds it but it
//! cannot be served (corrupt, unreadable) — above 125 so that PostgreSQL aborts recovery instead
//! of taking the file for missing and ending recovery early.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub use repo_arg::RepoArg;

mod backup;
mod check;
mod drill;
mod events;
mod expire;
mod list;
mod reindex;
mod repo_arg;
mod restore;
mod run;
mod stream;
mod text;
mod tiers;
mod verify;
mod wal_fetch;

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_WAL_GONE: u8 = 3;
pub const EXIT_NOT_IN_ARCHIVE: u8 = 1;
pub const EXIT_UNSERVABLE: u8 = 126;

#[derive(Parser, Debug)]
#[command(
    name = "archiver",
    version,
    about = "Native PostgreSQL WAL-streaming continuous archiver"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    /// Log level filter (also RUST_LOG), e.g. `info`, `debug`, `archiver=debug`.
    #[arg(long, default_value = "info", global = true, env = "ARCHIVER_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream WAL continuously from PostgreSQL into the repository.
    Stream(stream::StreamArgs),
    /// Fetch one WAL segment or history file from the repository (for restore_command: `%f %p`).
    WalFetch(wal_fetch::WalFetchArgs),
    /// Take a base backup into the repository.
    Backup(backup::BackupArgs),
    /// List the backups in the repository, oldest first.
    List(list::ListArgs),
    /// Show one backup in full.
    Info(list::InfoArgs),
    /// Restore a data directory that recovers to a point in time (or plan it: --dry-run).
    Restore(restore::RestoreArgs),
    /// Restore into a scratch cluster, start it, check it, measure the RTO, record the result.
    Drill(drill::DrillArgs),
    /// Show each remote tier's state: how far the WAL is durable there, what is queued.
    Tiers(tiers::TiersArgs),
    /// Apply a retention policy: remove the backups no rule keeps and the WAL no kept backup
    /// needs (--dry-run: print the plan only).
    Expire(expire::ExpireArgs),
    /// Read back every object and check it, every backup against its manifest, and the WAL
    /// unbroken from every backup to the archive's head (exit 1 if anything is wrong).
    Verify(verify::VerifyArgs),
    /// Index the records of archived WAL that has no index yet (commit times, restore points,
    /// dropped relations), for WAL archived before the index or with `stream --no-index`.
    Reindex(reindex::ReindexArgs),
    /// What happened, from the WAL index: commits per interval, restore points, and each table
    /// dropped, truncated or rewritten (name, time, transaction, WAL position).
    Events(events::EventsArgs),
    /// Pre-flight: check the server and the repository before relying on them (exit 1 if any
    /// check failed).
    Check(check::CheckArgs),
    /// The sidecar: stream, scheduled backups/verify/drills, metrics, health and alerts.
    Run(run::RunArgs),
}

/// Set once at start: JSON logging reports the final error as a log event, human logging as a line.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn init_logging(format: LogFormat, level: &str) {
    let _ = JSON_LOGS.set(matches!(format, LogFormat::Json));
    if matches!(format, LogFormat::Json) {
        crate::progress::disable_bars();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Before any thread starts, for every command: glibc keeps freed memory in per-thread arenas,
/// and its dynamic mmap threshold moves large buffers (WAL segments, 8 MiB S3 parts) into them,
/// so the resident size only grows — over hours in `archiver run` (soak benchmark: 246 MB
/// peak outside backups), within one `archiver backup --config` (136 MB against its 128 MB
/// bound). Two arenas and a fixed 1 MiB threshold (large buffers mmapped and returned on free)
/// keep it flat: under 80 MB and 83–93 MB (docs/benchmarks.md).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Parses arguments, runs the command and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let missing_repo = e.kind() == clap::error::ErrorKind::MissingRequiredArgument
                && e.to_string().contains("--repo");
            let _ = e.print();
            if missing_repo {
                eprintln!(
                    "hint: name the repository with --repo DIR (or --repo s3://BUCKET/PREFIX), or a tiered repository with --config FILE; or set ARCHIVER_REPO or ARCHIVER_CONFIG"
                );
            }
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.log_format, &cli.log_level);
    tune_allocator();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("archiver: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let code = rt.block_on(async {
        match cli.command {
            Command::Stream(a) => stream::run(a).await,
            Command::WalFetch(a) => wal_fetch::run(a).await,
            Command::Backup(a) => backup::run(a).await,
            Command::List(a) => list::list(a).await,
            Command::Info(a) => list::info(a).await,
            Command::Restore(a) => restore::run(a).await,
            Command::Drill(a) => drill::run(a).await,
            Command::Tiers(a) => tiers::run(a).await,
            Command::Expire(a) => expire::run(a).await,
            Command::Verify(a) => verify::run(a).await,
            Command::Reindex(a) => reindex::run(a).await,
            Command::Events(a) => events::run(a).await,
            Command::Check(a) => check::run(a).await,
            Command::Run(a) => run::run(a).await,
        }
    });
    ExitCode::from(code)
}

fn explain_connect_error(e: crate::pg::PgError) -> anyhow::Error {
    let hint = e.connect_hint();
    let e = anyhow::Error::new(e).context("cannot start a replication connection");
    match hint {
        Some(h) => e.context(h),
        None => e,
    }
}

/// Opens a replication connection and reads the server's identity, explaining failures.
pub(crate) async fn connect_replication(
    conninfo: &crate::pg::ConnInfo,
    application_name: &str,
) -> anyhow::Result<(crate::pg::Connection, crate::pg::replication::ServerInfo)> {
    let mut conn = crate::pg::Connection::connect(conninfo, Some("true"), application_name)
        .await
        .map_err(explain_connect_error)?;
    let server = crate::pg::replication::server_info(&mut conn)
        .await
        .map_err(explain_connect_error)?;
    Ok((conn, server))
}

/// Prints an error chain the way operators read it and returns `code`.
pub fn report(err: &anyhow::Error, code: u8) -> u8 {
    if JSON_LOGS.get().copied().unwrap_or(false) {
        tracing::error!(exit_code = code, "{err:#}");
    } else {
        eprintln!("archiver: error: {err:#}");
    }
    code
}
