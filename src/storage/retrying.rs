//! Retries a backend's transient failures (5xx, throttling, timeouts, resets) with the one retry
//! helper — exponential backoff with jitter, giving up after the policy's budget — for every
//! operation that can be repeated safely; permanent errors are returned at once. Wrap remote
//! backends in it; the filesystem backend has no transient errors worth a retry.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, ObjectWriter, Storage, StorageError, WriteMode};
use crate::retry::{retry, RetryPolicy, Transient};

impl Transient for StorageError {
    fn is_transient(&self) -> bool {
        StorageError::is_transient(self)
    }
}

#[derive(Debug)]
pub struct Retrying {
    inner: Arc<dyn Storage>,
    policy: RetryPolicy,
}

impl Retrying {
    pub fn new(inner: Arc<dyn Storage>, policy: RetryPolicy) -> Self {
        Retrying { inner, policy }
    }
}

#[async_trait]
impl Storage for Retrying {
    async fn writer_with(
        &self,
        key: &str,
        mode: WriteMode,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        retry(&self.policy, "starting an object", || {
            self.inner.writer_with(key, mode)
        })
        .await
    }

    async fn put_with(&self, key: &str, data: Bytes, mode: WriteMode) -> Result<(), StorageError> {
        retry(&self.policy, "storing an object", || {
            self.inner.put_with(key, data.clone(), mode)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        retry(&self.policy, "reading an object", || self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        retry(&self.policy, "reading an object range", || {
            self.inner.get_range(key, offset, len)
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        retry(&self.policy, "looking up an object", || {
            self.inner.head(key)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        retry(&self.policy, "listing objects", || self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        retry(&self.policy, "deleting an object", || {
            self.inner.delete(key)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::storage::fs::FsStorage;

    /// Fails the first `failures` calls of every operation with `error`, then delegates.
    #[derive(Debug)]
    struct Flaky {
        inner: FsStorage,
        failures: u32,
        calls: AtomicU32,
        transient: bool,
    }

    impl Flaky {
        fn trip(&self) -> Result<(), StorageError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(StorageError::Remote {
                    key: "k".into(),
                    message: "503 SlowDown".into(),
                    transient: self.transient,
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Storage for Flaky {
        async fn writer_with(
            &self,
            key: &str,
            mode: WriteMode,
        ) -> Result<Box<dyn ObjectWriter>, StorageError> {
            self.trip()?;
            self.inner.writer_with(key, mode).await
        }
        async fn put_with(&self, key: &str, data: Bytes, m: WriteMode) -> Result<(), StorageError> {
            self.trip()?;
            self.inner.put_with(key, data, m).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
            self.trip()?;
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, o: u64, l: u64) -> Result<Bytes, StorageError> {
            self.trip()?;
            self.inner.get_range(key, o, l).await
        }
        async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
            self.trip()?;
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
            self.trip()?;
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.trip()?;
            self.inner.delete(key).await
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            give_up_after: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_permanent_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            inner: FsStorage::new(dir.path()),
            failures: 3,
            calls: AtomicU32::new(0),
            transient: true,
        });
        let s = Retrying::new(flaky.clone(), fast());
        s.put("a/b", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            4,
            "three failures, then success"
        );
        assert_eq!(&s.get("a/b").await.unwrap()[..], b"x");

        let dir = tempfile::tempdir().unwrap();
        let broken = Arc::new(Flaky {
            inner: FsStorage::new(dir.path()),
            failures: 3,
            calls: AtomicU32::new(0),
            transient: false,
        });
        let s = Retrying::new(broken.clone(), fast());
        assert!(s.put("a/b", Bytes::new()).await.is_err());
        assert_eq!(
            broken.calls.load(Ordering::SeqCst),
            1,
            "a permanent error is not retried"
        );
    }
}
