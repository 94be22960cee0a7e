//! Pre-flight checks (`archiver check`): everything archiver needs of the server and of the
//! repository, each with the value found and what is needed — before an operator relies on it.
//!
//! The verdicts are pure functions of the values read ([`verdicts`]), unit-tested; the I/O
//! gathers those values over a replication connection, an ordinary SQL connection and the
//! repository's storage. Nothing is changed, except one probe object written to and removed
//! from each tier to prove it writable.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::open::RepoLocation;
use crate::pg::conninfo::ConnInfo;
use crate::pg::Connection;
use crate::repo::Repo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What archiver needs.
    pub needed: String,
}

fn check(name: &str, status: Status, found: impl Into<String>, needed: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        found: found.into(),
        needed: needed.into(),
    }
}

/// The values the verdicts are made from (what the server and the repository said).
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub major: u32,
    pub rolreplication: Option<bool>,
    pub wal_level: String,
    pub max_wal_senders: u32,
    pub walsenders_used: u32,
    pub max_replication_slots: u32,
    pub slots_used: u32,
    /// Our slot: exists, and the WAL it holds back (bytes).
    pub slot: Option<u64>,
    /// `max_slot_wal_keep_size` in bytes (`None`: -1, unlimited).
    pub max_slot_wal_keep: Option<u64>,
    pub database_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    /// Server clock minus ours, in seconds.
    pub clock_skew_s: Option<f64>,
}

/// Turns the facts into one verdict per check.
pub fn verdicts(f: &Facts, slot_name: &str) -> Vec<Check> {
    use Status::*;
    let mut out = Vec::new();
    let supported = &crate::wal::cluster::SUPPORTED_MAJORS;
    let needed = format!("{} to {}", supported.start(), supported.end());
    out.push(if supported.contains(&f.major) {
        check("server version", Ok, f.major.to_string(), needed)
    } else {
        check("server version", Failed, f.major.to_string(), needed)
    });
    out.push(match f.rolreplication {
        Some(true) => check(
            "REPLICATION privilege",
            Ok,
            "yes",
            "the REPLICATION attribute",
        ),
        Some(false) => check(
            "REPLICATION privilege",
            Failed,
            "no",
            "the REPLICATION attribute (ALTER ROLE … REPLICATION)",
        ),
        None => check(
            "REPLICATION privilege",
            Warning,
            "unknown (no SQL connection)",
            "the REPLICATION attribute",
        ),
    });
    out.push(match f.wal_level.as_str() {
        "replica" | "logical" => check("wal_level", Ok, &f.wal_level, "replica or logical"),
        l => check(
            "wal_level",
            Failed,
            l,
            "replica or logical (a restart is needed)",
        ),
    });
    let free_senders = f.max_wal_senders.saturating_sub(f.walsenders_used);
    out.push(check(
        "free WAL senders",
        match free_senders {
            0 => Failed,
            1 => Warning,
            _ => Ok,
        },
        format!("{free_senders} of max_wal_senders = {}", f.max_wal_senders),
        "2 (the stream and a backup at once)",
    ));
    let free_slots = f.max_replication_slots.saturating_sub(f.slots_used);
    out.push(check(
        "replication slot",
        match (f.slot, free_slots) {
            (Some(_), _) => Ok,
            (None, 0) => Failed,
            (None, _) => Ok,
        },
        match f.slot {
            Some(_) => format!("\"{slot_name}\" exists"),
            None => format!(
                "\"{slot_name}\" absent; {free_slots} free of max_replication_slots = {}",
                f.max_replication_slots
            ),
        },
        "the slot, or a free one for `archiver stream` to create",
    ));
    if let Some(held) = f.slot {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        out.push(match f.max_slot_wal_keep {
            None => check(
                "WAL held by the slot",
                Warning,
                format!("{} (max_slot_wal_keep_size = -1: unbounded)", gib(held)),
                "a bound (max_slot_wal_keep_size), so a stopped archiver cannot fill the server's disk",
            ),
            Some(max) if held > max / 2 => check(
                "WAL held by the slot",
                if held >= max { Failed } else { Warning },
                format!("{} of max_slot_wal_keep_size = {}", gib(held), gib(max)),
                "well under max_slot_wal_keep_size: past it the server drops the WAL and the archive has a gap",
            ),
            Some(max) => check(
                "WAL held by the slot",
                Ok,
                format!("{} of max_slot_wal_keep_size = {}", gib(held), gib(max)),
                "under max_slot_wal_keep_size",
            ),
        });
    }
    out.push(match (f.database_bytes, f.free_bytes) {
        (Some(db), Some(free)) => check(
            "free disk",
            if free >= 2 * db { Ok } else { Failed },
            format!("{} free, databases {}", human(free), human(db)),
            format!("at least {} (twice the databases)", human(2 * db)),
        ),
        (None, _) => check(
            "free disk",
            Warning,
            "database size unknown (no SQL connection)",
            "twice the databases' size",
        ),
        (_, None) => check(
            "free disk",
            Ok,
            "not on a local file system (S3)",
            "twice the databases' size",
        ),
    });
    out.push(match f.clock_skew_s {
        Some(s) if s.abs() <= 5.0 => check(
            "clock skew",
            Ok,
            format!("{s:+.1} s"),
            "within 5 s of the server",
        ),
        Some(s) if s.abs() <= 60.0 => check(
            "clock skew",
            Warning,
            format!("{s:+.1} s"),
            "within 5 s of the server (target times and ages are read against both clocks)",
        ),
        Some(s) => check(
            "clock skew",
            Failed,
            format!("{s:+.1} s"),
            "within 60 s of the server",
        ),
        None => check(
            "clock skew",
            Warning,
            "unknown (no SQL connection)",
            "within 5 s of the server",
        ),
    });
    out
}

fn human(b: u64) -> String {
    format!("{:.1} GB", b as f64 / 1e9)
}

/// Runs every check. The replication connection gives the server's identity, version and
/// `wal_level`; an ordinary SQL connection everything else (and those again, when replication
/// is refused, so a `wal_level = minimal` server still says why). Without SQL, the checks that
/// need it say they could not run.
pub async fn run(ci: &ConnInfo, location: &RepoLocation, slot_name: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let mut f = Facts::default();
    let needed = "a replication connection (pg_hba.conf `replication` line, REPLICATION role)";
    let mut identity = None;
    let repl = async {
        let mut c = Connection::connect(ci, Some("true"), "archiver check").await?;
        let server = crate::pg::replication::server_info(&mut c).await;
        let wal_level = crate::pg::replication::show(&mut c, "wal_level").await;
        c.close().await;
        Ok::<_, crate::pg::PgError>((server?, wal_level?))
    };
    match repl.await {
        Ok((s, wal_level)) => {
            out.push(check(
                "replication connection",
                Status::Ok,
                "connected",
                needed,
            ));
            identity = Some(s.system.system_identifier);
            f.major = s.major();
            f.wal_level = wal_level;
        }
        Err(e) => out.push(check(
            "replication connection",
            Status::Failed,
            crate::retry::error_chain(&e),
            needed,
        )),
    }
    // Everything else over SQL.
    match Connection::connect(ci, None, "archiver check").await {
        Ok(mut c) => {
            let q = format!(
                "select (select rolreplication from pg_roles where rolname = current_user), \
                 current_setting('max_wal_senders')::int, \
                 (select count(*) from pg_stat_replication), \
                 current_setting('max_replication_slots')::int, \
                 (select count(*) from pg_replication_slots), \
                 (select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint from pg_replication_slots where slot_name = '{}'), \
                 (select exists (select 1 from pg_replication_slots where slot_name = '{}')), \
                 pg_size_bytes(current_setting('max_slot_wal_keep_size')), \
                 (select sum(pg_database_size(oid))::bigint from pg_database), \
                 extract(epoch from clock_timestamp()), \
                 current_setting('server_version_num')::int, \
                 current_setting('wal_level')",
                slot_name.replace('\'', "''"),
                slot_name.replace('\'', "''"),
            );
            let now = crate::time::now();
            match c.simple_query(&q).await {
                Ok(sets) => {
                    let col = |i: usize| sets.first().and_then(|s| s.text(0, i));
                    f.rolreplication = col(0).map(|v| v == "t");
                    f.max_wal_senders = col(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                    f.walsenders_used = col(2).and_then(|v| v.parse().ok()).unwrap_or(0);
                    f.max_replication_slots = col(3).and_then(|v| v.parse().ok()).unwrap_or(0);
                    f.slots_used = col(4).and_then(|v| v.parse().ok()).unwrap_or(0);
                    f.slot = (col(6) == Some("t")).then(|| col(5).and_then(|v| v.parse().ok()).unwrap_or(0));
                    f.max_slot_wal_keep = col(7).and_then(|v| v.parse::<i64>().ok()).filter(|v| *v >= 0).map(|v| v as u64);
                    f.database_bytes = col(8).and_then(|v| v.parse().ok());
                    f.major = col(10).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0) / 10000;
                    f.wal_level = col(11).unwrap_or_default().to_string();
                    f.clock_skew_s = col(9).and_then(|v| v.parse::<f64>().ok()).map(|server| {
                        server - now.as_microsecond() as f64 / 1e6
                    });
                }
                Err(e) => out.push(check("SQL queries", Status::Failed, crate::retry::error_chain(&e), "read access to pg_roles, pg_stat_replication, pg_replication_slots, pg_database")),
            }
            c.close().await;
        }
        Err(e) => out.push(check(
            "SQL connection",
            Status::Warning,
            crate::retry::error_chain(&e),
            "an ordinary connection (dbname in the conninfo) for the checks that need SQL",
        )),
    }
    f.free_bytes = match location {
        RepoLocation::S3 { .. } => None,
        _ => location
            .local_dir("check")
            .ok()
            .and_then(|d| crate::storage::fs::free_bytes(&d)),
    };
    out.extend(verdicts(&f, slot_name));
    out.extend(repository_checks(location, identity).await);
    out
}

/// The repository: the cluster it belongs to, and each tier reachable and writable.
async fn repository_checks(location: &RepoLocation, identity: Option<u64>) -> Vec<Check> {
    let mut out = Vec::new();
    let tiers = match location.each_tier().await {
        Ok(t) => t,
        Err(e) => {
            out.push(check(
                "repository",
                Status::Failed,
                crate::retry::error_chain(&e),
                "reachable storage",
            ));
            return out;
        }
    };
    let probe = format!("check-probe-{}", std::process::id());
    for (name, storage) in &tiers {
        let written = async {
            storage
                .put(&probe, Bytes::from_static(b"archiver check\n"))
                .await?;
            let back = storage.get(&probe).await?;
            storage.delete(&probe).await?;
            Ok::<_, crate::storage::StorageError>(back.as_ref() == b"archiver check\n")
        };
        out.push(
            match tokio::time::timeout(Duration::from_secs(60), written).await {
                Ok(Ok(true)) => check(
                    &format!("{name} writable"),
                    Status::Ok,
                    "wrote, read back and removed a probe object",
                    "write access",
                ),
                Ok(Ok(false)) => check(
                    &format!("{name} writable"),
                    Status::Failed,
                    "the probe object read back differs",
                    "storage that returns what was written",
                ),
                Ok(Err(e)) => check(
                    &format!("{name} writable"),
                    Status::Failed,
                    crate::retry::error_chain(&e),
                    "write access",
                ),
                Err(_) => check(
                    &format!("{name} writable"),
                    Status::Failed,
                    "no answer within 60 s",
                    "reachable storage",
                ),
            },
        );
    }
    let (_, first) = &tiers[0];
    out.push(match (Repo::read_meta(first.as_ref()).await, identity) {
        (Ok(Some(meta)), Some(id)) if meta.system_identifier == id.to_string() => check(
            "system identifier",
            Status::Ok,
            id.to_string(),
            "the repository's",
        ),
        (Ok(Some(meta)), Some(id)) => check(
            "system identifier",
            Status::Failed,
            id.to_string(),
            format!(
                "the repository's, {} (another cluster's repository)",
                meta.system_identifier
            ),
        ),
        (Ok(None), _) => check(
            "system identifier",
            Status::Ok,
            "a new repository",
            "none yet: the first stream or backup sets it",
        ),
        (Ok(Some(_)), None) => check(
            "system identifier",
            Status::Warning,
            "unknown (IDENTIFY_SYSTEM failed)",
            "the repository's",
        ),
        (Err(e), _) => check(
            "system identifier",
            Status::Failed,
            crate::retry::error_chain(&e),
            "a readable repository.json",
        ),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Facts {
        Facts {
            major: 15,
            rolreplication: Some(true),
            wal_level: "replica".into(),
            max_wal_senders: 10,
            walsenders_used: 1,
            max_replication_slots: 10,
            slots_used: 0,
            slot: None,
            max_slot_wal_keep: Some(10 << 30),
            database_bytes: Some(1 << 30),
            free_bytes: Some(100 << 30),
            clock_skew_s: Some(0.2),
        }
    }

    fn status(f: &Facts, name: &str) -> Status {
        verdicts(f, "archiver")
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
            .status
    }

    #[test]
    fn a_healthy_server_passes_every_check() {
        let v = verdicts(&healthy(), "archiver");
        assert!(v.iter().all(|c| c.status == Status::Ok), "{v:#?}");
    }

    #[test]
    fn each_problem_is_its_own_verdict() {
        let with = |change: fn(&mut Facts)| {
            let mut f = healthy();
            change(&mut f);
            f
        };
        assert_eq!(
            status(&with(|f| f.major = 12), "server version"),
            Status::Failed
        );
        assert_eq!(
            status(&with(|f| f.wal_level = "minimal".into()), "wal_level"),
            Status::Failed
        );
        assert_eq!(
            status(
                &with(|f| f.rolreplication = Some(false)),
                "REPLICATION privilege"
            ),
            Status::Failed
        );
        assert_eq!(
            status(&with(|f| f.walsenders_used = 10), "free WAL senders"),
            Status::Failed
        );
        assert_eq!(
            status(&with(|f| f.walsenders_used = 9), "free WAL senders"),
            Status::Warning
        );
        assert_eq!(
            status(&with(|f| f.slots_used = 10), "replication slot"),
            Status::Failed
        );
        // Our own slot exists: no free one needed; what it holds is weighed.
        let f = with(|f| {
            f.slots_used = 10;
            f.slot = Some(6 << 30);
        });
        assert_eq!(status(&f, "replication slot"), Status::Ok);
        assert_eq!(status(&f, "WAL held by the slot"), Status::Warning);
        let f = with(|f| {
            f.slot = Some(1 << 20);
            f.max_slot_wal_keep = None;
        });
        assert_eq!(status(&f, "WAL held by the slot"), Status::Warning);
        assert_eq!(
            status(&with(|f| f.free_bytes = Some(1 << 30)), "free disk"),
            Status::Failed
        );
        assert_eq!(
            status(&with(|f| f.clock_skew_s = Some(-30.0)), "clock skew"),
            Status::Warning
        );
        assert_eq!(
            status(&with(|f| f.clock_skew_s = Some(300.0)), "clock skew"),
            Status::Failed
        );
    }
}
