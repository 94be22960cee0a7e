//! Continuous WAL streaming into a repository (`archiver stream`).
//!
//! Owns: choosing where to (re)start, the replication session loop ([`session`]), the local spool
//! of the segment being received ([`spool`]) and publication of complete segments
//! ([`publisher`]).
//!
//! Invariants:
//! - the flush position reported to the server never exceeds what is fsync'd in the spool;
//! - streaming always (re)starts at a segment boundary, from what the repository and spool
//!   durably hold, so archived segments are byte-identical to the server's and a restart after a
//!   crash leaves neither a gap nor a duplicate;
//! - WAL whose page headers fail validation is never written;
//! - if the WAL needed to continue is gone from the server, streaming stops with
//!   [`StreamError::WalGone`] rather than archiving a hole — unless the operator accepts the gap
//!   (`accept_gap`): then the gap is recorded in the repository ([`crate::repo::gaps`]) before
//!   any WAL after it is streamed, and every later start skips it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::pg::conninfo::ConnInfo;
use crate::pg::replication::{self, ServerInfo, SystemInfo};
use crate::pg::{Connection, PgError};
use crate::repo::{Repo, RepoError};
use crate::retry::{RetryPolicy, Transient};
use crate::wal::page::PageError;
use crate::wal::{Lsn, SegmentName, TimeLineId};

pub(crate) mod assembler;
pub mod publisher;
pub mod session;
pub(crate) mod stages;

use crate::spool::{Spool, SpoolEntry};

/// SQLSTATE `58P01` (undefined_file): "requested WAL segment … has already been removed".
const SQLSTATE_UNDEFINED_FILE: &str = "58P01";

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub slot: String,
    pub application_name: String,
    /// fsync and reply after every received batch (for synchronous replication).
    pub synchronous: bool,
    pub fsync_interval: Duration,
    pub status_interval: Duration,
    pub progress_interval: Duration,
    pub compress_level: i32,
    pub retry: RetryPolicy,
    /// When the WAL needed to continue is gone from the server: record the gap and continue
    /// from the oldest position the server still has (`--accept-gap`).
    pub accept_gap: bool,
    /// Index the records of each segment as it is published (`wal::index`).
    pub index: bool,
    /// Told the durable (fsync'd) position after every status update (the partial-segment
    /// shipper of a tiered repository reads it).
    pub flushed: Option<std::sync::Arc<watch::Sender<Option<crate::wal::WalPoint>>>>,
    /// Told where the stream is, for a supervisor's metrics and health (`archiver run`).
    pub status: Option<std::sync::Arc<StreamStatus>>,
}

/// Where a running stream is, published without locks for whoever watches it (the daemon's
/// metrics and readiness). Positions only grow while a session lasts; `connected` is true
/// from `START_REPLICATION` until the session ends.
#[derive(Debug, Default)]
pub struct StreamStatus {
    pub connected: AtomicBool,
    /// WAL received (written to the spool, maybe not yet fsync'd).
    pub received: AtomicU64,
    /// WAL fsync'd and acknowledged to the server.
    pub flushed: AtomicU64,
    /// The server's WAL end, from its last message.
    pub server_end: AtomicU64,
    pub timeline: AtomicU32,
    /// Archived segments whose WAL records did not read back (a record CRC-32C failed): the
    /// server sent damaged WAL. Never decreases.
    pub damaged_segments: AtomicU64,
    /// The last such segment and why.
    pub last_damage: std::sync::Mutex<Option<String>>,
}

impl StreamStatus {
    pub fn lsn(a: &AtomicU64) -> Lsn {
        Lsn(a.load(Ordering::Relaxed))
    }
}

impl StreamConfig {
    fn report(&self, f: impl FnOnce(&StreamStatus)) {
        if let Some(s) = &self.status {
            f(s)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error("the WAL needed to continue is no longer available on the server ({0}); the archive would have a gap. To continue this repository from the server's current position, run `archiver stream --accept-gap` (the gap is recorded; restores stay on either side of it and never cross it), then take a base backup at once (`archiver backup`): the WAL after the gap is restorable only from a backup taken after it")]
    WalGone(String),
    #[error("refusing to archive invalid WAL")]
    InvalidWal(#[from] PageError),
    #[error("the server is not the repository's cluster: {0}")]
    OtherCluster(String),
    #[error("internal error: {0}")]
    Invariant(String),
}

impl StreamError {
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> Self {
        StreamError::Io {
            context: context.into(),
            cause,
        }
    }
}

impl Transient for StreamError {
    fn is_transient(&self) -> bool {
        match self {
            StreamError::Pg(e) => e.is_transient(),
            StreamError::Repo(e) => e.is_transient(),
            _ => false,
        }
    }
}

impl Transient for PgError {
    fn is_transient(&self) -> bool {
        PgError::is_transient(self)
    }
}

/// Where a session starts streaming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartPoint {
    pub tli: TimeLineId,
    pub lsn: Lsn,
}

/// Chooses the start. `resume`: the segment this streamer continues with (its spool partial, or
/// the segment it recorded as next); `last_complete`: the end of the unbroken run of archived
/// segments from `resume` (without `resume`: the newest archived segment). Start at `resume`,
/// or after `last_complete` when that covers it, else (a new repository) at the slot's
/// `restart_lsn`, else at the server's current position — always at a segment boundary.
pub fn plan_start(
    resume: Option<SegmentName>,
    last_complete: Option<SegmentName>,
    slot: Option<(Lsn, Option<TimeLineId>)>,
    server: &SystemInfo,
    seg_size: u64,
) -> StartPoint {
    let next_after = |c: SegmentName| StartPoint {
        tli: c.tli,
        lsn: c.end_lsn(),
    };
    match (resume, last_complete) {
        (Some(p), Some(c)) if (c.segno, c.tli) >= (p.segno, p.tli) => next_after(c),
        (Some(p), _) => StartPoint {
            tli: p.tli,
            lsn: p.start_lsn(),
        },
        (None, Some(c)) => next_after(c),
        (None, None) => match slot {
            Some((lsn, tli)) if lsn.is_valid() => StartPoint {
                tli: tli.unwrap_or(server.timeline),
                lsn: lsn.segment_start(seg_size),
            },
            _ => StartPoint {
                tli: server.timeline,
                lsn: server.xlogpos.segment_start(seg_size),
            },
        },
    }
}

/// The streamer's relation-name snapshots: at least this often (kept only when changed) …
const NAMES_EVERY: Duration = Duration::from_secs(15 * 60);
/// … and at most this often when the index sees relation files created.
const NAMES_MIN_GAP: Duration = Duration::from_secs(10);

/// Publishes complete segments left in the spool by an earlier run (before anything else).
pub async fn recover_spool(
    repo: &Repo,
    spool: &Spool,
    level: i32,
    index: bool,
) -> Result<(), StreamError> {
    let mut indexer = publisher::indexer_for(repo, index);
    for e in spool
        .scan()
        .map_err(|e| StreamError::io("scanning the spool", e))?
    {
        if let SpoolEntry::Complete(seg) = e {
            info!(segment = %seg, "publishing a complete segment left in the spool");
            publisher::publish_segment(repo, spool, seg, level, &mut indexer).await?;
            publisher::record_next(spool, seg).await?;
        }
    }
    Ok(())
}

/// Where the server holds `slot`. PostgreSQL 15+: `READ_REPLICATION_SLOT` on the replication
/// connection. PostgreSQL 13 and 14 have no such command: `pg_replication_slots` over an
/// ordinary SQL connection with the same conninfo, and when pg_hba does not allow one (a
/// replication-only user), `None`. That loses little: the start point comes from the
/// repository's own end whenever it holds WAL (the slot retains WAL from there, since only
/// stored WAL was acknowledged), and for an empty repository from the server's current
/// position, which is where a slot archiver has just created reserves WAL from anyway.
async fn read_slot(
    conn: &mut Connection,
    conninfo: &ConnInfo,
    server: &ServerInfo,
    slot: &str,
) -> Result<Option<replication::SlotInfo>, StreamError> {
    if server.major() >= 15 {
        return Ok(replication::read_replication_slot(conn, slot).await?);
    }
    match replication::read_slot_over_sql(conninfo, slot).await {
        Ok(s) => Ok(s),
        Err(e) => {
            info!(%slot, error = %e, "PostgreSQL {} has no READ_REPLICATION_SLOT and pg_replication_slots cannot be read over SQL; the start point comes from the repository (or the server's current position)", server.major());
            Ok(None)
        }
    }
}

/// Makes sure the slot exists and decides where to start.
async fn prepare(
    conn: &mut Connection,
    conninfo: &ConnInfo,
    server: &ServerInfo,
    repo: &Repo,
    spool: &Spool,
    cfg: &StreamConfig,
) -> Result<StartPoint, StreamError> {
    let seg_size = repo.seg_size();
    let mut slot = read_slot(conn, conninfo, server, &cfg.slot).await?;
    if slot.is_none() {
        if replication::create_physical_slot(conn, &cfg.slot).await? {
            info!(slot = %cfg.slot, "created physical replication slot");
            repo.record_slot(&cfg.slot).await?;
        }
        slot = read_slot(conn, conninfo, server, &cfg.slot).await?;
    }
    if let Some(s) = &slot {
        if s.slot_type != "physical" {
            return Err(StreamError::Pg(PgError::Protocol(format!(
                "replication slot \"{}\" is a {} slot; archiver needs a physical one",
                cfg.slot, s.slot_type
            ))));
        }
    }
    let entries = spool
        .scan()
        .map_err(|e| StreamError::io("scanning the spool", e))?;
    let partial = entries.iter().rev().find_map(|e| match e {
        SpoolEntry::Partial(s) => Some(*s),
        _ => None,
    });
    // Resume where this streamer stopped (its partial, or the segment it recorded as next),
    // after whatever unbroken run of archived segments follows: segments a backup archived
    // further ahead must not hide a gap.
    let resume = [partial, spool.recorded_next()]
        .into_iter()
        .flatten()
        .max_by_key(|s| (s.segno, s.tli));
    let last = match resume {
        Some(r) => repo.contiguous_end(r).await?,
        None => repo.last_complete_segment().await?,
    };
    let mut start = plan_start(
        resume,
        last,
        slot.as_ref()
            .and_then(|s| s.restart_lsn.map(|l| (l, s.restart_tli))),
        &server.system,
        seg_size,
    );
    // A recorded gap is never streamed into: continue after it.
    for g in repo.list_gaps().await? {
        if g.from_lsn.segment_start(seg_size) <= start.lsn && start.lsn < g.to_lsn {
            info!(from = %g.from_lsn, to = %g.to_lsn, "continuing after the recorded gap");
            start = StartPoint {
                tli: g.timeline,
                lsn: g.to_lsn,
            };
        }
    }
    // Stale partials (below the start, e.g. an old timeline's) are of no further use.
    for e in entries {
        if let SpoolEntry::Partial(s) = e {
            if s.start_lsn() < start.lsn || (s.start_lsn() == start.lsn && s.tli != start.tli) {
                let _ = spool.remove(&spool.partial_path(&s));
            }
        }
    }
    if let Some(restart) = slot.as_ref().and_then(|s| s.restart_lsn) {
        if restart.segment_start(seg_size) > start.lsn {
            warn!(
                slot = %cfg.slot,
                %restart,
                start = %start.lsn,
                "the slot's restart_lsn is ahead of the archive; the WAL in between may already be removed"
            );
        }
    }
    info!(tli = start.tli, start = %start.lsn, resumed = last.is_some() || resume.is_some(), "streaming start point");
    Ok(start)
}

/// The slots archiver created for this repository, other than the one in use, that still exist
/// on the server (they retain WAL there), as "name (restart_lsn X)".
async fn abandoned_slots(
    conn: &mut Connection,
    conninfo: &ConnInfo,
    server: &ServerInfo,
    repo: &Repo,
    cfg: &StreamConfig,
) -> Result<Vec<String>, StreamError> {
    let mut out = Vec::new();
    for s in repo.list_slots().await? {
        if s.name == cfg.slot {
            continue;
        }
        if let Some(info) = read_slot(conn, conninfo, server, &s.name).await? {
            let restart = info
                .restart_lsn
                .map_or_else(|| "none".to_string(), |l| l.to_string());
            out.push(format!("{} (restart_lsn {restart})", s.name));
        }
    }
    Ok(out)
}

/// The gap the stream accepts when the WAL at `start` is gone: from `start` (or the start of
/// the gap already recorded there) to the slot's `restart_lsn` (`slot_restart`) when it is
/// ahead, else the segment of the server's current position.
async fn accept_gap(
    server: &ServerInfo,
    repo: &Repo,
    spool: &Spool,
    cfg: &StreamConfig,
    start: StartPoint,
    reason: &str,
    slot_restart: Option<Lsn>,
) -> Result<crate::repo::gaps::Gap, StreamError> {
    let seg_size = repo.seg_size();
    let current = server.system.xlogpos.segment_start(seg_size);
    let to = match slot_restart {
        Some(r) if r.segment_start(seg_size) > start.lsn => r.segment_start(seg_size),
        _ => current,
    };
    if to <= start.lsn {
        return Err(StreamError::WalGone(format!(
            "{reason}; the server's oldest WAL is not ahead of {}",
            start.lsn
        )));
    }
    let existing = repo
        .list_gaps()
        .await?
        .into_iter()
        .find(|g| g.to_lsn == start.lsn && g.timeline == start.tli && g.from_lsn < start.lsn);
    // The durable prefix of the segment at `start` is acknowledged WAL, and its only copy:
    // keep it as the segment's partial object before the spool lets it go.
    let mut from = start.lsn;
    if let Some((seg, len)) = spool.durable_tail().filter(|(_, len)| *len > 0) {
        if seg.start_lsn() == start.lsn && seg.tli == start.tli && existing.is_none() {
            let raw = spool
                .read_tail(seg, len)
                .map_err(|e| StreamError::io("reading the spool's partial segment", e))?;
            repo.put_raw(
                &crate::repo::layout::partial_segment_key(&seg),
                raw.into(),
                crate::repo::object::ObjectKind::PartialWalSegment,
                cfg.compress_level,
            )
            .await?;
            info!(segment = %seg, bytes = len, "kept the received prefix before the gap as a partial segment");
            from = Lsn(start.lsn.0 + len);
        }
    }
    let gap = match existing {
        Some(mut g) => {
            g.to_lsn = to;
            g.timeline = server.system.timeline;
            g.at = crate::time::now();
            g
        }
        None => crate::repo::gaps::Gap {
            from_timeline: start.tli,
            from_lsn: from,
            timeline: server.system.timeline,
            to_lsn: to,
            at: crate::time::now(),
            last_received_before: repo.newest_segment_time().await?.max(
                spool
                    .durable_tail()
                    .and_then(|_| spool.last_flush_time())
                    .map(crate::time::from_system),
            ),
            reason: reason.to_string(),
        },
    };
    // The record first: nothing after the gap is streamed before the repository explains it.
    repo.put_gap(&gap).await?;
    spool
        .clear_flush_record()
        .map_err(|e| StreamError::io("resetting the spool", e))?;
    warn!(
        from = %gap.from_lsn,
        to = %gap.to_lsn,
        tli = gap.timeline,
        "accepted a gap in the archive: WAL in between is gone from the server; take a base backup now (WAL after the gap is restorable only from a backup taken after it)"
    );
    Ok(gap)
}

/// Connects again after a transient failure and re-checks the server's identity.
async fn reconnect(
    conninfo: &ConnInfo,
    repo: &Repo,
    cfg: &StreamConfig,
) -> Result<(Connection, ServerInfo), StreamError> {
    crate::retry::retry(&cfg.retry, "reconnecting to the server", || async {
        let mut conn = Connection::connect(conninfo, Some("true"), &cfg.application_name).await?;
        let server = replication::server_info(&mut conn).await?;
        Ok::<_, PgError>((conn, server))
    })
    .await
    .map_err(StreamError::from)
    .and_then(|(conn, server)| {
        Repo::check_compatible(repo.meta(), &server)
            .map_err(|e| StreamError::OtherCluster(e.to_string()))?;
        Ok((conn, server))
    })
}

thread_local! {
    /// Set on the thread [`run_where_cheapest`] starts: the only kind of thread whose stream
    /// may block it on its socket.
    static OWN_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is a stream's own (see [`run_where_cheapest`]).
pub(crate) fn on_own_thread() -> bool {
    OWN_THREAD.with(|t| t.get())
}

/// Runs [`run`] where it costs least, and waits for it.
///
/// A stream gets a thread of its own, still within the runtime (its tasks, timers and I/O go
/// on as anywhere else). There it blocks on its socket instead of going through the runtime
/// on every read ([`session::Session`]); a runtime worker must never block like that.
/// - A synchronous stream reads whatever came, at once: every commit waits on its reply.
/// - An asynchronous one reads in batches of 256 KiB (or what came in 100 ms): one wake-up
///   per batch instead of one per message, ~15-20% less CPU per GB of WAL than as a runtime
///   task (docs/benchmarks.md).
///
/// TLS or not: a TLS session is detached with its socket
/// ([`Connection::detach`](crate::pg::Connection::detach)).
#[allow(clippy::too_many_arguments)]
pub async fn run_where_cheapest(
    conn: Connection,
    server: ServerInfo,
    repo: Repo,
    spool: Spool,
    conninfo: ConnInfo,
    cfg: StreamConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("archiver-stream".into())
        .spawn(move || {
            OWN_THREAD.with(|t| t.set(true));
            let _ = tx.send(rt.block_on(run(conn, server, repo, spool, conninfo, cfg, shutdown)));
        })
        .map_err(|e| StreamError::io("starting the stream's thread", e))?;
    rx.await.unwrap_or_else(|_| {
        Err(StreamError::Invariant(
            "the stream's thread panicked".into(),
        ))
    })
}

/// Streams until `shutdown` is set or a permanent error occurs. `conn` is an established
/// replication connection to `server`, already checked against the repository.
pub async fn run(
    conn: Connection,
    server: ServerInfo,
    repo: Repo,
    spool: Spool,
    conninfo: ConnInfo,
    cfg: StreamConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let spool = spool.recycling(true).resident(true);
    recover_spool(&repo, &spool, cfg.compress_level, cfg.index).await?;
    // Names for the relation files the index will see removed (best effort, in the
    // background: a replication-only user cannot read them, and says so).
    let names = cfg.index.then(|| {
        crate::repo::relmap::keep_names(repo.clone(), conninfo.clone(), NAMES_EVERY, NAMES_MIN_GAP)
    });
    let mut publisher = publisher::Publisher::start(
        repo.clone(),
        spool.clone(),
        cfg.compress_level,
        names.as_ref().map(|(poke, _)| poke.clone()),
        cfg.status.clone(),
        cfg.index,
    );
    let mut next = Some((conn, server));
    let mut failing_since: Option<std::time::Instant> = None;
    let mut gap_attempts = 0u32;
    let result = loop {
        let (mut conn, server) = match next.take() {
            Some(c) => c,
            None => {
                // A stop request ends the reconnection at once: the service stops promptly
                // exactly when the server is gone (everything received is already fsync'd).
                let r = tokio::select! {
                    biased;
                    _ = session::shutdown_requested(&mut shutdown) => {
                        info!("stop requested while reconnecting; everything received is durable");
                        break Ok(());
                    }
                    r = reconnect(&conninfo, &repo, &cfg) => r,
                };
                match r {
                    Ok(c) => c,
                    Err(e) => break Err(e),
                }
            }
        };
        let mut started_at = None;
        let outcome = async {
            let start = prepare(&mut conn, &conninfo, &server, &repo, &spool, &cfg).await?;
            started_at = Some(start);
            let abandoned = abandoned_slots(&mut conn, &conninfo, &server, &repo, &cfg).await?;
            if !abandoned.is_empty() {
                warn!(
                    slots = %abandoned.join(", "),
                    "replication slots archiver created for this repository are not streamed from: they retain WAL on the server; drop each one no longer needed (SELECT pg_drop_replication_slot('NAME'))"
                );
            }
            let mut s = session::Session::new(
                conn,
                &server,
                &repo,
                &spool,
                &cfg,
                &mut publisher,
                start.tli,
            );
            s.abandoned_slots = abandoned.join(", ");
            let r = s.run(start, &mut shutdown).await;
            cfg.report(|st| st.connected.store(false, Ordering::Relaxed));
            Ok::<_, StreamError>((r, s.bytes_received()))
        }
        .await;
        let (r, progressed) = match outcome {
            Ok((r, n)) => (r, n > 0),
            Err(e) => (Err(e), false),
        };
        match r {
            Ok(()) => break Ok(()),
            Err(StreamError::Pg(PgError::Server(e))) if e.code == SQLSTATE_UNDEFINED_FILE => {
                let Some(start) = started_at.filter(|_| cfg.accept_gap && gap_attempts < 3) else {
                    break Err(StreamError::WalGone(e.message));
                };
                gap_attempts += 1;
                let accepted = async {
                    let (mut conn, server) = reconnect(&conninfo, &repo, &cfg).await?;
                    // The slot's position on the first try; after that (the WAL went on
                    // moving), the server's current position.
                    let slot_restart = if gap_attempts == 1 {
                        read_slot(&mut conn, &conninfo, &server, &cfg.slot)
                            .await?
                            .and_then(|s| s.restart_lsn)
                    } else {
                        None
                    };
                    accept_gap(
                        &server,
                        &repo,
                        &spool,
                        &cfg,
                        start,
                        &e.message,
                        slot_restart,
                    )
                    .await?;
                    Ok::<_, StreamError>((conn, server))
                }
                .await;
                match accepted {
                    Ok(c) => next = Some(c),
                    Err(e) => break Err(e),
                }
            }
            Err(e) if e.is_transient() && !*shutdown.borrow() => {
                if progressed {
                    failing_since = None;
                }
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > cfg.retry.give_up_after {
                    break Err(e);
                }
                warn!(error = %e, "replication connection lost; reconnecting");
                tokio::select! {
                    _ = session::shutdown_requested(&mut shutdown) => {}
                    _ = tokio::time::sleep(cfg.retry.delay(0)) => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    let stages = publisher.stages.clone();
    let published = publisher.finish().await;
    stages.log();
    if let Some((_, task)) = names {
        task.abort();
    }
    match (result, published) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn server(tli: TimeLineId, pos: u64) -> SystemInfo {
        SystemInfo {
            system_identifier: 1,
            timeline: tli,
            xlogpos: Lsn(pos),
        }
    }

    fn seg(tli: TimeLineId, n: u64) -> SegmentName {
        SegmentName::new(tli, n, SEG)
    }

    #[test]
    fn start_point_table() {
        let srv = server(3, 0x0A00_1234);
        type Case = (
            Option<SegmentName>,
            Option<SegmentName>,
            Option<(Lsn, Option<TimeLineId>)>,
            StartPoint,
        );
        let cases: Vec<Case> = vec![
            // Fresh repository, no slot position: the server's current segment.
            (
                None,
                None,
                None,
                StartPoint {
                    tli: 3,
                    lsn: Lsn(0x0A00_0000),
                },
            ),
            // Fresh repository, slot: its restart_lsn's segment and timeline.
            (
                None,
                None,
                Some((Lsn(0x0500_0100), Some(2))),
                StartPoint {
                    tli: 2,
                    lsn: Lsn(0x0500_0000),
                },
            ),
            (
                None,
                None,
                Some((Lsn(0x0500_0100), None)),
                StartPoint {
                    tli: 3,
                    lsn: Lsn(0x0500_0000),
                },
            ),
            // Archived segments only: the next one, same timeline.
            (
                None,
                Some(seg(1, 7)),
                None,
                StartPoint {
                    tli: 1,
                    lsn: Lsn(0x0800_0000),
                },
            ),
            // A partial in the spool wins: restart it from its beginning.
            (
                Some(seg(1, 8)),
                Some(seg(1, 7)),
                None,
                StartPoint {
                    tli: 1,
                    lsn: Lsn(0x0800_0000),
                },
            ),
            // A stale partial behind the archive is ignored.
            (
                Some(seg(1, 5)),
                Some(seg(1, 7)),
                Some((Lsn(1), None)),
                StartPoint {
                    tli: 1,
                    lsn: Lsn(0x0800_0000),
                },
            ),
            // A partial on the new timeline at the switch segment.
            (
                Some(seg(2, 7)),
                Some(seg(1, 6)),
                None,
                StartPoint {
                    tli: 2,
                    lsn: Lsn(0x0700_0000),
                },
            ),
        ];
        for (partial, last, slot, want) in cases {
            assert_eq!(
                plan_start(partial, last, slot, &srv, SEG),
                want,
                "{partial:?} {last:?} {slot:?}"
            );
        }
    }
}
