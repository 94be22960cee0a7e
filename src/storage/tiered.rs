//! A tiered store: a local hot tier and remote tiers behind one [`Storage`].
//!
//! Writes go to the hot tier only — that is what the stream's flush position and a backup's
//! completion acknowledge — and each successful write is reported to a [`WriteObserver`] (the
//! uploader, which ships it to every remote tier). Readers ([`Reads::AllTiers`]) prefer the hot
//! tier and fall back to the remote tiers in order, and listings merge every tier; an object
//! found nowhere is `NotFound`, but a remote tier that fails while no tier has the object is
//! that failure, never `NotFound` (a `restore_command` must not take an unreachable bucket for
//! the end of the archive). The writers ([`Reads::HotOnly`]: stream, backup) read and list the
//! hot tier alone: everything they need is there, and they must keep working while a remote
//! tier is unreachable. Deletes remove the object from every tier.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, ObjectWriter, Storage, StorageError, WriteMode};

/// Told of every object written to the hot tier, once it is durable there.
pub trait WriteObserver: Send + Sync + std::fmt::Debug {
    fn written(&self, key: &str);

    /// Something to hand the bytes of a streamed object to while it is being written (the
    /// uploader ships them to the remote tiers at once), or `None`: ship once `written`.
    fn tee(&self, _key: &str, _mode: WriteMode) -> Option<Box<dyn Tee>> {
        None
    }
}

/// Receives a streamed object's bytes as the hot tier's writer takes them. Never blocks and
/// never fails the write: whatever it cannot take now it must get from the hot tier later.
pub trait Tee: Send {
    /// The next bytes, in order (already taken by the hot tier's writer).
    fn write(&mut self, data: &Bytes);
    /// The hot tier has published the object, `size` bytes (the observer was told `written`
    /// just before).
    fn published(self: Box<Self>, size: u64);
    // Dropped without `published`: the write was aborted, and the object does not exist.
}

/// One remote tier.
#[derive(Debug, Clone)]
pub struct RemoteTier {
    pub name: String,
    pub url: String,
    pub storage: Arc<dyn Storage>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    HotOnly,
    AllTiers,
}

#[derive(Debug, Clone)]
pub struct Tiered {
    hot: Arc<dyn Storage>,
    remotes: Vec<RemoteTier>,
    reads: Reads,
    observer: Option<Arc<dyn WriteObserver>>,
}

impl Tiered {
    pub fn new(
        hot: Arc<dyn Storage>,
        remotes: Vec<RemoteTier>,
        reads: Reads,
        observer: Option<Arc<dyn WriteObserver>>,
    ) -> Tiered {
        Tiered {
            hot,
            remotes,
            reads,
            observer,
        }
    }

    fn written(&self, key: &str) {
        if let Some(o) = &self.observer {
            o.written(key);
        }
    }

    /// Runs `op` on the hot tier, then on each remote tier while the object is not found.
    async fn first_found<T, F, Fut>(&self, key: &str, op: F) -> Result<T, StorageError>
    where
        F: Fn(Arc<dyn Storage>) -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let mut failure = None;
        let remotes = match self.reads {
            Reads::AllTiers => &self.remotes[..],
            Reads::HotOnly => &[],
        };
        for s in std::iter::once(&self.hot).chain(remotes.iter().map(|r| &r.storage)) {
            match op(s.clone()).await {
                Err(StorageError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "a tier could not serve an object; trying the next");
                    failure.get_or_insert(e);
                }
                ok => return ok,
            }
        }
        Err(failure.unwrap_or_else(|| StorageError::NotFound(key.to_string())))
    }
}

/// Reports the object to the observer once the hot tier has published it, and hands its bytes
/// to the observer's tee (if any) on the way.
struct ObservedWriter {
    inner: Box<dyn ObjectWriter>,
    key: String,
    observer: Option<Arc<dyn WriteObserver>>,
    tee: Option<Box<dyn Tee>>,
}

#[async_trait]
impl ObjectWriter for ObservedWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        if let Some(t) = &mut self.tee {
            self.inner.write(data.clone()).await?;
            t.write(&data);
            return Ok(());
        }
        self.inner.write(data).await
    }

    async fn finish(self: Box<Self>) -> Result<u64, StorageError> {
        let n = self.inner.finish().await?;
        if let Some(o) = &self.observer {
            o.written(&self.key);
        }
        if let Some(t) = self.tee {
            t.published(n);
        }
        Ok(n)
    }

    async fn abort(self: Box<Self>) {
        self.inner.abort().await
    }
}

#[async_trait]
impl Storage for Tiered {
    async fn writer_with(
        &self,
        key: &str,
        mode: WriteMode,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let inner = self.hot.writer_with(key, mode).await?;
        Ok(Box::new(ObservedWriter {
            inner,
            key: key.to_string(),
            tee: self.observer.as_ref().and_then(|o| o.tee(key, mode)),
            observer: self.observer.clone(),
        }))
    }

    async fn put_with(&self, key: &str, data: Bytes, mode: WriteMode) -> Result<(), StorageError> {
        self.hot.put_with(key, data, mode).await?;
        self.written(key);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.first_found(key, |s| async move { s.get(key).await })
            .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        self.first_found(key, |s| async move { s.get_range(key, offset, len).await })
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let found = self
            .first_found(key, |s| async move {
                s.head(key)
                    .await?
                    .ok_or_else(|| StorageError::NotFound(key.to_string()))
            })
            .await;
        match found {
            Ok(m) => Ok(Some(m)),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut all: BTreeMap<String, ObjectMeta> = self
            .hot
            .list(prefix)
            .await?
            .into_iter()
            .map(|m| (m.key.clone(), m))
            .collect();
        if self.reads == Reads::AllTiers {
            for r in &self.remotes {
                for m in r.storage.list(prefix).await? {
                    all.entry(m.key.clone()).or_insert(m);
                }
            }
        }
        Ok(all.into_values().collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.hot.delete(key).await?;
        for r in &self.remotes {
            r.storage.delete(key).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsStorage;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<String>>);
    impl WriteObserver for Seen {
        fn written(&self, key: &str) {
            self.0.lock().unwrap().push(key.to_string());
        }
    }

    #[tokio::test]
    async fn writes_hot_reads_fall_back_lists_merge() {
        let dir = tempfile::tempdir().unwrap();
        let hot: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path().join("hot")));
        let remote: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path().join("remote")));
        let seen = Arc::new(Seen::default());
        let t = Tiered::new(
            hot.clone(),
            vec![RemoteTier {
                name: "r".into(),
                url: "s3://x".into(),
                storage: remote.clone(),
            }],
            Reads::AllTiers,
            Some(seen.clone()),
        );
        // The conformance suite holds for the whole (every write lands hot, reads find it).
        crate::storage::conformance::run(&t).await;
        seen.0.lock().unwrap().clear();

        t.put("t/1", Bytes::from_static(b"hot")).await.unwrap();
        let mut w = t.writer("t/2").await.unwrap();
        w.write(Bytes::from_static(b"streamed")).await.unwrap();
        assert_eq!(seen.0.lock().unwrap().len(), 1, "told only once durable");
        w.finish().await.unwrap();
        assert_eq!(*seen.0.lock().unwrap(), ["t/1", "t/2"]);
        assert!(
            remote.list("").await.unwrap().is_empty(),
            "writes go hot only"
        );

        // An object only the remote tier holds is read from it; listings merge.
        remote
            .put("t/3", Bytes::from_static(b"cold"))
            .await
            .unwrap();
        assert_eq!(&t.get("t/3").await.unwrap()[..], b"cold");
        assert_eq!(&t.get_range("t/3", 1, 2).await.unwrap()[..], b"ol");
        assert_eq!(t.head("t/3").await.unwrap().unwrap().size, 4);
        let keys: Vec<_> = t
            .list("t/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["t/1", "t/2", "t/3"]);
        let hot_only = Tiered::new(hot.clone(), t.remotes.clone(), Reads::HotOnly, None);
        assert_eq!(hot_only.list("t/").await.unwrap().len(), 2);
        assert!(matches!(
            hot_only.get("t/3").await,
            Err(StorageError::NotFound(_))
        ));
        assert!(matches!(
            t.get("t/none").await,
            Err(StorageError::NotFound(_))
        ));
        t.delete("t/3").await.unwrap();
        assert!(!remote.exists("t/3").await.unwrap());
    }

    #[tokio::test]
    async fn an_unreachable_remote_is_an_error_not_a_missing_object() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let t = Tiered::new(
            Arc::new(FsStorage::new(dir.path().join("hot"))),
            vec![RemoteTier {
                name: "r".into(),
                url: "s3://x".into(),
                storage: Arc::new(FsStorage::new(&file)),
            }],
            Reads::AllTiers,
            None,
        );
        let e = t.get("t/b").await.unwrap_err();
        assert!(matches!(e, StorageError::Io { .. }), "{e:?}");
    }
}
