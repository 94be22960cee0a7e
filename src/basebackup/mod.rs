//! Base backups over the replication protocol (`BASE_BACKUP`).
//!
//! This module owns the command and the decoding of its COPY stream; storing archives and the
//! catalog entry build on it. Invariant: nothing here buffers a whole archive — the decoder
//! yields chunks as they arrive.

pub mod contents;
pub mod lifecycle;
pub mod protocol;
pub mod run;
pub mod store;
pub mod wal;
