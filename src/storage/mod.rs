//! The object-storage abstraction: a small async trait over keys like `wal/00000001/…zst`.
//!
//! Contract every backend must meet (checked by [`conformance::run`]):
//! - `put` is atomic and durable: after it returns, a reader sees the whole object or — if it
//!   failed — the previous state; never a torn object. It overwrites an existing key, unless
//!   written with [`WriteMode::CreateNew`]: then an existing object is left as it is and the
//!   write fails with [`StorageError::AlreadyExists`] (S3 `If-None-Match: *`, a hard link on
//!   disk), so an archived object is never replaced.
//! - `get` of a missing key is [`StorageError::NotFound`]; `delete` of a missing key succeeds.
//! - `list(prefix)` returns every object whose key starts with `prefix`, sorted by key.
//! - a [`ObjectWriter`] from `writer` streams an object of any size with bounded memory; nothing
//!   is visible under the key until `finish` returns, and an aborted or dropped writer leaves
//!   nothing behind.
//!
//! Nothing above this trait may assume objects are local files.

use async_trait::async_trait;
use bytes::Bytes;

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
mod direct;
pub mod encrypted;
pub mod fs;
pub mod retrying;
pub mod s3;
pub mod tiered;

/// A stored object's key, size and (where the backend knows it) last modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0} not found")]
    NotFound(String),
    /// A [`WriteMode::CreateNew`] write found the key taken; the existing object is unchanged.
    #[error("object {0} already exists")]
    AlreadyExists(String),
    /// An encrypted object that cannot be opened: wrong key, no key, damaged or truncated.
    #[error("object {key} cannot be decrypted: {reason}")]
    Undecryptable { key: String, reason: String },
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("storage I/O error on {key}: {cause}")]
    Io { key: String, cause: std::io::Error },
    /// A remote store (S3) refused or failed; `transient`: worth retrying (5xx, throttling,
    /// timeouts, connection resets).
    #[error("object store error on {key}: {message}")]
    Remote {
        key: String,
        message: String,
        transient: bool,
    },
}

impl StorageError {
    /// Permission and space problems are permanent; interrupted or timed-out I/O is transient.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Io { cause, .. } => matches!(
                cause.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            StorageError::Remote { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// Streams one object into storage.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends a chunk.
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError>;
    /// Publishes the object atomically and durably; returns its size.
    async fn finish(self: Box<Self>) -> Result<u64, StorageError>;
    /// Discards everything written (dropping the writer does the same).
    async fn abort(self: Box<Self>);
}

/// Whether a write may replace an existing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Replace any existing object (mutable keys: catalog records, growing partial segments).
    Overwrite,
    /// Fail with [`StorageError::AlreadyExists`] if the key exists (immutable objects).
    CreateNew,
}

#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Starts streaming a new object under `key`; `finish` publishes it as `mode` says.
    async fn writer_with(
        &self,
        key: &str,
        mode: WriteMode,
    ) -> Result<Box<dyn ObjectWriter>, StorageError>;
    /// Stores `data` under `key`, atomically and durably, as `mode` says.
    async fn put_with(&self, key: &str, data: Bytes, mode: WriteMode) -> Result<(), StorageError>;

    /// Starts streaming a new object under `key` (replacing any existing one on `finish`).
    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        self.writer_with(key, WriteMode::Overwrite).await
    }
    /// Stores `data` under `key`, atomically and durably, replacing any existing object.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.put_with(key, data, WriteMode::Overwrite).await
    }
    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;
    /// Reads up to `len` bytes from `offset` (fewer at the object's end; none past it).
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError>;
    /// Size of an object, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;
    /// All objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError>;
    /// Removes an object; succeeds if it is already gone.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Removes every object under `prefix` (which ends with `/`), and on a file system the
    /// directory itself. For what no writer adds to any more (an expired backup's objects).
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        for m in self.list(prefix).await? {
            self.delete(&m.key).await?;
        }
        Ok(())
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        Ok(self.head(key).await?.is_some())
    }
}

/// Keys are `/`-separated relative paths of non-empty, non-dot components.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !c.starts_with(fs::TEMP_PREFIX)
                && !c.contains('\0')
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_string()))
    }
}
