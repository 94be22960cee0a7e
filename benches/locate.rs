//! Locating restore targets in a large archive through the WAL index: a simulated archive of
//! 6,400 segments (100 GiB of WAL; LOCATE_SEGMENTS to change) with 25,000 transactions each
//! (the density pgbench produces; LOCATE_XACTS), one running-transactions snapshot per
//! segment and a restore point every 1,000 segments, in a local repository with one backup at
//! its start. The segment objects are placeholders (the search never reads WAL that has an
//! index); the index objects are real. Times `make_plan` — listing, search and plan — for a
//! time, a transaction and a restore-point target. Target: under 1 s each.
//!
//! `cargo bench --bench locate`

use std::sync::Arc;
use std::time::{Duration, Instant};

use archiver::{
    make_plan, BackupRecord, BackupStatus, FsStorage, Lsn, Repo, SegmentIndex, SegmentName,
    ServerInfo, Storage, SystemInfo, Target, TargetAction, TargetSpec, TimelineChoice, Timestamp,
};

const SEG: u64 = 16 << 20;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The index of segment `k`: its transactions 40 µs apart, xids consecutive.
fn index(k: u64, xacts: u64, t0_us: i64, first_seg: u64) -> SegmentIndex {
    let seg = SegmentName::new(1, first_seg + k, SEG);
    let mut ix = SegmentIndex::new(&seg);
    let base = seg.start_lsn().0;
    let step = (SEG - 8192) / (xacts + 2);
    for i in 0..xacts {
        let n = k * xacts + i;
        let start = Lsn(base + 64 + i * step);
        ix.add(archiver::WalEvent::XactEnd {
            xid: 1000 + n as u32,
            committed: true,
            time: Timestamp::from_microsecond(t0_us + n as i64 * 40).unwrap(),
            start,
            end: Lsn(start.0 + 40),
            dropped: vec![],
        });
    }
    let next = 1000 + ((k + 1) * xacts) as u32;
    ix.add(archiver::WalEvent::RunningXacts {
        next_xid: next,
        oldest_running: next.saturating_sub(50),
        start: Lsn(base + SEG - 4096),
        end: Lsn(base + SEG - 4000),
    });
    if k % 1000 == 700 {
        // A table dropped (the commit of the segment's last transaction removes its file).
        let last = ix.xacts.len() - 1;
        let x = ix.xacts.get(last);
        ix.xacts.xid.pop();
        ix.xacts.time.pop();
        ix.xacts.start.pop();
        ix.xacts.end.pop();
        ix.add(archiver::WalEvent::XactEnd {
            xid: x.xid,
            committed: true,
            time: x.time,
            start: x.start,
            end: x.end,
            dropped: vec![archiver::RelFile {
                spc: 1663,
                db: 5,
                rel: 16384 + k as u32,
            }],
        });
    }
    if k % 1000 == 500 {
        ix.add(archiver::WalEvent::RestorePoint {
            name: format!("rp-{k}"),
            time: Timestamp::from_microsecond(t0_us + (k * xacts) as i64 * 40).unwrap(),
            start: Lsn(base + SEG - 2048),
            end: Lsn(base + SEG - 1980),
        });
    }
    ix
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let segments = env("LOCATE_SEGMENTS", 6400);
    let xacts = env("LOCATE_XACTS", 25_000);
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    let server = ServerInfo {
        system: SystemInfo {
            system_identifier: 7_000_000_000_000_000_001,
            timeline: 1,
            xlogpos: Lsn(0),
        },
        version_num: 160004,
        wal_segment_size: SEG,
    };
    let repo = Repo::open_or_init(storage.clone(), "bench", &server)
        .await
        .unwrap();
    let first_seg = 2u64;
    let t0_us = Timestamp::now().as_microsecond() - 86_400_000_000;
    let t0 = Instant::now();
    let mut stored = 0u64;
    for k in 0..segments {
        let seg = SegmentName::new(1, first_seg + k, SEG);
        storage
            .put(
                &format!("wal/00000001/{seg}.zst"),
                bytes::Bytes::from_static(b"placeholder"),
            )
            .await
            .unwrap();
        let ix = index(k, xacts, t0_us, first_seg);
        repo.put_segment_index(&seg, &ix).await.unwrap();
        stored += ix.encode().len() as u64;
    }
    let start = SegmentName::new(1, first_seg, SEG).start_lsn();
    let rec: BackupRecord = serde_json::from_value(serde_json::json!({
        "id": "b1", "label": "", "status": "complete",
        "start_lsn": Lsn(start.0 + 40).to_string(), "stop_lsn": Lsn(start.0 + 4096).to_string(),
        "timeline": 1,
        "start_time": Timestamp::from_microsecond(t0_us - 1_000_000).unwrap(),
        "stop_time": Timestamp::from_microsecond(t0_us).unwrap(),
        "pg_version": 160004, "system_identifier": "7000000000000000001",
        "size_bytes": 0, "stored_bytes": 0, "objects": [], "tablespaces": [],
        "backup_label": null, "archiver_version": "bench", "error": null
    }))
    .unwrap();
    assert_eq!(rec.status, BackupStatus::Complete);
    repo.put_backup(&rec).await.unwrap();
    println!(
        "simulated archive: {segments} segments ({} GiB of WAL), {xacts} transactions each, index {} MB raw, built in {:.1} s",
        (segments * SEG) >> 30,
        stored >> 20,
        t0.elapsed().as_secs_f64()
    );
    let total = segments * xacts;
    let at = |n: u64| Timestamp::from_microsecond(t0_us + n as i64 * 40 + 20).unwrap();
    let mut cases = vec![
        ("time, 1/3 in", Target::Time(at(total / 3))),
        ("time, near the end", Target::Time(at(total - 1000))),
        ("xid, 2/3 in", Target::Xid(1000 + total * 2 / 3)),
    ];
    if segments > 500 {
        let k = (segments - 501) / 1000 * 1000 + 500;
        cases.push(("restore point, last", Target::Name(format!("rp-{k}"))));
    }
    println!(
        "{:<22} {:>10} {:>14} {:>12}",
        "target", "seconds", "index_reads", "wal_decoded"
    );
    for (what, target) in cases {
        let spec = TargetSpec {
            target,
            timeline: TimelineChoice::Latest,
            action: TargetAction::Promote,
            exclusive: false,
            backup: None,
        };
        let mut best = Duration::MAX;
        let mut reads = (0, 0);
        for _ in 0..3 {
            let t = Instant::now();
            let (plan, _) = make_plan(&repo, &spec).await.unwrap();
            best = best.min(t.elapsed());
            let l = plan.located.expect("located");
            assert!(l.last_applied.is_some() && l.first_not_applied.is_some());
            reads = (l.index_objects_read, l.wal_segments_decoded);
        }
        println!(
            "{:<22} {:>10.3} {:>14} {:>12}",
            what,
            best.as_secs_f64(),
            reads.0,
            reads.1
        );
    }
    // --before-drop's search: every drop on the chain.
    let t = Instant::now();
    let drops = archiver::all_drops(&repo, None).await.unwrap().tables;
    let want = if segments > 700 {
        (segments - 701) / 1000 + 1
    } else {
        0
    };
    assert_eq!(drops.len() as u64, want);
    println!(
        "{:<22} {:>10.3} {:>14} {:>12}",
        "every drop (before-drop)",
        t.elapsed().as_secs_f64(),
        drops.len(),
        "-"
    );
}
