//! WAL vocabulary: LSNs, segment file names, timeline history files and page-header checks.
//!
//! Everything here is pure (no I/O) so it can be unit-tested exhaustively; the names and
//! layouts follow PostgreSQL's `src/include/access/xlog_internal.h` and `xlogdefs.h`.

pub mod lsn;
pub mod page;
pub mod record;
pub mod segment;
pub mod timeline;

pub use lsn::Lsn;
pub use segment::{SegmentName, TimeLineId};
