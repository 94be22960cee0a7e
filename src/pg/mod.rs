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
