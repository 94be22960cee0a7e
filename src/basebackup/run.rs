//! Runs `BASE_BACKUP` on a replication connection and feeds the archives to a [`BackupSink`]
//! as they stream in: bounded memory whatever the database size.

use async_trait::async_trait;
use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::protocol::{decode, BaseBackupOptions, CopyMessage};
use crate::pg::conn::{decode_row, parse_error_fields, Backend};
use crate::pg::{Connection, PgError};
use crate::wal::{Lsn, TimeLineId};

/// A base backup failed: on the server side, or where the archives were going.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Sink(Box<dyn std::error::Error + Send + Sync>),
}

impl BackupError {
    pub fn sink(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BackupError::Sink(Box::new(e))
    }
}

/// Where the streamed archives go.
#[async_trait]
pub trait BackupSink: Send {
    /// A new tablespace archive starts (`base.tar` for the main data directory).
    async fn new_archive(&mut self, name: &str, tablespace_path: &str) -> Result<(), BackupError>;
    /// The manifest starts; later data belongs to it.
    async fn manifest(&mut self) -> Result<(), BackupError>;
    /// Bytes of the current archive or manifest.
    async fn data(&mut self, data: Bytes) -> Result<(), BackupError>;
    /// Total bytes sent so far.
    fn progress(&mut self, _done: u64) {}
    /// The tablespaces the server is about to send (sizes in kB, with PROGRESS).
    fn tablespaces(&mut self, _ts: &[TablespaceInfo]) {}
}

/// A tablespace as the server announces it (`spcoid`, `spclocation`, `size` in kB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablespaceInfo {
    pub oid: Option<u32>,
    pub location: Option<String>,
    pub size_kb: Option<u64>,
}

/// What the server reported around the archives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupResult {
    pub start_lsn: Lsn,
    pub start_tli: TimeLineId,
    pub stop_lsn: Lsn,
    pub stop_tli: TimeLineId,
    pub tablespaces: Vec<TablespaceInfo>,
}

fn proto(m: impl Into<String>) -> BackupError {
    BackupError::Pg(PgError::Protocol(m.into()))
}

fn text(row: &[Option<Bytes>], i: usize) -> Option<String> {
    row.get(i)?
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Runs the backup to the end: the PostgreSQL 15+ protocol, or with `opts.legacy` the 13/14 one.
pub async fn base_backup(
    conn: &mut Connection,
    opts: &BaseBackupOptions,
    sink: &mut dyn BackupSink,
) -> Result<BackupResult, BackupError> {
    frontend::query(&opts.command(), conn.write_buf()).map_err(PgError::from)?;
    conn.flush().await?;
    // Result sets in order: start position, tablespaces, (COPY), stop position.
    let mut sets: Vec<Vec<Vec<Option<Bytes>>>> = Vec::new();
    let mut cur: Option<Vec<Vec<Option<Bytes>>>> = None;
    let mut err = None;
    let mut copied = false;
    let mut legacy_copies = 0usize;
    let mut received = 0u64;
    loop {
        let msg = match conn.next_message().await? {
            Backend::Msg(m) => m,
            Backend::CopyBothResponse => {
                return Err(proto("unexpected CopyBothResponse in BASE_BACKUP"))
            }
        };
        match msg {
            Message::RowDescription(_) => cur = Some(Vec::new()),
            Message::DataRow(row) => cur
                .as_mut()
                .ok_or_else(|| proto("DataRow without RowDescription"))?
                .push(decode_row(&row)?),
            Message::CommandComplete(_) => {
                if let Some(rows) = cur.take() {
                    sets.push(rows);
                    if sets.len() == 2 {
                        sink.tablespaces(&tablespace_rows(&sets[1]));
                    }
                }
            }
            Message::CopyOutResponse(_) if opts.legacy => {
                // One COPY per tablespace, in the order of the tablespace result set, then one
                // for the manifest.
                let ts = sets.get(1).map(|s| tablespace_rows(s)).unwrap_or_default();
                let k = legacy_copies;
                legacy_copies += 1;
                match ts.get(k) {
                    Some(t) => {
                        let name = t.oid.map_or("base.tar".to_string(), |o| format!("{o}.tar"));
                        sink.new_archive(&name, t.location.as_deref().unwrap_or(""))
                            .await?
                    }
                    None if k == ts.len() => sink.manifest().await?,
                    None => return Err(proto("more COPY results than tablespaces and a manifest")),
                }
                copied = true;
                received = legacy_copy_out(conn, sink, received).await?;
            }
            Message::CopyOutResponse(_) => {
                copied = true;
                copy_out(conn, sink).await?;
            }
            Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
            Message::ErrorResponse(body) => err = Some(parse_error_fields(&mut body.fields())),
            Message::ReadyForQuery(_) => break,
            _ => return Err(proto("unexpected message in BASE_BACKUP response")),
        }
    }
    if let Some(e) = err {
        return Err(PgError::Server(e).into());
    }
    if !copied || sets.len() < 3 {
        return Err(proto(format!(
            "incomplete BASE_BACKUP response ({} result sets)",
            sets.len()
        )));
    }
    let pos =
        |set: &Vec<Vec<Option<Bytes>>>, what: &str| -> Result<(Lsn, TimeLineId), BackupError> {
            let row = set
                .first()
                .ok_or_else(|| proto(format!("{what}: no row")))?;
            let lsn = text(row, 0)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| proto(format!("{what}: bad LSN")))?;
            let tli = text(row, 1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| proto(format!("{what}: bad timeline")))?;
            Ok((lsn, tli))
        };
    let (start_lsn, start_tli) = pos(&sets[0], "start position")?;
    let (stop_lsn, stop_tli) = pos(&sets[sets.len() - 1], "stop position")?;
    let tablespaces = tablespace_rows(&sets[1]);
    Ok(BackupResult {
        start_lsn,
        start_tli,
        stop_lsn,
        stop_tli,
        tablespaces,
    })
}

fn tablespace_rows(rows: &[Vec<Option<Bytes>>]) -> Vec<TablespaceInfo> {
    rows.iter()
        .map(|r| TablespaceInfo {
            oid: text(r, 0).and_then(|s| s.parse().ok()),
            location: text(r, 1),
            size_kb: text(r, 2).and_then(|s| s.parse().ok()),
        })
        .collect()
}

/// One COPY of the PostgreSQL 13/14 protocol: raw bytes of one archive (or the manifest) until
/// CopyDone. Progress is what has arrived (these servers send no progress messages).
async fn legacy_copy_out(
    conn: &mut Connection,
    sink: &mut dyn BackupSink,
    mut received: u64,
) -> Result<u64, BackupError> {
    loop {
        match conn.next_message().await? {
            Backend::Msg(Message::CopyData(body)) => {
                let d = body.into_bytes();
                if d.is_empty() {
                    continue;
                }
                received += d.len() as u64;
                sink.data(d).await?;
                sink.progress(received);
            }
            Backend::Msg(Message::CopyDone) => return Ok(received),
            Backend::Msg(Message::ErrorResponse(body)) => {
                return Err(PgError::Server(parse_error_fields(&mut body.fields())).into())
            }
            Backend::Msg(Message::NoticeResponse(_)) => {}
            _ => return Err(proto("unexpected message in the BASE_BACKUP COPY stream")),
        }
    }
}

/// The CopyOut phase: every CopyData to the sink until CopyDone.
async fn copy_out(conn: &mut Connection, sink: &mut dyn BackupSink) -> Result<(), BackupError> {
    let mut started = false;
    loop {
        match conn.next_message().await? {
            Backend::Msg(Message::CopyData(body)) => {
                match decode(body.into_bytes()).map_err(|e| proto(e.to_string()))? {
                    CopyMessage::NewArchive {
                        name,
                        tablespace_path,
                    } => {
                        started = true;
                        sink.new_archive(&name, &tablespace_path).await?
                    }
                    CopyMessage::Manifest => {
                        started = true;
                        sink.manifest().await?
                    }
                    CopyMessage::Data(d) if started => sink.data(d).await?,
                    CopyMessage::Data(_) => {
                        return Err(proto("archive data before any archive began"))
                    }
                    CopyMessage::Progress(n) => sink.progress(n),
                }
            }
            Backend::Msg(Message::CopyDone) => return Ok(()),
            Backend::Msg(Message::ErrorResponse(body)) => {
                return Err(PgError::Server(parse_error_fields(&mut body.fields())).into())
            }
            Backend::Msg(Message::NoticeResponse(_)) => {}
            _ => return Err(proto("unexpected message in the BASE_BACKUP COPY stream")),
        }
    }
}
