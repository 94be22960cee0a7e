//! WAL vocabulary: LSNs, segment file names, timeline history files, page-header checks, record
//! decoding, positions on a timeline and the identity of the cluster that writes the WAL.
//!
//! Everything here is pure (no I/O) so it can be unit-tested exhaustively; the names and
//! layouts follow PostgreSQL's `src/include/access/xlog_internal.h` and `xlogdefs.h`.

pub mod cluster;
pub mod index;
pub mod lsn;
pub mod page;
pub mod record;
pub mod segment;
#[doc(hidden)]
pub mod synth;
pub mod timeline;

pub use lsn::Lsn;
pub use segment::{SegmentName, TimeLineId};

/// A WAL position on a timeline, ordered by position first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WalPoint {
    pub tli: TimeLineId,
    pub lsn: Lsn,
}

impl WalPoint {
    /// The ordering key: position, then timeline.
    pub fn key(&self) -> (Lsn, TimeLineId) {
        (self.lsn, self.tli)
    }
}
