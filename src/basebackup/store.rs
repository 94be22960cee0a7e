//! A [`BackupSink`] that stores each archive and the manifest as repository objects while they
//! stream: zstd on zstd's own worker threads (off the receive loop), SHA-256 + CRC-32 of the raw
//! bytes, chunks handed to a streaming [`ObjectWriter`]. Memory stays bounded by the chunk size
//! and zstd's windows, whatever the database size. It also collects each file's digest for the
//! manifest check and the server's `backup_label`.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tracing::info;

use super::run::{BackupError, BackupSink, TablespaceInfo};
use crate::format::manifest::{ChecksumAlgorithm, FileDigests};
use crate::format::tar::{TarEvent, TarReader};
use crate::progress::Progress;
use crate::repo::catalog::BackupObject;
use crate::repo::layout::backup_object_key;
use crate::repo::object::{ObjectKind, PassthroughEncoder, StreamEncoder};
use crate::repo::Repo;
use crate::storage::ObjectWriter;

/// The per-file checksums asked of the server and checked here.
pub const MANIFEST_CHECKSUMS: ChecksumAlgorithm = ChecksumAlgorithm::Crc32c;

/// Compressed bytes are handed to storage in chunks of at least this size.
const WRITE_CHUNK: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SinkError(String);

/// How an object's stored bytes are made.
enum Coder {
    /// Raw bytes arrive; we compress.
    Compress(StreamEncoder),
    /// The server compressed (`--server-compress`); stored as they come, decoded to verify.
    Pass(PassthroughEncoder),
}

struct Current {
    key: String,
    writer: Box<dyn ObjectWriter>,
    enc: Coder,
    pending: Vec<u8>,
    tar: Option<TarReader>,
}

pub struct StoreSink {
    repo: Repo,
    id: String,
    level: i32,
    workers: u32,
    /// Archives arrive zstd-compressed by the server.
    server_compressed: bool,
    cur: Option<Current>,
    pub objects: Vec<BackupObject>,
    pub digests: FileDigests,
    pub manifest: Vec<u8>,
    pub backup_label: Vec<u8>,
    capturing_label: bool,
    in_manifest: bool,
    progress: Progress,
    pub stages: Stages,
    /// When the sink last returned to the receive loop (what follows is receive time).
    returned: Option<Instant>,
}

/// Where a backup's time goes on the receiving side, stage by stage (logged as `backup stage
/// totals` when it ends). Each is time spent in that stage by the receive loop itself: with
/// zstd's worker threads, `encode` is the hand-off to them (and any wait on them), not their CPU.
#[derive(Debug, Default)]
pub struct Stages {
    /// Bytes of archives and manifest received (compressed ones with `--server-compress`).
    pub received_bytes: u64,
    /// Waiting on the server: between the sink's calls (receive and protocol decode).
    pub receive: Duration,
    /// Compression and checksums (with `--server-compress`: decompression to check, checksums).
    pub encode: Duration,
    /// Reading the tar stream and the manifest's per-file checksums.
    pub check: Duration,
    /// Handing compressed chunks to storage.
    pub write: Duration,
    /// Ending objects: the encoder's last bytes, the last write and the durable publication.
    pub finish: Duration,
    pub objects: u64,
    pub stored_bytes: u64,
}

impl Stages {
    pub fn log(&self) {
        let ms = |d: Duration| d.as_millis() as u64;
        info!(
            received_bytes = self.received_bytes,
            receive_ms = ms(self.receive),
            encode_ms = ms(self.encode),
            check_ms = ms(self.check),
            write_ms = ms(self.write),
            finish_ms = ms(self.finish),
            objects = self.objects,
            stored_bytes = self.stored_bytes,
            "backup stage totals"
        );
    }
}

impl StoreSink {
    pub fn new(repo: Repo, id: &str, level: i32, server_compressed: bool) -> Self {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        StoreSink {
            repo,
            id: id.to_string(),
            level,
            workers,
            server_compressed,
            cur: None,
            objects: Vec::new(),
            digests: FileDigests::new(MANIFEST_CHECKSUMS),
            manifest: Vec::new(),
            backup_label: Vec::new(),
            capturing_label: false,
            in_manifest: false,
            progress: Progress::new("backup"),
            stages: Stages::default(),
            returned: None,
        }
    }

    async fn open(&mut self, name: &str, tar: bool) -> Result<(), BackupError> {
        self.close().await?;
        let key = backup_object_key(&self.id, name);
        let writer = self
            .repo
            .storage()
            .writer(&key)
            .await
            .map_err(BackupError::sink)?;
        // The manifest always comes uncompressed.
        let enc = if tar && self.server_compressed {
            Coder::Pass(PassthroughEncoder::new(ObjectKind::Other).map_err(BackupError::sink)?)
        } else {
            Coder::Compress(
                StreamEncoder::new(ObjectKind::Other, self.level, self.workers)
                    .map_err(BackupError::sink)?,
            )
        };
        self.cur = Some(Current {
            key,
            writer,
            enc,
            pending: Vec::with_capacity(WRITE_CHUNK * 2),
            tar: tar.then(TarReader::new),
        });
        Ok(())
    }

    /// Finishes the current object: flush, trailer, publish, record.
    pub async fn close(&mut self) -> Result<(), BackupError> {
        if self.in_manifest {
            self.progress.finish();
        }
        let Some(mut c) = self.cur.take() else {
            return Ok(());
        };
        let t = Instant::now();
        if let Some(r) = self.returned.take() {
            self.stages.receive += t - r;
        }
        if let Some(t) = &c.tar {
            if !(t.ended() || t.at_boundary()) {
                return Err(BackupError::sink(SinkError(format!(
                    "archive {} ended mid-entry",
                    c.key
                ))));
            }
        }
        let (tail, info) = match c.enc {
            Coder::Compress(e) => e.finish(),
            Coder::Pass(p) => p.finish(),
        }
        .map_err(BackupError::sink)?;
        c.pending.extend_from_slice(&tail);
        c.writer
            .write(Bytes::from(c.pending))
            .await
            .map_err(BackupError::sink)?;
        let stored = c.writer.finish().await.map_err(BackupError::sink)?;
        self.stages.finish += t.elapsed();
        self.returned = Some(Instant::now());
        self.stages.objects += 1;
        self.stages.stored_bytes += stored;
        self.objects.push(BackupObject {
            key: c.key,
            size_bytes: info.raw_size,
            stored_bytes: stored,
            sha256: info.sha256_hex(),
        });
        Ok(())
    }
}

#[async_trait]
impl BackupSink for StoreSink {
    async fn new_archive(&mut self, name: &str, _tablespace_path: &str) -> Result<(), BackupError> {
        // A server-compressed archive is announced as `base.tar.zst`; the object is
        // `base.tar.zst` either way.
        let name = name.strip_suffix(".zst").unwrap_or(name);
        self.open(name, true).await?;
        let oid = name
            .strip_suffix(".tar")
            .and_then(|n| n.parse::<u32>().ok());
        self.digests.start_archive(oid);
        Ok(())
    }

    async fn manifest(&mut self) -> Result<(), BackupError> {
        self.open("backup_manifest", false).await?;
        self.in_manifest = true;
        Ok(())
    }

    async fn data(&mut self, data: Bytes) -> Result<(), BackupError> {
        let t = Instant::now();
        if let Some(r) = self.returned {
            self.stages.receive += t - r;
        }
        self.stages.received_bytes += data.len() as u64;
        let c = self
            .cur
            .as_mut()
            .expect("data only after an archive started");
        let raw: &[u8] = match &mut c.enc {
            Coder::Compress(e) => {
                e.push(&data, &mut c.pending).map_err(BackupError::sink)?;
                &data
            }
            Coder::Pass(p) => p.push(&data, &mut c.pending).map_err(BackupError::sink)?,
        };
        let encoded = Instant::now();
        self.stages.encode += encoded - t;
        if let Some(t) = c.tar.as_mut() {
            let digests = &mut self.digests;
            let label = &mut self.backup_label;
            let capturing = &mut self.capturing_label;
            t.feed(raw, &mut |e| {
                match &e {
                    TarEvent::Entry { path, .. } => *capturing = path == "backup_label",
                    TarEvent::Data(d) if *capturing => label.extend_from_slice(d),
                    TarEvent::EntryEnd => *capturing = false,
                    _ => {}
                }
                digests.event(&e);
                Ok(())
            })
            .map_err(BackupError::sink)?;
        }
        if self.in_manifest {
            self.manifest.extend_from_slice(raw);
        }
        let checked = Instant::now();
        self.stages.check += checked - encoded;
        if c.pending.len() >= WRITE_CHUNK {
            let chunk = std::mem::replace(&mut c.pending, Vec::with_capacity(WRITE_CHUNK * 2));
            c.writer
                .write(Bytes::from(chunk))
                .await
                .map_err(BackupError::sink)?;
            self.stages.write += checked.elapsed();
        }
        self.returned = Some(Instant::now());
        Ok(())
    }

    fn tablespaces(&mut self, ts: &[TablespaceInfo]) {
        self.progress
            .set_total(ts.iter().filter_map(|t| t.size_kb).sum::<u64>() * 1024);
    }

    fn progress(&mut self, done: u64) {
        self.progress.set(done);
    }
}
