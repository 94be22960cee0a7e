//! Names for relation files: snapshots of each database's map relfilenode → schema.table
//! (with the relation's OID), taken over ordinary SQL connections at each backup and when a
//! stream starts, stored as `relmaps/<LSN>.zst` (the server's WAL position when the snapshot
//! was taken, so snapshots sort in WAL order).
//!
//! How names follow DDL: the WAL says which relation *files* a transaction created and removed
//! (`wal::index`), never their names. A file removed at LSN L is named by the newest snapshot
//! taken before L that holds it; a table truncated or rewritten after a snapshot gets a new
//! file, which the next snapshot names (a later drop of that file is then named too). A table
//! created and dropped between two snapshots stays a number, and says so.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::object::ObjectKind;
use super::{Repo, RepoError};
use crate::pg::conninfo::ConnInfo;
use crate::pg::{Connection, PgError};
use crate::time::Timestamp;
use crate::wal::record::RelFile;
use crate::wal::Lsn;

pub const RELMAP_PREFIX: &str = "relmaps/";

/// Tables and materialized views with storage, with their files' tablespace resolved.
const RELATIONS: &str = "select c.oid, pg_relation_filenode(c.oid), \
     case when c.reltablespace = 0 then d.dattablespace else c.reltablespace end, \
     n.nspname, c.relname, c.relkind::text \
     from pg_class c join pg_namespace n on n.oid = c.relnamespace \
     join pg_database d on d.datname = current_database() \
     where c.relkind in ('r', 'm') and pg_relation_filenode(c.oid) is not null";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub oid: u32,
    pub spc: u32,
    pub file: u32,
    pub schema: String,
    pub name: String,
    /// `r` table, `m` materialized view.
    pub kind: String,
}

impl Relation {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseRelations {
    pub oid: u32,
    pub name: String,
    pub relations: Vec<Relation>,
}

/// One snapshot of every database's relations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelMap {
    pub taken_at: Timestamp,
    /// `pg_current_wal_lsn()` before the databases were read.
    pub lsn: Lsn,
    pub databases: Vec<DatabaseRelations>,
}

impl RelMap {
    pub fn key(&self) -> String {
        format!("{RELMAP_PREFIX}{:016X}.zst", self.lsn.0)
    }

    /// The database and relation of `f`, if this snapshot holds it.
    pub fn find(&self, f: &RelFile) -> Option<(&DatabaseRelations, &Relation)> {
        let db = self.databases.iter().find(|d| d.oid == f.db)?;
        let r = db
            .relations
            .iter()
            .find(|r| r.file == f.rel && r.spc == f.spc)?;
        Some((db, r))
    }

    pub fn database(&self, oid: u32) -> Option<&DatabaseRelations> {
        self.databases.iter().find(|d| d.oid == oid)
    }
}

/// The name of `f` removed at `at`: from the newest snapshot taken before `at` that holds it.
pub fn name_of<'m>(
    maps: &'m [RelMap],
    f: &RelFile,
    at: Lsn,
) -> Option<(&'m DatabaseRelations, &'m Relation)> {
    maps.iter()
        .rev()
        .filter(|m| m.lsn <= at)
        .find_map(|m| m.find(f))
}

fn num(rs: &crate::pg::conn::ResultSet, row: usize, col: usize) -> u32 {
    rs.text(row, col).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Takes a snapshot over `ci` (one connection per database that allows connections). A
/// database that cannot be entered is left out, with a warning.
pub async fn take(ci: &ConnInfo, application_name: &str) -> Result<RelMap, PgError> {
    let mut c = Connection::connect(ci, None, application_name).await?;
    let head = c.simple_query("select pg_current_wal_lsn(), now()").await;
    let dbs = c
        .simple_query("select oid, datname from pg_database where datallowconn order by datname")
        .await;
    c.close().await;
    let head = head?;
    let lsn = head
        .first()
        .and_then(|s| s.text(0, 0))
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let mut map = RelMap {
        taken_at: crate::time::now(),
        lsn,
        databases: Vec::new(),
    };
    let dbs = dbs?;
    let Some(rows) = dbs.first() else {
        return Ok(map);
    };
    for row in 0..rows.rows.len() {
        let name = rows.text(row, 1).unwrap_or_default().to_string();
        let mut ci = ci.clone();
        ci.dbname = name.clone();
        let rels = async {
            let mut c = Connection::connect(&ci, None, application_name).await?;
            let r = c.simple_query(RELATIONS).await;
            c.close().await;
            r
        }
        .await;
        match rels {
            Ok(sets) => {
                let relations = sets
                    .first()
                    .map(|rs| {
                        (0..rs.rows.len())
                            .map(|i| Relation {
                                oid: num(rs, i, 0),
                                file: num(rs, i, 1),
                                spc: num(rs, i, 2),
                                schema: rs.text(i, 3).unwrap_or_default().to_string(),
                                name: rs.text(i, 4).unwrap_or_default().to_string(),
                                kind: rs.text(i, 5).unwrap_or_default().to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                map.databases.push(DatabaseRelations {
                    oid: num(rows, row, 0),
                    name,
                    relations,
                });
            }
            Err(e) => {
                warn!(database = %name, error = %e, "cannot read the database's relations; its files stay unnamed")
            }
        }
    }
    Ok(map)
}

impl Repo {
    pub async fn put_relmap(&self, m: &RelMap) -> Result<(), RepoError> {
        let raw = serde_json::to_vec(m).expect("serializes");
        self.put_raw(&m.key(), Bytes::from(raw), ObjectKind::Other, 3)
            .await?;
        Ok(())
    }

    /// Every snapshot, oldest first, verified.
    pub async fn relmaps(&self) -> Result<Vec<RelMap>, RepoError> {
        let mut keys: Vec<String> = self
            .storage()
            .list(RELMAP_PREFIX)
            .await?
            .into_iter()
            .map(|m| m.key)
            .filter(|k| k.ends_with(".zst"))
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            let (raw, _) = self.get_verified(&k).await?;
            out.push(
                serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt {
                    key: k.clone(),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }
}

/// Takes a snapshot and stores it unless it names exactly what `previous` did; failures are
/// warnings (names are a convenience, never a reason to fail a backup or a stream). Returns
/// the snapshot taken.
pub async fn snapshot_if_changed(
    repo: &Repo,
    ci: &ConnInfo,
    application_name: &str,
    previous: Option<&RelMap>,
) -> Option<RelMap> {
    match take(ci, application_name).await {
        Ok(m) => {
            if previous.is_some_and(|p| p.databases == m.databases) {
                return Some(m);
            }
            match repo.put_relmap(&m).await {
                Ok(()) => debug!(lsn = %m.lsn, "relation names stored"),
                Err(e) => warn!(error = %e, "cannot store the relation names"),
            }
            Some(m)
        }
        Err(e) => {
            warn!(error = %e, "cannot read relation names over SQL; dropped tables will be named by number");
            None
        }
    }
}

/// Takes a snapshot and stores it (a backup's).
pub async fn snapshot(repo: &Repo, ci: &ConnInfo, application_name: &str) {
    snapshot_if_changed(repo, ci, application_name, None).await;
}

/// The streamer's name keeper: a snapshot at once, then whenever `poke` is notified (the
/// index saw relation files created: a new table, or a truncate or rewrite giving one a new
/// file) — at most every `min_gap` — and at least every `every`; stored only when the names
/// changed. Runs until aborted; after a failed snapshot (no SQL access) only the periodic
/// attempts go on.
pub fn keep_names(
    repo: Repo,
    ci: ConnInfo,
    every: std::time::Duration,
    min_gap: std::time::Duration,
) -> (
    std::sync::Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<()>,
) {
    let poke = std::sync::Arc::new(tokio::sync::Notify::new());
    let p = poke.clone();
    let task = tokio::spawn(async move {
        let mut last: Option<RelMap> = None;
        loop {
            let taken = snapshot_if_changed(&repo, &ci, "archiver stream", last.as_ref()).await;
            let reachable = taken.is_some();
            if taken.is_some() {
                last = taken;
            }
            tokio::time::sleep(min_gap).await;
            if reachable {
                let _ = tokio::time::timeout(every.saturating_sub(min_gap), p.notified()).await;
            } else {
                tokio::time::sleep(every.saturating_sub(min_gap)).await;
            }
        }
    });
    (poke, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lsn: u64, rels: &[(u32, &str)]) -> RelMap {
        RelMap {
            taken_at: Timestamp::UNIX_EPOCH,
            lsn: Lsn(lsn),
            databases: vec![DatabaseRelations {
                oid: 5,
                name: "shop".into(),
                relations: rels
                    .iter()
                    .map(|(file, name)| Relation {
                        oid: 16000 + file % 100,
                        spc: 1663,
                        file: *file,
                        schema: "public".into(),
                        name: name.to_string(),
                        kind: "r".into(),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn names_follow_snapshots() {
        // orders had file 100; a truncate gave it 200, which the second snapshot saw.
        let maps = vec![map(10, &[(100, "orders")]), map(50, &[(200, "orders")])];
        let f = |rel| RelFile {
            spc: 1663,
            db: 5,
            rel,
        };
        assert_eq!(name_of(&maps, &f(100), Lsn(40)).unwrap().1.name, "orders");
        assert_eq!(name_of(&maps, &f(200), Lsn(60)).unwrap().1.name, "orders");
        // A file removed before the snapshot that would name it: unnamed.
        assert!(name_of(&maps, &f(200), Lsn(40)).is_none());
        // Another database or tablespace: not this one.
        assert!(name_of(&maps, &RelFile { db: 6, ..f(100) }, Lsn(40)).is_none());
        assert!(name_of(
            &maps,
            &RelFile {
                spc: 1700,
                ..f(100)
            },
            Lsn(40)
        )
        .is_none());
        assert_eq!(maps[0].key(), "relmaps/000000000000000A.zst");
    }
}
