//! The restore drill as a library call: proves a restore works before anyone needs it.
//! Restores into a scratch directory, starts PostgreSQL there (binaries of the backup's major
//! version) on a private Unix socket, waits until it reaches the target and is promoted, runs
//! the checks, measures the time from the start to a usable cluster (the measured RTO), stops
//! and removes everything, and records the result in the backup's catalog record.
//!
//! Invariants: the scratch cluster is stopped and its directory removed whatever happens
//! ([`Scratch`]'s drop); a check that cannot run is named in the result, never left out.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use super::binaries;
use super::extract::Owner;
use super::recovery::TargetAction;
use super::run::{archives, make_plan, write_restore, RestoreError, TargetSpec, WriteSpec};
use super::target::conf_quote;
use crate::pg::conninfo::{ConnInfo, Env};
use crate::pg::{Connection, PgError};
use crate::repo::catalog::{BackupRecord, DrillResult, MAX_DRILLS};
use crate::repo::Repo;
use crate::wal::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// Bad input: nothing was started.
    #[error("{0}")]
    Refused(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        cause: std::io::Error,
    },
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The drill ran and failed.
    #[error("{0}")]
    Failed(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DrillError {
    let context = context.into();
    move |cause| DrillError::Io { context, cause }
}

/// A drill to run.
pub struct DrillOptions {
    pub target: TargetSpec,
    /// SQL whose statements must all succeed on the restored cluster.
    pub check_sql: Option<String>,
    /// PostgreSQL's binaries [default: pg_ctl on PATH, else /usr/lib/postgresql/<major>/bin].
    pub pg_bin: Option<PathBuf>,
    /// Where the scratch directory is made [default: the temporary directory].
    pub scratch: Option<PathBuf>,
    /// The OS user PostgreSQL runs as (when archiver runs as root).
    pub owner: Owner,
    /// The database role to check with.
    pub pg_user: String,
    /// Give up when the cluster is not usable after this long.
    pub timeout: Duration,
    /// The repository as the restored cluster's restore_command names it.
    pub repo_args: Vec<(&'static str, PathBuf)>,
}

/// What a drill did: its recorded result and where the time went.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub backup_id: String,
    #[serde(flatten)]
    pub result: DrillResult,
    pub restore_seconds: f64,
    pub recovery_seconds: f64,
}

/// No environment: the drill's connection must not pick up PG* variables or a pgpass file.
struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fn major_of(version_num: u32) -> u32 {
    version_num / 10000
}

/// The binaries directory (`--pg-bin`, else PATH's, else Debian's for `major`), checked to
/// be of `major`.
fn find_bin(pg_bin: Option<&PathBuf>, major: u32) -> Result<PathBuf, DrillError> {
    let dir = pg_bin
        .cloned()
        .unwrap_or_else(|| binaries::default_bin_dir(major));
    binaries::check_binaries(&dir, major).map_err(DrillError::Refused)?;
    Ok(dir)
}

/// A command run as the owner.
fn as_owner(program: PathBuf, owner: Owner) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        c.uid(uid).gid(gid);
    }
    c
}

/// The scratch cluster, stopped and removed on drop whatever happened.
struct Scratch {
    dir: PathBuf,
    pgdata: PathBuf,
    bin: PathBuf,
    owner: Owner,
    started: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.started {
            let _ = as_owner(self.bin.join("pg_ctl"), self.owner)
                .args(["-D"])
                .arg(&self.pgdata)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a drill. `Err` when it could not start (no plan, bad input); a drill that ran and failed
/// is `Ok` with `result.passed == false` and its error, recorded in the catalog like a pass.
pub async fn drill(repo: &Repo, o: &DrillOptions) -> Result<DrillReport, DrillError> {
    let t0 = Instant::now();
    if o.target.action != TargetAction::Promote {
        return Err(DrillError::Refused(
            "a drill promotes the restored cluster; --target-action must be promote".into(),
        ));
    }
    let (plan, rec) = make_plan(repo, &o.target).await?;
    let target = o.target.target.clone();
    let major = major_of(rec.pg_version);
    let bin = find_bin(o.pg_bin.as_ref(), major)?;
    let owner = o.owner;
    info!(backup = %plan.backup_id, target = %target.describe(), bin = %bin.display(), "drill");

    // The scratch directory: private, owned by the user PostgreSQL runs as.
    let base = o.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("archiver-drill-{}-{}", rec.id, std::process::id()));
    std::fs::create_dir(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let mut scratch = Scratch {
        pgdata: dir.join("pgdata"),
        dir: dir.clone(),
        bin: bin.clone(),
        owner,
        started: false,
    };
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io(format!("cannot set the mode of {}", dir.display())))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(io(format!("cannot chown {}", dir.display())))?;
    }
    let mapping: Vec<(PathBuf, PathBuf)> = rec
        .tablespaces
        .iter()
        .map(|t| {
            (
                PathBuf::from(&t.location),
                dir.join(format!("ts-{}", t.oid)),
            )
        })
        .collect();
    let archives = archives(&rec, &scratch.pgdata, &mapping)?;
    let hba = dir.join("drill_hba.conf");
    crate::storage::fs::write_private(&hba, b"local all all trust\n")
        .map_err(io("writing the drill's pg_hba.conf"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&hba, Some(uid), Some(gid))
            .map_err(io(format!("cannot chown {}", hba.display())))?;
    }
    let sock = dir.display().to_string();
    let extra = vec![
        ("port".to_string(), "5432".to_string()),
        ("listen_addresses".into(), conf_quote("")),
        ("unix_socket_directories".into(), conf_quote(&sock)),
        ("hba_file".into(), conf_quote(&hba.display().to_string())),
        ("archive_mode".into(), "off".into()),
        ("logging_collector".into(), "off".into()),
        ("hot_standby".into(), "on".into()),
    ];
    let wspec = WriteSpec {
        repo_args: &o.repo_args,
        target: &o.target,
        mapping: &mapping,
        extra,
    };
    let mut checks = Vec::new();
    let mut skipped = Vec::new();
    let mut restore_s = 0.0;
    let mut recovery_s = 0.0;
    let outcome: Result<(Option<Lsn>, Option<crate::time::Timestamp>), DrillError> = async {
        write_restore(&wspec, repo, &rec, &archives, owner).await?;
        restore_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let log = dir.join("postgres.log");
        let out = as_owner(bin.join("pg_ctl"), owner)
            .arg("-D")
            .arg(&scratch.pgdata)
            .arg("-l")
            .arg(&log)
            .args(["-W", "start"])
            .output()
            .map_err(io("cannot run pg_ctl"))?;
        scratch.started = true;
        if !out.status.success() {
            return Err(DrillError::Failed(format!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let ci = ConnInfo::parse(
            Some(&format!(
                "host={sock} port=5432 user={} dbname=postgres",
                o.pg_user
            )),
            &NoEnv,
        )
        .map_err(|e| DrillError::Failed(format!("the drill's connection: {e}")))?;
        let deadline = Instant::now() + o.timeout;
        // `pg_ctl -W` returns at once: give the postmaster a moment to write its pid file.
        let pid_wait = Instant::now() + Duration::from_secs(30);
        while !scratch.pgdata.join("postmaster.pid").exists() && Instant::now() < pid_wait {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut conn = loop {
            let tail = || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if !scratch.pgdata.join("postmaster.pid").exists() {
                return Err(DrillError::Failed(format!(
                    "PostgreSQL stopped during recovery:\n{}",
                    tail()
                )));
            }
            if Instant::now() > deadline {
                return Err(DrillError::Failed(format!(
                    "not usable after {:?}:\n{}",
                    o.timeout,
                    tail()
                )));
            }
            if let Ok(mut c) = Connection::connect(&ci, None, "archiver drill").await {
                let r = c.simple_query("select pg_is_in_recovery()").await;
                if matches!(
                    r.as_ref().ok().and_then(|s| s.first()?.text(0, 0)),
                    Some("f")
                ) {
                    break c;
                }
                c.close().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        recovery_s = t1.elapsed().as_secs_f64();
        let sets = conn
            .simple_query("select pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp()")
            .await?;
        let lsn = sets
            .first()
            .and_then(|s| s.text(0, 0))
            .and_then(|v| v.parse().ok());
        // As the server prints it (`2026-12-04 15:40:17.123456+00`, in its `timezone`).
        let time = sets
            .first()
            .and_then(|s| s.text(0, 1))
            .and_then(|v| crate::time::parse(v).ok());
        if let Some(sql) = &o.check_sql {
            conn.simple_query(sql).await.map_err(|e| {
                DrillError::Failed(format!(
                    "the --check-sql statements failed on the restored cluster: {e}"
                ))
            })?;
            checks.push("check-sql".to_string());
        }
        conn.close().await;
        let amcheck = bin.join("pg_amcheck");
        if amcheck.is_file() {
            let out = as_owner(amcheck, owner)
                .args([
                    "-h",
                    &sock,
                    "-p",
                    "5432",
                    "-U",
                    &o.pg_user,
                    "--install-missing",
                    "--all",
                ])
                .output()
                .map_err(io("cannot run pg_amcheck"))?;
            if !out.status.success() {
                return Err(DrillError::Failed(format!(
                    "pg_amcheck found problems:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            checks.push("pg_amcheck".to_string());
        } else {
            let why = format!(
                "pg_amcheck: not available (no {}; install the PostgreSQL client or contrib package of that major, or point --pg-bin at binaries that have it)",
                amcheck.display()
            );
            warn!("{why}");
            skipped.push(why);
        }
        Ok((lsn, time))
    }
    .await;
    let seconds = t0.elapsed().as_secs_f64();
    drop(scratch);
    let (passed, achieved, error) = match outcome {
        Ok((lsn, time)) => (true, (lsn, time), None),
        Err(e) => (false, (None, None), Some(crate::retry::error_chain(&e))),
    };
    let result = DrillResult {
        at: crate::time::now(),
        passed,
        target: target.describe(),
        achieved_lsn: achieved.0,
        achieved_time: achieved.1,
        seconds,
        error,
        checks,
        checks_skipped: skipped,
    };
    record(repo, &rec, &result).await;
    Ok(DrillReport {
        backup_id: rec.id.clone(),
        result,
        restore_seconds: restore_s,
        recovery_seconds: recovery_s,
    })
}

/// Adds the result to the backup's record (re-read, so nothing written meanwhile is lost).
async fn record(repo: &Repo, rec: &BackupRecord, result: &DrillResult) {
    let mut fresh = match repo.get_backup(&rec.id).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot record the drill result");
            return;
        }
    };
    fresh.drills.push(result.clone());
    let n = fresh.drills.len();
    if n > MAX_DRILLS {
        fresh.drills.drain(..n - MAX_DRILLS);
    }
    if let Err(e) = repo.put_backup(&fresh).await {
        warn!(error = %e, "cannot record the drill result");
    }
}
