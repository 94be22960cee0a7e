//! What happened, from the WAL index: commits per interval, restore points, and every relation
//! dropped, truncated or rewritten — named through the relation-name snapshots
//! (`repo::relmap`). The timeline `archiver events` prints and `restore --before-drop` picks
//! its target from.
//!
//! A committed transaction that removed a relation's file either dropped the relation or gave
//! it a new file (TRUNCATE, VACUUM FULL, CLUSTER, a rewriting ALTER TABLE). It is called a
//! truncate or rewrite when the same transaction created a file in that database
//! (`XLOG_SMGR_CREATE` with its xid) or a later snapshot still lists the relation's OID; a drop
//! otherwise.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use super::locate::ChainIndex;
use super::run::{inventory, longest_chain, RestoreError};
use super::target::TimelineChoice;
use crate::repo::local_wal::WalSource;
use crate::repo::relmap::{name_of, RelMap};
use crate::repo::Repo;
use crate::time::Timestamp;
use crate::wal::index::{DatabaseDrop, DropEntry, RestorePointEntry, SegmentIndex};
use crate::wal::record::RelFile;
use crate::wal::{Lsn, SegmentName};

#[derive(Clone, Debug)]
pub struct EventsQuery {
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    /// Only relation events of this database.
    pub database: Option<String>,
    /// Width of the commit-count buckets.
    pub interval: std::time::Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    pub start: Timestamp,
    pub commits: u64,
    pub aborts: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelChange {
    Dropped,
    TruncatedOrRewritten,
}

/// A relation whose file a committed transaction removed.
#[derive(Clone, Debug, Serialize)]
pub struct RelEvent {
    pub change: RelChange,
    /// `schema.table`, when a snapshot names the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_oid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    pub file: RelFile,
    pub xid: u32,
    pub time: Timestamp,
    /// Where the commit record starts and ends.
    pub start: Lsn,
    pub end: Lsn,
}

impl RelEvent {
    pub fn describe(&self) -> String {
        format!(
            "{} {} (database {}) by transaction {} at {} (WAL {})",
            match self.change {
                RelChange::Dropped => "DROP",
                RelChange::TruncatedOrRewritten => "TRUNCATE/rewrite",
            },
            self.table.clone().unwrap_or_else(|| format!(
                "relation file {}/{}/{} (no name snapshot holds it)",
                self.file.spc, self.file.db, self.file.rel
            )),
            self.database
                .clone()
                .unwrap_or_else(|| self.file.db.to_string()),
            self.xid,
            self.time,
            self.start
        )
    }
}

/// A database dropped (`DROP DATABASE`).
#[derive(Clone, Debug, Serialize)]
pub struct DatabaseEvent {
    /// Its name, when a snapshot taken before the drop knew it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    pub oid: u32,
    pub xid: u32,
    /// Where the drop record starts.
    pub start: Lsn,
    /// Where the database was marked invalid, first (recovery to before the drop stops there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidated: Option<Lsn>,
    /// The dropping transaction's commit (time, end), when it ends in the same segment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<crate::wal::index::XactRef>,
}

impl DatabaseEvent {
    pub fn describe(&self) -> String {
        format!(
            "DROP DATABASE {} by transaction {}{} (WAL {})",
            self.database
                .clone()
                .unwrap_or_else(|| format!("with OID {} (no name snapshot holds it)", self.oid)),
            self.xid,
            self.commit
                .map(|c| format!(" at {}", c.time))
                .unwrap_or_default(),
            self.start
        )
    }

    fn of(d: &DatabaseDrop, maps: &[RelMap]) -> DatabaseEvent {
        DatabaseEvent {
            database: maps
                .iter()
                .rev()
                .filter(|m| m.lsn <= d.start)
                .find_map(|m| m.database(d.db))
                .map(|db| db.name.clone()),
            oid: d.db,
            xid: d.xid,
            start: d.start,
            invalidated: d.invalidated,
            commit: d.commit,
        }
    }
}

/// Every drop in the archive: tables (dropped, truncated, rewritten) and databases.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Drops {
    pub tables: Vec<RelEvent>,
    pub databases: Vec<DatabaseEvent>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventsReport {
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub commits: u64,
    pub aborts: u64,
    pub buckets: Vec<Bucket>,
    pub restore_points: Vec<RestorePointEntry>,
    pub relations: Vec<RelEvent>,
    pub databases: Vec<DatabaseEvent>,
    pub segments_read: usize,
    pub index_objects_read: usize,
    pub wal_segments_decoded: usize,
}

/// The WAL from the oldest backup on, along the newest timeline; without a backup, the
/// complete segments of the newest timeline.
async fn chain_segments(repo: &Repo) -> Result<Vec<(SegmentName, WalSource)>, RestoreError> {
    let backups = repo.list_backups().await?;
    let inv = inventory(repo).await?;
    let seg_size = repo.seg_size();
    let segs: Vec<(SegmentName, WalSource)> =
        match longest_chain(&backups, &inv, TimelineChoice::Latest, seg_size) {
            Some(chain) => chain
                .segments
                .iter()
                .map(|s| (s.segment(seg_size), s.source))
                .collect(),
            None => {
                let mut all = repo.complete_segments().await?;
                let newest = all.iter().map(|s| s.tli).max().unwrap_or(1);
                all.retain(|s| s.tli == newest);
                all.sort();
                all.into_iter().map(|s| (s, WalSource::Object)).collect()
            }
        };
    if segs.is_empty() {
        return Err(RestoreError::Refused(
            "the repository holds no archived WAL yet".into(),
        ));
    }
    Ok(segs)
}

/// The events of the archive's longest chain between `q.from` and `q.to`.
pub async fn events(repo: &Repo, q: &EventsQuery) -> Result<EventsReport, RestoreError> {
    let segs = chain_segments(repo).await?;
    let mut ix = ChainIndex::new(repo, segs).await?;
    let maps = repo.relmaps().await?;
    let in_range = |t: Timestamp| q.from.is_none_or(|f| t >= f) && q.to.is_none_or(|e| t <= e);
    let has_xacts: fn(&SegmentIndex) -> bool = |i| !i.xacts.is_empty();
    // The first segment with a commit at or after `from` (one earlier: times are nearly in
    // order), through the first whose every commit is after `to`.
    let first = match q.from {
        Some(f) => {
            let b = ix
                .first_where(has_xacts, |i| i.xacts.max_time().is_some_and(|m| m >= f))
                .await?;
            b.saturating_sub(1)
        }
        None => 0,
    };
    let step = q.interval.as_micros().max(1) as i64;
    let mut buckets: BTreeMap<i64, Bucket> = BTreeMap::new();
    let mut report = EventsReport {
        from: q.from,
        to: q.to,
        commits: 0,
        aborts: 0,
        buckets: Vec::new(),
        restore_points: Vec::new(),
        relations: Vec::new(),
        databases: Vec::new(),
        segments_read: 0,
        index_objects_read: 0,
        wal_segments_decoded: 0,
    };
    let mut created: HashSet<(u32, u32)> = HashSet::new(); // (xid, db)
    let mut drops = Vec::new();
    for k in first..ix.len() {
        let i = ix.get(k).await?;
        report.segments_read += 1;
        for c in &i.created {
            created.insert((c.xid, c.file.db));
        }
        for x in i.xacts.iter().filter(|x| in_range(x.time)) {
            let key = x.time.as_microsecond().div_euclid(step) * step;
            let b = buckets.entry(key).or_insert_with(|| Bucket {
                start: Timestamp::from_microsecond(key).unwrap_or(Timestamp::UNIX_EPOCH),
                commits: 0,
                aborts: 0,
            });
            if x.committed {
                b.commits += 1;
                report.commits += 1;
            } else {
                b.aborts += 1;
                report.aborts += 1;
            }
        }
        report.restore_points.extend(
            i.restore_points
                .iter()
                .filter(|p| in_range(p.time))
                .cloned(),
        );
        drops.extend(
            i.drops
                .iter()
                .filter(|d| d.committed && in_range(d.time))
                .cloned(),
        );
        report.databases.extend(
            i.databases_dropped
                .iter()
                .filter(|d| d.commit.is_none_or(|c| in_range(c.time)))
                .map(|d| DatabaseEvent::of(d, &maps)),
        );
        if let (Some(to), Some(min)) = (q.to, i.xacts.min_time()) {
            if min > to {
                break;
            }
        }
    }
    report.relations = classify(drops, &created, &maps, q.database.as_deref());
    report.buckets = buckets.into_values().collect();
    let (reads, decoded) = ix.reads();
    report.index_objects_read = reads;
    report.wal_segments_decoded = decoded;
    Ok(report)
}

/// Names and classifies the relation files removed by committed transactions `drops`
/// (`created`: (xid, database) of the files created by the same records' range).
fn classify(
    drops: Vec<DropEntry>,
    created: &HashSet<(u32, u32)>,
    maps: &[RelMap],
    database: Option<&str>,
) -> Vec<RelEvent> {
    let mut out = Vec::new();
    for d in drops {
        for f in &d.files {
            // Files of indexes, TOAST and the like have no entry: only tables are events.
            let Some((db, rel)) = name_of(maps, f, d.start) else {
                if maps
                    .iter()
                    .any(|m| m.lsn <= d.start && m.database(f.db).is_some())
                {
                    continue; // a snapshot knew the database but not this file: not a table
                }
                if database.is_none() {
                    out.push(rel_event(&d, f, None, RelChange::Dropped));
                }
                continue;
            };
            if database.is_some_and(|n| n != db.name) {
                continue;
            }
            let still_there = later_has_oid(maps, d.end, f.db, rel.oid);
            let change = if created.contains(&(d.xid, f.db)) || still_there {
                RelChange::TruncatedOrRewritten
            } else {
                RelChange::Dropped
            };
            let mut e = rel_event(&d, f, Some(rel.qualified()), change);
            e.table_oid = Some(rel.oid);
            e.database = Some(db.name.clone());
            out.push(e);
        }
    }
    out
}

/// Every committed drop, truncate and rewrite of a table on the chain (of `database`, when
/// given) and every database dropped: from the drops objects of indexed segments — found by
/// listing, so only segments that removed something are read — and the WAL of the others.
pub async fn all_drops(repo: &Repo, database: Option<&str>) -> Result<Drops, RestoreError> {
    let segs = chain_segments(repo).await?;
    let mut ix = ChainIndex::new(repo, segs).await?;
    let maps = repo.relmaps().await?;
    let (mut drops, mut created, mut databases) = (Vec::new(), HashSet::new(), Vec::new());
    for k in 0..ix.len() {
        if let Some(d) = ix.drops_of(k).await? {
            created.extend(d.created.iter().map(|c| (c.xid, c.file.db)));
            drops.extend(d.drops.into_iter().filter(|d| d.committed));
            databases.extend(d.databases.iter().map(|d| DatabaseEvent::of(d, &maps)));
        }
    }
    Ok(Drops {
        tables: classify(drops, &created, &maps, database),
        databases,
    })
}

fn rel_event(d: &DropEntry, f: &RelFile, table: Option<String>, change: RelChange) -> RelEvent {
    RelEvent {
        change,
        table,
        table_oid: None,
        database: None,
        file: *f,
        xid: d.xid,
        time: d.time,
        start: d.start,
        end: d.end,
    }
}

/// Whether a snapshot taken after `after` still lists relation `oid` of database `db`.
fn later_has_oid(maps: &[RelMap], after: Lsn, db: u32, oid: u32) -> bool {
    maps.iter()
        .filter(|m| m.lsn > after)
        .filter_map(|m| m.database(db))
        .any(|d| d.relations.iter().any(|r| r.oid == oid))
}

/// The newest drop or truncate of `table` (`schema.table`, or a bare name for `public`) in
/// `database` (any, when None), and the others, oldest first.
pub fn pick_drop<'e>(
    evs: &'e [RelEvent],
    table: &str,
    database: Option<&str>,
) -> Option<(&'e RelEvent, Vec<&'e RelEvent>)> {
    let want = if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    };
    let mut hits: Vec<&RelEvent> = evs
        .iter()
        .filter(|e| e.table.as_deref() == Some(want.as_str()))
        .filter(|e| database.is_none_or(|d| e.database.as_deref() == Some(d)))
        .collect();
    hits.sort_by_key(|e| e.end);
    let newest = hits.pop()?;
    Some((newest, hits))
}
