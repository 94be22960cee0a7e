//! The daemon's scheduled jobs as library calls: a backup, full or incremental (retried with
//! backoff, then alerted; an incremental one that cannot be taken is a full one; expire after
//! it), a whole-repository verify, and a restore drill that records the
//! measured RTO. Each returns what happened; none panics the daemon.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::alerts::{Event, Severity};
use super::Ctx;
use crate::basebackup::lifecycle::{check_space, take_backup, BackupOptions, Incremental};
use crate::basebackup::protocol::Checkpoint;
use crate::pg::replication;
use crate::pg::Connection;
use crate::repo::catalog::BackupRecord;
use crate::repo::Repo;
use crate::restore::drill::{drill, DrillOptions};
use crate::restore::recovery::TargetAction;
use crate::restore::run::TargetSpec;
use crate::restore::target::{Target, TimelineChoice};
use crate::restore::verify::{verify, VerifyOptions};
use crate::retry::{error_chain, RetryPolicy};

/// Why a backup attempt failed, and whether a full backup should be taken instead (an
/// incremental one that cannot be).
struct Failed {
    message: String,
    full_instead: bool,
}

impl From<String> for Failed {
    fn from(message: String) -> Self {
        Failed {
            message,
            full_instead: false,
        }
    }
}

/// One backup attempt: a replication connection of its own, the same checks as `archiver
/// backup`, then the backup (incremental on top of the newest one, when asked). On shutdown it
/// may go on for `stop_timeout`, then it is stopped and recorded failed.
async fn attempt(
    ctx: &Ctx,
    stop: watch::Receiver<bool>,
    incremental: bool,
) -> Result<BackupRecord, Failed> {
    let s = &ctx.settings().schedule;
    let app = "archiver run backup";
    let mut conn = Connection::connect(&ctx.conninfo, Some("true"), app)
        .await
        .map_err(|e| {
            let hint = e
                .connect_hint()
                .map(|h| format!("{h}: "))
                .unwrap_or_default();
            format!(
                "{hint}cannot start a replication connection: {}",
                error_chain(&e)
            )
        })?;
    let server = replication::server_info(&mut conn)
        .await
        .map_err(|e| format!("cannot read the server's identity: {}", error_chain(&e)))?;
    Repo::check_compatible(ctx.repo.meta(), &server).map_err(|e| e.to_string())?;
    check_space(&ctx.conninfo, Some(&ctx.local_dir))
        .await
        .map_err(|e| error_chain(&e))?;
    let opts = BackupOptions {
        label: Some(format!(
            "archiver run {}",
            crate::time::short(crate::time::now())
        )),
        checkpoint: if s.backup_checkpoint == "spread" {
            Checkpoint::Spread
        } else {
            Checkpoint::Fast
        },
        max_rate_kb: None,
        compress: s.backup_compress_level,
        server_compress: s.backup_server_compress,
        server_workers: 1,
        wal_timeout: Duration::from_secs(600),
        sql: Some(ctx.conninfo.clone()),
        environment: ctx.environment.clone(),
        incremental: incremental.then_some(Incremental::Newest),
    };
    let grace = s.stop_timeout;
    let interrupted = async move {
        super::session_stopped(stop).await;
        info!(
            grace_s = grace.as_secs(),
            "stopping: the running backup may finish within the grace period"
        );
        tokio::time::sleep(grace).await;
        "interrupted: archiver run is stopping".to_string()
    };
    let r = take_backup(
        &ctx.repo,
        &mut conn,
        &server,
        &ctx.spool_dir,
        &opts,
        interrupted,
    )
    .await;
    conn.close().await;
    r.map_err(|e| Failed {
        message: error_chain(&e),
        full_instead: e.wants_full_backup(),
    })
}

/// A scheduled backup: up to `1 + backup_retries` attempts with backoff and jitter, then an
/// alert; after a success, expire under the configured retention. `incremental`: on top of the
/// newest backup (PostgreSQL 17+); where that cannot be, a full backup at once instead.
pub async fn backup(
    ctx: &Ctx,
    stop: watch::Receiver<bool>,
    mut incremental: bool,
) -> Result<String, String> {
    let s = ctx.settings().schedule.clone();
    let policy = RetryPolicy {
        initial: s.backup_retry_delay,
        max_delay: s.backup_retry_delay.saturating_mul(16),
        give_up_after: Duration::MAX,
    };
    let attempts = s.backup_retries + 1;
    let mut last = String::new();
    let mut n = 0;
    while n < attempts {
        if n > 0 {
            let d = policy.delay(n - 1).max(s.backup_retry_delay / 2);
            warn!(attempt = n + 1, of = attempts, delay_s = d.as_secs_f64(), error = %last, "backup failed; retrying");
            ctx.shared
                .metrics
                .retries
                .with_label_values(&["backup"])
                .inc();
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = super::session_stopped(stop.clone()) => {
                    last = format!("{last} (not retried: archiver run is stopping)");
                    break;
                }
            }
        }
        n += 1;
        match attempt(ctx, stop.clone(), incremental).await {
            Err(e) if incremental && e.full_instead => {
                warn!(error = %e.message, "no incremental backup can be taken; taking a full backup instead");
                incremental = false;
                // The refusal wrote nothing: the full backup is this attempt, not a retry.
                n -= 1;
                last = e.message;
            }
            Ok(rec) => {
                ctx.shared
                    .metrics
                    .backups
                    .with_label_values(&["success"])
                    .inc();
                let secs = rec
                    .stop_time
                    .map(|t| (t.as_millisecond() - rec.start_time.as_millisecond()) as f64 / 1000.0)
                    .unwrap_or(0.0);
                if ctx.shared.alerts.backup_success_enabled() {
                    ctx.shared.alerts.send(Event::new(
                        "backup_succeeded",
                        Severity::Info,
                        format!("{} backup {} complete", rec.kind(), rec.id),
                        format!(
                            "{:.1} s, {} bytes stored, from {} to {}",
                            secs,
                            rec.stored_bytes,
                            rec.start_lsn,
                            rec.stop_lsn.unwrap_or_default()
                        ),
                    ));
                }
                if shipped(ctx, &rec.id, stop.clone()).await {
                    expire(ctx).await;
                }
                return Ok(format!("{} backup {} complete", rec.kind(), rec.id));
            }
            Err(e) => last = e.message,
        }
    }
    ctx.shared
        .metrics
        .backups
        .with_label_values(&["failure"])
        .inc();
    ctx.shared.alerts.send(Event::new(
        "backup_failed",
        Severity::Critical,
        format!("the scheduled backup failed after {attempts} attempts"),
        last.clone(),
    ));
    Err(last)
}

/// Waits until every remote tier holds backup `id` (its objects and its final record), for at
/// most `backup_upload_timeout`. Expiring before that could remove from the hot tier a backup
/// whose final record a remote tier does not have yet, leaving it there `running` for ever.
async fn shipped(ctx: &Ctx, id: &str, stop: watch::Receiver<bool>) -> bool {
    let Some(q) = ctx.shared.queue.get() else {
        return true;
    };
    let record = crate::repo::layout::catalog_key(id);
    let objects = crate::repo::layout::backup_prefix(id);
    let pending = || q.any_pending(|k| k == record || k.starts_with(&objects));
    let limit = ctx.settings().schedule.backup_upload_timeout;
    let wait = async {
        while pending() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(limit, wait) => {}
        _ = super::session_stopped(stop) => {}
    }
    if pending() {
        warn!(backup = %id, "the backup is not yet in every remote tier; expire is skipped until the next backup");
        return false;
    }
    info!(backup = %id, "the backup is in every tier");
    true
}

/// Expires every tier under its policy after a backup, when one is configured.
async fn expire(ctx: &Ctx) {
    let c = &ctx.config;
    let any_policy = c.retention.is_some() || c.remotes.iter().any(|r| r.retention.is_some());
    if !ctx.settings().schedule.expire_after_backup || !any_policy {
        return;
    }
    let r = async {
        let tiers = ctx
            .location
            .each_tier()
            .await
            .map_err(|e| error_chain(&e))?;
        let policies = crate::retention::tier_policies(c, tiers, None)
            .await
            .map_err(|e| error_chain(&e))?;
        crate::retention::expire_tiers(&policies, &ctx.local_dir, crate::time::now(), false)
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;
    match r {
        Ok(reports) => {
            ctx.shared
                .metrics
                .expires
                .with_label_values(&["success"])
                .inc();
            for (tier, rep) in reports {
                if let Some(rep) = rep {
                    info!(%tier, removed_backups = rep.removed_backups.len(), removed_wal = rep.removed_wal_objects, bytes_freed = rep.bytes_freed, "expired");
                }
            }
        }
        Err(e) => {
            ctx.shared
                .metrics
                .expires
                .with_label_values(&["failure"])
                .inc();
            warn!(error = %e, "expire after the backup failed; the next backup tries again");
        }
    }
}

/// Verifies the repository (every tier's view of it and each remote tier on its own).
pub async fn verify_all(ctx: &Ctx) -> Result<String, String> {
    let o = VerifyOptions {
        backup: None,
        jobs: 4,
    };
    let r = async {
        let mut out = vec![(
            "repository".to_string(),
            verify(
                &ctx.location
                    .open_for_reading(true)
                    .await
                    .map_err(|e| error_chain(&e))?,
                &o,
            )
            .await
            .map_err(|e| error_chain(&e))?,
        )];
        for (name, storage) in ctx
            .location
            .each_tier()
            .await
            .map_err(|e| error_chain(&e))?
            .into_iter()
            .skip(1)
        {
            let repo = Repo::open(storage, &name)
                .await
                .map_err(|e| error_chain(&e))?;
            out.push((name, verify(&repo, &o).await.map_err(|e| error_chain(&e))?));
        }
        Ok::<_, String>(out)
    }
    .await;
    let m = &ctx.shared.metrics;
    match r {
        Ok(reports) => {
            let mut problems = Vec::new();
            for (tier, rep) in &reports {
                for b in rep.backups.iter().filter(|b| !b.ok) {
                    problems.push(format!(
                        "{tier}: backup {}: {}",
                        b.id,
                        b.problems.join("; ")
                    ));
                }
                for d in &rep.damaged {
                    problems.push(format!("{tier}: damaged {}: {}", d.key, d.problem));
                }
                for h in &rep.wal_holes {
                    problems.push(format!(
                        "{tier}: missing {}",
                        crate::restore::verify::describe_hole(h)
                    ));
                }
                for p in &rep.wal_problems {
                    problems.push(format!("{tier}: {p}"));
                }
            }
            if problems.is_empty() {
                m.verifies.with_label_values(&["success"]).inc();
                let objects: usize = reports.iter().map(|(_, r)| r.objects_checked).sum();
                Ok(format!("verified {objects} objects: ok"))
            } else {
                m.verifies.with_label_values(&["problems"]).inc();
                ctx.shared.alerts.send(Event::new(
                    "verify_failed",
                    Severity::Critical,
                    format!(
                        "verify found {} problem(s) in the repository",
                        problems.len()
                    ),
                    problems.join("\n"),
                ));
                Err(problems.join("; "))
            }
        }
        Err(e) => {
            m.verifies.with_label_values(&["error"]).inc();
            ctx.shared.alerts.send(Event::new(
                "verify_failed",
                Severity::Critical,
                "verify could not run".into(),
                e.clone(),
            ));
            Err(e)
        }
    }
}

/// A restore drill of the newest backup to the end of the archive, in a scratch cluster; its
/// measured recovery time is the RTO, recorded in the catalog and compared to the objective.
pub async fn drill_latest(ctx: &Ctx) -> Result<String, String> {
    let settings = ctx.settings();
    let s = &settings.schedule;
    let objective = settings.alerts.rto_objective;
    let r = async {
        let owner = if crate::storage::fs::is_root() {
            Some(
                crate::storage::fs::user_ids(&s.drill_os_user).ok_or_else(|| {
                    format!("schedule.drill_os_user: no user {:?}", s.drill_os_user)
                })?,
            )
        } else {
            None
        };
        ctx.location
            .check_readable_by(owner, &s.drill_os_user)
            .map_err(|e| error_chain(&e))?;
        let check_sql = match &s.drill_check_sql {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read {}: {e}", f.display()))?,
            ),
            None => None,
        };
        let repo = ctx
            .location
            .open_for_reading(true)
            .await
            .map_err(|e| error_chain(&e))?;
        let o = DrillOptions {
            target: TargetSpec {
                target: Target::Latest,
                timeline: TimelineChoice::Latest,
                action: TargetAction::Promote,
                exclusive: false,
                backup: None,
            },
            check_sql,
            pg_bin: s.drill_pg_bin.clone(),
            scratch: s.drill_scratch.clone(),
            owner,
            pg_user: s.drill_pg_user.clone(),
            timeout: s.drill_timeout,
            repo_args: ctx
                .location
                .for_restore_command()
                .map_err(|e| error_chain(&e))?,
        };
        drill(&repo, &o).await.map_err(|e| error_chain(&e))
    }
    .await;
    let m = &ctx.shared.metrics;
    match r {
        Ok(rep) if rep.result.passed => {
            m.drills.with_label_values(&["success"]).inc();
            m.last_drill_rto.set(rep.result.seconds);
            let over = rep.result.seconds > objective.as_secs_f64();
            let e = Event::new(
                "drill_rto_exceeded",
                Severity::Warning,
                format!(
                    "the restore drill of backup {} took {:.0} s, over the RTO objective of {:.0} s",
                    rep.backup_id,
                    rep.result.seconds,
                    objective.as_secs_f64()
                ),
                format!(
                    "restore {:.1} s, recovery {:.1} s",
                    rep.restore_seconds, rep.recovery_seconds
                ),
            );
            ctx.shared.alerts.condition(over, e, || {
                format!(
                    "the restore drill of backup {} took {:.0} s, within the RTO objective",
                    rep.backup_id, rep.result.seconds
                )
            });
            ctx.shared.alerts.condition(
                false,
                Event::new(
                    "drill_failed",
                    Severity::Critical,
                    String::new(),
                    String::new(),
                ),
                || format!("the restore drill of backup {} passed", rep.backup_id),
            );
            Ok(format!(
                "drill of backup {} passed: RTO {:.1} s",
                rep.backup_id, rep.result.seconds
            ))
        }
        other => {
            let why = match other {
                Ok(rep) => format!(
                    "backup {}: {}",
                    rep.backup_id,
                    rep.result.error.unwrap_or_default()
                ),
                Err(e) => e,
            };
            m.drills.with_label_values(&["failure"]).inc();
            ctx.shared.alerts.condition(
                true,
                Event::new(
                    "drill_failed",
                    Severity::Critical,
                    "the restore drill failed".into(),
                    why.clone(),
                ),
                String::new,
            );
            Err(why)
        }
    }
}
