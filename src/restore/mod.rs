//! Point-in-time restore: from the repository to a PostgreSQL data directory that recovers to
//! exactly the requested point.
//!
//! `target` parses what the operator asks for, `plan` decides (a pure function of the catalog
//! and the WAL inventory) which backup and WAL serve it or why nothing can, `extract` writes the
//! backup's archives verifying every byte, `recovery` writes the settings PostgreSQL needs, and
//! `run` puts them together with the repository's I/O (the calls commands and the daemon make).
//! Invariants: nothing is written before the plan holds and the destination is checked empty;
//! every object is checked against its checksums and every file against the backup manifest;
//! a failed restore removes what it wrote.

pub(crate) mod binaries;
pub mod combine;
pub mod drill;
pub mod events;
pub mod extract;
pub mod info;
pub mod locate;
pub mod plan;
pub mod recovery;
pub mod run;
pub mod target;
pub mod verify;
pub mod wal_fetch;
