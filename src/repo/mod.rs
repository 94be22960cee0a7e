//! A repository: its identity (`repo.json`), its object layout, and verified object I/O on top of
//! a [`Storage`] backend.
//!
//! Invariants: a repository belongs to exactly one cluster (system identifier, major version and
//! WAL segment size are fixed at initialisation and checked on every connection); every object
//! read back is verified ([`object::decode`]); objects are published atomically by the backend.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError};
use crate::time::Timestamp;
use crate::wal::cluster::ServerInfo;
use crate::wal::SegmentName;

pub mod catalog;
pub mod gaps;
pub mod layout;
pub mod local_wal;
pub mod lock;
pub mod object;
pub mod relmap;
pub mod sealed;
pub mod wal_index;

use layout::{parse_wal_key, WalObject};
use object::{ObjectError, ObjectInfo, ObjectKind};

/// The repository format version written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// Key prefix reserved for the local spool of the fs layout (never an object).
pub const SPOOL_DIR: &str = "spool";

/// Bytes per ranged read when streaming an object.
pub const READ_CHUNK: u64 = 8 << 20;

/// A blocking reader over chunks fetched by an async task.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, StorageError>>,
    cur: Bytes,
    /// A storage error, kept to report as such (not as corruption).
    error: Option<StorageError>,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// `repo.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoMeta {
    pub format_version: u32,
    /// Decimal, as a string: JSON numbers lose precision above 2^53 in many readers.
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub pg_major: u32,
    pub wal_segment_size: u64,
    pub created_at: Timestamp,
    pub created_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "{0} is not an archiver repository (no repo.json) and is not empty; refusing to use it"
    )]
    NotARepository(String),
    #[error(
        "{0} is not an archiver repository (no repo.json); run `archiver stream` to initialise it"
    )]
    NotInitialized(String),
    #[error(
        "repository belongs to another cluster: its {field} is {repo}, the server's is {server}"
    )]
    OtherCluster {
        field: &'static str,
        repo: String,
        server: String,
    },
    #[error("repository format version {0} is newer than this archiver understands ({FORMAT_VERSION}); upgrade archiver")]
    NewerFormat(u32),
    #[error("the repository is encrypted: give its key (--encryption-key-file, or [encryption] in the configuration file)")]
    Encrypted,
    #[error("repo.json is damaged: {0}")]
    BadMeta(String),
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("no backup with id {0} in the repository")]
    UnknownBackup(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Where the verified bytes were going failed (e.g. writing a restored file).
    #[error("{0}")]
    Sink(String),
}

impl RepoError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Storage(e) if e.is_transient())
    }
}

#[derive(Debug, Clone)]
pub struct Repo {
    storage: Arc<dyn Storage>,
    meta: RepoMeta,
    name: String,
    /// The local spool readers may take WAL from ([`local_wal`]), if there is one.
    spool: Option<crate::spool::Spool>,
}

impl Repo {
    /// Reads `repo.json`, if there is one.
    pub async fn read_meta(storage: &dyn Storage) -> Result<Option<RepoMeta>, RepoError> {
        let raw = match storage.get(layout::REPO_META_KEY).await {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if raw.starts_with(crate::storage::encrypted::MAGIC) {
            return Err(RepoError::Encrypted);
        }
        let meta: RepoMeta = sealed::open(&raw).map_err(|e| RepoError::BadMeta(e.to_string()))?;
        if meta.format_version > FORMAT_VERSION {
            return Err(RepoError::NewerFormat(meta.format_version));
        }
        Ok(Some(meta))
    }

    /// Opens an initialised repository (readers: wal-fetch, list, restore).
    pub async fn open(storage: Arc<dyn Storage>, name: &str) -> Result<Repo, RepoError> {
        let meta = Self::read_meta(storage.as_ref())
            .await?
            .ok_or_else(|| RepoError::NotInitialized(name.to_string()))?;
        Ok(Repo {
            storage,
            meta,
            name: name.to_string(),
            spool: None,
        })
    }

    /// Refuses a server that is not the repository's cluster.
    pub fn check_compatible(meta: &RepoMeta, server: &ServerInfo) -> Result<(), RepoError> {
        let sysid = server.system.system_identifier.to_string();
        if meta.system_identifier != sysid {
            return Err(RepoError::OtherCluster {
                field: "system identifier",
                repo: meta.system_identifier.clone(),
                server: sysid,
            });
        }
        if meta.pg_major != server.major() {
            return Err(RepoError::OtherCluster {
                field: "PostgreSQL major version",
                repo: meta.pg_major.to_string(),
                server: server.major().to_string(),
            });
        }
        if meta.wal_segment_size != server.wal_segment_size {
            return Err(RepoError::OtherCluster {
                field: "WAL segment size",
                repo: meta.wal_segment_size.to_string(),
                server: server.wal_segment_size.to_string(),
            });
        }
        Ok(())
    }

    /// Opens the repository for `server`, initialising it if it is new. Refuses another
    /// cluster's repository, and a non-empty store that is not a repository.
    pub async fn open_or_init(
        storage: Arc<dyn Storage>,
        name: &str,
        server: &ServerInfo,
    ) -> Result<Repo, RepoError> {
        if let Some(meta) = Self::read_meta(storage.as_ref()).await? {
            Self::check_compatible(&meta, server)?;
            return Ok(Repo {
                storage,
                meta,
                name: name.to_string(),
                spool: None,
            });
        }
        let foreign = storage
            .list("")
            .await?
            .into_iter()
            .any(|m| !m.key.starts_with(&format!("{SPOOL_DIR}/")));
        if foreign {
            return Err(RepoError::NotARepository(name.to_string()));
        }
        let meta = RepoMeta {
            format_version: FORMAT_VERSION,
            system_identifier: server.system.system_identifier.to_string(),
            pg_version_num: server.version_num,
            pg_major: server.major(),
            wal_segment_size: server.wal_segment_size,
            created_at: crate::time::now(),
            created_by: format!("archiver {}", env!("CARGO_PKG_VERSION")),
        };
        let body = sealed::seal(&meta).map_err(|e| RepoError::BadMeta(e.to_string()))?;
        storage
            .put(layout::REPO_META_KEY, Bytes::from(body))
            .await?;
        tracing::info!(repo = name, system_identifier = %meta.system_identifier, "initialised repository");
        Ok(Repo {
            storage,
            meta,
            name: name.to_string(),
            spool: None,
        })
    }

    /// Lets reads take WAL from the spool in `dir` too (when it exists): the segment being
    /// received and complete segments not yet published.
    pub fn with_spool(mut self, dir: Option<&std::path::Path>) -> Repo {
        self.spool = dir.and_then(|d| crate::spool::Spool::existing(d, self.seg_size()));
        self
    }

    /// What the local spool holds for readers (nothing without one).
    pub fn spool_wal(&self) -> crate::spool::SpoolWal {
        self.spool
            .as_ref()
            .and_then(|s| s.readable().ok())
            .unwrap_or_default()
    }

    pub fn meta(&self) -> &RepoMeta {
        &self.meta
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn seg_size(&self) -> u64 {
        self.meta.wal_segment_size
    }

    pub fn system_identifier(&self) -> u64 {
        self.meta.system_identifier.parse().unwrap_or(0)
    }

    /// Stores an already-encoded object.
    pub async fn put_encoded(&self, key: &str, obj: Vec<u8>) -> Result<(), RepoError> {
        Ok(self.storage.put(key, Bytes::from(obj)).await?)
    }

    /// Encodes (zstd + trailer) and stores raw bytes.
    pub async fn put_raw(
        &self,
        key: &str,
        raw: Bytes,
        kind: ObjectKind,
        level: i32,
    ) -> Result<ObjectInfo, RepoError> {
        let (obj, info) =
            tokio::task::spawn_blocking(move || object::encode_bytes(&raw, kind, level))
                .await
                .expect("encode task panicked")
                .map_err(|e| RepoError::Corrupt {
                    key: "(new object)".into(),
                    reason: e.to_string(),
                })?;
        self.put_encoded(key, obj).await?;
        Ok(info)
    }

    /// Reads and verifies an object, returning its raw bytes.
    pub async fn get_verified(&self, key: &str) -> Result<(Vec<u8>, ObjectInfo), RepoError> {
        let obj = self.storage.get(key).await?;
        let k = key.to_string();
        tokio::task::spawn_blocking(move || object::decode_bytes(&obj))
            .await
            .expect("decode task panicked")
            .map_err(|e| match e {
                ObjectError::Corrupt(reason) => RepoError::Corrupt { key: k, reason },
                ObjectError::Io(e) => RepoError::Corrupt {
                    key: k,
                    reason: e.to_string(),
                },
            })
    }

    /// The stored size of object `key`; an object too short to hold its trailer is corrupt.
    async fn object_size(&self, key: &str) -> Result<u64, RepoError> {
        let size = self
            .storage
            .head(key)
            .await?
            .ok_or_else(|| StorageError::NotFound(key.to_string()))?
            .size;
        if size < object::TRAILER_LEN as u64 {
            return Err(RepoError::Corrupt {
                key: key.to_string(),
                reason: format!("object too short ({size} bytes)"),
            });
        }
        Ok(size)
    }

    /// The trailer of object `key` (its kind, raw size and checksums), without reading it all.
    pub async fn object_info(&self, key: &str) -> Result<ObjectInfo, RepoError> {
        let size = self.object_size(key).await?;
        let trailer = self
            .storage
            .get_range(
                key,
                size - object::TRAILER_LEN as u64,
                object::TRAILER_LEN as u64,
            )
            .await?;
        object::read_trailer(&trailer).map_err(|e| RepoError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// Streams object `key` into `out` on a blocking thread, verifying it against its trailer as
    /// it goes: ranged reads of [`READ_CHUNK`] bytes, at most two chunks in flight, so memory
    /// stays bounded whatever the object's size. `out` may have received bytes before an error;
    /// callers write somewhere they discard on failure.
    pub async fn stream_verified<W: std::io::Write + Send + 'static>(
        &self,
        key: &str,
        out: W,
    ) -> Result<(ObjectInfo, W), RepoError> {
        let size = self.object_size(key).await?;
        let corrupt = |reason: String| RepoError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let body_len = size - object::TRAILER_LEN as u64;
        let trailer = self
            .storage
            .get_range(key, body_len, object::TRAILER_LEN as u64)
            .await?;
        let info = object::read_trailer(&trailer).map_err(|e| corrupt(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, StorageError>>(2);
        let storage = self.storage.clone();
        let k = key.to_string();
        let fetcher = tokio::spawn(async move {
            let mut off = 0;
            while off < body_len {
                let r = storage
                    .get_range(&k, off, READ_CHUNK.min(body_len - off))
                    .await;
                let failed = r.is_err();
                off += r.as_ref().map_or(0, |b| b.len() as u64);
                if tx.send(r).await.is_err() || failed {
                    return;
                }
            }
        });
        let i = info.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut reader = ChunkReader {
                rx,
                cur: Bytes::new(),
                error: None,
            };
            let mut out = out;
            let r = object::decode_body(&mut reader, &i, &mut out);
            (r, reader.error.take(), out)
        })
        .await
        .expect("decode task panicked");
        fetcher.abort();
        match result {
            (_, Some(e), _) => Err(e.into()),
            (Ok(()), None, out) => Ok((info, out)),
            (Err(ObjectError::Corrupt(reason)), None, _) => Err(corrupt(reason)),
            (Err(ObjectError::Io(e)), None, _) => Err(RepoError::Sink(e.to_string())),
        }
    }

    /// When the newest WAL segment — complete or the shipped prefix of a partial one — was
    /// stored (None: none, or the backend cannot say).
    pub async fn newest_segment_time(&self) -> Result<Option<Timestamp>, RepoError> {
        let seg = self.seg_size();
        Ok(self
            .storage
            .list(layout::WAL_PREFIX)
            .await?
            .into_iter()
            .filter(|m| {
                matches!(
                    parse_wal_key(&m.key, seg),
                    Some(WalObject::Segment(_) | WalObject::Partial(_))
                )
            })
            .filter_map(|m| m.modified)
            .max()
            .map(crate::time::from_system))
    }

    /// Every WAL object (segments, partials, history files), in key order.
    pub async fn wal_objects(&self) -> Result<Vec<WalObject>, RepoError> {
        let seg = self.seg_size();
        Ok(self
            .storage
            .list(layout::WAL_PREFIX)
            .await?
            .into_iter()
            .filter_map(|m| parse_wal_key(&m.key, seg))
            .collect())
    }

    /// The last segment of the unbroken run of complete segments that starts at `from` (None if
    /// `from` itself is not archived). Segments archived out of order — a backup fetching its own
    /// WAL while no streamer runs — must not make the streamer skip what lies before them.
    pub async fn contiguous_end(
        &self,
        from: SegmentName,
    ) -> Result<Option<SegmentName>, RepoError> {
        let mut segs: Vec<SegmentName> = self
            .wal_objects()
            .await?
            .into_iter()
            .filter_map(|o| match o {
                WalObject::Segment(s) if s.segno >= from.segno && s.tli >= from.tli => Some(s),
                _ => None,
            })
            .collect();
        segs.sort_by_key(|s| (s.segno, s.tli));
        let mut end: Option<SegmentName> = None;
        for s in segs {
            let want = end.map_or(from.segno, |e| e.segno + 1);
            if s.segno == want || end.is_some_and(|e| e.segno == s.segno) {
                end = Some(s);
            } else if s.segno > want {
                break;
            }
        }
        Ok(end)
    }

    /// Every complete segment object, in key order (timeline, then position).
    pub async fn complete_segments(&self) -> Result<Vec<SegmentName>, RepoError> {
        Ok(self
            .wal_objects()
            .await?
            .into_iter()
            .filter_map(|o| match o {
                WalObject::Segment(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    /// The newest complete segment, by position then timeline.
    pub async fn last_complete_segment(&self) -> Result<Option<SegmentName>, RepoError> {
        Ok(self
            .complete_segments()
            .await?
            .into_iter()
            .max_by_key(|s| (s.segno, s.tli)))
    }
}

/// A new local repository in `dir` for a PostgreSQL 15 cluster (system identifier 7, 16 MiB
/// segments), for unit tests.
#[cfg(test)]
pub(crate) async fn test_repo(dir: &std::path::Path) -> Repo {
    let server = ServerInfo {
        system: crate::wal::cluster::SystemInfo {
            system_identifier: 7,
            timeline: 1,
            xlogpos: crate::wal::Lsn(0),
        },
        version_num: 150018,
        wal_segment_size: 16 << 20,
    };
    Repo::open_or_init(
        Arc::new(crate::storage::fs::FsStorage::new(dir)),
        "test",
        &server,
    )
    .await
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::object::ObjectKind;
    use crate::storage::fs::FsStorage;
    use crate::wal::cluster::SystemInfo;
    use crate::wal::Lsn;

    fn server(sysid: u64, version_num: u32, seg: u64) -> ServerInfo {
        ServerInfo {
            system: SystemInfo {
                system_identifier: sysid,
                timeline: 1,
                xlogpos: Lsn(0x0300_0000),
            },
            version_num,
            wal_segment_size: seg,
        }
    }

    #[tokio::test]
    async fn compatibility_and_contiguous_runs() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(42, 150_004, 16 << 20);
        let repo = Repo::open_or_init(Arc::new(FsStorage::new(dir.path())), "t", &srv)
            .await
            .unwrap();
        // Same cluster, a newer minor: fine. Other sysid, major or segment size: refused.
        let meta = repo.meta();
        Repo::check_compatible(meta, &server(42, 150_009, 16 << 20)).unwrap();
        for (other, field) in [
            (server(43, 150_004, 16 << 20), "system identifier"),
            (server(42, 160_001, 16 << 20), "PostgreSQL major version"),
            (server(42, 150_004, 64 << 20), "WAL segment size"),
        ] {
            match Repo::check_compatible(meta, &other) {
                Err(RepoError::OtherCluster { field: f, .. }) => assert_eq!(f, field),
                r => panic!("{field}: {r:?}"),
            }
        }

        // Segments 3, 4, 5 then (a gap) 8, 9 on timeline 1.
        let seg = |n| SegmentName::containing(1, Lsn(n << 24), 16 << 20);
        for n in [3u64, 4, 5, 8, 9] {
            repo.put_raw(
                &layout::wal_segment_key(&seg(n)),
                Bytes::from(vec![0u8; 16]),
                ObjectKind::Other,
                1,
            )
            .await
            .unwrap();
        }
        assert_eq!(repo.contiguous_end(seg(3)).await.unwrap(), Some(seg(5)));
        assert_eq!(repo.contiguous_end(seg(4)).await.unwrap(), Some(seg(5)));
        assert_eq!(repo.contiguous_end(seg(6)).await.unwrap(), None);
        assert_eq!(repo.contiguous_end(seg(8)).await.unwrap(), Some(seg(9)));
        assert_eq!(repo.last_complete_segment().await.unwrap(), Some(seg(9)));

        // Streamed, verified reads across several ranged chunks; a flipped byte is caught.
        let raw: Vec<u8> = (0..(READ_CHUNK as usize * 2 + 12345))
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4])
            .collect();
        repo.put_raw(
            "backups/x/big.zst",
            Bytes::from(raw.clone()),
            ObjectKind::Other,
            1,
        )
        .await
        .unwrap();
        let (info, out) = repo
            .stream_verified("backups/x/big.zst", Vec::new())
            .await
            .unwrap();
        assert_eq!(out, raw);
        assert_eq!(info.raw_size, raw.len() as u64);
        let path = dir.path().join("backups/x/big.zst");
        let mut obj = std::fs::read(&path).unwrap();
        let mid = obj.len() / 2;
        obj[mid] ^= 0x10;
        std::fs::write(&path, obj).unwrap();
        let e = repo
            .stream_verified("backups/x/big.zst", Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
        assert!(matches!(
            repo.stream_verified("backups/x/none.zst", Vec::new()).await,
            Err(RepoError::Storage(StorageError::NotFound(_)))
        ));
    }
}
