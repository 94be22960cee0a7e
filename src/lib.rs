//! archiver: a native PostgreSQL WAL-streaming continuous archiver.
//!
//! # Module map and layers
//!
//! Each module may use (`crate::…`) only modules of a *lower* rank; `tests/layers.rs` reads
//! this table and checks every `crate::` path in `src/` against it. The data path of a WAL byte
//! and of a restore, and where each invariant is enforced: `docs/architecture.md`.
//!
//! | rank | modules | what they own |
//! |------|---------|---------------|
//! | 0 | `time`, `retry`, `progress` | the one timestamp type and its conversions (PostgreSQL's epoch, operator input); the one retry helper and error chains; progress bars and lines |
//! | 1 | `wal` | WAL vocabulary (LSN, segment names, timelines, page and record decoding, cluster identity, positions) |
//! | 2 | `pg`, `storage`, `format` | our PostgreSQL client (conninfo, auth, TLS, replication commands); the object-store trait, its backends (fs, S3, encryption, tiers, retries) and the private/durable file helpers; the tar stream and backup manifest formats |
//! | 3 | `config`, `spool` | the tiered repository's configuration file; the local spool (the segment being received, segments awaiting publication, the durable-prefix record) |
//! | 4 | `repo` | the repository: layout, object format and verification, catalog, gaps and slots, lock, local WAL reads |
//! | 5 | `stream`, `upload`, `retention` | the WAL receiver (sessions, the segment assembler, publishing, gaps); shipping the hot tier to remote tiers (uploader, partial segments, eviction, background tasks); retention (the pure planner and `expire`) |
//! | 6 | `basebackup`, `open` | base backups (protocol, storing, their WAL, their life in the catalog); opening a repository from where it is (directory, S3, tiered) |
//! | 7 | `restore`, `check` | planning, writing, dry runs, drills, `wal-fetch` and `verify`; the pre-flight checks |
//! | 8 | `daemon` | `archiver run`: supervision of the stream, uploader and scheduled jobs; metrics, health, alerts |
//! | 9 | `commands` | one file per CLI command: arguments, the call into the library, output, exit code |

pub(crate) mod basebackup;
pub(crate) mod check;
pub(crate) mod commands;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod format;
pub(crate) mod open;
pub(crate) mod pg;
pub(crate) mod progress;
pub(crate) mod repo;
pub(crate) mod restore;
pub(crate) mod retention;
pub(crate) mod retry;
pub(crate) mod spool;
pub(crate) mod storage;
pub(crate) mod stream;
pub(crate) mod time;
pub(crate) mod upload;
pub(crate) mod wal;

// The public API, in one list: what the binary, the benches and the integration tests use.
// Everything else is `pub(crate)`; the sidecar daemon lives in this crate.
pub use basebackup::protocol::{BaseBackupOptions, Checkpoint};
pub use basebackup::run::{base_backup, BackupError, BackupSink};
pub use commands::main;
pub use format::manifest::{ChecksumAlgorithm, FileDigests, Manifest, ManifestError};
pub use format::tar::TarReader;
pub use pg::conninfo::{ConnInfo, ProcessEnv};
pub use pg::replication::{decode_copy_data, identify_system, ReplicationMessage};
pub use pg::Connection;
pub use repo::catalog::{BackupRecord, BackupStatus, Tablespace};
pub use repo::layout::WalObject;
pub use repo::lock::RepoLock;
pub use repo::object::{decode_bytes, encode as encode_object, encode_contiguous, ObjectKind};
pub use repo::Repo;
#[doc(hidden)]
pub use restore::events::all_drops;
pub use restore::locate::Located;
pub use restore::recovery::TargetAction;
pub use restore::run::{make_plan, TargetSpec};
pub use restore::target::{Target, TimelineChoice};
pub use retention::plan::{plan as plan_retention, Policy as RetentionPolicy};
pub use spool::Spool;
#[cfg(feature = "test-utils")]
pub use storage::conformance;
pub use storage::encrypted::{Encrypted, MasterKey};
pub use storage::fs::FsStorage;
pub use storage::s3::{S3Options, S3Storage, PART_SIZE};
pub use storage::tiered::RemoteTier;
pub use storage::Storage;
pub use time::Timestamp;
pub use upload::upload_object;
pub use wal::cluster::{ServerInfo, SystemInfo};
pub use wal::index::{Indexer, SegmentIndex};
pub use wal::page::{synthetic_wal, PageValidator};
pub use wal::record::{Event as WalEvent, RecordError, RecordReader, RelFile};
#[doc(hidden)]
pub use wal::synth;
pub use wal::{Lsn, SegmentName};
