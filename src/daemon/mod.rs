//! `archiver run`: the sidecar. One process streams WAL, ships it to the remote tiers, takes
//! scheduled backups (full and incremental, expiring after each), verifies and drills by the
//! clock, serves metrics
//! and health over HTTP, and sends alerts.
//!
//! Owns: the supervision of those tasks ([`run`]), the state they share ([`Shared`]: what
//! `/metrics`, `/ready` and `/status` read), the schedule ([`schedule`]), the live RPO
//! ([`lag`]), alerts ([`alerts`], [`notify`]) and the HTTP endpoint ([`http`]).
//!
//! Invariants:
//! - the stream is the same library code as `archiver stream` (its durability rules hold);
//!   a lost connection is reconnected forever, with backoff and jitter, the outage visible
//!   in `archiver_replication_connected`, `/ready` and a `stream_disconnected` alert;
//! - nothing the daemon does besides streaming (alerts, metrics, jobs) can hold up the stream:
//!   each runs in its own task, alert delivery behind bounded queues;
//! - on SIGTERM/SIGINT no new job starts, a running backup may finish within
//!   `schedule.stop_timeout` (then it is stopped and recorded failed, never left running),
//!   the stream fsyncs and sends its final status, and the process exits 0;
//! - SIGHUP re-reads the file and applies `[schedule]`, `[alerts]` and `[[notify]]`; a file
//!   that does not parse is refused and the running settings stay.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub mod alerts;
pub mod http;
pub mod jobs;
pub mod lag;
pub mod metrics;
pub mod notify;
pub mod schedule;

use self::alerts::{Alerts, Event, Severity};
use self::lag::LagClock;
use self::metrics::Metrics;
use self::schedule::{Job, JobLog};
use crate::config::daemon::{rpo_objective, AlertsConfig, NotifyConfig, ScheduleConfig};
use crate::config::Config;
use crate::open::{OpenError, RepoLocation};
use crate::pg::conninfo::ConnInfo;
use crate::pg::replication::{self, ServerInfo};
use crate::pg::{Connection, PgError};
use crate::repo::catalog::BackupStatus;
use crate::repo::lock::RepoLock;
use crate::repo::{Repo, RepoError, SPOOL_DIR};
use crate::retry::{error_chain, RetryPolicy};
use crate::spool::Spool;
use crate::storage::Storage;
use crate::stream::{StreamConfig, StreamStatus};
use crate::time::Timestamp;
use crate::upload::tasks::TierTasks;
use crate::wal::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot start a replication connection")]
    Connect(#[source] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error("the HTTP endpoint cannot listen on {addr}: {cause}")]
    Listen {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// The settings SIGHUP reloads.
#[derive(Clone, Debug)]
pub struct Settings {
    pub schedule: ScheduleConfig,
    pub alerts: AlertsConfig,
    pub notify: Vec<NotifyConfig>,
}

impl Settings {
    fn of(c: &Config) -> Settings {
        Settings {
            schedule: c.schedule.clone(),
            alerts: c.alerts.clone(),
            notify: c.notify.clone(),
        }
    }
}

/// What a scheduled job did last and does next (for `/status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobView {
    pub job: Option<Job>,
    pub schedule: Option<String>,
    pub next: Option<Timestamp>,
    pub running: bool,
    pub last_start: Option<Timestamp>,
    pub last_end: Option<Timestamp>,
    pub last_ok: Option<bool>,
    pub last_result: Option<String>,
}

/// One backup as `/status` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct BackupView {
    pub id: String,
    pub status: BackupStatus,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Option<Lsn>,
    pub start_time: Timestamp,
    pub stop_time: Option<Timestamp>,
    pub size_bytes: u64,
    pub stored_bytes: u64,
}

/// A tier now: where its durable copy ends and how far behind the server that is in time.
#[derive(Clone, Debug, Serialize)]
pub struct TierNow {
    pub name: String,
    pub durable_lsn: Option<Lsn>,
    pub rpo_seconds: f64,
    pub rpo_objective_seconds: f64,
    pub pending_objects: usize,
    pub stored_bytes: Option<u64>,
    pub last_error: Option<String>,
}

/// Each tier's name and storage, the hot tier first.
type TierStorages = Vec<(String, Arc<dyn Storage>)>;

/// The state every task of the daemon shares, read by the HTTP endpoint.
pub struct Shared {
    pub environment: Option<String>,
    pub metrics: Arc<Metrics>,
    pub alerts: Alerts,
    pub stream: Arc<StreamStatus>,
    pub server: String,
    pub started_at: Timestamp,
    /// Each tier's name and RPO objective, the hot tier first.
    tiers: Vec<(String, Duration)>,
    queue: OnceLock<Arc<crate::upload::Queue>>,
    lag: Mutex<LagClock>,
    jobs: Mutex<BTreeMap<Job, JobView>>,
    backups: Mutex<Vec<BackupView>>,
    stored: Mutex<BTreeMap<String, u64>>,
    slot_retained: Mutex<Option<u64>>,
    disk: Mutex<Option<(u64, u64)>>,
    /// Once connected: the repository (its catalog) and each tier's storage (what it stores).
    repo: OnceLock<(Repo, TierStorages)>,
}

impl Shared {
    /// Each tier now, the hot tier first.
    pub fn tiers_now(&self, now: Timestamp) -> Vec<TierNow> {
        let lag = self.lag.lock().unwrap();
        let stored = self.stored.lock().unwrap();
        let flushed = StreamStatus::lsn(&self.stream.flushed);
        let remote = self.queue.get().map(|q| q.states()).unwrap_or_default();
        self.tiers
            .iter()
            .enumerate()
            .map(|(i, (name, objective))| {
                let (durable, pending, err) = if i == 0 {
                    ((flushed.0 > 0).then_some(flushed), 0, None)
                } else {
                    match remote.iter().find(|s| &s.name == name) {
                        Some(s) => (
                            s.durable.map(|p| p.lsn),
                            s.pending_objects,
                            s.last_error.clone(),
                        ),
                        None => (None, 0, None),
                    }
                };
                TierNow {
                    name: name.clone(),
                    durable_lsn: durable,
                    rpo_seconds: lag.rpo_seconds(durable.unwrap_or(Lsn(0)), now),
                    rpo_objective_seconds: objective.as_secs_f64(),
                    pending_objects: pending,
                    stored_bytes: stored.get(name).copied(),
                    last_error: err,
                }
            })
            .collect()
    }

    /// Why the daemon is not ready (empty: ready): the stream must be connected and every
    /// tier within its RPO objective.
    pub fn not_ready(&self, now: Timestamp) -> Vec<String> {
        self.not_ready_with(&self.tiers_now(now))
    }

    fn not_ready_with(&self, tiers: &[TierNow]) -> Vec<String> {
        let mut why = Vec::new();
        if !self.stream.connected.load(Ordering::Relaxed) {
            why.push(format!(
                "the replication stream to {} is not connected",
                self.server
            ));
        }
        for t in tiers {
            if t.rpo_seconds > t.rpo_objective_seconds {
                why.push(format!(
                    "tier {}: RPO {:.0} s is over its objective of {:.0} s",
                    t.name, t.rpo_seconds, t.rpo_objective_seconds
                ));
            }
        }
        why
    }

    /// Sets the state gauges from the shared state (before each scrape).
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        let s = &self.stream;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
        m.received_lsn.set(n(&s.received));
        m.flushed_lsn.set(n(&s.flushed));
        m.server_lsn.set(n(&s.server_end));
        m.connected.set(s.connected.load(Ordering::Relaxed) as i64);
        m.wal_damaged_segments
            .set(s.damaged_segments.load(Ordering::Relaxed) as i64);
        for t in self.tiers_now(crate::time::now()) {
            let l = [t.name.as_str()];
            m.tier_durable_lsn
                .with_label_values(&l)
                .set(t.durable_lsn.map(|l| l.0 as i64).unwrap_or(0));
            m.tier_rpo_seconds.with_label_values(&l).set(t.rpo_seconds);
            m.tier_rpo_objective_seconds
                .with_label_values(&l)
                .set(t.rpo_objective_seconds);
            m.tier_pending_objects
                .with_label_values(&l)
                .set(t.pending_objects as i64);
            if let Some(b) = t.stored_bytes {
                m.tier_stored_bytes.with_label_values(&l).set(b as i64);
            }
        }
        if let Some(b) = *self.slot_retained.lock().unwrap() {
            m.slot_retained_bytes.set(b as i64);
        }
        if let Some((free, total)) = *self.disk.lock().unwrap() {
            m.hot_disk_free_ratio.set(if total == 0 {
                0.0
            } else {
                free as f64 / total as f64
            });
        }
        let backups = self.backups.lock().unwrap();
        m.backups_complete.set(
            backups
                .iter()
                .filter(|b| b.status == BackupStatus::Complete)
                .count() as i64,
        );
        if let Some(b) = backups
            .iter()
            .filter(|b| b.status == BackupStatus::Complete)
            .max_by_key(|b| b.stop_time)
        {
            let stop = b.stop_time.unwrap_or(b.start_time);
            m.last_backup_time
                .set(stop.as_millisecond() as f64 / 1000.0);
            m.last_backup_duration
                .set((stop.as_millisecond() - b.start_time.as_millisecond()) as f64 / 1000.0);
            m.last_backup_size.set(b.size_bytes as i64);
            m.last_backup_stored.set(b.stored_bytes as i64);
        }
        m.alerts_firing.set(self.alerts.firing().len() as i64);
        for (job, v) in self.jobs.lock().unwrap().iter() {
            m.job_running
                .with_label_values(&[job.name()])
                .set(v.running as i64);
        }
    }

    /// The whole state, as `/status` serves it.
    pub fn status(&self) -> serde_json::Value {
        let now = crate::time::now();
        let s = &self.stream;
        let tiers = self.tiers_now(now);
        let not_ready = self.not_ready_with(&tiers);
        serde_json::json!({
            "environment": self.environment,
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": self.started_at,
            "now": now,
            "server": self.server,
            "stream": {
                "connected": s.connected.load(Ordering::Relaxed),
                "timeline": s.timeline.load(Ordering::Relaxed),
                "received_lsn": StreamStatus::lsn(&s.received),
                "flushed_lsn": StreamStatus::lsn(&s.flushed),
                "server_lsn": StreamStatus::lsn(&s.server_end),
            },
            "ready": not_ready.is_empty(),
            "not_ready": not_ready,
            "tiers": tiers,
            "slot_retained_bytes": *self.slot_retained.lock().unwrap(),
            "hot_disk": self.disk.lock().unwrap().map(|(free, total)| serde_json::json!({"free_bytes": free, "total_bytes": total})),
            "jobs": self.jobs.lock().unwrap().values().cloned().collect::<Vec<_>>(),
            "backups": *self.backups.lock().unwrap(),
            "alerts_firing": self.alerts.firing(),
        })
    }

    fn job(&self, job: Job, f: impl FnOnce(&mut JobView)) {
        let mut jobs = self.jobs.lock().unwrap();
        let v = jobs.entry(job).or_insert_with(|| JobView {
            job: Some(job),
            ..Default::default()
        });
        f(v)
    }
}

/// What the jobs need.
pub struct Ctx {
    pub shared: Arc<Shared>,
    /// The configuration as read at start (the repository, retention, drill settings).
    pub config: Config,
    pub location: RepoLocation,
    pub conninfo: ConnInfo,
    pub repo: Repo,
    pub local_dir: PathBuf,
    pub spool_dir: PathBuf,
    pub environment: Option<String>,
    settings: watch::Receiver<Arc<Settings>>,
}

impl Ctx {
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }
}

/// How the daemon is stopped and reloaded (signals, in the command; anything, in tests).
pub struct Control {
    pub shutdown: watch::Receiver<bool>,
    pub reload: mpsc::Receiver<()>,
}

/// Runs the daemon for the tiered repository `location` (from `--config`) and the server
/// `conninfo` until `control.shutdown`.
pub async fn run(
    location: RepoLocation,
    conninfo: ConnInfo,
    mut control: Control,
) -> Result<(), DaemonError> {
    let RepoLocation::Tiered { config, .. } = &location else {
        return Err(DaemonError::Config(
            "archiver run needs a configuration file (--config)".into(),
        ));
    };
    let config = (**config).clone();
    let environment = config.environment.clone();
    let metrics = Arc::new(Metrics::new());
    let alerts = Alerts::start(
        environment.clone(),
        &config.alerts,
        &config.notify,
        metrics.clone(),
    )
    .map_err(DaemonError::Config)?;
    let local_dir = config.hot.path.clone();
    let spool_dir = local_dir.join(SPOOL_DIR);
    // Owned as the hot tier is (run as root: by its parent's owner), as the commands do.
    crate::storage::fs::create_dir_all_durable(&spool_dir).map_err(|cause| DaemonError::Io {
        context: format!("cannot create {}", spool_dir.display()),
        cause,
    })?;
    let _lock = RepoLock::acquire(&spool_dir.join("stream.lock")).map_err(|e| {
        DaemonError::Config(format!(
            "{e} (another `archiver run` or `archiver stream` uses this repository)"
        ))
    })?;

    let mut tiers = vec![("hot".to_string(), rpo_objective(config.hot.rpo_objective))];
    tiers.extend(
        config
            .remotes
            .iter()
            .map(|r| (r.name.clone(), rpo_objective(r.rpo_objective))),
    );
    let shared = Arc::new(Shared {
        environment: environment.clone(),
        metrics: metrics.clone(),
        alerts: alerts.clone(),
        stream: Arc::new(StreamStatus::default()),
        server: conninfo.display_target(),
        started_at: crate::time::now(),
        tiers,
        queue: OnceLock::new(),
        lag: Mutex::new(LagClock::default()),
        jobs: Mutex::new(BTreeMap::new()),
        backups: Mutex::new(Vec::new()),
        stored: Mutex::new(BTreeMap::new()),
        slot_retained: Mutex::new(None),
        disk: Mutex::new(None),
        repo: OnceLock::new(),
    });

    // Health first: /health answers while the server is still being reached, and until the
    // very end of a stop.
    let (stop_http, http_stop) = watch::channel(false);
    let server_task = match config.http.listen {
        Some(addr) => {
            let listener = http::bind(addr).await?;
            info!(%addr, "serving /metrics, /health, /ready and /status");
            Some(tokio::spawn(http::serve(
                listener,
                shared.clone(),
                http_stop.clone(),
            )))
        }
        None => None,
    };
    let (stop_monitor, monitor_stop) = watch::channel(false);
    let (settings_tx, settings_rx) = watch::channel(Arc::new(Settings::of(&config)));
    let monitor_task = tokio::spawn(monitor(
        shared.clone(),
        conninfo.clone(),
        config.server.slot.clone(),
        local_dir.clone(),
        settings_rx.clone(),
        monitor_stop,
    ));

    let (storage, tier_handles) = location.storage_for_writing().await?;
    let app = config
        .server
        .application_name
        .clone()
        .or_else(|| conninfo.application_name.clone())
        .unwrap_or_else(|| "archiver".into());
    info!(server = %shared.server, "connecting");
    let Some((conn, server)) = connect(&conninfo, &app, control.shutdown.clone(), true).await?
    else {
        return Ok(());
    };
    info!(
        system_identifier = server.system.system_identifier,
        timeline = server.system.timeline,
        version = server.version_num,
        "connected"
    );
    server.check_supported().map_err(DaemonError::Config)?;
    let repo = Repo::open_or_init(storage, &location.name(), &server).await?;
    let spool = Spool::open(&spool_dir, repo.seg_size()).map_err(|cause| DaemonError::Io {
        context: format!("cannot open the spool {}", spool_dir.display()),
        cause,
    })?;
    let tier_storages = location.each_tier().await?;

    let mut scfg = StreamConfig {
        slot: config.server.slot.clone(),
        application_name: app,
        synchronous: config.server.synchronous,
        fsync_interval: config.server.fsync_interval,
        status_interval: Duration::from_secs(10),
        progress_interval: Duration::from_secs(60),
        compress_level: config.server.compress_level,
        retry: RetryPolicy {
            give_up_after: Duration::MAX,
            ..RetryPolicy::default()
        },
        flushed: None,
        status: Some(shared.stream.clone()),
        accept_gap: false,
        index: config.server.index,
    };
    let background = match tier_handles {
        Some(t) if !t.remotes.is_empty() => {
            t.queue.set_seg_size(repo.seg_size());
            let _ = shared.queue.set(t.queue.clone());
            let (flushed_tx, flushed_rx) = watch::channel(None);
            scfg.flushed = Some(Arc::new(flushed_tx));
            Some(TierTasks::start(
                t.plan(),
                spool.clone(),
                flushed_rx,
                config.server.compress_level,
            ))
        }
        _ => None,
    };

    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        config: config.clone(),
        location,
        conninfo: conninfo.clone(),
        repo: repo.clone(),
        local_dir: local_dir.clone(),
        spool_dir: spool_dir.clone(),
        environment,
        settings: settings_rx.clone(),
    });
    let _ = shared.repo.set((repo.clone(), tier_storages));
    let stream_task = tokio::spawn(supervise_stream(
        ctx.clone(),
        (conn, server),
        spool,
        scfg,
        control.shutdown.clone(),
    ));
    let scheduler_task = tokio::spawn(scheduler(ctx.clone(), control.shutdown.clone()));

    // Until stopped: reload on request.
    let file = config.source.clone();
    loop {
        tokio::select! {
            _ = session_stopped(control.shutdown.clone()) => break,
            r = control.reload.recv() => {
                if r.is_none() {
                    continue;
                }
                match Config::load(&file) {
                    Ok(c) => {
                        let s = Settings::of(&c);
                        match alerts.reload(&s.alerts, &s.notify) {
                            Ok(()) => {
                                let _ = settings_tx.send(Arc::new(s));
                                info!(file = %file.display(), "reloaded [schedule], [alerts] and [[notify]]");
                            }
                            Err(e) => warn!(error = %e, "reload refused; the running settings stay"),
                        }
                    }
                    Err(e) => warn!(error = %e, "reload refused; the running settings stay"),
                }
            }
        }
    }
    info!("stopping: no new jobs; a running backup may finish");
    let _ = scheduler_task.await;
    let _ = stream_task.await;
    if let Some(b) = background {
        b.shutdown(Duration::from_secs(15)).await;
    }
    let _ = stop_monitor.send(true);
    let _ = monitor_task.await;
    alerts.flush(Duration::from_secs(5)).await;
    let _ = stop_http.send(true);
    if let Some(t) = server_task {
        let _ = t.await;
    }
    info!("stopped cleanly");
    Ok(())
}

/// Resolves once shutdown is requested.
async fn session_stopped(mut rx: watch::Receiver<bool>) {
    crate::stream::session::shutdown_requested(&mut rx).await
}

/// Connects (replication) and reads the server's identity, retrying transient failures
/// forever. `Ok(None)`: stopped while waiting. A permanent failure is an error when
/// `fail_permanent` (the first connection: bad credentials refuse the start), else retried too.
async fn connect(
    ci: &ConnInfo,
    app: &str,
    stop: watch::Receiver<bool>,
    fail_permanent: bool,
) -> Result<Option<(Connection, ServerInfo)>, DaemonError> {
    let policy = RetryPolicy {
        initial: Duration::from_millis(500),
        max_delay: Duration::from_secs(30),
        give_up_after: Duration::MAX,
    };
    let mut attempt = 0;
    loop {
        let r = async {
            let mut c = Connection::connect(ci, Some("true"), app).await?;
            let s = replication::server_info(&mut c).await?;
            Ok::<_, PgError>((c, s))
        }
        .await;
        match r {
            Ok(c) => return Ok(Some(c)),
            Err(e) if fail_permanent && !e.is_transient() => return Err(DaemonError::Connect(e)),
            Err(e) => {
                let d = policy.delay(attempt).max(Duration::from_millis(200));
                warn!(error = %error_chain(&e), attempt = attempt + 1, delay_ms = d.as_millis() as u64, "cannot reach the server; retrying");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = session_stopped(stop.clone()) => return Ok(None),
                }
            }
        }
    }
}

/// The stream, restarted after every failure (with backoff) until shutdown.
async fn supervise_stream(
    ctx: Arc<Ctx>,
    first: (Connection, ServerInfo),
    spool: Spool,
    cfg: StreamConfig,
    shutdown: watch::Receiver<bool>,
) {
    let policy = RetryPolicy {
        initial: Duration::from_secs(1),
        max_delay: Duration::from_secs(300),
        give_up_after: Duration::MAX,
    };
    let mut next = Some(first);
    let mut failures = 0u32;
    loop {
        let (conn, server) = match next.take() {
            Some(c) => c,
            None => match connect(
                &ctx.conninfo,
                &cfg.application_name,
                shutdown.clone(),
                false,
            )
            .await
            {
                Ok(Some(c)) => c,
                _ => return,
            },
        };
        let r = match Repo::check_compatible(ctx.repo.meta(), &server) {
            Ok(()) => crate::stream::run_where_cheapest(
                conn,
                server,
                ctx.repo.clone(),
                spool.clone(),
                ctx.conninfo.clone(),
                cfg.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(|e| error_chain(&e)),
            Err(e) => Err(e.to_string()),
        };
        ctx.shared.stream.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(()) => return,
            Err(e) => {
                ctx.shared.alerts.condition(
                    true,
                    Event::new(
                        "stream_failed",
                        Severity::Critical,
                        "WAL streaming stopped with an error; archiver run restarts it".into(),
                        e.clone(),
                    ),
                    String::new,
                );
                ctx.shared
                    .metrics
                    .retries
                    .with_label_values(&["stream"])
                    .inc();
                let d = policy.delay(failures).max(Duration::from_secs(1));
                failures = failures.saturating_add(1);
                warn!(error = %e, delay_s = d.as_secs_f64(), "the stream stopped; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = session_stopped(shutdown.clone()) => return,
                }
            }
        }
    }
}

/// Runs the scheduled jobs one at a time: those missed while the daemon was down once at
/// start, then each at its next occurrence. Stops taking jobs at shutdown.
async fn scheduler(ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    let mut settings = ctx.settings.clone();
    let mut log = JobLog::load(&ctx.spool_dir);
    let now = crate::time::now();
    if log.first_start.is_none() {
        log.first_start = Some(now);
        save_log(&log, &ctx);
    }
    let mut due: Vec<Job> = Vec::new();
    {
        let s = ctx.settings();
        let newest_backup = ctx
            .repo
            .list_backups()
            .await
            .ok()
            .and_then(|b| b.iter().map(|r| r.start_time).max());
        for job in Job::ALL {
            let Some(cron) = cron_of(&s.schedule, job) else {
                continue;
            };
            let (last, since) = match job {
                Job::Backup => (log.last_run.get(&job).copied().max(newest_backup), None),
                _ => (log.last_run.get(&job).copied(), log.first_start),
            };
            if schedule::overdue(cron, &s.schedule.timezone.0, last, since, now) {
                info!(
                    job = job.name(),
                    "a scheduled run was missed; running it now"
                );
                due.push(job);
            }
        }
        due = schedule::due_order(due);
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !due.is_empty() {
            let job = due.remove(0);
            log.last_run.insert(job, crate::time::now());
            save_log(&log, &ctx);
            run_job(&ctx, job, shutdown.clone()).await;
            continue;
        }
        let s = ctx.settings();
        let now = crate::time::now();
        let mut next: Option<(Timestamp, Job)> = None;
        for job in Job::ALL {
            let at = cron_of(&s.schedule, job)
                .and_then(|c| schedule::next_after(c, &s.schedule.timezone.0, now));
            ctx.shared.job(job, |v| {
                v.schedule = cron_of(&s.schedule, job).map(|c| c.text.clone());
                v.next = at;
            });
            if let Some(at) = at {
                if next.is_none_or(|(t, _)| at < t) {
                    next = Some((at, job));
                }
            }
        }
        let wait = match next {
            Some((at, _)) => {
                Duration::from_millis((at.as_millisecond() - now.as_millisecond()).max(0) as u64)
            }
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let now = crate::time::now();
                for job in Job::ALL {
                    let v = ctx.shared.jobs.lock().unwrap().get(&job).and_then(|v| v.next);
                    if v.is_some_and(|t| t <= now) {
                        due.push(job);
                    }
                }
                due = schedule::due_order(due);
            }
            _ = settings.changed() => info!("schedule reloaded"),
            _ = session_stopped(shutdown.clone()) => return,
        }
    }
}

fn cron_of(s: &ScheduleConfig, job: Job) -> Option<&crate::config::daemon::Cron> {
    match job {
        Job::Backup => s.backup.as_ref(),
        Job::Incremental => s.incremental.as_ref(),
        Job::Verify => s.verify.as_ref(),
        Job::Drill => s.drill.as_ref(),
    }
}

fn save_log(log: &JobLog, ctx: &Ctx) {
    if let Err(e) = log.save(&ctx.spool_dir) {
        warn!(error = %e, "cannot record the schedule's state");
    }
}

async fn run_job(ctx: &Arc<Ctx>, job: Job, shutdown: watch::Receiver<bool>) {
    let t0 = crate::time::now();
    info!(job = job.name(), "scheduled job starting");
    ctx.shared.job(job, |v| {
        v.running = true;
        v.last_start = Some(t0);
    });
    let r = match job {
        Job::Backup => jobs::backup(ctx, shutdown, false).await,
        Job::Incremental => jobs::backup(ctx, shutdown, true).await,
        Job::Verify => jobs::verify_all(ctx).await,
        Job::Drill => jobs::drill_latest(ctx).await,
    };
    match &r {
        Ok(s) => info!(job = job.name(), "scheduled job done: {s}"),
        Err(e) => warn!(job = job.name(), error = %e, "scheduled job failed"),
    }
    ctx.shared.job(job, |v| {
        v.running = false;
        v.last_end = Some(crate::time::now());
        v.last_ok = Some(r.is_ok());
        v.last_result = Some(match r {
            Ok(s) => s,
            Err(e) => e,
        });
    });
    if let Ok(b) = ctx.repo.list_backups().await {
        *ctx.shared.backups.lock().unwrap() = b.iter().map(backup_view).collect();
    }
    release_freed_memory();
}

/// Gives the memory a job freed back to the system (glibc keeps it otherwise).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn backup_view(r: &crate::repo::catalog::BackupRecord) -> BackupView {
    BackupView {
        id: r.id.clone(),
        status: r.status,
        timeline: r.timeline,
        start_lsn: r.start_lsn,
        stop_lsn: r.stop_lsn,
        start_time: r.start_time,
        stop_time: r.stop_time,
        size_bytes: r.size_bytes,
        stored_bytes: r.stored_bytes,
    }
}

/// Once a second: samples the server's WAL end for the RPO, and raises or resolves the
/// conditions (disconnected, RPO over objective, disk, slot); less often, reads the disk, the
/// slot, the catalog and what each tier stores.
async fn monitor(
    shared: Arc<Shared>,
    conninfo: ConnInfo,
    slot: String,
    hot_dir: PathBuf,
    settings: watch::Receiver<Arc<Settings>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut disconnected_since: Option<Instant> = None;
    let mut damaged_seen = 0u64;
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let a = settings.borrow().alerts.clone();
        let now = crate::time::now();
        let st = &shared.stream;
        let end = StreamStatus::lsn(&st.server_end);
        if end.0 > 0 {
            shared.lag.lock().unwrap().sample(now, end);
        }
        let damaged = st.damaged_segments.load(Ordering::Relaxed);
        if damaged > damaged_seen {
            damaged_seen = damaged;
            let last = st.last_damage.lock().unwrap().clone().unwrap_or_default();
            shared.alerts.send(Event::new(
                "wal_damaged",
                Severity::Critical,
                format!("WAL streamed from {} fails its record checks", shared.server),
                format!("{last}. The segment is archived as the server sent it, without an index; a restore through it is refused. Check the server's storage and its own WAL (pg_waldump), and take a new base backup once the server is sound."),
            ));
        }
        let connected = st.connected.load(Ordering::Relaxed);
        if connected {
            disconnected_since = None;
            shared.alerts.condition(
                false,
                Event::new(
                    "stream_failed",
                    Severity::Critical,
                    String::new(),
                    String::new(),
                ),
                || "WAL streaming runs again".into(),
            );
        }
        let since = *disconnected_since.get_or_insert_with(Instant::now);
        shared.alerts.condition(
            !connected && since.elapsed() >= a.disconnected_after,
            Event::new(
                "stream_disconnected",
                Severity::Critical,
                format!(
                    "the replication stream to {} has been disconnected for over {} s",
                    shared.server,
                    a.disconnected_after.as_secs()
                ),
                "archiver run reconnects by itself; WAL the server writes meanwhile is not archived (the slot keeps it on the server)".into(),
            ),
            || format!("the replication stream to {} is connected again", shared.server),
        );
        let tiers = shared.tiers_now(now);
        if end.0 > 0 {
            for t in &tiers {
                shared.alerts.condition(
                    t.rpo_seconds > t.rpo_objective_seconds,
                    Event::new(
                        "rpo_breached",
                        Severity::Critical,
                        format!(
                            "tier {}: RPO {:.0} s is over its objective of {:.0} s",
                            t.name, t.rpo_seconds, t.rpo_objective_seconds
                        ),
                        format!(
                            "durable up to {}, the server is at {end}; pending objects: {}{}",
                            t.durable_lsn
                                .map(|l| l.to_string())
                                .unwrap_or_else(|| "nothing yet".into()),
                            t.pending_objects,
                            t.last_error
                                .as_deref()
                                .map(|e| format!("; last error: {e}"))
                                .unwrap_or_default()
                        ),
                    )
                    .about(&t.name),
                    || format!("tier {}: RPO is within its objective again", t.name),
                );
            }
            let min = tiers
                .iter()
                .map(|t| t.durable_lsn.unwrap_or(Lsn(0)))
                .min()
                .unwrap_or(Lsn(0));
            shared.lag.lock().unwrap().prune(min);
        }
        if n % 10 == 0 {
            let usage = disk_usage(&hot_dir);
            *shared.disk.lock().unwrap() = usage;
            if let Some((free, total)) = usage.filter(|(_, t)| *t > 0) {
                let used = 100.0 * (1.0 - free as f64 / total as f64);
                shared.alerts.condition(
                    used > a.disk_usage_percent,
                    Event::new(
                        "disk_usage_high",
                        Severity::Warning,
                        format!(
                            "the hot tier's file system is {used:.0}% full (threshold {:.0}%)",
                            a.disk_usage_percent
                        ),
                        format!("{} has {:.1} GB free", hot_dir.display(), free as f64 / 1e9),
                    ),
                    || "the hot tier's file system has room again".into(),
                );
            }
        }
        if n % 30 == 0 {
            match slot_retained(&conninfo, &slot).await {
                Ok(Some(b)) => {
                    *shared.slot_retained.lock().unwrap() = Some(b);
                    shared.alerts.condition(
                        b > a.slot_retained,
                        Event::new(
                            "slot_retained_high",
                            Severity::Warning,
                            format!(
                                "replication slot {slot} holds {:.1} GB of WAL on the server (threshold {:.1} GB)",
                                b as f64 / 1e9,
                                a.slot_retained as f64 / 1e9
                            ),
                            "the server keeps WAL archiver has not acknowledged: is the stream behind or down?".into(),
                        ),
                        || format!("replication slot {slot} holds little WAL again"),
                    );
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read the slot's retained WAL"),
            }
        }
        if let Some((repo, tiers)) = shared.repo.get() {
            if n % 60 == 0 {
                if let Ok(b) = repo.list_backups().await {
                    *shared.backups.lock().unwrap() = b.iter().map(backup_view).collect();
                }
            }
            if n % 300 == 0 {
                for (name, storage) in tiers {
                    if let Ok(objects) = storage.list("").await {
                        let bytes = objects.iter().map(|o| o.size).sum();
                        shared.stored.lock().unwrap().insert(name.clone(), bytes);
                    }
                }
            }
        }
        n += 1;
    }
}

/// Free and total bytes of the file system holding `dir`.
fn disk_usage(dir: &std::path::Path) -> Option<(u64, u64)> {
    Some((
        crate::storage::fs::free_bytes(dir)?,
        crate::storage::fs::total_bytes(dir)?,
    ))
}

/// WAL the slot holds on the server, over an ordinary SQL connection.
async fn slot_retained(ci: &ConnInfo, slot: &str) -> Result<Option<u64>, PgError> {
    let mut c = Connection::connect(ci, None, "archiver run").await?;
    // The slot name is validated (lower-case letters, digits, underscores).
    let r = c
        .simple_query(&format!(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint from pg_replication_slots where slot_name = '{slot}'"
        ))
        .await;
    c.close().await;
    Ok(r?
        .first()
        .and_then(|rs| rs.text(0, 0))
        .and_then(|t| t.parse::<i64>().ok())
        .map(|b| b.max(0) as u64))
}
