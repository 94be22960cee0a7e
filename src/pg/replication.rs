//! Replication commands (`IDENTIFY_SYSTEM`, `SHOW`, slots, `TIMELINE_HISTORY`,
//! `START_REPLICATION`) and the CopyBoth messages of physical streaming: XLogData (`'w'`),
//! primary keepalive (`'k'`) and the standby status update (`'r'`) we send back.
//!
//! The message codec is sans-IO ([`decode_copy_data`], [`encode_status_update`]) so it can be
//! unit-tested and benchmarked without a server.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::{parse_error_fields, Backend, Connection, ResultSet};
use super::PgError;
use crate::wal::{Lsn, TimeLineId};

pub use crate::wal::cluster::{ServerInfo, SystemInfo};

fn proto(msg: impl Into<String>) -> PgError {
    PgError::Protocol(msg.into())
}

fn single_row(mut sets: Vec<ResultSet>, what: &str, cols: usize) -> Result<ResultSet, PgError> {
    let rs = sets
        .pop()
        .ok_or_else(|| proto(format!("{what} returned no result")))?;
    if rs.rows.len() != 1 || rs.rows[0].len() < cols {
        return Err(proto(format!(
            "{what} returned {} rows of {} columns, expected 1 row of {cols}",
            rs.rows.len(),
            rs.rows.first().map_or(0, |r| r.len())
        )));
    }
    Ok(rs)
}

fn text_field<T: std::str::FromStr>(rs: &ResultSet, col: usize, what: &str) -> Result<T, PgError> {
    rs.text(0, col)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| proto(format!("{what}: could not parse column {col}")))
}

pub async fn identify_system(conn: &mut Connection) -> Result<SystemInfo, PgError> {
    let rs = single_row(
        conn.simple_query("IDENTIFY_SYSTEM").await?,
        "IDENTIFY_SYSTEM",
        3,
    )?;
    Ok(SystemInfo {
        system_identifier: text_field(&rs, 0, "IDENTIFY_SYSTEM systemid")?,
        timeline: text_field(&rs, 1, "IDENTIFY_SYSTEM timeline")?,
        xlogpos: text_field(&rs, 2, "IDENTIFY_SYSTEM xlogpos")?,
    })
}

/// `SHOW name` on a replication connection.
pub async fn show(conn: &mut Connection, name: &str) -> Result<String, PgError> {
    let rs = single_row(conn.simple_query(&format!("SHOW {name}")).await?, "SHOW", 1)?;
    rs.text(0, 0)
        .map(str::to_string)
        .ok_or_else(|| proto(format!("SHOW {name} returned NULL")))
}

/// Parses a GUC memory value as `SHOW` prints it (`16MB`, `1GB`, `8kB`, or bytes).
pub fn parse_guc_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub async fn server_info(conn: &mut Connection) -> Result<ServerInfo, PgError> {
    let system = identify_system(conn).await?;
    let version_num: u32 = show(conn, "server_version_num")
        .await?
        .parse()
        .map_err(|_| proto("server_version_num is not a number"))?;
    let seg = show(conn, "wal_segment_size").await?;
    let wal_segment_size = parse_guc_bytes(&seg)
        .ok_or_else(|| proto(format!("cannot parse wal_segment_size \"{seg}\"")))?;
    Ok(ServerInfo {
        system,
        version_num,
        wal_segment_size,
    })
}

/// Slot names are limited to lower-case letters, digits and underscores (`ReplicationSlotValidateName`).
pub fn validate_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "replication slot name \"{name}\" must be 1 to 63 characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "replication slot name \"{name}\" contains invalid characters (use lower-case letters, digits and underscores)"
        ));
    }
    Ok(())
}

/// What `READ_REPLICATION_SLOT` says of a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot_type: String,
    pub restart_lsn: Option<Lsn>,
    pub restart_tli: Option<TimeLineId>,
}

/// `READ_REPLICATION_SLOT` (PG15+). `Ok(None)` when the slot does not exist.
pub async fn read_replication_slot(
    conn: &mut Connection,
    slot: &str,
) -> Result<Option<SlotInfo>, PgError> {
    let rs = single_row(
        conn.simple_query(&format!("READ_REPLICATION_SLOT {slot}"))
            .await?,
        "READ_REPLICATION_SLOT",
        3,
    )?;
    let Some(slot_type) = rs.text(0, 0) else {
        return Ok(None);
    };
    Ok(Some(SlotInfo {
        slot_type: slot_type.to_string(),
        restart_lsn: rs.text(0, 1).and_then(|s| s.parse().ok()),
        restart_tli: rs.text(0, 2).and_then(|s| s.parse().ok()),
    }))
}

/// A slot as `pg_replication_slots` shows it, over an ordinary SQL connection: for
/// PostgreSQL 13 and 14, whose walsender has no `READ_REPLICATION_SLOT`. The view gives no
/// timeline (`restart_tli` is `None`: the caller takes the server's). `Ok(None)` when the slot
/// does not exist; an error when the SQL connection is refused (pg_hba often allows the
/// replication user replication connections only).
pub async fn read_slot_over_sql(
    ci: &crate::pg::ConnInfo,
    slot: &str,
) -> Result<Option<SlotInfo>, PgError> {
    validate_slot_name(slot).map_err(proto)?;
    let mut c = Connection::connect(ci, None, "archiver").await?;
    // The name is validated above (letters, digits, underscores): safe to inline.
    let sets = c
        .simple_query(&format!(
            "select slot_type, restart_lsn from pg_replication_slots where slot_name = '{slot}'"
        ))
        .await;
    c.close().await;
    let sets = sets?;
    let Some(rs) = sets.first() else {
        return Ok(None);
    };
    let Some(slot_type) = rs.text(0, 0) else {
        return Ok(None);
    };
    Ok(Some(SlotInfo {
        slot_type: slot_type.to_string(),
        restart_lsn: rs.text(0, 1).and_then(|s| s.parse().ok()),
        restart_tli: None,
    }))
}

/// `CREATE_REPLICATION_SLOT slot PHYSICAL RESERVE_WAL`. Returns false if it already existed.
pub async fn create_physical_slot(conn: &mut Connection, slot: &str) -> Result<bool, PgError> {
    match conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"
        ))
        .await
    {
        Ok(_) => Ok(true),
        Err(PgError::Server(e)) if e.code == "42710" => Ok(false), // duplicate_object
        Err(e) => Err(e),
    }
}

/// `TIMELINE_HISTORY tli`: the file name and raw content of `0000000N.history`.
pub async fn timeline_history(
    conn: &mut Connection,
    tli: TimeLineId,
) -> Result<(String, Bytes), PgError> {
    let rs = single_row(
        conn.simple_query(&format!("TIMELINE_HISTORY {tli}"))
            .await?,
        "TIMELINE_HISTORY",
        2,
    )?;
    let name = rs
        .text(0, 0)
        .ok_or_else(|| proto("TIMELINE_HISTORY: no file name"))?
        .to_string();
    let content = rs.rows[0][1]
        .clone()
        .ok_or_else(|| proto("TIMELINE_HISTORY: no content"))?;
    Ok((name, content))
}

/// How `START_REPLICATION` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum StartOutcome {
    /// In CopyBoth mode; WAL follows.
    Streaming,
    /// The requested start is exactly the end of `tli`'s history on this server: no COPY,
    /// continue on `next_tli` from `switch`.
    TimelineEnded { next_tli: TimeLineId, switch: Lsn },
}

/// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE tli`.
pub async fn start_replication(
    conn: &mut Connection,
    slot: Option<&str>,
    start: Lsn,
    tli: TimeLineId,
) -> Result<StartOutcome, PgError> {
    let slot = slot.map(|s| format!("SLOT {s} ")).unwrap_or_default();
    frontend::query(
        &format!("START_REPLICATION {slot}PHYSICAL {start} TIMELINE {tli}"),
        conn.write_buf(),
    )?;
    conn.flush().await?;
    loop {
        match conn.next_message().await? {
            Backend::CopyBothResponse => return Ok(StartOutcome::Streaming),
            Backend::Msg(Message::NoticeResponse(_))
            | Backend::Msg(Message::ParameterStatus(_)) => {}
            Backend::Msg(m @ Message::ErrorResponse(_))
            | Backend::Msg(m @ Message::RowDescription(_)) => {
                let sets = conn.read_results_from(Some(m)).await?;
                return end_of_timeline(sets);
            }
            Backend::Msg(_) => {
                return Err(proto("unexpected message in answer to START_REPLICATION"))
            }
        }
    }
}

/// Parses the result set that follows a finished timeline (`next_tli`, `next_tli_startpos`).
fn end_of_timeline(sets: Vec<ResultSet>) -> Result<StartOutcome, PgError> {
    let rs = single_row(sets, "end-of-timeline result", 2)?;
    Ok(StartOutcome::TimelineEnded {
        next_tli: text_field(&rs, 0, "next_tli")?,
        switch: text_field(&rs, 1, "next_tli_startpos")?,
    })
}

/// After the server's CopyDone: answer with ours and read the next timeline and switch point.
pub async fn finish_copy(conn: &mut Connection) -> Result<StartOutcome, PgError> {
    frontend::copy_done(conn.write_buf());
    conn.flush().await?;
    let sets = conn.read_results().await?;
    end_of_timeline(sets)
}

/// A message of the CopyBoth stream.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `'w'`: WAL data starting at `start`; `server_end` is the server's current end of WAL.
    XLogData {
        start: Lsn,
        server_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// `'k'`: primary keepalive.
    Keepalive {
        server_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// Decodes the payload of one CopyData message of a physical replication stream.
pub fn decode_copy_data(mut b: Bytes) -> Result<ReplicationMessage, PgError> {
    if b.is_empty() {
        return Err(proto("empty CopyData in replication stream"));
    }
    match b.get_u8() {
        b'w' => {
            if b.len() < 24 {
                return Err(proto("XLogData message too short"));
            }
            let start = Lsn(b.get_u64());
            let server_end = Lsn(b.get_u64());
            let send_time = b.get_i64();
            Ok(ReplicationMessage::XLogData {
                start,
                server_end,
                send_time,
                data: b,
            })
        }
        b'k' => {
            if b.len() != 17 {
                return Err(proto("keepalive message has the wrong length"));
            }
            Ok(ReplicationMessage::Keepalive {
                server_end: Lsn(b.get_u64()),
                send_time: b.get_i64(),
                reply_requested: b.get_u8() != 0,
            })
        }
        t => Err(proto(format!(
            "unknown replication message type {:?}",
            t as char
        ))),
    }
}

/// What the CopyBoth stream delivered, for a receiver's loop.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    Message(ReplicationMessage),
    /// The server's CopyDone: the timeline ended (see [`finish_copy`]).
    End,
}

/// Classifies one backend message of the CopyBoth stream: `None` for a notice (logged),
/// the server's error as [`PgError::Server`], anything unexpected as a protocol error.
pub fn stream_event(msg: Backend) -> Result<Option<StreamEvent>, PgError> {
    match msg {
        Backend::Msg(Message::CopyData(body)) => Ok(Some(StreamEvent::Message(decode_copy_data(
            body.into_bytes(),
        )?))),
        Backend::Msg(Message::CopyDone) => Ok(Some(StreamEvent::End)),
        Backend::Msg(Message::ErrorResponse(body)) => {
            Err(PgError::Server(parse_error_fields(&mut body.fields())))
        }
        Backend::Msg(Message::NoticeResponse(body)) => {
            let n = parse_error_fields(&mut body.fields());
            tracing::info!(code = %n.code, "server notice: {}", n.message);
            Ok(None)
        }
        // A walsender that shuts down with everything sent and acknowledged ends the COPY
        // with CommandComplete alone, no CopyDone (walsender.c, WalSndDone): the server is
        // going away, which is transient, not a protocol violation.
        Backend::Msg(Message::CommandComplete(_)) => {
            tracing::info!("the server ended the replication stream (it is shutting down)");
            Err(PgError::Closed)
        }
        _ => Err(proto("unexpected message in the replication stream")),
    }
}

/// Sends a standby status update now: `write` received, `flush` durable (the server may
/// release WAL before it), no apply position.
pub async fn send_status(
    conn: &mut Connection,
    write: Lsn,
    flush: Lsn,
    reply_requested: bool,
) -> Result<(), PgError> {
    encode_status_update(
        conn.write_buf(),
        write,
        flush,
        Lsn::INVALID,
        crate::time::pg_now(),
        reply_requested,
    );
    conn.flush().await?;
    tracing::debug!(%write, %flush, "status update sent");
    Ok(())
}

/// Queues a standby status update (`'r'`) in a CopyData message. Positions are "last byte + 1".
pub fn encode_status_update(
    buf: &mut BytesMut,
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: i64,
    reply_requested: bool,
) {
    buf.put_u8(b'd');
    buf.put_u32(4 + 1 + 8 * 4 + 1);
    buf.put_u8(b'r');
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(now);
    buf.put_u8(reply_requested as u8);
}

/// Decodes a frontend CopyData carrying a status update.
#[cfg(test)]
fn decode_status_update(b: &[u8]) -> Option<(Lsn, Lsn, Lsn, i64, bool)> {
    let mut b = b;
    if b.len() != 39 || b.get_u8() != b'd' || b.get_u32() != 38 || b.get_u8() != b'r' {
        return None;
    }
    Some((
        Lsn(b.get_u64()),
        Lsn(b.get_u64()),
        Lsn(b.get_u64()),
        b.get_i64(),
        b.get_u8() != 0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_xlogdata_and_keepalive() {
        let mut m = BytesMut::new();
        m.put_u8(b'w');
        m.put_u64(0x0100_0000);
        m.put_u64(0x0200_0000);
        m.put_i64(42);
        m.put_slice(b"walbytes");
        assert_eq!(
            decode_copy_data(m.freeze()).unwrap(),
            ReplicationMessage::XLogData {
                start: Lsn(0x0100_0000),
                server_end: Lsn(0x0200_0000),
                send_time: 42,
                data: Bytes::from_static(b"walbytes")
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(7);
        k.put_i64(-1);
        k.put_u8(1);
        assert_eq!(
            decode_copy_data(k.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                server_end: Lsn(7),
                send_time: -1,
                reply_requested: true
            }
        );
    }

    #[test]
    fn rejects_bad_copy_data() {
        assert!(decode_copy_data(Bytes::new()).is_err());
        assert!(decode_copy_data(Bytes::from_static(b"w123")).is_err());
        assert!(decode_copy_data(Bytes::from_static(b"k1")).is_err());
        assert!(decode_copy_data(Bytes::from_static(b"x")).is_err());
    }

    #[test]
    fn status_update_layout() {
        let mut b = BytesMut::new();
        encode_status_update(&mut b, Lsn(3), Lsn(2), Lsn(1), 99, true);
        assert_eq!(b.len(), 39);
        assert_eq!(
            decode_status_update(&b),
            Some((Lsn(3), Lsn(2), Lsn(1), 99, true))
        );
    }

    #[test]
    fn guc_sizes_and_slot_names() {
        assert_eq!(parse_guc_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_guc_bytes("1GB"), Some(1 << 30));
        assert_eq!(parse_guc_bytes("8kB"), Some(8192));
        assert_eq!(parse_guc_bytes("12 parsecs"), None);
        assert!(validate_slot_name("archiver_1").is_ok());
        assert!(validate_slot_name("Bad-Name").is_err());
        assert!(validate_slot_name("").is_err());
        assert!(validate_slot_name(&"a".repeat(64)).is_err());
    }
}
