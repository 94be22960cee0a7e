//! How a command names its repository: `--repo DIR`, `--repo s3://BUCKET/PREFIX`, or
//! `--config FILE` (a tiered repository: a local hot tier and remote tiers, see
//! [`crate::config`]). Opens the storage stack for readers (every tier, reads falling back) and
//! for writers (the hot tier written, the uploader told of every write).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::storage::encrypted::{Encrypted, MasterKey};
use crate::storage::fs::FsStorage;
use crate::storage::retrying::Retrying;
use crate::storage::s3::{S3Options, S3Storage};
use crate::storage::tiered::{Reads, RemoteTier, Tiered};
use crate::storage::Storage;
use crate::upload::Queue;

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
}

/// Retries of one remote-tier operation by the uploader: short, since its workers try again
/// anyway, and a failure then shows in the tier's state (`archiver tiers`) instead of hiding
/// in a long retry.
const UPLOAD_RETRY: crate::retry::RetryPolicy = crate::retry::RetryPolicy {
    initial: std::time::Duration::from_millis(200),
    max_delay: std::time::Duration::from_secs(5),
    give_up_after: std::time::Duration::from_secs(20),
};

/// A tiered repository opened for writing: what the command's uploader needs.
pub struct Tiers {
    pub config: Config,
    pub hot: Arc<dyn Storage>,
    pub remotes: Vec<RemoteTier>,
    pub queue: Arc<Queue>,
}

/// Whether (and how) to check a bucket before using it: `Some(outage_ok)`, see
/// [`check_reachable`].
type Check = Option<bool>;

/// The remote tiers of a configuration, each S3 behind the retry wrapper (`retry`) and, with
/// a key, encryption.
async fn remote_tiers(
    config: &Config,
    key: Option<&MasterKey>,
    retry: crate::retry::RetryPolicy,
    check: Check,
) -> anyhow::Result<Vec<RemoteTier>> {
    let mut out = Vec::new();
    for r in &config.remotes {
        out.push(RemoteTier {
            name: r.name.clone(),
            url: r.url.clone(),
            storage: s3_stack(&r.url, r.s3.clone(), key, retry.clone(), check)
                .await
                .with_context(|| format!("remote tier {}", r.name))?,
        });
    }
    Ok(out)
}

/// One S3 store (checked first as `check` says) behind the retry wrapper and, with a key,
/// encryption.
async fn s3_stack(
    url: &str,
    opts: S3Options,
    key: Option<&MasterKey>,
    retry: crate::retry::RetryPolicy,
    check: Check,
) -> anyhow::Result<Arc<dyn Storage>> {
    let s3 = S3Storage::with_options(url, opts)
        .await
        .with_context(|| format!("cannot use {url}"))?;
    if let Some(outage_ok) = check {
        check_reachable(url, &s3, outage_ok).await?;
    }
    let s: Arc<dyn Storage> = Arc::new(Retrying::new(Arc::new(s3), retry));
    Ok(match key {
        Some(k) => Arc::new(Encrypted::new(s, k.clone())),
        None => s,
    })
}

/// Lists the bucket: fails at once for what retrying cannot fix (no bucket, bad credentials,
/// no permission). An outage (after 10 s of retries) fails too, unless `outage_ok` (a remote
/// tier: one attempt, then a warning — the hot tier keeps archiving, the uploader catches up).
async fn check_reachable(url: &str, s3: &S3Storage, outage_ok: bool) -> anyhow::Result<()> {
    let policy = crate::retry::RetryPolicy {
        initial: std::time::Duration::from_millis(200),
        max_delay: std::time::Duration::from_secs(2),
        give_up_after: if outage_ok {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs(10)
        },
    };
    match crate::retry::retry(&policy, "reaching the bucket", || s3.check_access()).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_transient() && outage_ok => {
            tracing::warn!(%url, error = %e, "the remote tier is unreachable for now; uploads will catch up");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot use {url}"))),
    }
}

/// A new hot tier (no `repo.json`) takes the identity of the repository the remote tiers
/// already hold, if any — the same repository continuing on a new host, checked against the
/// server like any other — so a fresh hot tier never starts a second repository over an
/// existing one. (The caller has made sure every remote tier answers.)
async fn adopt_remote_identity(hot: &dyn Storage, remotes: &[RemoteTier]) -> anyhow::Result<()> {
    use crate::repo::layout::REPO_META_KEY;
    for r in remotes {
        match r.storage.get(REPO_META_KEY).await {
            Ok(meta) => {
                tracing::info!(tier = %r.name, "a new hot tier takes the remote tier's repository identity");
                hot.put(REPO_META_KEY, meta).await?;
                return Ok(());
            }
            Err(crate::storage::StorageError::NotFound(_)) => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("remote tier {}", r.name))),
        }
    }
    Ok(())
}

/// Warns (once per directory and process) when a repository or spool directory that exists is
/// open to other users: it holds a full copy of the database, password hashes included.
pub(crate) fn warn_if_readable_by_others(dir: &Path, what: &str) {
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let Some(mode) = crate::storage::fs::readable_by_others(dir) else {
        return;
    };
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|d| d == dir) {
        return;
    }
    warned.push(dir.to_path_buf());
    tracing::warn!(
        path = %dir.display(),
        mode = format!("{mode:04o}"),
        "the {what} directory is open to other users, and it holds a full copy of the database (password hashes included): restrict it as PostgreSQL's data directory is (chmod -R go-rwx {})",
        dir.display()
    );
}

/// The local directory of `stream`/`backup` into `--repo s3://…` without `--spool-dir`: one per
/// repository URL, under `$XDG_STATE_HOME/archiver/spool` when that is set, else
/// `/var/lib/archiver/spool` for root and `~/.local/state/archiver/spool` for others: `<bucket>-<prefix>-<8 hex digits of the URL's
/// SHA-256>`.
pub fn default_spool_dir(url: &str) -> Option<PathBuf> {
    use sha2::Digest;
    // SAFETY: geteuid has no preconditions.
    let base = if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("archiver/spool")
    } else if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/archiver/spool")
    } else {
        PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?)
            .join(".local/state/archiver/spool")
    };
    let readable: String = url
        .trim_start_matches("s3://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    let digest = sha2::Sha256::digest(url.as_bytes());
    Some(base.join(format!(
        "{}-{:02x}{:02x}{:02x}{:02x}",
        readable.trim_matches('-'),
        digest[0],
        digest[1],
        digest[2],
        digest[3]
    )))
}

impl RepoArg {
    /// The S3 URL, when the repository is in S3 (`--repo s3://…`).
    pub fn s3_url(&self) -> Option<&str> {
        self.repo
            .as_deref()
            .and_then(Path::to_str)
            .filter(|s| s.starts_with("s3://"))
    }

    pub fn load_config(&self) -> anyhow::Result<Option<Config>> {
        self.config
            .as_deref()
            .map(|p| Config::load(p).map_err(anyhow::Error::new))
            .transpose()
    }

    /// The local directory that holds the spool and locks: the repository directory, a
    /// tiered repository's hot tier, or `--spool-dir` for an S3 repository.
    pub fn local_dir(&self, command: &str) -> anyhow::Result<PathBuf> {
        if let Some(c) = self.load_config()? {
            return Ok(c.hot.path);
        }
        if let Some(url) = self.s3_url() {
            if let Some(d) = &self.spool_dir {
                warn_if_readable_by_others(d, "spool");
                return Ok(d.clone());
            }
            let d = default_spool_dir(url).ok_or_else(|| {
                anyhow::anyhow!(
                    "`archiver {command}` into an S3 repository needs a local directory for the segment being received and the locks: give --spool-dir DIR (no default: neither XDG_STATE_HOME nor HOME is set)"
                )
            })?;
            tracing::info!(spool_dir = %d.display(), "using the default spool directory for this S3 repository");
            warn_if_readable_by_others(&d, "spool");
            return Ok(d);
        }
        Ok(self.repo.clone().expect("clap requires --repo or --config"))
    }

    /// The spool readers may take WAL from (the segment being received, segments not yet
    /// published): `<repo>/spool`, a tiered repository's `<hot>/spool`, or with `--repo s3://`
    /// the `--spool-dir`'s. None when there is none to read.
    pub fn spool_for_reading(&self) -> Option<PathBuf> {
        let local = match self.load_config() {
            Ok(Some(c)) => c.hot.path,
            Ok(None) if self.s3_url().is_some() => self
                .spool_dir
                .clone()
                .or_else(|| default_spool_dir(self.s3_url()?))?,
            Ok(None) => self.repo.clone()?,
            Err(_) => return None,
        };
        Some(local.join(crate::repo::SPOOL_DIR))
    }

    /// The local directory a restored cluster's `restore_command` reads: the repository, a
    /// tiered repository's hot tier, or an S3 repository's spool directory.
    fn local_root(&self) -> Option<PathBuf> {
        self.spool_for_reading()?.parent().map(Path::to_path_buf)
    }

    /// Run as root, a restore starts a cluster whose `restore_command` runs as `owner`: refuses
    /// (before anything is written) when that user cannot read the local repository.
    pub fn check_readable_by(&self, owner: Option<(u32, u32)>, who: &str) -> anyhow::Result<()> {
        let (Some((uid, gid)), Some(root)) = (owner, self.local_root()) else {
            return Ok(());
        };
        if !root.exists() {
            return Ok(());
        }
        crate::storage::fs::readable_by(&root, uid, gid).map_err(|why| {
            anyhow::anyhow!(
                "the restored cluster's restore_command runs as {who} (uid {uid}), who cannot read the repository: {why}. Give the repository to that user (chown -R), or run archiver as that user; archiver run as root gives what it creates the owner of the directory it creates it in"
            )
        })
    }

    /// Opens the repository for reading, with its local spool.
    pub async fn open_for_reading(&self, checked: bool) -> anyhow::Result<crate::repo::Repo> {
        let storage = if checked {
            self.storage_checked().await?
        } else {
            self.storage().await?
        };
        let repo = crate::repo::Repo::open(storage, &self.name()).await?;
        Ok(repo.with_spool(self.spool_for_reading().as_deref()))
    }

    /// The write options of `--repo s3://…` from the flags.
    fn s3_options(&self) -> S3Options {
        S3Options {
            storage_class: self.s3_storage_class.clone(),
            sse: self.s3_sse.clone(),
            sse_kms_key_id: self.s3_sse_kms_key_id.clone(),
            ..S3Options::default()
        }
    }

    fn key_for_s3_repo(&self) -> anyhow::Result<Option<MasterKey>> {
        self.encryption_key_file
            .as_deref()
            .map(|f| MasterKey::from_file(f).map_err(anyhow::Error::new))
            .transpose()
    }

    fn local_storage(dir: &Path) -> anyhow::Result<Arc<dyn Storage>> {
        if dir.exists() && !dir.is_dir() {
            anyhow::bail!(
                "repository path {} exists and is not a directory",
                dir.display()
            );
        }
        warn_if_readable_by_others(dir, "repository");
        Ok(Arc::new(FsStorage::new(dir)))
    }

    /// The repository for reading: every tier, the hot one first.
    pub async fn storage(&self) -> anyhow::Result<Arc<dyn Storage>> {
        self.storage_for_reading(None).await
    }

    /// [`Self::storage`], for interactive readers (list, info, restore, drill): an S3
    /// repository that cannot be reached fails within seconds instead of after the retry
    /// budget of every request.
    pub async fn storage_checked(&self) -> anyhow::Result<Arc<dyn Storage>> {
        self.storage_for_reading(Some(false)).await
    }

    async fn storage_for_reading(&self, check: Check) -> anyhow::Result<Arc<dyn Storage>> {
        if let Some(c) = self.load_config()? {
            let key = c.encryption_key()?;
            let remotes = remote_tiers(&c, key.as_ref(), Default::default(), None).await?;
            let hot = Self::local_storage(&c.hot.path)?;
            return Ok(Arc::new(Tiered::new(hot, remotes, Reads::AllTiers, None)));
        }
        if let Some(url) = self.s3_url() {
            return s3_stack(
                url,
                self.s3_options(),
                self.key_for_s3_repo()?.as_ref(),
                Default::default(),
                check,
            )
            .await;
        }
        Self::local_storage(
            self.repo
                .as_deref()
                .expect("clap requires --repo or --config"),
        )
    }

    /// The repository for a writing command (stream, backup): for a tiered repository, the hot
    /// tier behind a write hook and the tiers for the command's uploader; remote tiers and an
    /// S3 repository are checked first, so a missing bucket or bad credentials fail at once.
    pub async fn storage_for_writing(&self) -> anyhow::Result<(Arc<dyn Storage>, Option<Tiers>)> {
        if let Some(c) = self.load_config()? {
            let key = c.encryption_key()?;
            let hot = Self::local_storage(&c.hot.path)?;
            // A new hot tier must see the remote tiers (see adopt_remote_identity): their
            // outage is then an error, after the usual seconds of retries.
            let fresh = !hot.exists(crate::repo::layout::REPO_META_KEY).await?;
            let remotes = remote_tiers(&c, key.as_ref(), UPLOAD_RETRY, Some(!fresh))
                .await
                .map_err(|e| {
                    if fresh {
                        e.context(format!(
                            "the hot tier {} holds no repository yet, and archiver must see what the remote tiers hold before it initialises one (another may be there); try again once they are reachable",
                            c.hot.path.display()
                        ))
                    } else {
                        e
                    }
                })?;
            if fresh {
                adopt_remote_identity(hot.as_ref(), &remotes).await?;
            }
            let queue = Queue::new(&remotes);
            let storage = Arc::new(Tiered::new(
                hot.clone(),
                remotes.clone(),
                Reads::HotOnly,
                Some(queue.clone()),
            ));
            return Ok((
                storage,
                Some(Tiers {
                    config: c,
                    hot,
                    remotes,
                    queue,
                }),
            ));
        }
        Ok((self.storage_checked().await?, None))
    }

    /// The repository as `restore_command` should name it (absolute paths).
    pub fn for_restore_command(&self) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
        if let Some(c) = &self.config {
            return Ok(vec![("--config", std::path::absolute(c)?)]);
        }
        let repo = self.repo.clone().expect("clap requires --repo or --config");
        if self.s3_url().is_some() {
            let mut v = vec![("--repo", repo)];
            if let Some(k) = &self.encryption_key_file {
                v.push(("--encryption-key-file", std::path::absolute(k)?));
            }
            if let Some(d) = &self.spool_dir {
                v.push(("--spool-dir", std::path::absolute(d)?));
            }
            return Ok(v);
        }
        Ok(vec![("--repo", std::path::absolute(repo)?)])
    }

    pub fn name(&self) -> String {
        match (&self.config, &self.repo) {
            (Some(c), _) => format!("tiered repository {}", c.display()),
            (None, Some(r)) => r.display().to_string(),
            (None, None) => String::new(),
        }
    }
}
