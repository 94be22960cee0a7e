//! WAL a reader takes from the repository's local spool: complete segments the streamer has
//! not published yet, and the durable prefix of the segment it is receiving — so that a restore
//! reaches every byte the stream acknowledged, not only what filled a segment.
//!
//! Invariants: only what the streamer recorded as fsync'd is read (the spool's flush record,
//! [`crate::spool::FLUSHED_NAME`]), never bytes after it; every page header read from
//! the spool is checked ([`PageValidator`]) since spool files carry no checksum; a segment that
//! completes or is published while it is being read is read again from where it went.

use serde::Serialize;

use super::layout::{partial_segment_key, wal_segment_key};
use super::{Repo, RepoError};
use crate::storage::StorageError;
use crate::wal::page::{page_magic_for_major, PageValidator};
use crate::wal::SegmentName;

/// Where a segment of a restore is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WalSource {
    /// A complete segment object.
    Object,
    /// A partial segment object (a timeline's last segment, or one shipped while it grew).
    PartialObject,
    /// A complete segment in the local spool, not yet published.
    SpoolSegment,
    /// The segment being received: its first `bytes` bytes are durable.
    SpoolTail { bytes: u64 },
}

impl WalSource {
    pub fn is_partial(&self) -> bool {
        matches!(self, WalSource::PartialObject | WalSource::SpoolTail { .. })
    }
}

impl Repo {
    /// Reads the raw bytes of `seg` from `src`, verified: an object against its checksums, spool
    /// data by its page headers (and a complete segment by its size). A partial source returns
    /// only its prefix. Spool data that moved on meanwhile (completed, published) is read from
    /// where it went.
    pub async fn read_wal(&self, seg: SegmentName, src: WalSource) -> Result<Vec<u8>, RepoError> {
        let seg_size = self.seg_size();
        let mut src = src;
        loop {
            match src {
                WalSource::Object => {
                    let (info, raw) = self
                        .stream_verified(&wal_segment_key(&seg), Vec::new())
                        .await?;
                    if info.raw_size != seg_size {
                        return Err(RepoError::Corrupt {
                            key: wal_segment_key(&seg),
                            reason: format!("{} bytes, expected {seg_size}", info.raw_size),
                        });
                    }
                    return Ok(raw);
                }
                WalSource::PartialObject => {
                    let (_, raw) = self
                        .stream_verified(&partial_segment_key(&seg), Vec::new())
                        .await?;
                    return Ok(raw);
                }
                WalSource::SpoolSegment | WalSource::SpoolTail { .. } => {
                    let Some(spool) = self.spool.clone() else {
                        return Err(
                            StorageError::NotFound(format!("{seg} (no local spool)")).into()
                        );
                    };
                    let read = tokio::task::spawn_blocking(move || match src {
                        WalSource::SpoolTail { bytes } => spool.read_tail(seg, bytes),
                        _ => spool.read_complete(&seg),
                    })
                    .await
                    .expect("spool read task panicked");
                    match read {
                        Ok(raw) => {
                            self.check_spool_wal(seg, &raw, !src.is_partial())?;
                            return Ok(raw);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            // Completed (tail → spool segment) or published (→ object).
                            src = match src {
                                WalSource::SpoolTail { .. } => WalSource::SpoolSegment,
                                _ => WalSource::Object,
                            };
                        }
                        Err(e) => {
                            return Err(RepoError::Sink(format!(
                                "reading {seg} from the local spool: {e}"
                            )))
                        }
                    }
                }
            }
        }
    }

    fn check_spool_wal(&self, seg: SegmentName, raw: &[u8], full: bool) -> Result<(), RepoError> {
        let corrupt = |reason: String| RepoError::Corrupt {
            key: format!("spool/{seg}"),
            reason,
        };
        if full && raw.len() as u64 != self.seg_size() {
            return Err(corrupt(format!(
                "{} bytes, expected {}",
                raw.len(),
                self.seg_size()
            )));
        }
        let mut v = PageValidator::new(
            self.seg_size(),
            self.system_identifier(),
            page_magic_for_major(self.meta().pg_major),
            seg.start_lsn(),
            seg.tli,
        );
        v.feed(seg.start_lsn(), raw)
            .map_err(|e| corrupt(e.to_string()))
    }
}
