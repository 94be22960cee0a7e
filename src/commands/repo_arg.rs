//! How a command names its repository: `--repo DIR`, `--repo s3://BUCKET/PREFIX`, or
//! `--config FILE` (a tiered repository, see [`crate::config`]) — the flags, turned into a
//! [`RepoLocation`] that opens it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::open::RepoLocation;
pub use crate::open::Tiers;
use crate::storage::s3::S3Options;
use crate::storage::Storage;

#[derive(clap::Args, Debug, Clone)]
pub struct RepoArg {
    /// Repository: a directory, or s3://BUCKET/PREFIX (AWS configuration from the environment).
    #[arg(long, env = "ARCHIVER_REPO", required_unless_present = "config")]
    pub repo: Option<PathBuf>,
    /// A tiered repository's configuration file (TOML: hot tier, remote tiers, encryption);
    /// instead of --repo.
    #[arg(long, env = "ARCHIVER_CONFIG", conflicts_with = "repo")]
    pub config: Option<PathBuf>,
    /// With --repo s3://…: the local directory for the stream's spool and the locks (stream,
    /// backup) [default: one per repository URL, created 0700, under
    /// $XDG_STATE_HOME/archiver/spool, else /var/lib/archiver/spool for root, else
    /// ~/.local/state/archiver/spool].
    #[arg(long, env = "ARCHIVER_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// With --repo s3://…: client-side encryption key file (64 hex digits or 32 raw bytes).
    #[arg(long, env = "ARCHIVER_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// With --repo s3://…: storage class of the objects written (e.g. STANDARD_IA).
    #[arg(long, value_name = "CLASS")]
    pub s3_storage_class: Option<String>,
    /// With --repo s3://…: server-side encryption, AES256 (SSE-S3) or aws:kms (SSE-KMS).
    #[arg(long, value_name = "SSE")]
    pub s3_sse: Option<String>,
    /// With --repo s3://… --s3-sse aws:kms: the KMS key.
    #[arg(long, value_name = "KEY")]
    pub s3_sse_kms_key_id: Option<String>,
    /// With --repo s3://…: sign upload bodies too (SigV4 payload hash), for buckets whose
    /// policy demands it. Default: bodies go out with their CRC-32 in a signed header.
    #[arg(long)]
    pub s3_sign_payload: bool,
}

impl RepoArg {
    /// Where the flags say the repository is (a tiered repository's configuration loaded).
    pub fn location(&self) -> anyhow::Result<RepoLocation> {
        if let Some(file) = &self.config {
            let config = Config::load(file)?;
            return Ok(RepoLocation::Tiered {
                file: file.clone(),
                config: Box::new(config),
            });
        }
        let repo = self.repo.clone().expect("clap requires --repo or --config");
        match repo.to_str().filter(|s| s.starts_with("s3://")) {
            Some(url) => Ok(RepoLocation::S3 {
                url: url.to_string(),
                options: Box::new(S3Options {
                    storage_class: self.s3_storage_class.clone(),
                    sse: self.s3_sse.clone(),
                    sse_kms_key_id: self.s3_sse_kms_key_id.clone(),
                    sign_payload: self.s3_sign_payload.then_some(true),
                    ..S3Options::default()
                }),
                key_file: self.encryption_key_file.clone(),
                spool_dir: self.spool_dir.clone(),
            }),
            None => Ok(RepoLocation::Dir(repo)),
        }
    }

    /// The S3 URL, when the repository is in S3 (`--repo s3://…`).
    pub fn s3_url(&self) -> Option<&str> {
        self.repo
            .as_deref()
            .and_then(Path::to_str)
            .filter(|s| s.starts_with("s3://"))
    }

    pub fn local_dir(&self, command: &str) -> anyhow::Result<PathBuf> {
        Ok(self.location()?.local_dir(command)?)
    }

    pub fn check_readable_by(&self, owner: Option<(u32, u32)>, who: &str) -> anyhow::Result<()> {
        Ok(self.location()?.check_readable_by(owner, who)?)
    }

    pub async fn open_for_reading(&self, checked: bool) -> anyhow::Result<crate::repo::Repo> {
        Ok(self.location()?.open_for_reading(checked).await?)
    }

    pub async fn storage_checked(&self) -> anyhow::Result<Arc<dyn Storage>> {
        Ok(self.location()?.storage_checked().await?)
    }

    pub async fn storage_for_writing(&self) -> anyhow::Result<(Arc<dyn Storage>, Option<Tiers>)> {
        Ok(self.location()?.storage_for_writing().await?)
    }

    pub fn for_restore_command(&self) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
        Ok(self.location()?.for_restore_command()?)
    }

    /// How messages name the repository (before it is opened).
    pub fn name(&self) -> String {
        match (&self.config, &self.repo) {
            (Some(c), _) => format!("tiered repository {}", c.display()),
            (None, Some(r)) => r.display().to_string(),
            (None, None) => String::new(),
        }
    }
}
