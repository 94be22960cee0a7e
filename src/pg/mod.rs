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
