//! Errors of the PostgreSQL client, classified transient (retry may help) or permanent.

use std::fmt;

/// A server `ErrorResponse` / `NoticeResponse`, with its SQLSTATE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SQLSTATE {}): {}",
            self.severity, self.code, self.message
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; HINT: {h}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("could not connect to {target}: {cause}")]
    Connect {
        target: String,
        cause: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    ConnectTimeout(String),
    #[error("I/O error on the server connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection unexpectedly")]
    Closed,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("server error: {0}")]
    Server(ServerError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl PgError {
    /// True when trying again later may succeed (network trouble, server starting or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. }
            | PgError::ConnectTimeout(_)
            | PgError::Io(_)
            | PgError::Closed => true,
            PgError::Server(e) => {
                e.code.starts_with("08") // connection exception
                    || e.code == "53300" // too_many_connections (no free wal senders)
                    || e.code == "57P01" // admin_shutdown
                    || e.code == "57P02" // crash_shutdown
                    || e.code == "57P03" // cannot_connect_now
            }
            PgError::Tls(_) | PgError::Auth(_) | PgError::Protocol(_) => false,
        }
    }

    /// What to do about a failed replication connection, when the SQLSTATE says.
    pub fn connect_hint(&self) -> Option<&'static str> {
        match self.sqlstate()? {
            "53300" => Some(
                "no free WAL sender: raise max_wal_senders (wal_level must be replica or logical)",
            ),
            "42501" => Some("the user needs the REPLICATION attribute (ALTER ROLE … REPLICATION)"),
            "28000" => Some("check pg_hba.conf: a `host replication` line must allow this user"),
            _ => None,
        }
    }

    /// The SQLSTATE, for server errors.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}
