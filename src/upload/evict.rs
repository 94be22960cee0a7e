//! Hot-tier retention: objects older than `hot.retention` are removed from the hot tier — but
//! only once every remote tier holds them verified (read back whole from the tier, the SHA-256
//! of its stored body checked against its trailer, and its trailer equal to the hot copy's).
//!
//! Only immutable data objects are evicted (WAL segments, backup objects); `repo.json`, the
//! catalog and history files stay local (small, and read by every command). This never
//! deletes from a remote tier: the remote tiers' own retention is separate.

use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::is_immutable;
use crate::repo::layout;
use crate::repo::object::{StoredCheck, TRAILER_LEN};
use crate::storage::tiered::RemoteTier;
use crate::storage::{Storage, StorageError};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub objects: usize,
    pub bytes: u64,
    /// Old enough, but some tier did not hold a verified copy (kept).
    pub kept: usize,
}

/// Reads `key` back from `tier` whole and checks it: its body against its own trailer, and the
/// trailer against `expected` (the hot copy's).
pub async fn verify_remote(
    tier: &RemoteTier,
    key: &str,
    expected: &[u8],
) -> Result<bool, StorageError> {
    let Some(meta) = tier.storage.head(key).await? else {
        return Ok(false);
    };
    let mut check = StoredCheck::new(meta.size);
    let mut off = 0;
    while off < meta.size {
        let chunk = tier
            .storage
            .get_range(key, off, (8 << 20).min(meta.size - off))
            .await?;
        if chunk.is_empty() {
            return Ok(false);
        }
        off += chunk.len() as u64;
        check.update(&chunk);
    }
    Ok(check
        .finish()
        .is_ok_and(|(trailer, _)| trailer[..] == *expected))
}

fn evictable(key: &str) -> bool {
    key != layout::REPO_META_KEY
        && !key.starts_with(layout::HISTORY_PREFIX)
        && key.ends_with(".zst")
        && is_immutable(key)
}

/// One pass over the hot tier.
pub async fn evict_once(
    hot: &dyn Storage,
    remotes: &[RemoteTier],
    retention: Duration,
    now: SystemTime,
) -> Result<Evicted, StorageError> {
    let mut out = Evicted::default();
    if remotes.is_empty() {
        return Ok(out);
    }
    for m in hot.list("").await? {
        let old = m
            .modified
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() > retention);
        if !old || !super::is_object_key(&m.key) || !evictable(&m.key) {
            continue;
        }
        let trailer = hot
            .get_range(
                &m.key,
                m.size.saturating_sub(TRAILER_LEN as u64),
                TRAILER_LEN as u64,
            )
            .await?;
        let mut everywhere = true;
        for t in remotes {
            match verify_remote(t, &m.key, &trailer).await {
                Ok(true) => {}
                Ok(false) => {
                    everywhere = false;
                    break;
                }
                Err(e) => {
                    warn!(tier = %t.name, key = %m.key, error = %e, "cannot verify the remote copy; keeping the hot one");
                    everywhere = false;
                    break;
                }
            }
        }
        if everywhere {
            hot.delete(&m.key).await?;
            out.objects += 1;
            out.bytes += m.size;
        } else {
            out.kept += 1;
        }
    }
    if out.objects > 0 || out.kept > 0 {
        info!(
            evicted = out.objects,
            bytes = out.bytes,
            kept = out.kept,
            "hot-tier retention pass"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::object::{self, ObjectKind};
    use crate::storage::fs::FsStorage;
    use crate::wal::SegmentName;
    use bytes::Bytes;
    use std::sync::Arc;

    #[tokio::test]
    async fn evicts_only_what_every_tier_holds_verified() {
        let dir = tempfile::tempdir().unwrap();
        let hot = FsStorage::new(dir.path().join("hot"));
        let tier = |n: &str| RemoteTier {
            name: n.into(),
            url: "s3://b".into(),
            storage: Arc::new(FsStorage::new(dir.path().join(n))),
        };
        let (a, b) = (tier("a"), tier("b"));
        let key = |n| layout::wal_segment_key(&SegmentName::new(1, n, 16 << 20));
        let obj = |n: u8| {
            Bytes::from(
                object::encode_bytes(&vec![n; 50_000], ObjectKind::WalSegment, 1)
                    .unwrap()
                    .0,
            )
        };
        for n in 1..=4u8 {
            hot.put(&key(n as u64), obj(n)).await.unwrap();
        }
        hot.put("catalog/x.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        // 1: in both tiers. 2: only in a. 3: in both, but b's copy is damaged. 4: in both.
        for n in [1u8, 2, 3, 4] {
            a.storage.put(&key(n as u64), obj(n)).await.unwrap();
        }
        for n in [1u8, 3, 4] {
            let mut o = obj(n).to_vec();
            if n == 3 {
                o[10] ^= 1;
            }
            b.storage.put(&key(n as u64), Bytes::from(o)).await.unwrap();
        }
        let remotes = [a, b];
        // Nothing is old enough yet.
        let now = SystemTime::now();
        let r = evict_once(&hot, &remotes, Duration::from_secs(3600), now)
            .await
            .unwrap();
        assert_eq!(r, Evicted::default());
        let later = now + Duration::from_secs(7200);
        let r = evict_once(&hot, &remotes, Duration::from_secs(3600), later)
            .await
            .unwrap();
        assert_eq!((r.objects, r.kept), (2, 2));
        assert!(!hot.exists(&key(1)).await.unwrap());
        assert!(hot.exists(&key(2)).await.unwrap(), "missing from tier b");
        assert!(hot.exists(&key(3)).await.unwrap(), "damaged in tier b");
        assert!(!hot.exists(&key(4)).await.unwrap());
        assert!(
            hot.exists("catalog/x.json").await.unwrap(),
            "metadata stays"
        );
        assert!(
            remotes[0].storage.exists(&key(1)).await.unwrap(),
            "remote untouched"
        );
    }
}
