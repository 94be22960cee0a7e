//! PostgreSQL's file formats that backups are made of and restores read: the tar stream of
//! `BASE_BACKUP` ([`tar`], a sans-IO reader fed chunks as they arrive) and the backup manifest
//! ([`manifest`]: parsing, and checking each file's size and checksum as it streams by).
//! Pure: no I/O, no knowledge of the repository. Used by `basebackup` and `restore` alike.

pub mod manifest;
pub mod tar;
