//! The uploader: ships every object of the hot tier to each remote tier, and keeps, per tier,
//! the last WAL position that is durable there.
//!
//! Owns: the upload queue (told of each hot-tier write through [`WriteObserver`]), one worker
//! per remote tier (objects in key order — WAL in LSN order — with bounded concurrency and an
//! optional bandwidth limit), reconciliation against what each tier holds (at start and every
//! [`RECONCILE_EVERY`], so objects written by another process or left by a crash are shipped),
//! and the per-tier state (`spool/tiers.json` in the hot tier, written by the streamer).
//! [`partial`] ships the growing `.partial` segment; [`evict`] applies the hot tier's retention.
//!
//! Invariants:
//! - a hot object is verified while it is read for upload (the SHA-256 of an object's stored
//!   body against its trailer, sealed JSON against its own checksum): a damaged hot copy is
//!   never shipped, and the error names it;
//! - immutable objects (WAL segments, history files, backup objects, `repo.json`) are created
//!   with [`WriteMode::CreateNew`]; if the tier already holds the key (a retried upload whose
//!   first attempt landed), its trailer must equal ours, else the conflict is reported and the
//!   remote object is left alone;
//! - a tier's durable position never counts a segment while an earlier one is still queued.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::repo::layout::{self, parse_wal_key, WalObject};
use crate::repo::object::{self, TRAILER_LEN};
use crate::repo::sealed;
use crate::storage::tiered::{RemoteTier, Tee, WriteObserver};
use crate::storage::{Storage, StorageError, WriteMode};

pub mod evict;
mod follow;
pub mod partial;
pub mod tasks;

/// How often a long-running uploader compares each tier with the hot tier again.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(300);
/// The pause before a worker's next round after an upload failed (the retry wrapper has
/// already retried each transient failure).
const ROUND_BACKOFF: crate::retry::RetryPolicy = crate::retry::RetryPolicy {
    initial: Duration::from_millis(500),
    max_delay: Duration::from_secs(5),
    give_up_after: Duration::MAX,
};
/// Bytes per ranged read of a hot object.
const READ_CHUNK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the hot tier's copy of {key} is damaged ({reason}); it is not uploaded")]
    HotCorrupt { key: String, reason: String },
    #[error("remote tier {tier} already holds a different {key}; left as it is")]
    Conflict { tier: String, key: String },
}

impl UploadError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, UploadError::Storage(e) if e.is_transient())
    }
}

/// Whether a key names an object that is never rewritten.
pub fn is_immutable(key: &str) -> bool {
    key == layout::REPO_META_KEY
        || key.starts_with("backups/")
        || key.starts_with(layout::HISTORY_PREFIX)
        || matches!(
            parse_wal_key(key, 1 << 24).or_else(|| parse_wal_key(key, 1 << 30)),
            Some(WalObject::Segment(_))
        )
}

/// Keys of the hot tier that are repository objects (not the spool, not temporaries).
pub fn is_object_key(key: &str) -> bool {
    !key.starts_with(&format!("{}/", crate::repo::SPOOL_DIR))
}

/// Checks bytes of a hot object as they stream by.
enum Verifier {
    /// An archiver object: its stored body against its trailer.
    Object(object::StoredCheck),
    /// Sealed JSON (small): checked whole at the end.
    Sealed(Vec<u8>),
    None,
}

impl Verifier {
    fn for_key(key: &str, size: u64) -> Verifier {
        if key.ends_with(".zst") {
            Verifier::Object(object::StoredCheck::new(size))
        } else if key.ends_with(".json") {
            Verifier::Sealed(Vec::new())
        } else {
            Verifier::None
        }
    }

    /// For an object still being written (its size unknown until its end).
    fn streamed() -> Verifier {
        Verifier::Object(object::StoredCheck::of_unknown_size())
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Verifier::Object(check) => check.update(b),
            Verifier::Sealed(v) => v.extend_from_slice(b),
            Verifier::None => {}
        }
    }

    /// The object's trailer (for objects), or an error naming what is wrong.
    fn finish(self) -> Result<Option<Vec<u8>>, String> {
        match self {
            Verifier::Object(check) => match check.finish() {
                Ok((trailer, _)) => Ok(Some(trailer)),
                Err(object::ObjectError::Corrupt(reason)) => Err(reason),
                Err(e) => Err(e.to_string()),
            },
            Verifier::Sealed(v) => sealed::open::<serde_json::Value>(&v)
                .map(|_| None)
                .map_err(|e| e.to_string()),
            Verifier::None => Ok(None),
        }
    }
}

/// A token bucket: at most `rate` bytes per second, shared by a tier's concurrent uploads.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    next_free: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            rate: bytes_per_sec as f64,
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn take(&self, n: usize) {
        let at = {
            let mut next = self.next_free.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / self.rate);
            start
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Copies one hot object to a remote tier, verifying the hot bytes on the way.
/// Returns the bytes sent (0: the hot object is gone, or the tier already held it).
pub async fn upload_object(
    hot: &dyn Storage,
    tier: &RemoteTier,
    key: &str,
    limit: Option<&RateLimit>,
) -> Result<u64, UploadError> {
    let Some(meta) = hot.head(key).await? else {
        return Ok(0);
    };
    let mut up = Upload::start(tier, key, Verifier::for_key(key, meta.size)).await?;
    match up.copy_from_hot(hot, meta.size, limit).await {
        Ok(true) => up.finish(hot).await,
        Ok(false) => {
            up.abort().await;
            Ok(0)
        }
        Err(e) => {
            up.abort().await;
            Err(e)
        }
    }
}

/// One object on its way to one remote tier: the tier's writer, the check of the bytes sent,
/// and how many have been sent.
pub(crate) struct Upload<'a> {
    tier: &'a RemoteTier,
    key: &'a str,
    w: Box<dyn crate::storage::ObjectWriter>,
    verifier: Verifier,
    sent: u64,
}

impl<'a> Upload<'a> {
    async fn start(
        tier: &'a RemoteTier,
        key: &'a str,
        verifier: Verifier,
    ) -> Result<Upload<'a>, UploadError> {
        let mode = if is_immutable(key) {
            WriteMode::CreateNew
        } else {
            WriteMode::Overwrite
        };
        Ok(Upload {
            w: tier.storage.writer_with(key, mode).await?,
            tier,
            key,
            verifier,
            sent: 0,
        })
    }

    /// Sends the object's next bytes.
    async fn send(&mut self, chunk: Bytes, limit: Option<&RateLimit>) -> Result<(), UploadError> {
        self.verifier.update(&chunk);
        if let Some(l) = limit {
            l.take(chunk.len()).await;
        }
        self.sent += chunk.len() as u64;
        Ok(self.w.write(chunk).await?)
    }

    /// Sends the rest of the hot object (`size` bytes), from where the upload stands. False:
    /// the hot object is gone (nothing to ship).
    async fn copy_from_hot(
        &mut self,
        hot: &dyn Storage,
        size: u64,
        limit: Option<&RateLimit>,
    ) -> Result<bool, UploadError> {
        while self.sent < size {
            let chunk = match hot.get_range(self.key, self.sent, READ_CHUNK).await {
                Ok(c) if !c.is_empty() => c,
                Ok(_) => break,
                Err(StorageError::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            self.send(chunk, limit).await?;
        }
        Ok(true)
    }

    async fn abort(self) {
        self.w.abort().await
    }

    /// Checks what was sent and publishes it in the tier. Returns the bytes stored (0: the
    /// tier already held this very object).
    async fn finish(self, hot: &dyn Storage) -> Result<u64, UploadError> {
        let (tier, key) = (self.tier, self.key);
        let trailer = match self.verifier.finish() {
            Ok(t) => t,
            Err(reason) => {
                self.w.abort().await;
                return Err(UploadError::HotCorrupt {
                    key: key.to_string(),
                    reason,
                });
            }
        };
        match self.w.finish().await {
            Ok(n) => Ok(n),
            Err(StorageError::AlreadyExists(_)) => {
                // Ours already (a retry whose first attempt landed, another process) — or not.
                let theirs = match tier.storage.head(key).await? {
                    Some(m) if m.size >= TRAILER_LEN as u64 => {
                        tier.storage
                            .get_range(key, m.size - TRAILER_LEN as u64, TRAILER_LEN as u64)
                            .await?
                    }
                    _ => Bytes::new(),
                };
                let same = match trailer {
                    Some(t) if theirs[..] == t[..] => true,
                    Some(t) => {
                        same_content_encoded_differently(tier, hot, key, &t, &theirs).await?
                    }
                    None => tier.storage.get(key).await? == hot.get(key).await?,
                };
                if same {
                    return Ok(0);
                }
                Err(UploadError::Conflict {
                    tier: tier.name.clone(),
                    key: key.to_string(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The largest raw content [`same_content_encoded_differently`] compares (in memory): a WAL
/// segment of up to 64 MiB. A larger segment (`wal_segment_size` of 128 MiB or more)
/// republished with other compression is still reported as a conflict; nothing else is
/// written twice under one key.
const SAME_CONTENT_MAX: u64 = 64 << 20;

/// Whether the tier's object under `key` (trailer `theirs`) holds the same raw content as the
/// hot one (trailer `ours`) though its stored bytes differ: the same segment compressed
/// with other parameters, published again after a crash between the hot write and the spool's
/// retire, by a build or configuration that compresses differently. Kind, raw size and CRC-32
/// must agree; then both are decoded (each verified) and compared byte for byte. Their copy
/// is kept either way.
async fn same_content_encoded_differently(
    tier: &RemoteTier,
    hot: &dyn Storage,
    key: &str,
    ours: &[u8],
    theirs: &[u8],
) -> Result<bool, UploadError> {
    let (Ok(o), Ok(t)) = (
        object::ObjectInfo::parse_trailer(ours),
        object::ObjectInfo::parse_trailer(theirs),
    ) else {
        return Ok(false);
    };
    if (o.kind, o.raw_size, o.crc32) != (t.kind, t.raw_size, t.crc32)
        || o.raw_size > SAME_CONTENT_MAX
    {
        return Ok(false);
    }
    let (ours, theirs) = (hot.get(key).await?, tier.storage.get(key).await?);
    let k = key.to_string();
    let same = tokio::task::spawn_blocking(move || {
        let (raw, _) = object::decode_bytes(&ours).map_err(|e| UploadError::HotCorrupt {
            key: k,
            reason: e.to_string(),
        })?;
        let mut cmp = SameBytes { want: &raw, at: 0 };
        Ok::<_, UploadError>(object::decode(&theirs, &mut cmp).is_ok() && cmp.at == raw.len())
    })
    .await
    .expect("comparison task panicked")?;
    if same {
        info!(tier = %tier.name, %key, "the remote tier already holds this content, compressed differently; kept its copy");
    }
    Ok(same)
}

/// A writer that fails at the first byte differing from `want` (or beyond its end).
struct SameBytes<'a> {
    want: &'a [u8],
    at: usize,
}

impl std::io::Write for SameBytes<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.want.get(self.at..self.at + b.len()) != Some(b) {
            return Err(std::io::Error::other("content differs"));
        }
        self.at += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub use crate::wal::WalPoint;

/// What one remote tier holds, as far as this process knows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TierState {
    pub name: String,
    pub url: String,
    /// Everything up to here is in the tier (complete segments and the uploaded partial).
    pub durable: Option<WalPoint>,
    /// When `durable` last moved.
    pub durable_at: Option<crate::time::Timestamp>,
    pub pending_objects: usize,
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    pub last_error: Option<String>,
    /// The last error was one retrying cannot fix (no permission, no bucket, a conflict).
    #[serde(skip)]
    last_error_permanent: bool,
    #[serde(skip)]
    max_uploaded: Option<WalPoint>,
    #[serde(skip)]
    pending: BTreeSet<String>,
    #[serde(skip)]
    in_flight: BTreeSet<String>,
    /// Objects shipped while they are written ([`follow`]): not queued when written.
    #[serde(skip)]
    following: BTreeSet<String>,
}

impl TierState {
    fn min_queued_wal(&self, seg_size: u64) -> Option<WalPoint> {
        self.pending
            .iter()
            .chain(self.in_flight.iter())
            .filter_map(|k| match parse_wal_key(k, seg_size) {
                Some(WalObject::Segment(s)) => Some(WalPoint {
                    tli: s.tli,
                    lsn: s.start_lsn(),
                }),
                _ => None,
            })
            .min_by_key(|p| p.key())
    }

    /// Recomputes `durable`: the highest point uploaded, unless an earlier segment is queued.
    fn refresh(&mut self, seg_size: u64) {
        let d = match (self.max_uploaded, self.min_queued_wal(seg_size)) {
            (Some(up), Some(q)) if q.key() < up.key() => Some(q),
            (up, _) => up,
        };
        if d != self.durable && d.is_some() {
            self.durable_at = Some(crate::time::now());
        }
        self.durable = d;
        self.pending_objects = self.pending.len() + self.in_flight.len() + self.following.len();
    }

    fn uploaded_point(&mut self, p: WalPoint) {
        if self.max_uploaded.is_none_or(|m| p.key() > m.key()) {
            self.max_uploaded = Some(p);
        }
    }
}

/// The queue and state shared by the tiers' workers and the hot tier's write hook.
#[derive(Debug)]
pub struct Queue {
    tiers: Mutex<Vec<TierState>>,
    notify: Notify,
    /// Signalled whenever a worker goes idle (for [`Uploader::drain`]).
    idle: Notify,
    /// The repository's WAL segment size (known once it is opened; 16 MiB until then).
    seg_size: std::sync::atomic::AtomicU64,
    /// While an uploader runs: what ships objects to the tiers as they are written.
    write_through: Mutex<Option<Arc<follow::WriteThrough>>>,
}

impl WriteObserver for Queue {
    fn written(&self, key: &str) {
        if !is_object_key(key) {
            return;
        }
        for t in self.tiers.lock().unwrap().iter_mut() {
            if !t.following.contains(key) {
                t.pending.insert(key.to_string());
            }
            t.pending_objects = t.pending.len() + t.in_flight.len() + t.following.len();
        }
        self.notify.notify_waiters();
    }

    fn tee(&self, key: &str, _mode: WriteMode) -> Option<Box<dyn Tee>> {
        let wt = self.write_through.lock().unwrap().clone()?;
        // The mode of the remote copy follows from the key (`is_immutable`), as for the worker.
        follow::tee(&wt, self, key)
    }
}

impl Queue {
    pub fn new(remotes: &[RemoteTier]) -> Arc<Queue> {
        Arc::new(Queue {
            tiers: Mutex::new(
                remotes
                    .iter()
                    .map(|r| TierState {
                        name: r.name.clone(),
                        url: r.url.clone(),
                        ..TierState::default()
                    })
                    .collect(),
            ),
            notify: Notify::new(),
            idle: Notify::new(),
            seg_size: std::sync::atomic::AtomicU64::new(16 << 20),
            write_through: Mutex::new(None),
        })
    }

    pub fn set_seg_size(&self, seg_size: u64) {
        self.seg_size
            .store(seg_size, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn seg_size(&self) -> u64 {
        self.seg_size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A snapshot of every tier's state.
    pub fn states(&self) -> Vec<TierState> {
        self.tiers.lock().unwrap().clone()
    }

    fn with_tier<T>(&self, i: usize, f: impl FnOnce(&mut TierState) -> T) -> T {
        let mut tiers = self.tiers.lock().unwrap();
        let t = &mut tiers[i];
        let r = f(t);
        t.refresh(self.seg_size());
        r
    }

    /// Records that tier `i` holds WAL up to `p` (a partial segment's upload).
    pub fn record_partial(&self, i: usize, p: WalPoint) {
        self.with_tier(i, |t| t.uploaded_point(p));
    }

    /// `key` is in tier `i` (uploaded by the worker or by a follower).
    fn record_done(&self, i: usize, key: &str, bytes: u64) {
        let seg_size = self.seg_size();
        self.with_tier(i, |t| {
            t.in_flight.remove(key);
            t.following.remove(key);
            t.uploaded_objects += 1;
            t.uploaded_bytes += bytes;
            if let Some(WalObject::Segment(s)) = parse_wal_key(key, seg_size) {
                t.uploaded_point(WalPoint {
                    tli: s.tli,
                    lsn: s.end_lsn(),
                });
            }
            t.last_error = None;
            t.last_error_permanent = false;
        });
    }

    /// Starts following `key` for tier `i`; false if the tier already has it on the way.
    fn start_following(&self, i: usize, key: &str) -> bool {
        self.with_tier(i, |t| {
            let busy = t.pending.contains(key) || t.in_flight.contains(key);
            !busy && t.following.insert(key.to_string())
        })
    }

    /// A follower of `key` for tier `i` is done: `Ok(Some(bytes))` uploaded, `Ok(None)` nothing
    /// to ship (the write was abandoned), `Err`: queued for the worker's usual upload.
    fn followed(&self, i: usize, key: &str, r: &Result<Option<u64>, UploadError>) {
        match r {
            Ok(Some(bytes)) => self.record_done(i, key, *bytes),
            Ok(None) => self.with_tier(i, |t| {
                t.following.remove(key);
            }),
            Err(e) => self.record_failed(i, key, e),
        }
        // Wakes the worker (to take a failed follower's key, or to report itself idle).
        self.notify.notify_waiters();
    }

    /// A follower of `key` for tier `i` was stopped with its uploader: the key goes back to
    /// the queue, for the next worker (the object may be published already, or soon).
    fn follower_stopped(&self, i: usize, key: &str) {
        self.with_tier(i, |t| {
            t.following.remove(key);
            t.pending.insert(key.to_string());
        });
        self.notify.notify_waiters();
    }

    /// `key` failed to reach tier `i`: queued again for the worker.
    fn record_failed(&self, i: usize, key: &str, e: &UploadError) {
        self.with_tier(i, |t| {
            t.in_flight.remove(key);
            t.following.remove(key);
            t.pending.insert(key.to_string());
            t.last_error = Some(e.to_string());
            t.last_error_permanent = !e.is_transient();
        });
        self.refused(e);
    }

    /// A drain does not wait on a tier that refuses for good: told, it returns at once (the
    /// worker retrying the key is never idle).
    fn refused(&self, e: &UploadError) {
        if !e.is_transient() {
            self.idle.notify_waiters();
        }
    }

    /// Takes up to `n` queued keys for tier `i`, in key order. A key still in flight (a
    /// catalog record rewritten while its previous version uploads) waits: two uploads of one
    /// key at once could land in the wrong order and leave the tier the older version.
    fn take(&self, i: usize, n: usize) -> Vec<String> {
        self.with_tier(i, |t| {
            let keys: Vec<String> = t
                .pending
                .iter()
                .filter(|k| !t.in_flight.contains(*k))
                .take(n)
                .cloned()
                .collect();
            for k in &keys {
                t.pending.remove(k);
                t.in_flight.insert(k.clone());
            }
            keys
        })
    }

    /// Whether a key that `matches` still waits for (or is being) uploaded to some tier.
    pub fn any_pending(&self, matches: impl Fn(&str) -> bool) -> bool {
        self.tiers.lock().unwrap().iter().any(|t| {
            t.pending
                .iter()
                .chain(t.in_flight.iter())
                .chain(t.following.iter())
                .any(|k| matches(k))
        })
    }

    fn is_idle(&self) -> bool {
        self.tiers
            .lock()
            .unwrap()
            .iter()
            .all(|t| t.pending.is_empty() && t.in_flight.is_empty() && t.following.is_empty())
    }
}

/// Lists what tier `i` lacks (or, for mutable objects, holds older) and queues it; also
/// derives the tier's durable WAL position from what it holds.
async fn reconcile(
    queue: &Queue,
    hot: &dyn Storage,
    i: usize,
    tier: &RemoteTier,
) -> Result<usize, StorageError> {
    let hot_objects = hot.list("").await?;
    let remote = tier.storage.list("").await?;
    let theirs: std::collections::HashMap<&str, &crate::storage::ObjectMeta> =
        remote.iter().map(|m| (m.key.as_str(), m)).collect();
    let seg_size = queue.seg_size();
    let newest_held = remote
        .iter()
        .filter_map(|m| match parse_wal_key(&m.key, seg_size) {
            Some(WalObject::Segment(s)) => Some(WalPoint {
                tli: s.tli,
                lsn: s.end_lsn(),
            }),
            _ => None,
        })
        .max_by_key(|p| p.key());
    let missing: Vec<String> = hot_objects
        .iter()
        .filter(|m| is_object_key(&m.key))
        .filter(|m| match theirs.get(m.key.as_str()) {
            None => true,
            Some(r) if !is_immutable(&m.key) => {
                // Mutable (catalog records, partials): ship again when the hot copy is newer.
                r.size != m.size || matches!((m.modified, r.modified), (Some(h), Some(t)) if h > t)
            }
            Some(_) => false,
        })
        .map(|m| m.key.clone())
        .collect();
    let n = missing.len();
    queue.with_tier(i, |t| {
        if let Some(p) = newest_held {
            t.uploaded_point(p);
        }
        // A key being shipped while written is on its way already.
        t.pending
            .extend(missing.into_iter().filter(|k| !t.following.contains(k)));
    });
    Ok(n)
}

#[derive(Clone, Debug)]
pub struct UploadSettings {
    pub concurrency: usize,
    pub max_rate: Option<u64>,
    /// Compare every tier with the hot tier at start and every [`RECONCILE_EVERY`] (the
    /// streamer); a backup ships only what it writes.
    pub reconcile: bool,
}

/// The running upload workers.
pub struct Uploader {
    queue: Arc<Queue>,
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Uploader {
    pub fn start(
        queue: Arc<Queue>,
        hot: Arc<dyn Storage>,
        remotes: Vec<RemoteTier>,
        settings: UploadSettings,
    ) -> Uploader {
        let (stop, stop_rx) = watch::channel(false);
        let remotes: Vec<Arc<RemoteTier>> = remotes.into_iter().map(Arc::new).collect();
        // One limit per tier, shared by its worker and its followers.
        let limits: Vec<Option<Arc<RateLimit>>> = remotes
            .iter()
            .map(|_| settings.max_rate.map(|r| Arc::new(RateLimit::new(r))))
            .collect();
        *queue.write_through.lock().unwrap() = Some(Arc::new(follow::WriteThrough {
            queue: Arc::downgrade(&queue),
            hot: hot.clone(),
            remotes: remotes.clone(),
            limits: limits.clone(),
            stop: stop_rx.clone(),
        }));
        let workers = remotes
            .into_iter()
            .zip(limits)
            .enumerate()
            .map(|(i, (tier, limit))| {
                tokio::spawn(worker(
                    queue.clone(),
                    hot.clone(),
                    i,
                    tier,
                    limit,
                    settings.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        Uploader {
            queue,
            stop,
            workers,
        }
    }

    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// Waits until nothing is queued or in flight, or `timeout` passes; Err names what is
    /// not yet in which tier.
    pub async fn drain(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let idle = self.queue.idle.notified();
            if self.queue.is_idle() {
                return Ok(());
            }
            // A tier refusing for good (no permission, no bucket) is not waited for.
            let refused = self
                .queue
                .states()
                .iter()
                .any(|t| t.pending_objects > 0 && t.last_error_permanent);
            let timed_out = !refused
                && tokio::time::timeout_at(deadline.into(), idle)
                    .await
                    .is_err();
            if refused || timed_out {
                let states = self.queue.states();
                let behind: Vec<String> = states
                    .iter()
                    .filter(|t| t.pending_objects > 0)
                    .map(|t| {
                        format!(
                            "{}: {} objects not uploaded{}",
                            t.name,
                            t.pending_objects,
                            t.last_error
                                .as_ref()
                                .map(|e| format!(" (last error: {e})"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                return Err(behind.join("; "));
            }
        }
    }

    /// Stops the workers and followers (uploads in flight are abandoned; the next
    /// reconciliation ships them).
    pub async fn stop(self) {
        self.queue.write_through.lock().unwrap().take();
        let _ = self.stop.send(true);
        for w in self.workers {
            let _ = w.await;
        }
    }
}

async fn worker(
    queue: Arc<Queue>,
    hot: Arc<dyn Storage>,
    i: usize,
    tier: Arc<RemoteTier>,
    limit: Option<Arc<RateLimit>>,
    settings: UploadSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_reconcile = settings.reconcile.then(Instant::now);
    let mut backoff: u32 = 0;
    let mut running: JoinSet<(String, Result<u64, UploadError>, Duration)> = JoinSet::new();
    loop {
        if *stop.borrow() {
            running.abort_all();
            return;
        }
        if next_reconcile.is_some_and(|t| Instant::now() >= t) && running.is_empty() {
            match reconcile(&queue, hot.as_ref(), i, &tier).await {
                Ok(n) => {
                    if n > 0 {
                        info!(tier = %tier.name, objects = n, "queued objects the remote tier lacks");
                    }
                    next_reconcile = Some(Instant::now() + RECONCILE_EVERY);
                }
                Err(e) => {
                    warn!(tier = %tier.name, error = %e, "cannot compare the remote tier with the hot tier; retrying");
                    queue.with_tier(i, |t| t.last_error = Some(e.to_string()));
                    next_reconcile = Some(Instant::now() + ROUND_BACKOFF.delay(backoff.min(8)));
                    backoff += 1;
                }
            }
        }
        // Made before taking from the queue, so a write in between is not missed
        // (notify_waiters reaches every Notified created before it).
        let notified = queue.notify.notified();
        let free = settings.concurrency.saturating_sub(running.len());
        if free > 0 {
            for key in queue.take(i, free) {
                let (hot, tier, limit) = (hot.clone(), tier.clone(), limit.clone());
                running.spawn(async move {
                    let t = Instant::now();
                    let r = upload_object(hot.as_ref(), &tier, &key, limit.as_deref()).await;
                    (key, r, t.elapsed())
                });
            }
        }
        if running.is_empty() {
            queue.idle.notify_waiters();
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = notified, if running.len() < settings.concurrency => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((key, r, took)) = done else { continue };
                match r {
                    Ok(bytes) => {
                        debug!(tier = %tier.name, %key, bytes, elapsed_ms = took.as_millis() as u64, "uploaded");
                        queue.record_done(i, &key, bytes);
                        backoff = 0;
                    }
                    Err(e) => {
                        warn!(tier = %tier.name, %key, error = %e, "upload failed; will retry");
                        queue.record_failed(i, &key, &e);
                        // The retry wrapper has already retried transient errors; wait before
                        // the next round so a tier that is down is not hammered.
                        let d = ROUND_BACKOFF.delay(backoff.min(8));
                        backoff += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Writes the tiers' state to `spool/tiers.json` in the hot tier's directory.
pub fn write_state(spool_dir: &std::path::Path, states: &[TierState]) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct File<'a> {
        updated_at: crate::time::Timestamp,
        tiers: &'a [TierState],
    }
    let body = serde_json::to_vec_pretty(&File {
        updated_at: crate::time::now(),
        tiers: states,
    })
    .map_err(std::io::Error::other)?;
    crate::storage::fs::write_atomic(&spool_dir.join(TIERS_STATE_FILE), &body)
}

pub const TIERS_STATE_FILE: &str = "tiers.json";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::object::ObjectKind;
    use crate::storage::fs::FsStorage;
    use crate::wal::Lsn;
    use crate::wal::SegmentName;

    fn seg_key(n: u64) -> String {
        layout::wal_segment_key(&SegmentName::new(1, n, 16 << 20))
    }

    #[test]
    fn a_key_rewritten_during_its_upload_is_uploaded_again_after_it() {
        let q = Queue::new(&[RemoteTier {
            name: "r".into(),
            url: "s3://b".into(),
            storage: Arc::new(FsStorage::new("/nonexistent")),
        }]);
        let rec = "catalog/20261204T000000Z.json";
        q.written(rec);
        assert_eq!(q.take(0, 4), [rec]);
        q.written(rec); // the record is rewritten (running -> complete) while it uploads
        assert!(q.take(0, 4).is_empty(), "not twice at once");
        assert!(q.any_pending(|k| k == rec));
        q.record_done(0, rec, 10);
        assert!(
            q.any_pending(|k| k == rec),
            "the new version is still to go"
        );
        assert_eq!(q.take(0, 4), [rec]);
        q.record_done(0, rec, 10);
        assert!(!q.any_pending(|k| k == rec));
    }

    #[test]
    fn durable_position_waits_for_earlier_segments() {
        let q = Queue::new(&[RemoteTier {
            name: "r".into(),
            url: "s3://b".into(),
            storage: Arc::new(FsStorage::new("/nonexistent")),
        }]);
        for n in [3, 4, 5] {
            q.written(&seg_key(n));
        }
        q.written("spool/stream.next");
        assert_eq!(
            q.states()[0].pending_objects,
            3,
            "spool files are not objects"
        );
        let keys = q.take(0, 2);
        assert_eq!(keys, [seg_key(3), seg_key(4)]);
        q.record_done(0, &seg_key(4), 10);
        assert_eq!(
            q.states()[0].durable,
            Some(WalPoint {
                tli: 1,
                lsn: Lsn(3 << 24)
            }),
            "segment 3 is still in flight"
        );
        q.record_done(0, &seg_key(3), 10);
        assert_eq!(q.states()[0].durable.unwrap().lsn, Lsn(5 << 24));
        // A partial of segment 6 uploaded while 5 is queued: still 5's start.
        q.record_partial(
            0,
            WalPoint {
                tli: 1,
                lsn: Lsn((6 << 24) + 100),
            },
        );
        assert_eq!(q.states()[0].durable.unwrap().lsn, Lsn(5 << 24));
        let k = q.take(0, 1);
        q.record_failed(
            0,
            &k[0],
            &UploadError::Conflict {
                tier: "r".into(),
                key: k[0].clone(),
            },
        );
        assert!(q.states()[0]
            .last_error
            .as_ref()
            .unwrap()
            .contains("different"));
        let k = q.take(0, 1);
        q.record_done(0, &k[0], 1);
        assert_eq!(q.states()[0].durable.unwrap().lsn, Lsn((6 << 24) + 100));
        assert!(q.is_idle());
    }

    #[test]
    fn which_keys_are_immutable() {
        assert!(is_immutable(&seg_key(1)));
        assert!(is_immutable("backups/20261201T000000Z/base.tar.zst"));
        assert!(is_immutable("wal/history/00000002.history.zst"));
        assert!(is_immutable("repo.json"));
        assert!(!is_immutable("catalog/20261201T000000Z.json"));
        assert!(!is_immutable(&layout::partial_segment_key(
            &SegmentName::new(1, 2, 16 << 20)
        )));
    }

    /// A hot tier and a remote one, on disk in a new temporary directory.
    fn hot_and_remote() -> (tempfile::TempDir, FsStorage, RemoteTier) {
        let dir = tempfile::tempdir().unwrap();
        let hot = FsStorage::new(dir.path().join("hot"));
        let tier = RemoteTier {
            name: "r".into(),
            url: "s3://b".into(),
            storage: Arc::new(FsStorage::new(dir.path().join("remote"))),
        };
        (dir, hot, tier)
    }

    /// Two different 8-byte suffixes that give `prefix` the same CRC-32 (a birthday search
    /// over scattered 64-bit values — ~80,000 tries on average, deterministic; suffixes that
    /// differ in 32 bits or fewer never collide, a CRC-32 detects every such burst).
    fn crc_twins(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut seen = std::collections::HashMap::new();
        for n in 1u64..1 << 24 {
            let i = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ n;
            let mut h = crc32fast::Hasher::new();
            h.update(prefix);
            h.update(&i.to_le_bytes());
            if let Some(j) = seen.insert(h.finalize(), i) {
                let raw = |n: u64| [prefix, &n.to_le_bytes()[..]].concat();
                return (raw(j), raw(i));
            }
        }
        panic!("no CRC-32 collision found")
    }

    #[tokio::test]
    async fn a_remote_copy_of_the_same_content_compressed_otherwise_is_kept_without_conflict() {
        let (_dir, hot, tier) = hot_and_remote();
        let raw: Vec<u8> = (0..300_000u32)
            .map(|i| ((i % 251) ^ (i / 4093)) as u8)
            .collect();
        let (fast, _) = object::encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
        let (small, _) = object::encode_bytes(&raw, ObjectKind::WalSegment, 9).unwrap();
        assert_ne!(fast, small);
        let key = seg_key(3);
        tier.storage
            .put(&key, Bytes::from(small.clone()))
            .await
            .unwrap();
        hot.put(&key, Bytes::from(fast)).await.unwrap();
        assert_eq!(upload_object(&hot, &tier, &key, None).await.unwrap(), 0);
        assert_eq!(tier.storage.get(&key).await.unwrap(), Bytes::from(small));
        // Same kind, size and CRC-32, other content: still a conflict.
        let (a, b) = crc_twins(&raw[..1000]);
        assert_ne!(a, b);
        assert_eq!(crc32fast::hash(&a), crc32fast::hash(&b));
        let key = seg_key(4);
        let (theirs, _) = object::encode_bytes(&a, ObjectKind::WalSegment, 1).unwrap();
        let (ours, _) = object::encode_bytes(&b, ObjectKind::WalSegment, 1).unwrap();
        tier.storage
            .put(&key, Bytes::from(theirs.clone()))
            .await
            .unwrap();
        hot.put(&key, Bytes::from(ours)).await.unwrap();
        assert!(matches!(
            upload_object(&hot, &tier, &key, None).await,
            Err(UploadError::Conflict { .. })
        ));
        // The same content of another kind: a conflict.
        let key = seg_key(5);
        let (other_kind, _) = object::encode_bytes(&raw, ObjectKind::Other, 9).unwrap();
        tier.storage
            .put(&key, Bytes::from(other_kind))
            .await
            .unwrap();
        let (ours, _) = object::encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
        hot.put(&key, Bytes::from(ours)).await.unwrap();
        assert!(matches!(
            upload_object(&hot, &tier, &key, None).await,
            Err(UploadError::Conflict { .. })
        ));
        assert_eq!(
            tier.storage.get(&seg_key(4)).await.unwrap(),
            Bytes::from(theirs)
        );
    }

    #[tokio::test]
    async fn uploads_verify_the_hot_copy_and_never_replace() {
        let (_dir, hot, tier) = hot_and_remote();
        let (obj, _) =
            object::encode_bytes(&vec![5u8; 100_000], ObjectKind::WalSegment, 1).unwrap();
        let key = seg_key(7);
        hot.put(&key, Bytes::from(obj.clone())).await.unwrap();
        assert!(upload_object(&hot, &tier, &key, None).await.unwrap() > 0);
        assert_eq!(
            tier.storage.get(&key).await.unwrap(),
            Bytes::from(obj.clone())
        );
        // Again: the tier holds the same object — nothing sent, no error.
        assert_eq!(upload_object(&hot, &tier, &key, None).await.unwrap(), 0);
        // A different object under the key in the tier: a conflict, theirs untouched.
        let (other, _) = object::encode_bytes(&[6u8; 10], ObjectKind::WalSegment, 1).unwrap();
        hot.put(&key, Bytes::from(other)).await.unwrap();
        assert!(matches!(
            upload_object(&hot, &tier, &key, None).await,
            Err(UploadError::Conflict { .. })
        ));
        assert_eq!(
            tier.storage.get(&key).await.unwrap(),
            Bytes::from(obj.clone())
        );
        // A damaged hot copy is not shipped.
        let mut bad = obj.clone();
        bad[10] ^= 1;
        let key2 = seg_key(8);
        hot.put(&key2, Bytes::from(bad)).await.unwrap();
        let e = upload_object(&hot, &tier, &key2, None).await.unwrap_err();
        assert!(matches!(e, UploadError::HotCorrupt { .. }), "{e}");
        assert!(!tier.storage.exists(&key2).await.unwrap());
        // A vanished hot object is nothing to do.
        assert_eq!(
            upload_object(&hot, &tier, &seg_key(9), None).await.unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn rate_limit_spaces_uploads() {
        let l = RateLimit::new(1_000_000);
        let t = Instant::now();
        // 15 × 100 kB at 1 MB/s: the last may start 1.4 s after the first.
        for _ in 0..15 {
            l.take(100_000).await;
        }
        assert!(
            t.elapsed() >= Duration::from_millis(1300),
            "{:?}",
            t.elapsed()
        );
    }
}
