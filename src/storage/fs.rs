//! Filesystem backend: one file per object under a root directory.
//!
//! `put` writes `<dir>/.tmp-<name>-<pid>-<rand>`, fsyncs it, renames it over the final name and
//! fsyncs the directory (and any directory it had to create), so a crash leaves either the old
//! object or the new one. Temporary files are skipped by `list` and never valid keys.
//!
//! The repository holds a full copy of the database (password hashes included): every
//! directory archiver creates is 0700 and every file 0600, as PostgreSQL's own data directory,
//! whatever the umask ([`create_private`], [`create_dir_all_durable`]). A repository has one
//! owner: run as root, archiver gives what it creates the owner of the directory it creates it
//! in (a new repository, the owner of its parent), so the cluster a restore starts, whose
//! `restore_command` runs as that user, can read it ([`inherit_owner`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::direct::DirectFile;
use super::{validate_key, ObjectMeta, ObjectWriter, Storage, StorageError, WriteMode};

pub(crate) const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

fn io_err(key: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |cause| StorageError::Io {
        key: key.to_string(),
        cause,
    }
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Renames `from` to `to` (replacing it) and fsyncs the directory of `to`: once this returns,
/// the new name survives a crash. `from` must already be fsync'd.
pub fn durable_rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    fsync_dir(parent_dir(to))
}

/// Mode of the files archiver creates (the owner alone reads them).
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories archiver creates.
pub const DIR_MODE: u32 = 0o700;

/// Whether this process runs as root (and so chooses who owns what it writes).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of the OS user `name`, if there is one.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam with a valid C string; the fields are copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    // SAFETY: a non-null result of getpwnam points to a valid passwd entry.
    (!pw.is_null()).then(|| unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// The owner and group of `dir`.
pub fn owner_of(dir: &Path) -> std::io::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    Ok((m.uid(), m.gid()))
}

/// Free bytes (for an unprivileged user) on the file system holding `dir`, or its nearest
/// existing ancestor.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    statvfs(dir).map(|st| st.f_bavail * st.f_frsize)
}

/// The size of the file system holding `dir` (or its nearest existing parent).
pub fn total_bytes(dir: &Path) -> Option<u64> {
    statvfs(dir).map(|st| st.f_blocks * st.f_frsize)
}

fn statvfs(dir: &Path) -> Option<libc::statvfs> {
    let mut p = dir;
    while !p.exists() {
        p = p.parent()?;
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed is a valid statvfs; statvfs with a valid C string writes only into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st)
}

/// Run as root: gives `path` the owner and group of its parent directory, when they differ
/// (a no-op for other users, who own what they create).
pub fn inherit_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        return Ok(());
    }
    let (p, m) = (
        std::fs::metadata(parent_dir(path))?,
        std::fs::symlink_metadata(path)?,
    );
    if (p.uid(), p.gid()) != (m.uid(), m.gid()) {
        std::os::unix::fs::lchown(path, Some(p.uid()), Some(p.gid()))?;
    }
    Ok(())
}

/// Whether user `uid` (group `gid`) may read and list directory `dir`, by its mode bits:
/// `Err` says why not.
pub fn readable_by(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mode = m.permissions().mode();
    let ok = if uid == 0 {
        true
    } else if m.uid() == uid {
        mode & 0o500 == 0o500
    } else if m.gid() == gid {
        mode & 0o050 == 0o050
    } else {
        mode & 0o005 == 0o005
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is owned by uid {} gid {} with mode {:04o}",
            dir.display(),
            m.uid(),
            m.gid(),
            mode & 0o777
        ))
    }
}

/// Creates (or truncates) `path` for writing, mode 0600 whatever the umask.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    create_private_with(path, 0)
}

/// [`create_private`] with extra `open(2)` flags (`O_DIRECT`).
pub(crate) fn create_private_with(path: &Path, flags: i32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(flags)
        .open(path)?;
    inherit_owner(path)?;
    Ok(f)
}

/// Opens `path` for reading and writing, creating it mode 0600 if missing (never truncated).
pub fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    inherit_owner(path)?;
    Ok(f)
}

/// Writes `data` to a new file `path`, mode 0600 (not durable: for restored files that
/// PostgreSQL fsyncs at its start).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    create_private(path)?.write_all(data)
}

/// The group/world permission bits of an existing directory, when it has any: a repository
/// or spool others can read exposes the database.
pub fn readable_by_others(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Creates `dir` and missing parents (mode 0700), fsyncing each parent whose entry changed.
pub fn create_dir_all_durable(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => inherit_owner(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// A temporary name next to `path`, never a valid key.
fn temp_path(path: &Path) -> PathBuf {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    dir.join(format!(
        "{TEMP_PREFIX}{name}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ))
}

/// Writes `data` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, data, WriteMode::Overwrite)
}

/// Moves the fsync'd temporary file `tmp` to `path`: a rename (replacing), or for
/// [`WriteMode::CreateNew`] a hard link, which fails with `AlreadyExists` if `path` exists
/// (atomic, never replaces), then the temporary name is removed. The directory is fsync'd.
fn publish_temp(tmp: &Path, path: &Path, mode: WriteMode) -> std::io::Result<()> {
    match mode {
        WriteMode::Overwrite => durable_rename(tmp, path),
        WriteMode::CreateNew => {
            std::fs::hard_link(tmp, path)?;
            std::fs::remove_file(tmp)?;
            fsync_dir(parent_dir(path))
        }
    }
}

/// Objects at least this large are written around the page cache ([`DirectFile`]); smaller
/// files (catalog entries, markers) are not worth the aligned buffer.
const DIRECT_FROM: usize = 64 * 1024;

fn write_atomic_with(path: &Path, data: &[u8], mode: WriteMode) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let f = if data.len() >= DIRECT_FROM {
            let mut f = DirectFile::create(&tmp)?;
            f.write_all(data)?;
            f.finish()?
        } else {
            let mut f = create_private(&tmp)?;
            f.write_all(data)?;
            f
        };
        f.sync_all()?;
        drop(f);
        publish_temp(&tmp, path, mode)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An I/O error on `key`, `AlreadyExists` as [`StorageError::AlreadyExists`].
fn write_err(key: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |cause| {
        if cause.kind() == std::io::ErrorKind::AlreadyExists {
            StorageError::AlreadyExists(key.to_string())
        } else {
            io_err(key)(cause)
        }
    }
}

impl FsStorage {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsStorage { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let key = path
            .strip_prefix(root)
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_string);
        let Some(key) = key else { continue };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            // Descend only where keys below can still match the prefix.
            let dir_key = format!("{key}/");
            if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                walk(root, &path, prefix, out)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            let m = entry.metadata()?;
            out.push(ObjectMeta {
                key,
                size: m.len(),
                modified: m.modified().ok(),
            });
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("storage task panicked")
}

/// Streams into a temporary file, around the page cache ([`DirectFile`]); `finish` fsyncs and
/// renames it into place.
struct FsWriter {
    key: String,
    path: PathBuf,
    tmp: PathBuf,
    file: Option<DirectFile>,
    mode: WriteMode,
    done: bool,
}

#[async_trait]
impl ObjectWriter for FsWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        let mut f = self.file.take().expect("writer used after an I/O error");
        let (f, r) = tokio::task::spawn_blocking(move || {
            let r = f.write_all(&data);
            (f, r)
        })
        .await
        .expect("storage task panicked");
        self.file = Some(f);
        r.map_err(io_err(&self.key))?;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
        let f = self.file.take().expect("writer used after an I/O error");
        let (tmp, path) = (self.tmp.clone(), self.path.clone());
        let key = self.key.clone();
        let mode = self.mode;
        let size = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let f = f.finish()?;
            f.sync_all()?;
            let size = f.metadata()?.len();
            drop(f);
            publish_temp(&tmp, &path, mode)?;
            Ok(size)
        })
        .await
        .expect("storage task panicked")
        .map_err(write_err(&key))?;
        self.done = true;
        Ok(size)
    }

    async fn abort(self: Box<Self>) {
        drop(self);
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[async_trait]
impl Storage for FsStorage {
    async fn writer_with(
        &self,
        key: &str,
        mode: WriteMode,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let path = self.path(key)?;
        let key = key.to_string();
        let k = key.clone();
        let (tmp, file) = blocking(move || {
            let dir = path.parent().expect("key has a parent: the root");
            create_dir_all_durable(dir).map_err(io_err(&k))?;
            let tmp = temp_path(&path);
            let file = DirectFile::create(&tmp).map_err(io_err(&k))?;
            Ok((tmp, file))
        })
        .await?;
        let path = self.path(&key)?;
        Ok(Box::new(FsWriter {
            key,
            path,
            tmp,
            file: Some(file),
            mode,
            done: false,
        }))
    }

    async fn put_with(&self, key: &str, data: Bytes, mode: WriteMode) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            let dir = path.parent().expect("key has a parent: the root");
            create_dir_all_durable(dir).map_err(io_err(&key))?;
            write_atomic_with(&path, &data, mode).map_err(write_err(&key))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || match std::fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound(key)),
            Err(e) => Err(io_err(&key)(e)),
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            use std::os::unix::fs::FileExt;
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StorageError::NotFound(key))
                }
                Err(e) => return Err(io_err(&key)(e)),
            };
            let size = f.metadata().map_err(io_err(&key))?.len();
            let n = len.min(size.saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, offset).map_err(io_err(&key))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key,
                size: m.len(),
                modified: m.modified().ok(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&key)(e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let mut out = Vec::new();
            walk(&root, &root, &prefix, &mut out).map_err(io_err(&prefix))?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(path.parent().unwrap()).map_err(io_err(&key)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&key)(e)),
        })
        .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        for m in self.list(prefix).await? {
            self.delete(&m.key).await?;
        }
        let dir = self.path(prefix.trim_end_matches('/'))?;
        let key = prefix.to_string();
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => fsync_dir(parent_dir(&dir)).map_err(io_err(&key)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&key)(e)),
        })
        .await
    }
}
