//! Where a repository is and how to open it: a directory, an S3 URL, or a tiered repository's
//! configuration ([`crate::config`]) — [`RepoLocation`]. Opens the storage stack for readers
//! (every tier, reads falling back) and for writers (the hot tier written, the uploader told of
//! every write), names the local directory of the spool and locks, and the repository as a
//! restored cluster's `restore_command` names it. Commands and the daemon open repositories
//! only through here.
//!
//! Invariants: a repository or spool directory open to other users is warned about by every
//! opening; a new hot tier never starts a second repository over one the remote tiers hold.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::repo::{Repo, RepoError, SPOOL_DIR};
use crate::storage::encrypted::{Encrypted, KeyError, MasterKey};
use crate::storage::fs::FsStorage;
use crate::storage::retrying::Retrying;
use crate::storage::s3::{S3Options, S3Storage};
use crate::storage::tiered::{Reads, RemoteTier, Tiered};
use crate::storage::{Storage, StorageError};
use crate::upload::Queue;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    StorageIo(#[from] StorageError),
    #[error("{context}")]
    Storage {
        context: String,
        #[source]
        cause: StorageError,
    },
    #[error("{context}")]
    Tier {
        context: String,
        #[source]
        cause: Box<OpenError>,
    },
    /// Bad input: a path that is not a directory, no place for the spool.
    #[error("{0}")]
    Refused(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        cause: std::io::Error,
    },
}

/// Where a repository is.
#[derive(Clone, Debug)]
pub enum RepoLocation {
    /// A local directory.
    Dir(PathBuf),
    /// `s3://BUCKET/PREFIX` (AWS configuration from the environment).
    S3 {
        url: String,
        options: Box<S3Options>,
        /// Client-side encryption key file.
        key_file: Option<PathBuf>,
        /// The local directory for the spool and the locks.
        spool_dir: Option<PathBuf>,
    },
    /// A tiered repository, from its configuration file.
    Tiered { file: PathBuf, config: Box<Config> },
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

impl Tiers {
    /// What runs beside a stream into these tiers (uploader, partial shipper, hot-tier
    /// retention).
    pub fn plan(self) -> crate::upload::tasks::TierPlan {
        crate::upload::tasks::TierPlan {
            queue: self.queue,
            hot: Some(self.hot),
            remotes: self.remotes,
            upload: self.config.upload,
            retention: self.config.hot.retention,
        }
    }
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
) -> Result<Vec<RemoteTier>, OpenError> {
    let mut out = Vec::new();
    for r in &config.remotes {
        out.push(RemoteTier {
            name: r.name.clone(),
            url: r.url.clone(),
            storage: s3_stack(&r.url, r.s3.clone(), key, retry.clone(), check)
                .await
                .map_err(|e| OpenError::Tier {
                    context: format!("remote tier {}", r.name),
                    cause: Box::new(e),
                })?,
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
) -> Result<Arc<dyn Storage>, OpenError> {
    let s3 = S3Storage::with_options(url, opts)
        .await
        .map_err(|cause| OpenError::Storage {
            context: format!("cannot use {url}"),
            cause,
        })?;
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
async fn check_reachable(url: &str, s3: &S3Storage, outage_ok: bool) -> Result<(), OpenError> {
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
        Err(cause) => Err(OpenError::Storage {
            context: format!("cannot use {url}"),
            cause,
        }),
    }
}

/// A new hot tier (no `repo.json`) takes the identity of the repository the remote tiers
/// already hold, if any — the same repository continuing on a new host, checked against the
/// server like any other — so a fresh hot tier never starts a second repository over an
/// existing one. (The caller has made sure every remote tier answers.)
async fn adopt_remote_identity(hot: &dyn Storage, remotes: &[RemoteTier]) -> Result<(), OpenError> {
    use crate::repo::layout::REPO_META_KEY;
    for r in remotes {
        match r.storage.get(REPO_META_KEY).await {
            Ok(meta) => {
                tracing::info!(tier = %r.name, "a new hot tier takes the remote tier's repository identity");
                hot.put(REPO_META_KEY, meta).await?;
                return Ok(());
            }
            Err(crate::storage::StorageError::NotFound(_)) => {}
            Err(cause) => {
                return Err(OpenError::Storage {
                    context: format!("remote tier {}", r.name),
                    cause,
                })
            }
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
    let base = if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("archiver/spool")
    } else if crate::storage::fs::is_root() {
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

impl RepoLocation {
    /// The local directory that holds the spool and locks: the repository directory, a
    /// tiered repository's hot tier, or the spool directory of an S3 repository (`command`
    /// names who needs it in the refusal when there is none).
    pub fn local_dir(&self, command: &str) -> Result<PathBuf, OpenError> {
        match self {
            RepoLocation::Dir(d) => Ok(d.clone()),
            RepoLocation::Tiered { config, .. } => Ok(config.hot.path.clone()),
            RepoLocation::S3 { url, spool_dir, .. } => {
                if let Some(d) = spool_dir {
                    warn_if_readable_by_others(d, "spool");
                    return Ok(d.clone());
                }
                let d = default_spool_dir(url).ok_or_else(|| {
                    OpenError::Refused(format!(
                        "`archiver {command}` into an S3 repository needs a local directory for the segment being received and the locks: give --spool-dir DIR (no default: neither XDG_STATE_HOME nor HOME is set)"
                    ))
                })?;
                tracing::info!(spool_dir = %d.display(), "using the default spool directory for this S3 repository");
                warn_if_readable_by_others(&d, "spool");
                Ok(d)
            }
        }
    }

    /// The spool readers may take WAL from (the segment being received, segments not yet
    /// published): `<repo>/spool`, a tiered repository's `<hot>/spool`, or an S3 repository's
    /// spool directory. None when there is none to read.
    pub fn spool_for_reading(&self) -> Option<PathBuf> {
        Some(self.local_root()?.join(SPOOL_DIR))
    }

    /// The local directory readers find (the repository, the hot tier, an S3 repository's
    /// spool directory), without creating or announcing anything.
    fn local_root(&self) -> Option<PathBuf> {
        match self {
            RepoLocation::Dir(d) => Some(d.clone()),
            RepoLocation::Tiered { config, .. } => Some(config.hot.path.clone()),
            RepoLocation::S3 { url, spool_dir, .. } => {
                spool_dir.clone().or_else(|| default_spool_dir(url))
            }
        }
    }

    /// Run as root, a restore starts a cluster whose `restore_command` runs as `owner`: refuses
    /// (before anything is written) when that user cannot read the local repository.
    pub fn check_readable_by(&self, owner: Option<(u32, u32)>, who: &str) -> Result<(), OpenError> {
        let (Some((uid, gid)), Some(root)) = (owner, self.local_root()) else {
            return Ok(());
        };
        if !root.exists() {
            return Ok(());
        }
        crate::storage::fs::readable_by(&root, uid, gid).map_err(|why| {
            OpenError::Refused(format!(
                "the restored cluster's restore_command runs as {who} (uid {uid}), who cannot read the repository: {why}. Give the repository to that user (chown -R), or run archiver as that user; archiver run as root gives what it creates the owner of the directory it creates it in"
            ))
        })
    }

    /// Opens the repository for reading, with its local spool; `checked`: an S3 repository
    /// that cannot be reached fails within seconds (interactive readers).
    pub async fn open_for_reading(&self, checked: bool) -> Result<Repo, OpenError> {
        let storage = if checked {
            self.storage_checked().await?
        } else {
            self.storage().await?
        };
        let repo = Repo::open(storage, &self.name()).await?;
        Ok(repo.with_spool(self.spool_for_reading().as_deref()))
    }

    fn local_storage(dir: &Path) -> Result<Arc<dyn Storage>, OpenError> {
        if dir.exists() && !dir.is_dir() {
            return Err(OpenError::Refused(format!(
                "repository path {} exists and is not a directory",
                dir.display()
            )));
        }
        warn_if_readable_by_others(dir, "repository");
        Ok(Arc::new(FsStorage::new(dir)))
    }

    /// The repository for reading: every tier, the hot one first.
    pub async fn storage(&self) -> Result<Arc<dyn Storage>, OpenError> {
        self.storage_for_reading(None).await
    }

    /// [`Self::storage`], for interactive readers (list, info, restore, drill): an S3
    /// repository that cannot be reached fails within seconds instead of after the retry
    /// budget of every request.
    pub async fn storage_checked(&self) -> Result<Arc<dyn Storage>, OpenError> {
        self.storage_for_reading(Some(false)).await
    }

    async fn storage_for_reading(&self, check: Check) -> Result<Arc<dyn Storage>, OpenError> {
        match self {
            RepoLocation::Tiered { config, .. } => {
                let key = config.encryption_key()?;
                let remotes = remote_tiers(config, key.as_ref(), Default::default(), None).await?;
                let hot = Self::local_storage(&config.hot.path)?;
                Ok(Arc::new(Tiered::new(hot, remotes, Reads::AllTiers, None)))
            }
            RepoLocation::S3 {
                url,
                options,
                key_file,
                ..
            } => {
                let key = key_file.as_deref().map(MasterKey::from_file).transpose()?;
                s3_stack(
                    url,
                    (**options).clone(),
                    key.as_ref(),
                    Default::default(),
                    check,
                )
                .await
            }
            RepoLocation::Dir(d) => Self::local_storage(d),
        }
    }

    /// The repository for a writing command (stream, backup): for a tiered repository, the hot
    /// tier behind a write hook and the tiers for the command's uploader; remote tiers and an
    /// S3 repository are checked first, so a missing bucket or bad credentials fail at once.
    pub async fn storage_for_writing(
        &self,
    ) -> Result<(Arc<dyn Storage>, Option<Tiers>), OpenError> {
        let RepoLocation::Tiered { config: c, .. } = self else {
            return Ok((self.storage_checked().await?, None));
        };
        let key = c.encryption_key()?;
        let hot = Self::local_storage(&c.hot.path)?;
        // A new hot tier must see the remote tiers (see adopt_remote_identity): their
        // outage is then an error, after the usual seconds of retries.
        let fresh = !hot.exists(crate::repo::layout::REPO_META_KEY).await?;
        let remotes = remote_tiers(c, key.as_ref(), UPLOAD_RETRY, Some(!fresh))
            .await
            .map_err(|e| {
                if fresh {
                    OpenError::Tier {
                        context: format!(
                            "the hot tier {} holds no repository yet, and archiver must see what the remote tiers hold before it initialises one (another may be there); try again once they are reachable",
                            c.hot.path.display()
                        ),
                        cause: Box::new(e),
                    }
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
        Ok((
            storage,
            Some(Tiers {
                config: (**c).clone(),
                hot,
                remotes,
                queue,
            }),
        ))
    }

    /// Each place the repository keeps objects, by name (`repository`, or `hot` and each
    /// remote tier), opened on its own: what `check` probes one by one.
    pub async fn each_tier(&self) -> Result<Vec<(String, Arc<dyn Storage>)>, OpenError> {
        match self {
            RepoLocation::Tiered { config: c, .. } => {
                let key = c.encryption_key()?;
                let mut out = vec![("hot".to_string(), Self::local_storage(&c.hot.path)?)];
                for r in remote_tiers(c, key.as_ref(), UPLOAD_RETRY, Some(false)).await? {
                    out.push((r.name, r.storage));
                }
                Ok(out)
            }
            _ => Ok(vec![(
                "repository".to_string(),
                self.storage_checked().await?,
            )]),
        }
    }

    /// The repository as `restore_command` should name it (absolute paths).
    pub fn for_restore_command(&self) -> Result<Vec<(&'static str, PathBuf)>, OpenError> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|cause| OpenError::Io {
                context: format!("cannot make {} absolute", p.display()),
                cause,
            })
        };
        Ok(match self {
            RepoLocation::Tiered { file, .. } => vec![("--config", abs(file)?)],
            RepoLocation::S3 {
                url,
                key_file,
                spool_dir,
                ..
            } => {
                let mut v = vec![("--repo", PathBuf::from(url))];
                if let Some(k) = key_file {
                    v.push(("--encryption-key-file", abs(k)?));
                }
                if let Some(d) = spool_dir {
                    v.push(("--spool-dir", abs(d)?));
                }
                v
            }
            RepoLocation::Dir(d) => vec![("--repo", abs(d)?)],
        })
    }

    /// How messages name the repository.
    pub fn name(&self) -> String {
        match self {
            RepoLocation::Tiered { file, .. } => format!("tiered repository {}", file.display()),
            RepoLocation::S3 { url, .. } => url.clone(),
            RepoLocation::Dir(d) => d.display().to_string(),
        }
    }
}
