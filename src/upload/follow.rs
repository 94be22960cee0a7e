//! Write-through: a backup's archives are shipped to the remote tiers while the hot tier's
//! writer is still writing them, so a backup is offsite about when it is complete on local disk
//! instead of one whole upload later.
//!
//! Owns the [`Tee`] that the uploader's queue hands the tiered store for each such object, and
//! one follower task per remote tier. A follower sends the bytes as they are written, checks
//! them as the uploader checks a hot object (the SHA-256 of the stored body against its
//! trailer), and completes the remote object only after the hot tier has published it.
//!
//! Invariants:
//! - the hot write never waits on a remote tier: a tee holds at most [`TEE_BUDGET`] bytes for
//!   a tier; past that it lets go of the live bytes, and the follower reads the rest from the
//!   hot tier once the object is published there, as the uploader would;
//! - an object whose write is abandoned is never completed in a remote tier (the follower
//!   aborts its upload);
//! - while a follower runs, its key counts as pending for its tier (a drain waits for it); a
//!   follower that fails hands the key to the tier's worker, which uploads it the usual way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{is_immutable, Queue, RateLimit, Upload, UploadError, Verifier};
use crate::storage::tiered::{RemoteTier, Tee};
use crate::storage::Storage;

/// Bytes a tee holds for one tier before it lets go of the live stream.
const TEE_BUDGET: usize = 16 << 20;

/// What the followers need; set on the queue while an uploader runs.
#[derive(Debug)]
pub(crate) struct WriteThrough {
    pub(crate) queue: Weak<Queue>,
    pub(crate) hot: Arc<dyn Storage>,
    pub(crate) remotes: Vec<Arc<RemoteTier>>,
    pub(crate) limits: Vec<Option<Arc<RateLimit>>>,
    pub(crate) stop: watch::Receiver<bool>,
}

/// Whether an object is shipped while it is written: a backup's archives and other stored
/// objects (never rewritten, and large); small or mutable objects wait for the worker.
fn follows(key: &str) -> bool {
    key.starts_with("backups/") && key.ends_with(".zst") && is_immutable(key)
}

/// A tee for `key`, with a follower for each tier that does not already have it on the way;
/// `None` if the object is not one to follow.
pub(crate) fn tee(wt: &Arc<WriteThrough>, queue: &Queue, key: &str) -> Option<Box<dyn Tee>> {
    if !follows(key) || *wt.stop.borrow() {
        return None;
    }
    let mut lanes = Vec::new();
    for i in 0..wt.remotes.len() {
        if !queue.start_following(i, key) {
            continue;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (published_tx, published_rx) = oneshot::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(follower(
            wt.clone(),
            i,
            key.to_string(),
            rx,
            queued.clone(),
            published_rx,
        ));
        lanes.push(Lane {
            tier: wt.remotes[i].name.clone(),
            tx: Some(tx),
            queued,
            published: Some(published_tx),
        });
    }
    (!lanes.is_empty()).then(|| {
        Box::new(Fanout {
            key: key.to_string(),
            lanes,
        }) as Box<dyn Tee>
    })
}

/// The writer's side of one follower.
struct Lane {
    tier: String,
    /// `None` once the lane let go of the live bytes (or the follower is gone).
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes sent and not yet taken by the follower.
    queued: Arc<AtomicUsize>,
    published: Option<oneshot::Sender<u64>>,
}

struct Fanout {
    key: String,
    lanes: Vec<Lane>,
}

impl Tee for Fanout {
    fn write(&mut self, data: &Bytes) {
        for l in &mut self.lanes {
            let Some(tx) = &l.tx else { continue };
            let over = l.queued.load(Ordering::Relaxed) + data.len() > TEE_BUDGET;
            if !over {
                l.queued.fetch_add(data.len(), Ordering::Relaxed);
            }
            if over || tx.send(data.clone()).is_err() {
                debug!(tier = %l.tier, key = %self.key, "the remote tier fell behind the write; the rest follows from the hot tier");
                l.tx = None;
            }
        }
    }

    fn published(mut self: Box<Self>, size: u64) {
        for l in &mut self.lanes {
            l.tx = None;
            if let Some(p) = l.published.take() {
                let _ = p.send(size);
            }
        }
    }
}

/// How a followed object was shipped.
struct Shipped {
    bytes: u64,
    /// Bytes sent while the object was being written.
    live: u64,
    /// From the hot tier's publication to the remote tier's.
    after_publish: Duration,
}

async fn follower(
    wt: Arc<WriteThrough>,
    i: usize,
    key: String,
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
    published: oneshot::Receiver<u64>,
) {
    let t = Instant::now();
    let tier = wt.remotes[i].clone();
    let mut stop = wt.stop.clone();
    let limit = wt.limits[i].as_deref();
    let r = tokio::select! {
        r = ship(wt.hot.as_ref(), &tier, &key, limit, rx, &queued, published) => r,
        // Dropping the upload abandons it in the tier; the key goes back to the queue (an
        // uploader restarted on it ships the object, or the next start's reconciliation does).
        _ = stop.wait_for(|s| *s) => {
            debug!(tier = %tier.name, %key, "uploader stopping; the upload while writing is abandoned");
            if let Some(q) = wt.queue.upgrade() {
                q.follower_stopped(i, &key);
            }
            return;
        }
    };
    match &r {
        Ok(Some(s)) => debug!(
            tier = %tier.name,
            %key,
            bytes = s.bytes,
            live_bytes = s.live,
            elapsed_ms = t.elapsed().as_millis() as u64,
            after_publish_ms = s.after_publish.as_millis() as u64,
            "uploaded while written"
        ),
        Ok(None) => debug!(tier = %tier.name, %key, "write abandoned; nothing uploaded"),
        Err(e) => {
            warn!(tier = %tier.name, %key, error = %e, "upload while writing failed; the uploader ships the object the usual way")
        }
    }
    if let Some(q) = wt.queue.upgrade() {
        q.followed(i, &key, &r.map(|s| s.map(|s| s.bytes)));
    }
}

/// Sends what the tee passes on, then (once the hot tier published the object) the rest from
/// the hot tier, and completes the upload. `Ok(None)`: the write was abandoned. An error is
/// returned only once the write's outcome is known: a key handed to the worker before the hot
/// tier has the object would be taken for nothing.
async fn ship(
    hot: &dyn Storage,
    tier: &RemoteTier,
    key: &str,
    limit: Option<&RateLimit>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: &AtomicUsize,
    mut published: oneshot::Receiver<u64>,
) -> Result<Option<Shipped>, UploadError> {
    let mut outcome = None;
    let r = send(
        hot,
        tier,
        key,
        limit,
        &mut rx,
        queued,
        &mut published,
        &mut outcome,
    )
    .await;
    let Err(e) = r else { return r };
    // The tee lets go of this follower (its sends fail) while the write goes on.
    drop(rx);
    let size = match outcome {
        Some(size) => size,
        None => published.await.ok(),
    };
    match size {
        Some(_) => Err(e),
        None => Ok(None),
    }
}

/// [`ship`]'s work; `outcome` is set once the write's outcome is known (the object's size, or
/// `None`: abandoned).
#[allow(clippy::too_many_arguments)]
async fn send(
    hot: &dyn Storage,
    tier: &RemoteTier,
    key: &str,
    limit: Option<&RateLimit>,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    queued: &AtomicUsize,
    published: &mut oneshot::Receiver<u64>,
    outcome: &mut Option<Option<u64>>,
) -> Result<Option<Shipped>, UploadError> {
    let mut up = Upload::start(tier, key, Verifier::streamed()).await?;
    let sent = async {
        while let Some(chunk) = rx.recv().await {
            queued.fetch_sub(chunk.len(), Ordering::Relaxed);
            up.send(chunk, limit).await?;
        }
        let size = published.await.ok();
        *outcome = Some(size);
        let Some(size) = size else {
            return Ok(None);
        };
        let (live, t) = (up.sent, Instant::now());
        if !up.copy_from_hot(hot, size, limit).await? {
            return Ok(None);
        }
        Ok(Some((live, t)))
    }
    .await;
    match sent {
        Ok(Some((live, t))) => {
            let bytes = up.finish(hot).await?;
            Ok(Some(Shipped {
                bytes,
                live,
                after_publish: t.elapsed(),
            }))
        }
        Ok(None) => {
            up.abort().await;
            Ok(None)
        }
        Err(e) => {
            up.abort().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use async_trait::async_trait;

    use super::*;
    use crate::repo::object::{self, ObjectKind};
    use crate::storage::fs::FsStorage;
    use crate::storage::tiered::{Reads, Tiered, WriteObserver};
    use crate::storage::{ObjectMeta, ObjectWriter, StorageError, WriteMode};
    use crate::upload::{UploadSettings, Uploader};

    /// A remote tier on disk that counts the bytes its writers take, can hold them back (a
    /// slow tier) and can refuse its next writer (a failing one).
    #[derive(Debug)]
    struct Remote {
        fs: FsStorage,
        taken: Arc<AtomicU64>,
        gate: Arc<tokio::sync::Semaphore>,
        refuse_next: AtomicBool,
    }

    struct CountingWriter {
        inner: Box<dyn ObjectWriter>,
        taken: Arc<AtomicU64>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    #[async_trait]
    impl ObjectWriter for CountingWriter {
        async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
            drop(self.gate.acquire().await.unwrap());
            self.taken.fetch_add(data.len() as u64, Ordering::SeqCst);
            self.inner.write(data).await
        }
        async fn finish(self: Box<Self>) -> Result<u64, StorageError> {
            self.inner.finish().await
        }
        async fn abort(self: Box<Self>) {
            self.inner.abort().await
        }
    }

    #[async_trait]
    impl Storage for Remote {
        async fn writer_with(
            &self,
            key: &str,
            mode: WriteMode,
        ) -> Result<Box<dyn ObjectWriter>, StorageError> {
            if self.refuse_next.swap(false, Ordering::SeqCst) {
                return Err(StorageError::Remote {
                    key: key.into(),
                    message: "refused once".into(),
                    transient: true,
                });
            }
            Ok(Box::new(CountingWriter {
                inner: self.fs.writer_with(key, mode).await?,
                taken: self.taken.clone(),
                gate: self.gate.clone(),
            }))
        }
        async fn put_with(
            &self,
            key: &str,
            data: Bytes,
            mode: WriteMode,
        ) -> Result<(), StorageError> {
            self.fs.put_with(key, data, mode).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
            self.fs.get(key).await
        }
        async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
            self.fs.get_range(key, offset, len).await
        }
        async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
            self.fs.head(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
            self.fs.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.fs.delete(key).await
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        remote: Arc<Remote>,
        store: Tiered,
        uploader: Uploader,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let hot: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path().join("hot")));
        let remote = Arc::new(Remote {
            fs: FsStorage::new(dir.path().join("remote")),
            taken: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(1 << 20)),
            refuse_next: AtomicBool::new(false),
        });
        let tiers = vec![RemoteTier {
            name: "r".into(),
            url: "s3://r".into(),
            storage: remote.clone(),
        }];
        let queue = Queue::new(&tiers);
        let store = Tiered::new(
            hot.clone(),
            tiers.clone(),
            Reads::HotOnly,
            Some(queue.clone()),
        );
        let uploader = Uploader::start(
            queue,
            hot,
            tiers,
            UploadSettings {
                concurrency: 2,
                max_rate: None,
                reconcile: false,
            },
        );
        Setup {
            _dir: dir,
            remote,
            store,
            uploader,
        }
    }

    const KEY: &str = "backups/20261205T000000Z/base.tar.zst";

    /// A stored object of about `len` bytes that does not compress.
    fn archive(len: usize) -> Bytes {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let raw: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Bytes::from(object::encode_bytes(&raw, ObjectKind::Other, 1).unwrap().0)
    }

    /// After a drain, the tier holds `obj` under [`KEY`], counted as one upload of its size.
    async fn shipped_once(s: &Setup, obj: &Bytes) {
        s.uploader.drain(Duration::from_secs(20)).await.unwrap();
        assert_eq!(&s.remote.get(KEY).await.unwrap(), obj);
        let st = &s.uploader.queue().states()[0];
        assert_eq!(
            (st.uploaded_objects, st.uploaded_bytes, st.pending_objects),
            (1, obj.len() as u64, 0)
        );
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "timed out waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_archive_is_shipped_while_it_is_written_and_only_once() {
        let s = setup();
        let obj = archive(3 << 20);
        let mut w = s.store.writer(KEY).await.unwrap();
        let (first, rest) = obj.split_at(1 << 20);
        w.write(Bytes::copy_from_slice(first)).await.unwrap();
        // The remote tier takes the first bytes before the object is complete anywhere.
        wait_until("the first MiB reaches the remote tier", || {
            s.remote.taken.load(Ordering::SeqCst) >= 1 << 20
        })
        .await;
        assert!(
            !s.remote.exists(KEY).await.unwrap(),
            "not complete before the hot tier"
        );
        w.write(Bytes::copy_from_slice(rest)).await.unwrap();
        assert_eq!(w.finish().await.unwrap(), obj.len() as u64);
        shipped_once(&s, &obj).await;
        // Sent once, by the follower: the worker did not upload it again.
        assert_eq!(s.remote.taken.load(Ordering::SeqCst), obj.len() as u64);
        s.uploader.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_tier_never_holds_up_the_write_and_gets_the_rest_from_the_hot_tier() {
        let s = setup();
        // The tier takes nothing until the gate opens.
        let all = s.remote.gate.acquire_many(1 << 20).await.unwrap();
        let obj = archive(TEE_BUDGET + (6 << 20));
        let mut w = s.store.writer(KEY).await.unwrap();
        let write = async {
            for c in obj.chunks(1 << 20) {
                w.write(Bytes::copy_from_slice(c)).await.unwrap();
            }
            w.finish().await.unwrap()
        };
        let n = tokio::time::timeout(Duration::from_secs(20), write)
            .await
            .expect("the hot write went on while the tier took nothing");
        assert_eq!(n, obj.len() as u64);
        assert_eq!(s.remote.taken.load(Ordering::SeqCst), 0);
        drop(all);
        shipped_once(&s, &obj).await;
        s.uploader.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_write_leaves_the_tier_nothing() {
        let s = setup();
        let obj = archive(2 << 20);
        let mut w = s.store.writer(KEY).await.unwrap();
        w.write(obj.slice(..1 << 20)).await.unwrap();
        wait_until("the first MiB reaches the remote tier", || {
            s.remote.taken.load(Ordering::SeqCst) >= 1 << 20
        })
        .await;
        w.abort().await;
        s.uploader.drain(Duration::from_secs(20)).await.unwrap();
        assert!(s.remote.list("").await.unwrap().is_empty());
        assert_eq!(s.uploader.queue().states()[0].uploaded_objects, 0);
        s.uploader.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_follower_leaves_the_object_to_the_worker() {
        let s = setup();
        s.remote.refuse_next.store(true, Ordering::SeqCst);
        let obj = archive(1 << 20);
        let mut w = s.store.writer(KEY).await.unwrap();
        w.write(obj.clone()).await.unwrap();
        w.finish().await.unwrap();
        s.uploader.drain(Duration::from_secs(20)).await.unwrap();
        assert_eq!(s.remote.get(KEY).await.unwrap(), obj);
        let st = &s.uploader.queue().states()[0];
        assert_eq!(st.uploaded_objects, 1);
        assert_eq!(
            st.last_error, None,
            "the worker's success clears the follower's error"
        );
        s.uploader.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_bytes_are_never_completed_in_the_tier() {
        let s = setup();
        let mut obj = archive(1 << 20).to_vec();
        obj[100] ^= 1;
        let mut w = s.store.writer(KEY).await.unwrap();
        w.write(Bytes::from(obj)).await.unwrap();
        w.finish().await.unwrap();
        // Neither the follower nor the worker after it ships it; the error names the damage,
        // and the drain does not wait out its timeout on an error retrying cannot fix.
        let t = Instant::now();
        let behind = s.uploader.drain(Duration::from_secs(60)).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(behind.contains("damaged"), "{behind}");
        assert!(!s.remote.exists(KEY).await.unwrap());
        s.uploader.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_stopped_with_its_uploader_leaves_the_object_queued() {
        let s = setup();
        let _held = s.remote.gate.acquire_many(1 << 20).await.unwrap();
        let obj = archive(1 << 20);
        let mut w = s.store.writer(KEY).await.unwrap();
        w.write(obj.clone()).await.unwrap();
        w.finish().await.unwrap();
        let queue = s.uploader.queue().clone();
        s.uploader.stop().await;
        wait_until("the follower hands the key back", || {
            queue.tiers.lock().unwrap()[0].pending.contains(KEY)
        })
        .await;
        {
            let t = &queue.tiers.lock().unwrap()[0];
            assert!(t.following.is_empty() && t.in_flight.is_empty());
            assert_eq!(t.pending_objects, 1);
        }
        assert!(!s.remote.exists(KEY).await.unwrap());
        // The stopped uploader tees nothing more.
        assert!(queue
            .tee("backups/x/base.tar.zst", WriteMode::Overwrite)
            .is_none());
    }

    #[test]
    fn which_objects_are_followed() {
        assert!(follows("backups/20261205T000000Z/base.tar.zst"));
        assert!(follows("backups/20261205T000000Z/16385.tar.zst"));
        assert!(!follows("backups/20261205T000000Z/backup.json"));
        assert!(!follows("wal/00000001/000000010000000000000001.zst"));
        assert!(!follows("catalog/backups.json"));
    }
}
