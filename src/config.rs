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
//! # sse_kms_key_id, object_lock_mode ("GOVERNANCE" | "COMPLIANCE"), object_lock_days
//! ```
//!
//! Invariants: a configuration is validated whole before anything is opened or written (unknown
//! keys, bad values, duplicate tier names, a key source that cannot be read are all refused with
//! the file named); the key itself is never kept outside [`MasterKey`], never printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::storage::encrypted::{KeyError, MasterKey};
use crate::storage::s3::S3Options;

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
        let s3 = S3Options::deserialize(r.rest)
            .map_err(|e| format!("remote tier {:?}: {}", r.name, e.message()))?;
        Ok(RemoteConfig {
            name: r.name,
            url: r.url,
            s3,
            retention,
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
    /// The file it was read from (absolute), for restore_command.
    #[serde(skip)]
    pub source: PathBuf,
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
        let mut c = Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        c.source = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if c.hot.path.is_relative() {
            // Relative to the file, not to wherever the command runs (restore_command).
            let base = c.source.parent().unwrap_or(Path::new("/"));
            c.hot.path = base.join(&c.hot.path);
        }
        Ok(c)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| locate_error(text, &e))?;
        c.validate()?;
        Ok(c)
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
"#,
        )
        .unwrap();
        assert_eq!(c.hot.retention, Some(Duration::from_secs(2 * 86400)));
        assert_eq!(c.upload.partial_upload_interval, Duration::from_secs(5));
        assert_eq!(c.upload.max_rate, Some(50_000_000));
        assert_eq!(c.remotes.len(), 2);
        assert_eq!(c.remotes[0].s3.sse.as_deref(), Some("aws:kms"));
        assert_eq!(c.remotes[1].s3.object_lock_days, Some(30));

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
    fn rates() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("2kB"), Ok(2000));
        assert_eq!(parse_rate("1MiB"), Ok(1 << 20));
        assert_eq!(parse_rate("1.5 MB/s"), Ok(1_500_000));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("5 parsecs").is_err());
    }
}
