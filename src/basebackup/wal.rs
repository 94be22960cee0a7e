//! Fetches a backup's own WAL (its start to its stop) over the replication connection when no
//! `archiver stream` is archiving into the repository — what `pg_basebackup -X fetch` does, but
//! into the repository's WAL objects.
//!
//! The backup's connection holds a temporary physical slot created before `BASE_BACKUP`
//! ([`create_temporary_slot`]), so the server keeps the WAL from before the backup's checkpoint
//! until this fetch has it. Segments go through a private spool directory
//! (`spool/backup-<id>/`) and are published exactly as the streamer publishes them (the same
//! objects, byte for byte), skipping any already archived. When the stop position lies inside a
//! segment the server has not finished (a backup from a standby of an idle primary), the
//! received prefix is archived as `<segment>.partial` after a grace period, like the old
//! timeline's last segment; `wal-fetch` serves it zero-filled when the segment is asked for.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::pg::replication::{self, ReplicationMessage, StartOutcome, StreamEvent};
use crate::pg::{Connection, PgError};
use crate::repo::layout::wal_segment_key;
use crate::repo::Repo;
use crate::spool::Spool;
use crate::stream::assembler::Assembler;
use crate::stream::publisher::publish_segment;
use crate::stream::StreamError;
use crate::wal::{Lsn, SegmentName, TimeLineId};

/// `CREATE_REPLICATION_SLOT name TEMPORARY PHYSICAL RESERVE_WAL`: a slot that lives as long as
/// this connection and keeps the server's WAL from now on.
pub async fn create_temporary_slot(
    conn: &mut Connection,
    name: &str,
    major: u32,
) -> Result<(), PgError> {
    let cmd = if major >= 15 {
        format!("CREATE_REPLICATION_SLOT {name} TEMPORARY PHYSICAL (RESERVE_WAL)")
    } else {
        format!("CREATE_REPLICATION_SLOT {name} TEMPORARY PHYSICAL RESERVE_WAL")
    };
    conn.simple_query(&cmd).await.map(|_| ())
}

/// What to fetch and how.
pub struct WalFetch<'a> {
    pub tli: TimeLineId,
    pub start: Lsn,
    pub stop: Lsn,
    pub slot: Option<&'a str>,
    pub sysid: u64,
    pub major: u32,
    pub compress_level: i32,
    /// How long to wait for the server to finish the stop segment before archiving it partial.
    pub partial_grace: Duration,
}

/// What the fetch archived.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    pub segments: u64,
    /// The stop segment, archived as a partial (its prefix up to where the server had WAL).
    pub partial: Option<SegmentName>,
}

/// Streams `[first missing segment, stop)` and publishes it. `spool_dir` must be private to
/// this backup; it is left empty.
pub async fn fetch_wal(
    conn: &mut Connection,
    repo: &Repo,
    spool_dir: &Path,
    f: &WalFetch<'_>,
) -> Result<Fetched, StreamError> {
    let seg_size = repo.seg_size();
    let last = SegmentName::containing(f.tli, Lsn(f.stop.0.saturating_sub(1)), seg_size);
    let mut next = SegmentName::containing(f.tli, f.start, seg_size);
    while next.segno <= last.segno
        && repo
            .storage()
            .exists(&wal_segment_key(&next))
            .await
            .map_err(crate::repo::RepoError::from)?
    {
        next = next.next();
    }
    let mut out = Fetched::default();
    if next.segno > last.segno {
        return Ok(out);
    }
    crate::storage::fs::create_dir_all_durable(spool_dir)
        .map_err(|e| StreamError::io(format!("creating {}", spool_dir.display()), e))?;
    let spool = Spool::open(spool_dir, seg_size)
        .map_err(|e| StreamError::io(format!("opening {}", spool_dir.display()), e))?;
    info!(from = %next, to = %last, "fetching the backup's WAL from the server");
    match replication::start_replication(conn, f.slot, next.start_lsn(), f.tli).await? {
        StartOutcome::Streaming => {}
        StartOutcome::TimelineEnded { next_tli, switch } => {
            return Err(StreamError::Invariant(format!(
                "timeline {} ended at {switch} (next {next_tli}) before the backup's WAL was fetched",
                f.tli
            )))
        }
    }
    let mut wal = Assembler::new(
        spool.clone(),
        seg_size,
        f.sysid,
        f.major,
        f.tli,
        next.start_lsn(),
    )
    .ending_at(last.end_lsn());
    let mut indexer = crate::stream::publisher::indexer_for(repo, true);
    let mut durable = next.start_lsn();
    let mut grace_until: Option<Instant> = None;
    let mut last_status = Instant::now();
    let status_every = Duration::from_secs(10);
    while wal.received() < last.end_lsn() {
        if wal.received() >= f.stop && grace_until.is_none() {
            grace_until = Some(Instant::now() + f.partial_grace);
        }
        let wake = grace_until.map_or(last_status + status_every, |g| {
            g.min(last_status + status_every)
        });
        let msg = tokio::select! {
            m = conn.next_message() => m?,
            _ = tokio::time::sleep_until(wake) => {
                if grace_until.is_some_and(|g| Instant::now() >= g) {
                    break;
                }
                replication::send_status(conn, wal.received(), durable, false).await?;
                last_status = Instant::now();
                continue;
            }
        };
        match replication::stream_event(msg)? {
            Some(StreamEvent::Message(ReplicationMessage::XLogData { start, data, .. })) => {
                for seg in wal.write(start, &data).await? {
                    publish_segment(repo, &spool, seg, f.compress_level, &mut indexer).await?;
                    out.segments += 1;
                    durable = seg.end_lsn();
                    debug!(segment = %seg, "backup WAL segment archived");
                }
            }
            Some(StreamEvent::Message(ReplicationMessage::Keepalive {
                reply_requested: true,
                ..
            })) => {
                replication::send_status(conn, wal.received(), durable, false).await?;
                last_status = Instant::now();
            }
            Some(StreamEvent::Message(ReplicationMessage::Keepalive { .. })) | None => {}
            Some(StreamEvent::End) => {
                return Err(StreamError::Invariant(format!(
                    "the server ended timeline {} at {}, before the backup's WAL was complete",
                    f.tli,
                    wal.received()
                )))
            }
        }
    }
    // If the grace period ran out inside the stop segment: archive what the server had.
    if let Some((segment, bytes)) = wal.archive_partial(repo, f.compress_level).await? {
        info!(%segment, bytes, "archived the stop segment as partial");
        out.partial = Some(segment);
        durable = wal.received();
    }
    replication::send_status(conn, wal.received(), durable, false).await?;
    info!(segments = out.segments, up_to = %wal.received(), "the backup's WAL is archived");
    Ok(out)
}
