//! Our own PostgreSQL client for physical replication: connection strings, startup,
//! authentication (trust, password, md5, SCRAM-SHA-256), TLS (rustls), the simple-query
//! protocol, replication commands and the CopyBoth sub-protocol.
//!
//! Built on `postgres-protocol` for message encoding/decoding and SCRAM; everything that is
//! replication-specific (CopyBoth, XLogData, keepalives, status updates) is decoded here.

pub mod conn;
pub mod conninfo;
pub mod error;
pub mod replication;
mod tls;

pub use conn::Connection;
pub use conninfo::ConnInfo;
pub use error::PgError;

/// The total size of the server's databases (`pg_database_size`), over an ordinary SQL
/// connection.
pub async fn database_bytes(ci: &ConnInfo) -> Result<u64, PgError> {
    let mut c = Connection::connect(ci, None, "archiver").await?;
    let sets = c
        .simple_query("select sum(pg_database_size(oid))::bigint from pg_database")
        .await;
    c.close().await;
    Ok(sets?
        .first()
        .and_then(|s| s.text(0, 0))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// The server's WAL summaries (`pg_available_wal_summaries()`, PostgreSQL 17+) as
/// (timeline, start, end), over an ordinary SQL connection.
pub async fn wal_summaries(
    ci: &ConnInfo,
) -> Result<Vec<(u32, crate::wal::Lsn, crate::wal::Lsn)>, PgError> {
    let mut c = Connection::connect(ci, None, "archiver").await?;
    let sets = c
        .simple_query("select tli, start_lsn, end_lsn from pg_available_wal_summaries()")
        .await;
    c.close().await;
    let sets = sets?;
    let mut out = Vec::new();
    if let Some(rs) = sets.first() {
        for i in 0..rs.rows.len() {
            let (Some(t), Some(s), Some(e)) = (rs.text(i, 0), rs.text(i, 1), rs.text(i, 2)) else {
                continue;
            };
            if let (Ok(t), Ok(s), Ok(e)) = (t.parse(), s.parse(), e.parse()) {
                out.push((t, s, e));
            }
        }
    }
    Ok(out)
}
