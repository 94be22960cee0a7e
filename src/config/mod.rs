//! The configuration file (`--config FILE`, TOML) of a tiered repository: a local hot tier, one
//! or more remote tiers (S3), the uploader's limits, and optional client-side encryption.
//!
//! ```toml
//! [hot]
//! path = "/var/lib/archiver"         # local hot tier: what the flush position acknowledges
//! retention = "2d"                   # optional: evict objects older than this from the hot
//!                                    # tier, once every remote tier holds them verified
//!
//! [upload]
//! partial_upload_interval = "10s"    # ship the growing .partial segment this often (RPO)
//! concurrency = 4                    # objects in flight per remote tier
//! max_rate = "50MB"                  # optional bandwidth limit per remote tier (bytes/s)
//!
//! [encryption]                       # optional: AES-256-GCM for the remote tiers
//! key_file = "/etc/archiver/key"     # 64 hex digits or 32 raw bytes; or key_env = "VAR"
//!
//! [[remote]]
//! name = "offsite"
//! url = "s3://bucket/prefix"
//! # endpoint, region, path_style, storage_class, sse ("AES256" | "aws:kms"),
//! # sse_kms_key_id, object_lock_mode ("GOVERNANCE" | "COMPLIANCE"), object_lock_days,
//! # rpo_objective = "1m" (the hot tier takes it too; default 15 minutes)
//! ```
//!
//! `archiver run` reads more sections of the same file ([`daemon`]). Any key of a table can be
//! overridden from the environment, so that one file serves every environment:
//! `ARCHIVER_<TABLE>__<KEY>` (`ARCHIVER_SERVER__CONNINFO`, `ARCHIVER_SCHEDULE__BACKUP`,
//! `ARCHIVER_HTTP__LISTEN`), and `ARCHIVER_ENVIRONMENT` for the top-level label; the value is
//! read as a TOML value when it is one (`3`, `true`, `["a", "b"]`), else as a string. Overridden
//! keys are logged by name, never by value.
//!
//! Invariants: a configuration is validated whole before anything is opened or written (unknown
//! keys, bad values, duplicate tier names, a key source that cannot be read are all refused with
//! the file named); the key itself is never kept outside [`MasterKey`], never printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod daemon;

use crate::storage::encrypted::{KeyError, MasterKey};
use crate::storage::s3::S3Options;

/// The zstd levels WAL may be archived at: 1 to 19, or zstd's fast levels −1 to −7 for hosts
/// where CPU is scarcer than storage (on pgbench WAL, −1 took about a quarter less CPU than 1
/// and stored a quarter more).
pub const WAL_COMPRESS_LEVELS: std::ops::RangeInclusive<i32> = -7..=19;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"10s\", \"5m\", \"2d\""
        ))
    })
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_opt_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    parse_rate(&s).map(Some).map_err(serde::de::Error::custom)
}

/// `"50MB"`, `"512KiB"`, `"1G"`, `"1000"`: bytes per second (k/M/G decimal, Ki/Mi/Gi binary).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid rate {s:?} (e.g. \"50MB\")"))?;
    let unit = unit.trim().trim_end_matches("/s");
    let mult: f64 = match unit.trim_end_matches(['B', 'b']) {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "invalid rate unit in {s:?} (use kB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let v = (n * mult) as u64;
    if v == 0 {
        return Err(format!("rate {s:?} must be positive"));
    }
    Ok(v)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotConfig {
    pub path: PathBuf,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub retention: Option<Duration>,
    /// How far (in time) the hot tier may trail the server before `archiver run` alerts.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rpo_objective: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadConfig {
    #[serde(default = "default_partial_interval", deserialize_with = "de_duration")]
    pub partial_upload_interval: Duration,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default, deserialize_with = "de_opt_rate")]
    pub max_rate: Option<u64>,
}

fn default_partial_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_concurrency() -> usize {
    4
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            partial_upload_interval: default_partial_interval(),
            concurrency: default_concurrency(),
            max_rate: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    pub key_file: Option<PathBuf>,
    pub key_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawRemote")]
pub struct RemoteConfig {
    pub name: String,
    pub url: String,
    pub s3: S3Options,
    /// This tier's own retention policy (`[remote.retention]`), instead of `[retention]`.
    pub retention: Option<RetentionConfig>,
    /// How far (in time) this tier may trail the server before `archiver run` alerts.
    pub rpo_objective: Option<Duration>,
}

/// A retention policy as written (`[retention]`, `[remote.retention]`); see `archiver expire`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub keep_within: Option<Duration>,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_quarterly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// Failed backups go once this old (default 1 day).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub failed_grace: Option<Duration>,
}

/// A `[[remote]]` table as written: the S3 options sit beside name and url. (serde's flatten
/// would accept any misspelt key, so the rest is parsed strictly on its own.)
#[derive(Deserialize)]
struct RawRemote {
    name: String,
    url: String,
    #[serde(flatten)]
    rest: toml::Table,
}

impl TryFrom<RawRemote> for RemoteConfig {
    type Error = String;
    fn try_from(mut r: RawRemote) -> Result<Self, String> {
        let retention = match r.rest.remove("retention") {
            Some(v) => Some(
                RetentionConfig::deserialize(v)
                    .map_err(|e| format!("remote tier {:?}, retention: {}", r.name, e.message()))?,
            ),
            None => None,
        };
        let rpo_objective = match r.rest.remove("rpo_objective") {
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| humantime::parse_duration(s).ok())
                    .ok_or_else(|| {
                        format!(
                            "remote tier {:?}: rpo_objective {v} is not a duration; write e.g. \"1m\"",
                            r.name
                        )
                    })?,
            ),
            None => None,
        };
        let s3 = S3Options::deserialize(r.rest)
            .map_err(|e| format!("remote tier {:?}: {}", r.name, e.message()))?;
        Ok(RemoteConfig {
            name: r.name,
            url: r.url,
            s3,
            retention,
            rpo_objective,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The operator's label for where this cluster runs (`environment = "prod"`), kept in
    /// every backup's record.
    #[serde(default)]
    pub environment: Option<String>,
    /// The retention policy of every tier without its own (`[retention]`).
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    pub hot: HotConfig,
    #[serde(default)]
    pub upload: UploadConfig,
    pub encryption: Option<EncryptionConfig>,
    #[serde(default, rename = "remote")]
    pub remotes: Vec<RemoteConfig>,
    /// `archiver run`: the server to archive.
    #[serde(default)]
    pub server: daemon::ServerConfig,
    /// `archiver run`: backups, verifies and drills by the clock.
    #[serde(default)]
    pub schedule: daemon::ScheduleConfig,
    /// `archiver run`: metrics and health.
    #[serde(default)]
    pub http: daemon::HttpConfig,
    /// `archiver run`: when conditions become alerts.
    #[serde(default)]
    pub alerts: daemon::AlertsConfig,
    /// `archiver run`: where alerts go.
    #[serde(default)]
    pub notify: Vec<daemon::NotifyConfig>,
    /// The file it was read from (absolute), for restore_command.
    #[serde(skip)]
    pub source: PathBuf,
}

/// The top-level keys an `ARCHIVER_<KEY>` variable sets (other `ARCHIVER_` variables without
/// `__` are not configuration: `ARCHIVER_LOG`, `ARCHIVER_CONFIG`).
const TOP_LEVEL_OVERRIDES: &[&str] = &["environment"];

/// `(table, key, value)` for every `ARCHIVER_TABLE__KEY` (and `ARCHIVER_ENVIRONMENT`).
fn env_overrides(vars: &[(String, String)]) -> Vec<(Option<String>, String, toml::Value)> {
    let mut out = Vec::new();
    for (k, v) in vars {
        let Some(rest) = k.strip_prefix("ARCHIVER_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let (section, key) = match rest.split_once("__") {
            Some((s, k)) if !s.is_empty() && !k.is_empty() => (Some(s.to_string()), k.to_string()),
            Some(_) => continue,
            None if TOP_LEVEL_OVERRIDES.contains(&rest.as_str()) => (None, rest),
            None => continue,
        };
        let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(v.clone()));
        out.push((section, key, value));
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

fn names(o: &[(Option<String>, String, toml::Value)]) -> Vec<String> {
    o.iter()
        .map(|(s, k, _)| match s {
            Some(s) => format!("{s}.{k}"),
            None => k.clone(),
        })
        .collect()
}

/// A parse error with the line and the key it is about (`line 3, key "retention": …`).
fn locate_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match key {
        Some(k) => format!("line {line_no}, key {k:?}: {}", e.message()),
        None => format!("line {line_no}: {}", e.message()),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let (mut c, overridden) =
            Self::parse_with_env(&text, &vars).map_err(|message| ConfigError::Invalid {
                path: path.display().to_string(),
                message,
            })?;
        if !overridden.is_empty() {
            tracing::info!(keys = %overridden.join(", "), "configuration keys set from ARCHIVER_… variables");
        }
        c.source = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if c.hot.path.is_relative() {
            // Relative to the file, not to wherever the command runs (restore_command).
            let base = c.source.parent().unwrap_or(Path::new("/"));
            c.hot.path = base.join(&c.hot.path);
        }
        Ok(c)
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Config, String> {
        Self::parse_with_env(text, &[]).map(|(c, _)| c)
    }

    /// Parses `text` with the overrides among `vars` (see the module documentation); also
    /// returns the keys overridden (`server.conninfo`).
    pub fn parse_with_env(
        text: &str,
        vars: &[(String, String)],
    ) -> Result<(Config, Vec<String>), String> {
        let overrides = env_overrides(vars);
        let c: Config = if overrides.is_empty() {
            toml::from_str(text).map_err(|e| locate_error(text, &e))?
        } else {
            let mut table: toml::Table =
                toml::from_str(text).map_err(|e| locate_error(text, &e))?;
            for (section, key, value) in &overrides {
                let t = match section {
                    None => &mut table,
                    Some(s) => match table
                        .entry(s.clone())
                        .or_insert_with(|| toml::Value::Table(Default::default()))
                    {
                        toml::Value::Table(t) => t,
                        _ => {
                            return Err(format!(
                                "{s} is not a table; it cannot take {key} from the environment"
                            ))
                        }
                    },
                };
                t.insert(key.clone(), value.clone());
            }
            Config::deserialize(toml::Value::Table(table)).map_err(|e| {
                format!(
                    "{} (with keys from the environment: {})",
                    e.message(),
                    names(&overrides).join(", ")
                )
            })?
        };
        c.validate()?;
        Ok((c, names(&overrides)))
    }

    fn validate(&self) -> Result<(), String> {
        if self.upload.concurrency == 0 || self.upload.concurrency > 64 {
            return Err("upload.concurrency must be between 1 and 64".into());
        }
        if self.upload.partial_upload_interval < Duration::from_millis(100) {
            return Err("upload.partial_upload_interval must be at least 100ms".into());
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.remotes {
            if r.name.is_empty()
                || !r
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "remote tier name {:?}: use letters, digits, - and _",
                    r.name
                ));
            }
            if !names.insert(&r.name) {
                return Err(format!("two remote tiers are named {:?}", r.name));
            }
            if crate::storage::s3::parse_url(&r.url).is_none() {
                return Err(format!(
                    "remote tier {:?}: url {:?} is not s3://BUCKET[/PREFIX]",
                    r.name, r.url
                ));
            }
            r.s3.validate()
                .map_err(|e| format!("remote tier {:?}: {e}", r.name))?;
        }
        if self.hot.retention.is_some() && self.remotes.is_empty() {
            return Err("hot.retention needs at least one remote tier (objects are evicted only once a remote tier holds them)".into());
        }
        if !(0.0..=100.0).contains(&self.alerts.disk_usage_percent) {
            return Err("alerts.disk_usage_percent must be between 0 and 100".into());
        }
        if self.alerts.queue == 0 {
            return Err("alerts.queue must be at least 1".into());
        }
        if !matches!(self.schedule.backup_checkpoint.as_str(), "fast" | "spread") {
            return Err("schedule.backup_checkpoint must be \"fast\" or \"spread\"".into());
        }
        let wal = WAL_COMPRESS_LEVELS;
        if !wal.contains(&self.server.compress_level) {
            return Err(format!(
                "server.compress_level must be between {} and {} (negative: zstd's fast levels)",
                wal.start(),
                wal.end()
            ));
        }
        if !(1..=19).contains(&self.schedule.backup_compress_level) {
            return Err("schedule.backup_compress_level must be between 1 and 19".into());
        }
        crate::pg::replication::validate_slot_name(&self.server.slot)
            .map_err(|e| format!("server.slot: {e}"))?;
        for (i, n) in self.notify.iter().enumerate() {
            n.validate()
                .map_err(|e| format!("notify channel {}: {e}", n.label(i)))?;
        }
        if let Some(e) = &self.encryption {
            match (&e.key_file, &e.key_env) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err("encryption: give exactly one of key_file and key_env".into()),
            }
        }
        Ok(())
    }

    /// The encryption key, when configured; an unreadable or malformed key is an error.
    pub fn encryption_key(&self) -> Result<Option<MasterKey>, ConfigError> {
        let Some(e) = &self.encryption else {
            return Ok(None);
        };
        Ok(Some(match (&e.key_file, &e.key_env) {
            (Some(f), _) => MasterKey::from_file(f)?,
            (_, Some(v)) => MasterKey::from_env(v)?,
            _ => unreachable!("validated"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_policies() {
        let c = Config::parse(
            "[hot]\npath = \"/x\"\n[retention]\nkeep_within = \"30d\"\nkeep_monthly = 12\n\
             [[remote]]\nname = \"r\"\nurl = \"s3://b\"\n[remote.retention]\nkeep_quarterly = 28\n",
        )
        .unwrap();
        let r = c.retention.unwrap();
        assert_eq!(r.keep_within, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(r.keep_monthly, 12);
        assert_eq!(c.remotes[0].retention.as_ref().unwrap().keep_quarterly, 28);
    }

    #[test]
    fn full_and_minimal_files() {
        let c = Config::parse(
            r#"
[hot]
path = "/var/lib/archiver"
retention = "2d"
[upload]
partial_upload_interval = "5s"
concurrency = 8
max_rate = "50MB"
[encryption]
key_env = "ARCHIVER_KEY"
[[remote]]
name = "offsite"
url = "s3://b/p"
region = "eu-west-1"
storage_class = "STANDARD_IA"
sse = "aws:kms"
sse_kms_key_id = "alias/archiver"
[[remote]]
name = "dr"
url = "s3://b2"
object_lock_mode = "COMPLIANCE"
object_lock_days = 30
sign_payload = true
"#,
        )
        .unwrap();
        assert_eq!(c.hot.retention, Some(Duration::from_secs(2 * 86400)));
        assert_eq!(c.upload.partial_upload_interval, Duration::from_secs(5));
        assert_eq!(c.upload.max_rate, Some(50_000_000));
        assert_eq!(c.remotes.len(), 2);
        assert_eq!(c.remotes[0].s3.sse.as_deref(), Some("aws:kms"));
        assert_eq!(c.remotes[1].s3.object_lock_days, Some(30));
        assert_eq!(c.remotes[0].s3.sign_payload, None);
        assert_eq!(c.remotes[1].s3.sign_payload, Some(true));

        let m = Config::parse("[hot]\npath = \"x\"\n").unwrap();
        assert_eq!(m.upload.partial_upload_interval, Duration::from_secs(10));
        assert_eq!(m.upload.concurrency, 4);
        assert!(m.remotes.is_empty() && m.encryption.is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let hot = "[hot]\npath = \"/x\"\n";
        let remote = "[[remote]]\nname = \"r\"\nurl = \"s3://b\"\n";
        for (text, needle) in [
            ("", "hot"),
            (
                &format!("{hot}[upload]\nconcurency = 3\n") as &str,
                "concurency",
            ),
            (&format!("{hot}[upload]\nmax_rate = \"fast\"\n"), "rate"),
            (&format!("{hot}[upload]\nconcurrency = 0\n"), "concurrency"),
            (&format!("{hot}{remote}{remote}"), "two remote tiers"),
            (
                &format!("{hot}[[remote]]\nname = \"r\"\nurl = \"/local\"\n"),
                "s3://",
            ),
            (&format!("{hot}{remote}sse = \"des\"\n"), "sse"),
            (
                &format!("{hot}{remote}storage_class = \"FAST\"\n"),
                "storage class",
            ),
            (
                &format!("{hot}{remote}object_lock_mode = \"GOVERNANCE\"\n"),
                "object_lock_days",
            ),
            (&format!("{hot}{remote}bucket_typo = 1\n"), "bucket_typo"),
            ("[hot]\npath = \"/x\"\nretention = \"1d\"\n", "remote tier"),
            (&format!("{hot}[encryption]\n"), "exactly one"),
            (
                &format!("{hot}[retention]\nkeep_within = \"3 fortnights\"\n"),
                "not a duration",
            ),
            (
                &format!("{hot}[retention]\nkeep_daily = -1\n"),
                "keep_daily",
            ),
            (&format!("{hot}[retention]\nkeep_dayly = 7\n"), "keep_dayly"),
            (
                &format!("{hot}{remote}[remote.retention]\nkeep_last = \"x\"\n"),
                "retention",
            ),
            (
                &format!("{hot}[upload]\npartial_upload_interval = \"fast\"\n"),
                "line 4, key \"partial_upload_interval\": \"fast\" is not a duration",
            ),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn daemon_sections() {
        let c = Config::parse(
            r#"
environment = "prod"
[hot]
path = "/x"
rpo_objective = "30s"
[server]
conninfo = "host=db user=archiver password=hunter2"
synchronous = true
[schedule]
backup = "0 2 * * *"
verify = "*/5 * * * * *"
timezone = "Europe/Paris"
backup_retries = 5
[http]
listen = ""
[alerts]
disconnected_after = "2m"
slot_retained = "1GB"
[[notify]]
type = "webhook"
url = "http://127.0.0.1:9/hook"
[[notify]]
type = "slack"
url = "https://hooks.slack.example/T/B/secret"
name = "ops"
[[notify]]
type = "email"
host = "smtp.example.com"
from = "archiver@example.com"
to = ["ops@example.com"]
username = "archiver"
password_env = "SMTP_PASSWORD"
[[remote]]
name = "r"
url = "s3://b"
rpo_objective = "2m"
"#,
        )
        .unwrap();
        assert_eq!(c.hot.rpo_objective, Some(Duration::from_secs(30)));
        assert_eq!(c.remotes[0].rpo_objective, Some(Duration::from_secs(120)));
        assert!(c.server.synchronous);
        assert_eq!(c.server.slot, "archiver");
        assert!(!format!("{:?}", c.server).contains("hunter2"));
        assert!(!format!("{:?}", c.notify).contains("secret"));
        assert_eq!(c.schedule.backup.as_ref().unwrap().text, "0 2 * * *");
        assert_eq!(c.schedule.backup_retries, 5);
        assert_eq!(c.schedule.timezone.0.iana_name(), Some("Europe/Paris"));
        assert_eq!(c.http.listen, None);
        assert_eq!(c.alerts.disconnected_after, Duration::from_secs(120));
        assert_eq!(c.alerts.slot_retained, 1_000_000_000);
        assert_eq!(c.alerts.rto_objective, Duration::from_secs(900));
        assert_eq!(c.notify.len(), 3);
        assert_eq!(c.notify[0].label(0), "webhook-1");
        assert_eq!(c.notify[1].label(1), "ops");

        let d = Config::parse("[hot]\npath = \"/x\"\n").unwrap();
        assert_eq!(d.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(d.schedule.backup_retries, 3);
        assert!(d.schedule.backup.is_none());
        assert!(d.notify.is_empty());
    }

    #[test]
    fn bad_daemon_sections_are_refused() {
        let hot = "[hot]\npath = \"/x\"\n";
        for (text, needle) in [
            ("[schedule]\nbackup = \"every night\"\n", "not a cron schedule"),
            ("[schedule]\nbackup = \"0 25 * * *\"\n", "not a cron schedule"),
            ("[schedule]\nincremental = \"hourly\"\n", "not a cron schedule"),
            ("[schedule]\ntimezone = \"Mars/Olympus\"\n", "not a time zone"),
            ("[schedule]\nbackup_checkpoint = \"slow\"\n", "fast"),
            ("[http]\nlisten = \"localhost\"\n", "not an address"),
            ("[alerts]\ndisk_usage_percent = 120.0\n", "between 0 and 100"),
            ("[alerts]\nslot_retained = \"lots\"\n", "size"),
            ("[server]\nslot = \"Bad-Slot\"\n", "server.slot"),
            ("[server]\ncompress_level = -8\n", "between -7 and 19"),
            ("[server]\ncompress_level = 20\n", "between -7 and 19"),
            ("[schedule]\nbackup_compress_level = -1\n", "between 1 and 19"),
            ("[[notify]]\ntype = \"pager\"\n", "pager"),
            ("[[notify]]\ntype = \"webhook\"\n", "url"),
            ("[[notify]]\ntype = \"webhook\"\nurl = \"ftp://x\"\n", "http://"),
            ("[[notify]]\ntype = \"slack\"\nurl = \"http://x\"\nchannel = \"#x\"\n", "channel"),
            (
                "[[notify]]\ntype = \"email\"\nhost = \"h\"\nfrom = \"not an address\"\nto = [\"a@b.c\"]\n",
                "not an email address",
            ),
            (
                "[[notify]]\ntype = \"email\"\nhost = \"h\"\nfrom = \"a@b.c\"\nto = []\n",
                "at least one",
            ),
            (
                "[[notify]]\ntype = \"email\"\nhost = \"h\"\nfrom = \"a@b.c\"\nto = [\"a@b.c\"]\nusername = \"u\"\n",
                "password",
            ),
        ] {
            let e = Config::parse(&format!("{hot}{text}")).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn environment_overrides() {
        let text =
            "environment = \"dev\"\n[hot]\npath = \"/x\"\n[schedule]\nbackup = \"0 2 * * *\"\n";
        let vars = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let (c, keys) = Config::parse_with_env(
            text,
            &vars(&[
                ("ARCHIVER_ENVIRONMENT", "prod"),
                ("ARCHIVER_SCHEDULE__BACKUP", "30 3 * * *"),
                ("ARCHIVER_SCHEDULE__BACKUP_RETRIES", "7"),
                ("ARCHIVER_SERVER__CONNINFO", "host=prod"),
                ("ARCHIVER_HTTP__LISTEN", "0.0.0.0:9999"),
                ("ARCHIVER_LOG", "debug"),
                ("ARCHIVER_KEY", "not configuration"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.environment.as_deref(), Some("prod"));
        assert_eq!(c.schedule.backup.unwrap().text, "30 3 * * *");
        assert_eq!(c.schedule.backup_retries, 7);
        assert_eq!(c.server.conninfo.unwrap().expose(), "host=prod");
        assert_eq!(c.http.listen, Some("0.0.0.0:9999".parse().unwrap()));
        assert_eq!(
            keys,
            [
                "environment",
                "http.listen",
                "schedule.backup",
                "schedule.backup_retries",
                "server.conninfo"
            ]
        );
        let e =
            Config::parse_with_env(text, &vars(&[("ARCHIVER_SCHEDULE__BAKUP", "x")])).unwrap_err();
        assert!(e.contains("bakup") && e.contains("schedule.bakup"), "{e}");
        let e = Config::parse_with_env(text, &vars(&[("ARCHIVER_SCHEDULE__BACKUP", "soon")]))
            .unwrap_err();
        assert!(e.contains("not a cron schedule"), "{e}");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("2kB"), Ok(2000));
        assert_eq!(parse_rate("1MiB"), Ok(1 << 20));
        assert_eq!(parse_rate("1.5 MB/s"), Ok(1_500_000));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("5 parsecs").is_err());
    }
}
