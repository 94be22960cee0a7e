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

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::pg::conn::{parse_error_fields, Backend};
use crate::pg::replication::{self, ReplicationMessage, StartOutcome};
use crate::pg::{Connection, PgError};
use crate::repo::layout::{partial_segment_key, wal_segment_key};
use crate::repo::object::ObjectKind;
use crate::repo::Repo;
use crate::spool::{SegmentFile, Spool};
use crate::stream::publisher::publish_segment;
use crate::stream::StreamError;
use crate::wal::page::{page_magic_for_major, PageValidator};
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
    let mut validator = PageValidator::new(
        seg_size,
        f.sysid,
        page_magic_for_major(f.major),
        next.start_lsn(),
        f.tli,
    );
    let mut received = next.start_lsn();
    let mut durable = next.start_lsn();
    let mut cur: Option<SegmentFile> = None;
    let mut grace_until: Option<Instant> = None;
    let mut last_status = Instant::now();
    let status_every = Duration::from_secs(10);
    loop {
        if received >= last.end_lsn() {
            break;
        }
        if received >= f.stop && grace_until.is_none() {
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
                send_status(conn, received, durable).await?;
                last_status = Instant::now();
                continue;
            }
        };
        let (start, data, reply) = match msg {
            Backend::Msg(Message::CopyData(body)) => {
                match replication::decode_copy_data(body.into_bytes())? {
                    ReplicationMessage::XLogData { start, data, .. } => (start, data, false),
                    ReplicationMessage::Keepalive {
                        reply_requested, ..
                    } => (received, Bytes::new(), reply_requested),
                }
            }
            Backend::Msg(Message::ErrorResponse(body)) => {
                return Err(PgError::Server(parse_error_fields(&mut body.fields())).into())
            }
            Backend::Msg(Message::NoticeResponse(_)) => continue,
            Backend::Msg(Message::CopyDone) => {
                return Err(StreamError::Invariant(format!(
                "the server ended timeline {} at {received}, before the backup's WAL was complete",
                f.tli
            )))
            }
            _ => {
                return Err(PgError::Protocol(
                    "unexpected message in the replication stream".into(),
                )
                .into())
            }
        };
        if reply {
            send_status(conn, received, durable).await?;
            last_status = Instant::now();
        }
        if data.is_empty() {
            continue;
        }
        if start != received {
            return Err(PgError::Protocol(format!(
                "WAL arrived at {start}, expected {received}: the stream has a gap"
            ))
            .into());
        }
        validator.feed(start, &data)?;
        let mut off = 0usize;
        while off < data.len() && Lsn(start.0 + off as u64) < last.end_lsn() {
            let pos = Lsn(start.0 + off as u64);
            let seg_off = pos.segment_offset(seg_size);
            if cur.is_none() {
                let seg = SegmentName::containing(f.tli, pos, seg_size);
                let s = spool.clone();
                cur = Some(
                    tokio::task::spawn_blocking(move || s.open_partial(seg))
                        .await
                        .expect("spool task panicked")
                        .map_err(|e| StreamError::io("creating a spool segment", e))?,
                );
            }
            let file = cur.as_mut().expect("opened above");
            let n = (data.len() - off).min((seg_size - seg_off) as usize);
            file.write_at(seg_off, &data[off..off + n])
                .map_err(|e| StreamError::io("writing a spool segment", e))?;
            off += n;
            if file.written == seg_size {
                let file = cur.take().expect("present");
                let s = spool.clone();
                let seg = tokio::task::spawn_blocking(move || s.complete(file))
                    .await
                    .expect("spool task panicked")
                    .map_err(|e| StreamError::io("completing a spool segment", e))?;
                publish_segment(repo, &spool, seg, f.compress_level).await?;
                out.segments += 1;
                durable = seg.end_lsn();
                debug!(segment = %seg, "backup WAL segment archived");
            }
        }
        received = Lsn(start.0 + data.len() as u64);
    }
    if let Some(file) = cur.take() {
        // The grace period ran out inside the stop segment: archive what the server had.
        let path = spool.partial_path(&file.seg);
        let raw = spool
            .read_prefix(&path, file.written)
            .map_err(|e| StreamError::io("reading the partial segment", e))?;
        repo.put_raw(
            &partial_segment_key(&file.seg),
            Bytes::from(raw),
            ObjectKind::PartialWalSegment,
            f.compress_level,
        )
        .await?;
        info!(segment = %file.seg, bytes = file.written, "archived the stop segment as partial");
        out.partial = Some(file.seg);
        durable = received;
        drop(file);
        spool
            .remove(&path)
            .map_err(|e| StreamError::io("removing the partial segment", e))?;
    }
    send_status(conn, received, durable).await?;
    info!(segments = out.segments, up_to = %received, "the backup's WAL is archived");
    Ok(out)
}

/// Tells the server what we received and what is archived (durable): the temporary slot may
/// then release the WAL before `flush`.
async fn send_status(conn: &mut Connection, write: Lsn, flush: Lsn) -> Result<(), StreamError> {
    replication::encode_status_update(
        conn.write_buf(),
        write,
        flush,
        Lsn::INVALID,
        replication::pg_now(),
        false,
    );
    conn.flush().await?;
    debug!(%write, %flush, "status update sent");
    Ok(())
}
