//! The identity of the cluster whose WAL is archived: what `IDENTIFY_SYSTEM` and the server's
//! settings say, read by `pg` and checked by `repo` (a repository holds one cluster's WAL).

use super::{Lsn, TimeLineId};

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Clone, Debug)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: TimeLineId,
    pub xlogpos: Lsn,
}

/// Server facts archiver depends on.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub system: SystemInfo,
    pub version_num: u32,
    pub wal_segment_size: u64,
}

/// The PostgreSQL majors archiver supports: the WAL page magic, record formats, replication
/// commands, `BASE_BACKUP` forms and recovery settings of each are known and tested.
pub const SUPPORTED_MAJORS: std::ops::RangeInclusive<u32> = 13..=18;

impl ServerInfo {
    /// The major version (`server_version_num / 10000`).
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }

    /// Refuses a major outside [`SUPPORTED_MAJORS`], saying which are supported.
    pub fn check_supported(&self) -> Result<(), String> {
        if SUPPORTED_MAJORS.contains(&self.major()) {
            return Ok(());
        }
        Err(format!(
            "PostgreSQL {} is not supported (archiver supports {} to {})",
            self.major(),
            SUPPORTED_MAJORS.start(),
            SUPPORTED_MAJORS.end()
        ))
    }
}
