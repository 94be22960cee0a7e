//! The WAL record reader against a real server's WAL: commits, aborts and restore points are
//! found with their xids and names, across pages, full-page images and segment switches.

mod common;

use archiver::Lsn;
use archiver::{RecordReader, WalEvent as Event};
use common::*;

const CONF: &str = "wal_keep_size = '1GB'\nmax_prepared_transactions = 5\n";

#[test]
fn finds_commits_aborts_and_restore_points_in_real_wal() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", CONF, "");
    pg.start();
    read_real_wal(&pg, 15);
}

/// The oldest and newest supported majors' WAL (their record formats differ in details).
#[test]
fn reads_postgresql_13_and_18_wal() {
    for major in [13, 18] {
        let Some(bin) = pg_bin_of_major(major) else {
            eprintln!("skipped: no PostgreSQL {major} binaries (scripts/test.sh fetches them)");
            continue;
        };
        let dir = TestDir::new();
        let mut pg = Pg::create_with_bin(&dir, "pg", CONF, &bin);
        pg.start();
        read_real_wal(&pg, major);
    }
}

fn read_real_wal(pg: &Pg, major: u32) {
    let first = pg.psql("select pg_walfile_name(pg_current_wal_insert_lsn())");
    pg.psql("create table t (id int, v text)");
    // Full-page images (records larger than a page) and enough WAL to cross segments.
    pg.psql("checkpoint");
    pg.psql("insert into t select g, repeat('x', 500) from generate_series(1, 40000) g");
    pg.psql("checkpoint");
    pg.psql("update t set v = repeat('y', 500) where id % 7 = 0");
    let out = pg.psql("begin; insert into t values (-1, 'c'); select txid_current(); commit;");
    let committed: u64 = out.lines().find_map(|l| l.parse().ok()).unwrap();
    let out = pg.psql("begin; insert into t values (-2, 'a'); select txid_current(); rollback;");
    let aborted: u64 = out.lines().find_map(|l| l.parse().ok()).unwrap();
    // A drop in a transaction with a subtransaction, and a truncate: each commit names the
    // relation files it removes.
    pg.psql("create table dropped (x int); create table truncated (x int); insert into truncated values (1)");
    let db: u32 = pg
        .psql("select oid from pg_database where datname = current_database()")
        .parse()
        .unwrap();
    let file_of = |t: &str| -> u32 {
        pg.psql(&format!("select pg_relation_filenode('{t}')"))
            .parse()
            .unwrap()
    };
    let (dropped_file, truncated_file) = (file_of("dropped"), file_of("truncated"));
    let out = pg.psql(
        "begin; savepoint s; insert into t values (-4, 'sub'); release s; drop table dropped;          select txid_current(); commit;",
    );
    let drop_xid: u64 = out.lines().find_map(|l| l.parse().ok()).unwrap();
    let out = pg.psql("begin; truncate truncated; select txid_current(); commit;");
    let truncate_xid: u64 = out.lines().find_map(|l| l.parse().ok()).unwrap();
    let new_truncated_file = file_of("truncated");
    // VACUUM cuts the empty tail of a table: an SMGR truncate record.
    pg.psql("create table shrunk (x int) with (autovacuum_enabled = off)");
    pg.psql("insert into shrunk select generate_series(1, 20000)");
    pg.psql("delete from shrunk where x > 100");
    let shrunk_file = file_of("shrunk");
    pg.psql("vacuum shrunk");
    pg.psql("checkpoint");
    // Two-phase commit: COMMIT PREPARED and ROLLBACK PREPARED end the prepared transaction's
    // xid (with its dropped relation and statistics in between, on 15+).
    pg.psql("create table dropped2 (x int); insert into dropped2 values (1)");
    let dropped2_file = file_of("dropped2");
    let prepared = |sql: &str, name: &str| -> u64 {
        let out = pg.psql(&format!(
            "begin; {sql}; select txid_current(); prepare transaction '{name}';"
        ));
        out.lines().find_map(|l| l.parse().ok()).unwrap()
    };
    let p_commit = prepared("drop table dropped2", "p1");
    pg.psql("commit prepared 'p1'");
    let p_abort = prepared("insert into t values (-5, 'p')", "p2");
    pg.psql("rollback prepared 'p2'");
    pg.psql("create database dropme");
    let dropme: u32 = pg
        .psql("select oid from pg_database where datname = 'dropme'")
        .parse()
        .unwrap();
    pg.psql("drop database dropme"); // (with checkpoints of its own)
    let next_xid: u64 = pg.psql("select txid_current()").parse().unwrap();
    let rp_lsn: Lsn = pg
        .psql("select pg_create_restore_point('the_point')")
        .parse()
        .unwrap();
    pg.psql("select pg_switch_wal()");
    pg.psql("insert into t values (-3, 'after the switch')");
    let last = pg.psql("select pg_walfile_name(pg_current_wal_insert_lsn())");

    let seg_size = 16u64 << 20;
    let mut names: Vec<String> = std::fs::read_dir(pg.wal_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && *n >= first && *n <= last)
        .collect();
    names.sort();
    assert!(names.len() >= 3, "{names:?}");
    let mut reader = RecordReader::new(seg_size, major);
    let mut events = Vec::new();
    for n in &names {
        let seg = archiver::SegmentName::parse(n, seg_size).unwrap();
        let bytes = std::fs::read(pg.wal_dir().join(n)).unwrap();
        reader
            .feed_segment(seg.start_lsn(), &bytes, &mut |e| events.push(e))
            .unwrap();
    }
    // One byte flipped inside a record (the restore point's name): its CRC-32C refuses it.
    let seg = archiver::SegmentName::containing(1, rp_lsn, seg_size);
    let mut bytes = std::fs::read(pg.wal_dir().join(seg.to_string())).unwrap();
    let at = (rp_lsn.0 - seg.start_lsn().0) as usize;
    let name_at = bytes[..at]
        .windows(9)
        .rposition(|w| w == b"the_point")
        .expect("the restore point's name in its segment");
    bytes[name_at] ^= 0x20;
    let mut reader = RecordReader::new(seg_size, major);
    match reader.feed_segment(seg.start_lsn(), &bytes, &mut |_| {}) {
        Err(archiver::RecordError::Crc { at, .. }) => {
            assert!(at < rp_lsn && rp_lsn.0 - at.0 < 200, "the record at {at}")
        }
        other => panic!("a flipped byte was not refused: {other:?}"),
    }
    let commit = events.iter().find(
        |e| matches!(e, Event::XactEnd { xid, committed: true, .. } if *xid as u64 == committed),
    );
    assert!(
        commit.is_some(),
        "commit of {committed} not found among {} events",
        events.len()
    );
    let abort = events.iter().find(
        |e| matches!(e, Event::XactEnd { xid, committed: false, .. } if *xid as u64 == aborted),
    );
    assert!(abort.is_some(), "abort of {aborted} not found");
    let dropped_by = |x: u64| -> Vec<archiver::RelFile> {
        events
            .iter()
            .find_map(|e| match e {
                Event::XactEnd {
                    xid,
                    committed: true,
                    dropped,
                    ..
                } if *xid as u64 == x => Some(dropped.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no commit of {x}"))
    };
    for (xid, file, what) in [
        (drop_xid, dropped_file, "drop table"),
        (truncate_xid, truncated_file, "truncate"),
    ] {
        let files = dropped_by(xid);
        assert!(
            files
                .iter()
                .any(|f| f.db == db && f.rel == file && f.spc == 1663),
            "{what}: {file} in database {db} not among {files:?}"
        );
    }
    assert!(dropped_by(committed).is_empty());
    match events
        .iter()
        .find(|e| matches!(e, Event::RestorePoint { .. }))
    {
        Some(Event::RestorePoint {
            name,
            end,
            time,
            start,
        }) => {
            assert!(start < end);
            assert_eq!(name, "the_point");
            assert_eq!(*end, rp_lsn, "the record ends where the server said");
            // The record's time is when the test made it (PostgreSQL's epoch read right).
            let age = archiver::Timestamp::now().duration_since(*time).as_secs();
            assert!((0..600).contains(&age), "restore point made {age} s ago");
        }
        other => panic!("no restore point: {other:?}"),
    }
    // The truncate created the table's new file, in the same transaction when it had one.
    let created = events.iter().find_map(|e| match e {
        Event::FileCreated { file, xid, .. } if file.rel == new_truncated_file => Some(*xid),
        _ => None,
    });
    match created {
        Some(x) => assert!(x == 0 || x as u64 == truncate_xid, "created by {x}"),
        None => panic!("no creation of {new_truncated_file}"),
    }
    let cut = events.iter().find_map(|e| match e {
        Event::FileTruncated { file, blocks, .. } if file.rel == shrunk_file => Some(*blocks),
        _ => None,
    });
    assert!(
        matches!(cut, Some(b) if (1..20).contains(&b)),
        "vacuum's truncation: {cut:?}"
    );
    // Checkpoints: the redo point precedes the record, the time is now, the next xid is past
    // every xid the test saw; running-xacts snapshots bound the transactions.
    let checkpoints: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Checkpoint {
                redo,
                time,
                next_xid: nx,
                shutdown,
                start,
                ..
            } => Some((*redo, *time, *nx, *shutdown, *start)),
            _ => None,
        })
        .collect();
    // (The cluster's own start may have left a shutdown checkpoint at the beginning.)
    let online = checkpoints.iter().filter(|c| !c.3).count();
    assert!(online >= 3, "{checkpoints:?}");
    for (redo, time, nx, _, start) in &checkpoints {
        assert!(redo <= start, "{checkpoints:?}");
        let age = archiver::Timestamp::now().duration_since(*time).as_secs();
        assert!((0..600).contains(&age), "checkpoint of {age} s ago");
        assert!(*nx & 0xFFFF_FFFF <= next_xid);
    }
    let (_, _, last_nx, _, _) = checkpoints.last().unwrap();
    assert!(
        *last_nx & 0xFFFF_FFFF > truncate_xid,
        "{last_nx} after {truncate_xid}"
    );
    let running: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::RunningXacts {
                next_xid,
                oldest_running,
                ..
            } => Some((*next_xid, *oldest_running)),
            _ => None,
        })
        .collect();
    assert!(running.len() >= 3, "{running:?}");
    assert!(running.iter().all(|(n, o)| o <= n));
    assert!(running.windows(2).all(|w| w[0].0 <= w[1].0));
    let ended = |x: u64| {
        events.iter().find_map(|e| match e {
            Event::XactEnd {
                xid,
                committed,
                dropped,
                ..
            } if *xid as u64 == x => Some((*committed, dropped.clone())),
            _ => None,
        })
    };
    let (committed2, files2) = ended(p_commit).expect("COMMIT PREPARED of the prepared xid");
    assert!(committed2);
    assert!(files2.iter().any(|f| f.rel == dropped2_file), "{files2:?}");
    assert_eq!(
        ended(p_abort).map(|e| e.0),
        Some(false),
        "ROLLBACK PREPARED"
    );
    // DROP DATABASE: its record names the database, after the in-place update marking it
    // invalid (a shared catalog's row).
    let (drop_start, invalidated) = events
        .iter()
        .find_map(|e| match e {
            Event::DatabaseDropped {
                db,
                start,
                invalidated,
                ..
            } if *db == dropme => Some((*start, *invalidated)),
            _ => None,
        })
        .expect("the drop of the database");
    assert!(
        invalidated.is_some_and(|i| i < drop_start),
        "no invalidation before the drop: {invalidated:?}"
    );
    // Records come in WAL order, and one follows the switch.
    let starts: Vec<Lsn> = events.iter().map(|e| e.start()).collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]));
    assert!(*starts.last().unwrap() > rp_lsn);
}
