//! `archiver drill`: proves a restore works before anyone needs it. Restores into a scratch
//! directory, starts PostgreSQL there (binaries of the backup's major version) on a private Unix
//! socket, waits until it reaches the target and is promoted, runs the checks, measures the time
//! from the start to a usable cluster (the measured RTO), stops and removes everything, and
//! records the result in the backup's catalog record.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tracing::{info, warn};

use super::restore::TargetArgs;
use super::{report, RepoArg, EXIT_ERROR};
use crate::pg::conninfo::{ConnInfo, Env};
use crate::pg::Connection;
use crate::repo::catalog::{BackupRecord, DrillResult, MAX_DRILLS};
use crate::repo::{now_rfc3339, Repo};
use crate::restore::extract::Owner;
use crate::restore::recovery::TargetAction;
use crate::restore::run::{archives, make_plan, write_restore, WriteSpec};
use crate::restore::target::conf_quote;
use crate::wal::Lsn;

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

/// The major version in `postgres --version` output
/// (`postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`, `postgres (PostgreSQL) 17beta1`).
fn version_major(text: &str) -> Option<u32> {
    let v = text.split_whitespace().nth(2)?;
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The binaries directory, checked to be of `major`.
fn find_bin(args: &DrillArgs, major: u32) -> anyhow::Result<PathBuf> {
    let dir = match &args.pg_bin {
        Some(d) => d.clone(),
        None => std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .find(|d| d.join("pg_ctl").is_file() && d.join("postgres").is_file())
            })
            .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))),
    };
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", dir.join("postgres").display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match version_major(&text) {
        Some(m) if m == major => Ok(dir),
        Some(m) => anyhow::bail!(
            "{} is PostgreSQL {m}; the backup is PostgreSQL {major} (use --pg-bin)",
            dir.display()
        ),
        None => anyhow::bail!("cannot tell the version of {}: {text}", dir.display()),
    }
}

fn os_user(args: &DrillArgs) -> anyhow::Result<Owner> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(args.os_user.as_str()).context("--os-user")?;
    // SAFETY: getpwnam with a valid C string; the fields are copied at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        anyhow::bail!("--os-user: no user {:?} to run PostgreSQL as", args.os_user);
    }
    // SAFETY: non-null result of getpwnam.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
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

#[derive(Serialize)]
struct Outcome<'a> {
    backup_id: &'a str,
    #[serde(flatten)]
    result: &'a DrillResult,
    restore_seconds: f64,
    recovery_seconds: f64,
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

async fn drill(args: DrillArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let repo = args.repo.open_for_reading(true).await?;
    let spec = args.target.spec();
    let (plan, rec) = make_plan(&repo, &spec).await?;
    let target = spec.target.clone();
    let major = major_of(rec.pg_version);
    let bin = find_bin(&args, major)?;
    let owner = os_user(&args)?;
    args.repo.check_readable_by(owner, &args.os_user)?;
    let check_sql = match &args.check_sql {
        Some(f) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        None => None,
    };
    if args.target.target_action != TargetAction::Promote {
        anyhow::bail!("a drill promotes the restored cluster; --target-action must be promote");
    }
    info!(backup = %plan.backup_id, target = %target.describe(), bin = %bin.display(), "drill");

    // The scratch directory: private, owned by the user PostgreSQL runs as.
    let base = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("archiver-drill-{}-{}", rec.id, std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut scratch = Scratch {
        pgdata: dir.join("pgdata"),
        dir: dir.clone(),
        bin: bin.clone(),
        owner,
        started: false,
    };
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
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
    std::fs::write(&hba, "local all all trust\n")?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&hba, Some(uid), Some(gid))?;
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
    let repo_for_cmd = args.repo.for_restore_command()?;
    let wspec = WriteSpec {
        repo_args: &repo_for_cmd,
        target: &spec,
        mapping: &mapping,
        extra,
    };
    let mut checks = Vec::new();
    let mut skipped = Vec::new();
    let mut restore_s = 0.0;
    let mut recovery_s = 0.0;
    let outcome: anyhow::Result<(Option<Lsn>, Option<String>)> = async {
        write_restore(&wspec, &repo, &rec, &archives, owner).await?;
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
            .context("cannot run pg_ctl")?;
        scratch.started = true;
        if !out.status.success() {
            anyhow::bail!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ci = ConnInfo::parse(
            Some(&format!(
                "host={sock} port=5432 user={} dbname=postgres",
                args.pg_user
            )),
            &NoEnv,
        )?;
        let deadline = Instant::now() + args.timeout;
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
                anyhow::bail!("PostgreSQL stopped during recovery:\n{}", tail());
            }
            if Instant::now() > deadline {
                anyhow::bail!("not usable after {:?}:\n{}", args.timeout, tail());
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
        let time = sets.first().and_then(|s| s.text(0, 1)).map(str::to_string);
        if let Some(sql) = &check_sql {
            conn.simple_query(sql)
                .await
                .context("the --check-sql statements failed on the restored cluster")?;
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
                    &args.pg_user,
                    "--install-missing",
                    "--all",
                ])
                .output()
                .context("cannot run pg_amcheck")?;
            if !out.status.success() {
                anyhow::bail!(
                    "pg_amcheck found problems:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
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
    let result = match &outcome {
        Ok((lsn, time)) => DrillResult {
            at: now_rfc3339(),
            passed: true,
            target: target.describe(),
            achieved_lsn: *lsn,
            achieved_time: time.clone(),
            seconds,
            error: None,
            checks: checks.clone(),
            checks_skipped: skipped.clone(),
        },
        Err(e) => DrillResult {
            at: now_rfc3339(),
            passed: false,
            target: target.describe(),
            achieved_lsn: None,
            achieved_time: None,
            seconds,
            error: Some(format!("{e:#}")),
            checks: checks.clone(),
            checks_skipped: skipped.clone(),
        },
    };
    record(&repo, &rec, &result).await;
    let out = Outcome {
        backup_id: &rec.id,
        result: &result,
        restore_seconds: restore_s,
        recovery_seconds: recovery_s,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if result.passed {
        println!(
            "drill passed: backup {} restored to {} and usable in {:.1} s (restore {:.1} s, recovery {:.1} s), replay ended at {}; checks: {}",
            rec.id,
            result.target,
            seconds,
            restore_s,
            recovery_s,
            result.achieved_lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            if result.checks.is_empty() { "none".to_string() } else { result.checks.join(", ") }
        );
        for s in &result.checks_skipped {
            println!("  not checked: {s}");
        }
    }
    match outcome {
        Ok(_) => Ok(true),
        Err(e) => Err(e.context(format!("drill of backup {} failed", rec.id))),
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn version_lines() {
        use super::version_major;
        assert_eq!(
            version_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(version_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(version_major("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(version_major("garbage"), None);
    }
}
