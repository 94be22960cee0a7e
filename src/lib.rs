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
//! | 2 | `pg`, `storage` | our PostgreSQL client (conninfo, auth, TLS, replication commands); the object-store trait, its backends (fs, S3, encryption, tiers, retries) and the private/durable file helpers |
//! | 3 | `config`, `spool` | the tiered repository's configuration file; the local spool (the segment being received, segments awaiting publication, the durable-prefix record) |
//! | 4 | `repo` | the repository: layout, object format and verification, catalog, gaps and slots, lock, local WAL reads |
//! | 5 | `stream`, `upload` | the WAL receiver (sessions, the segment assembler, publishing, gaps); shipping the hot tier to remote tiers (uploader, partial segments, eviction, background tasks) |
//! | 6 | `basebackup`, `open` | base backups (protocol, storing, their WAL, their life in the catalog); opening a repository from where it is (directory, S3, tiered) |
//! | 7 | `restore` | planning, writing, dry runs, drills and `wal-fetch` |
//! | 8 | `commands` | one file per CLI command: arguments, the call into the library, output, exit code |

pub mod basebackup;
pub mod commands;
pub mod config;
pub mod open;
pub mod pg;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod retry;
pub mod spool;
pub mod storage;
pub mod stream;
pub mod time;
pub mod upload;
pub mod wal;
