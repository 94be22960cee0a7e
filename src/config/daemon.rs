//! The sections of the configuration file that `archiver run` reads: `[server]`,
//! `[schedule]`, `[http]`, `[alerts]` and `[[notify]]` (the repository's own sections are in
//! the parent module).
//!
//! ```toml
//! environment = "prod"                # in the catalog and in every alert
//!
//! [server]
//! conninfo = "host=db user=archiver"  # or -d; a password here is never logged
//! slot = "archiver"
//! synchronous = true                  # fsync and acknowledge every batch (RPO 0)
//!
//! [schedule]                          # cron: minute hour day-of-month month day-of-week
//! backup = "0 2 * * *"
//! verify = "0 4 * * 0"
//! drill = "0 5 1 * *"
//! timezone = "Europe/Paris"           # default UTC
//! backup_retries = 3
//!
//! [http]
//! listen = "127.0.0.1:9187"           # "" turns the endpoint off
//!
//! [alerts]
//! disconnected_after = "60s"
//! rto_objective = "15m"
//! disk_usage_percent = 80
//! slot_retained = "10GB"
//!
//! [[notify]]
//! type = "webhook"                    # or "slack", "email"
//! url = "https://alerts.example.com/hook"
//! ```
//!
//! Invariants: every schedule, zone, address and channel is checked when the file is read, so
//! a bad one refuses the start, never fails at 2 a.m.; secrets (SMTP passwords, webhook URLs,
//! which carry tokens) are kept in [`Secret`], whose `Debug` and `Display` print nothing of
//! them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{de_duration, parse_rate};

/// Secrets in the file (the conninfo, webhook URLs, SMTP passwords) are the client's own
/// never-printed type.
pub use crate::pg::conninfo::Secret;

/// `[server]`: the cluster `archiver run` archives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A postgresql:// URI or key=value pairs (`-d` wins).
    pub conninfo: Option<Secret>,
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Acknowledge WAL only once fsync'd, after every batch (a synchronous standby: RPO 0).
    #[serde(default)]
    pub synchronous: bool,
    pub application_name: Option<String>,
    /// zstd level of archived segments.
    #[serde(default = "default_wal_level")]
    pub compress_level: i32,
    /// Without `synchronous`, fsync at least this often.
    #[serde(default = "default_fsync_interval", deserialize_with = "de_duration")]
    pub fsync_interval: Duration,
    /// Index the WAL's records as segments are archived (`wal::index`).
    #[serde(default = "default_true")]
    pub index: bool,
}

fn default_slot() -> String {
    "archiver".into()
}
fn default_wal_level() -> i32 {
    1
}
fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            conninfo: None,
            slot: default_slot(),
            synchronous: false,
            application_name: None,
            compress_level: default_wal_level(),
            fsync_interval: default_fsync_interval(),
            index: true,
        }
    }
}

/// A cron expression (five fields, or six with seconds first), checked when read.
#[derive(Clone)]
pub struct Cron {
    pub text: String,
    pub cron: croner::Cron,
}

impl std::fmt::Debug for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl PartialEq for Cron {
    fn eq(&self, o: &Cron) -> bool {
        self.text == o.text
    }
}

impl FromStr for Cron {
    type Err = String;
    fn from_str(s: &str) -> Result<Cron, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(s)
            .map_err(|e| {
                format!("{s:?} is not a cron schedule ({e}); write e.g. \"0 2 * * *\" (02:00 every day)")
            })?;
        Ok(Cron {
            text: s.to_string(),
            cron,
        })
    }
}

impl<'de> Deserialize<'de> for Cron {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A time zone by IANA name (`Europe/Paris`), checked against the zone database when read.
#[derive(Clone, Debug, PartialEq)]
pub struct Zone(pub jiff::tz::TimeZone);

impl Default for Zone {
    fn default() -> Self {
        Zone(jiff::tz::TimeZone::UTC)
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        jiff::tz::TimeZone::get(&s).map(Zone).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a time zone ({e}); write e.g. \"UTC\" or \"Europe/Paris\""
            ))
        })
    }
}

/// `[schedule]`: when the daemon takes backups, verifies the repository and drills a restore.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub backup: Option<Cron>,
    /// PostgreSQL 17+ (`summarize_wal = on`): an incremental backup on top of the newest
    /// backup; where none can be taken (older server, summaries off or gone, no backup yet) a
    /// full one is taken instead. A time also in `backup` takes the full backup only.
    pub incremental: Option<Cron>,
    pub verify: Option<Cron>,
    pub drill: Option<Cron>,
    /// The zone the schedules are read in (default UTC).
    #[serde(default)]
    pub timezone: Zone,
    /// A failed backup is tried again this many times (with backoff), then alerted.
    #[serde(default = "default_backup_retries")]
    pub backup_retries: u32,
    /// The first delay between backup attempts (doubling, with jitter).
    #[serde(
        default = "default_backup_retry_delay",
        deserialize_with = "de_duration"
    )]
    pub backup_retry_delay: Duration,
    /// After a backup, how long to wait for every remote tier to hold it before expiring
    /// (expire is skipped this time when it takes longer: a tier must never lose the last
    /// record of a backup the hot tier still had to ship).
    #[serde(default = "default_upload_timeout", deserialize_with = "de_duration")]
    pub backup_upload_timeout: Duration,
    /// On SIGTERM, how long a running backup may go on before it is stopped (recorded failed).
    #[serde(default = "default_stop_timeout", deserialize_with = "de_duration")]
    pub stop_timeout: Duration,
    /// zstd level of backups (default 1, as `archiver backup`).
    #[serde(default = "default_backup_level")]
    pub backup_compress_level: i32,
    /// The server compresses the backups (PostgreSQL 15+; one zstd worker thread on the server),
    /// as `archiver backup --server-compress`.
    #[serde(default)]
    pub backup_server_compress: bool,
    /// `fast` (default) or `spread` checkpoint at the start of a backup.
    #[serde(default = "default_checkpoint")]
    pub backup_checkpoint: String,
    /// After each successful backup, expire under `[retention]` (default on when a retention
    /// policy is configured).
    #[serde(default = "default_true")]
    pub expire_after_backup: bool,
    /// The drill: PostgreSQL's binaries (default: pg_ctl on PATH, else the Debian layout).
    pub drill_pg_bin: Option<PathBuf>,
    /// The drill's scratch directory (default: the temporary directory).
    pub drill_scratch: Option<PathBuf>,
    /// A SQL file whose statements must all succeed on the drilled cluster.
    pub drill_check_sql: Option<PathBuf>,
    /// The OS user PostgreSQL runs as in the drill when archiver runs as root.
    #[serde(default = "default_postgres")]
    pub drill_os_user: String,
    /// The restored cluster's superuser.
    #[serde(default = "default_postgres")]
    pub drill_pg_user: String,
    #[serde(default = "default_drill_timeout", deserialize_with = "de_duration")]
    pub drill_timeout: Duration,
}

fn default_backup_retries() -> u32 {
    3
}
fn default_backup_retry_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_upload_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_backup_level() -> i32 {
    1
}
fn default_checkpoint() -> String {
    "fast".into()
}
fn default_true() -> bool {
    true
}
fn default_postgres() -> String {
    "postgres".into()
}
fn default_drill_timeout() -> Duration {
    Duration::from_secs(3600)
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        toml::from_str("").expect("every [schedule] key has a default")
    }
}

/// `[http]`: the metrics and health endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port`; empty: no endpoint.
    #[serde(default = "default_listen", deserialize_with = "de_listen")]
    pub listen: Option<SocketAddr>,
}

fn default_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9187)))
}

fn de_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an address to listen on; write e.g. \"127.0.0.1:9187\" or \"0.0.0.0:9187\", or \"\" for none"
        ))
    })
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

/// `[alerts]`: when conditions become alerts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// The stream may be disconnected this long before it is an alert.
    #[serde(default = "default_disconnected", deserialize_with = "de_duration")]
    pub disconnected_after: Duration,
    /// A drill whose measured recovery takes longer is an alert.
    #[serde(default = "default_objective", deserialize_with = "de_duration")]
    pub rto_objective: Duration,
    /// The hot tier's file system fuller than this (percent) is an alert.
    #[serde(default = "default_disk_percent")]
    pub disk_usage_percent: f64,
    /// WAL the slot holds on the server beyond this is an alert (`"10GB"`).
    #[serde(default = "default_slot_retained", deserialize_with = "de_bytes")]
    pub slot_retained: u64,
    /// Also send an event for every successful backup.
    #[serde(default)]
    pub backup_success: bool,
    /// Events waiting for delivery per channel; beyond it the oldest are dropped (counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// How long one event is retried on a channel before it is given up (counted, logged).
    #[serde(default = "default_give_up", deserialize_with = "de_duration")]
    pub delivery_give_up_after: Duration,
}

fn default_disconnected() -> Duration {
    Duration::from_secs(60)
}
fn default_objective() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_disk_percent() -> f64 {
    80.0
}
fn default_slot_retained() -> u64 {
    10_000_000_000
}
fn default_queue() -> usize {
    100
}
fn default_give_up() -> Duration {
    Duration::from_secs(600)
}

fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    parse_rate(&s).map_err(|e| serde::de::Error::custom(e.replace("rate", "size")))
}

impl Default for AlertsConfig {
    fn default() -> Self {
        toml::from_str("").expect("every [alerts] key has a default")
    }
}

/// How an email channel talks to its SMTP server.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refused without it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on the same host or a test sink.
    None,
}

/// A `[[notify]]` channel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum NotifyConfig {
    /// A JSON POST of each event.
    Webhook {
        url: Secret,
        #[serde(default)]
        name: Option<String>,
    },
    /// A Slack-compatible incoming webhook (`{"text": …}`).
    Slack {
        url: Secret,
        #[serde(default)]
        name: Option<String>,
    },
    /// Email over SMTP.
    Email {
        #[serde(default)]
        name: Option<String>,
        /// The SMTP server's host name.
        host: String,
        /// Default: 587 with STARTTLS, 465 with TLS, 25 without.
        port: Option<u16>,
        #[serde(default)]
        tls: SmtpTls,
        from: String,
        to: Vec<String>,
        username: Option<String>,
        /// The password, from a file (first line) or an environment variable.
        password_file: Option<PathBuf>,
        password_env: Option<String>,
    },
}

impl NotifyConfig {
    /// How logs and metrics name the channel (never its URL: webhook URLs carry tokens).
    pub fn label(&self, index: usize) -> String {
        let (kind, name) = match self {
            NotifyConfig::Webhook { name, .. } => ("webhook", name),
            NotifyConfig::Slack { name, .. } => ("slack", name),
            NotifyConfig::Email { name, .. } => ("email", name),
        };
        match name {
            Some(n) => n.clone(),
            None => format!("{kind}-{}", index + 1),
        }
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        match self {
            NotifyConfig::Webhook { url, .. } | NotifyConfig::Slack { url, .. } => {
                let u = url.expose();
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err("a webhook url must start with http:// or https://".into());
                }
            }
            NotifyConfig::Email {
                to,
                from,
                username,
                password_file,
                password_env,
                ..
            } => {
                if to.is_empty() {
                    return Err("an email channel needs at least one address in `to`".into());
                }
                for a in to.iter().chain(std::iter::once(from)) {
                    a.parse::<lettre::message::Mailbox>()
                        .map_err(|e| format!("{a:?} is not an email address ({e})"))?;
                }
                if password_file.is_some() && password_env.is_some() {
                    return Err("give at most one of password_file and password_env".into());
                }
                if username.is_some() != (password_file.is_some() || password_env.is_some()) {
                    return Err(
                        "give username with password_file or password_env (or none of them)".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The SMTP password, read from its file or variable (for an email channel with one).
    pub fn smtp_password(&self) -> Result<Option<Secret>, String> {
        let NotifyConfig::Email {
            password_file,
            password_env,
            ..
        } = self
        else {
            return Ok(None);
        };
        if let Some(f) = password_file {
            let s = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read the SMTP password file {}: {e}", f.display()))?;
            let line = s.lines().next().unwrap_or("").to_string();
            return Ok(Some(Secret::new(line)));
        }
        if let Some(v) = password_env {
            return std::env::var(v)
                .map(|s| Some(Secret::new(s)))
                .map_err(|_| format!("the SMTP password variable {v} is not set"));
        }
        Ok(None)
    }
}

/// A configured per-tier RPO objective, or the default.
pub fn rpo_objective(v: Option<Duration>) -> Duration {
    v.unwrap_or(default_objective())
}
