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

impl ServerInfo {
    /// The major version (`server_version_num / 10000`).
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }
}
