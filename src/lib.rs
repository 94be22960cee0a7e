//! archiver: a native PostgreSQL WAL-streaming continuous archiver.
//!
//! Module map: `pg` (our replication-protocol client), `wal` (LSNs, segment names, timelines,
//! page checks), `storage` (the object-store trait and its backends: filesystem, S3, encryption,
//! tiers), `repo` (repository layout, object format, lock), `stream` (the WAL receiver),
//! `basebackup`, `restore`, `upload` (shipping the hot tier to remote tiers, partial segments,
//! hot-tier retention), `config` (the tiered repository's configuration file), `progress` (bars
//! and progress lines), `commands` (one file per CLI command).

pub mod basebackup;
pub mod commands;
pub mod config;
pub mod pg;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod retry;
pub mod storage;
pub mod stream;
pub mod upload;
pub mod wal;
