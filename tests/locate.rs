//! Locating restore targets, table-tested on an archive of synthetic WAL made of real records
//! (no server needed): segments written as objects, indexed by `archiver reindex`, then every
//! kind of target found through the index and, with some indexes removed, through the WAL —
//! with the same answers.

mod common;

use std::sync::Arc;

use archiver::synth::{lay_out, pgbench_like, restore_point, SynthRecord};
use archiver::{
    make_plan, BackupRecord, FsStorage, Lsn, Repo, SegmentName, ServerInfo, Storage, SystemInfo,
    Target, TargetAction, TargetSpec, TimelineChoice, Timestamp,
};
use common::*;

const SEG: u64 = 1 << 20;
const SEGMENTS: u64 = 12;
const FIRST_XID: u32 = 5000;
/// PostgreSQL time of the first commit (µs since 2000-01-01); commits are 1 ms apart.
const PG_T0: i64 = 800_000_000_000_000;
const PG_EPOCH_US: i64 = 946_684_800_000_000;

fn commit_time(n: u64) -> Timestamp {
    Timestamp::from_microsecond(PG_EPOCH_US + PG_T0 + n as i64 * 1000).unwrap()
}

/// Records per 1,000 transactions of `pgbench_like` (4 each, 2 more every 500th).
const PER_1000: usize = 4004;

fn records() -> impl Iterator<Item = SynthRecord> {
    // Restore points among pgbench-like transactions (xid FIRST_XID + n commits at n ms):
    // "one" after transaction 999 and again after 3999, "two" after 1999.
    let run =
        |from: u32, n: usize| pgbench_like(FIRST_XID + from, PG_T0 + from as i64 * 1000).take(n);
    let rp = |name: &str, after: i64| restore_point(name, PG_T0 + after * 1000 + 500);
    run(0, PER_1000)
        .chain([rp("one", 999)])
        .chain(run(1000, PER_1000))
        .chain([rp("two", 1999)])
        .chain(run(2000, 2 * PER_1000))
        .chain([rp("one", 3999)])
        .chain(pgbench_like(FIRST_XID + 4000, PG_T0 + 4000 * 1000))
}

struct Archive {
    dir: TestDir,
    repo: Repo,
    r: String,
}

async fn archive() -> Archive {
    let dir = TestDir::new();
    let path = dir.join("repo");
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(&path));
    let server = ServerInfo {
        system: SystemInfo {
            system_identifier: 42,
            timeline: 1,
            xlogpos: Lsn(0),
        },
        version_num: 160004,
        wal_segment_size: SEG,
    };
    let repo = Repo::open_or_init(storage.clone(), "t", &server)
        .await
        .unwrap();
    let start = Lsn(SEG);
    let (wal, _) = lay_out(
        start,
        (SEG * SEGMENTS) as usize,
        1,
        42,
        SEG,
        0xD113,
        records(),
    );
    for k in 0..SEGMENTS {
        let seg = SegmentName::new(1, 1 + k, SEG);
        let raw = &wal[(k * SEG) as usize..((k + 1) * SEG) as usize];
        let mut obj = Vec::new();
        archiver::encode_object(raw, &mut obj, archiver::ObjectKind::WalSegment, 1).unwrap();
        storage
            .put(&format!("wal/00000001/{seg}.zst"), obj.into())
            .await
            .unwrap();
    }
    let rec: BackupRecord = serde_json::from_value(serde_json::json!({
        "id": "b1", "label": "", "status": "complete",
        "start_lsn": Lsn(SEG + 40).to_string(), "stop_lsn": Lsn(SEG + 64).to_string(),
        "timeline": 1,
        "start_time": commit_time(0).checked_sub(jiff::SignedDuration::from_secs(2)).unwrap(),
        "stop_time": commit_time(0).checked_sub(jiff::SignedDuration::from_secs(1)).unwrap(),
        "pg_version": 160004, "system_identifier": "42",
        "size_bytes": 0, "stored_bytes": 0, "objects": [], "tablespaces": [],
        "backup_label": null, "archiver_version": "test", "error": null
    }))
    .unwrap();
    repo.put_backup(&rec).await.unwrap();
    let r = path.to_str().unwrap().to_string();
    Archive { dir, repo, r }
}

async fn locate(repo: &Repo, target: Target, exclusive: bool) -> Result<archiver::Located, String> {
    let spec = TargetSpec {
        target,
        timeline: TimelineChoice::Latest,
        action: TargetAction::Promote,
        exclusive,
        backup: None,
    };
    make_plan(repo, &spec)
        .await
        .map(|(p, _)| p.located.expect("located"))
        .map_err(|e| format!("{e:#}: {}", archiver_error_chain(&e)))
}

fn archiver_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s += &format!(": {x}");
        c = x.source();
    }
    s
}

/// (last applied, first not applied) xids.
fn around(l: &archiver::Located) -> (Option<u32>, Option<u32>) {
    (
        l.last_applied.map(|x| x.xid),
        l.first_not_applied.map(|x| x.xid),
    )
}

async fn table(a: &Archive, with_index: bool) {
    let x = |n: u32| Some(FIRST_XID + n);
    let half_ms = jiff::SignedDuration::from_micros(500);
    type Case = (Target, bool, (Option<u32>, Option<u32>));
    let cases: Vec<Case> = vec![
        // A time between two commits: the earlier applied, the later not (either way).
        (
            Target::Time(commit_time(10) + half_ms),
            false,
            (x(10), x(11)),
        ),
        (
            Target::Time(commit_time(3000) + half_ms),
            true,
            (x(3000), x(3001)),
        ),
        // Exactly a commit's time: inclusive applies it, exclusive stops before it.
        (Target::Time(commit_time(4321)), false, (x(4321), x(4322))),
        (Target::Time(commit_time(4321)), true, (x(4320), x(4321))),
        // Before the first commit: nothing applied.
        (Target::Time(commit_time(0) - half_ms), false, (None, x(0))),
        // A transaction: inclusive applies it, exclusive stops before it.
        (
            Target::Xid((FIRST_XID + 7777) as u64),
            false,
            (x(7777), x(7778)),
        ),
        (
            Target::Xid((FIRST_XID + 7777) as u64),
            true,
            (x(7776), x(7777)),
        ),
        (Target::Xid((FIRST_XID + 1) as u64), false, (x(1), x(2))),
        // A restore point: the transactions on either side; a name used twice: the first.
        (Target::Name("one".into()), false, (x(999), x(1000))),
        (Target::Name("two".into()), false, (x(1999), x(2000))),
    ];
    for (target, exclusive, want) in cases {
        let l = locate(&a.repo, target.clone(), exclusive)
            .await
            .unwrap_or_else(|e| panic!("{target:?}: {e}"));
        assert_eq!(around(&l), want, "{target:?} exclusive={exclusive}: {l:?}");
        if with_index {
            assert_eq!(l.wal_segments_decoded, 0, "{target:?}: {l:?}");
            assert!(l.index_objects_read <= 12, "{target:?}: {l:?}");
        } else {
            assert!(l.wal_segments_decoded >= 1, "{target:?}: {l:?}");
        }
    }
    // Not in the archive: refused, after reading only where the snapshots say it could be.
    let e = locate(&a.repo, Target::Xid(3), false).await.unwrap_err();
    assert!(e.contains("not in the archived WAL"), "{e}");
    let e = locate(&a.repo, Target::Name("three".into()), false)
        .await
        .unwrap_err();
    assert!(e.contains("not in the archived WAL"), "{e}");
    // A time after the last commit: no transaction stops recovery there.
    let e = locate(&a.repo, Target::Time(commit_time(10_000_000)), false)
        .await
        .unwrap_err();
    assert!(e.contains("lies beyond the archive"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_found_through_the_index_and_without_it() {
    let a = archive().await;
    // Without any index: decoded from the WAL.
    table(&a, false).await;
    let out = archiver_ok(&["reindex", "--repo", &a.r, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["indexed"], SEGMENTS);
    assert_eq!(r["restore_points"], 3);
    table(&a, true).await;
    // A few indexes gone (the middle of the archive): the same answers.
    for k in [4u64, 5, 9] {
        let seg = SegmentName::new(1, 1 + k, SEG);
        std::fs::remove_file(a.dir.join(&format!("repo/index/00000001/{seg}.zst"))).unwrap();
    }
    let l = locate(&a.repo, Target::Xid((FIRST_XID + 7777) as u64), false)
        .await
        .unwrap();
    assert_eq!(around(&l), (Some(FIRST_XID + 7777), Some(FIRST_XID + 7778)));
}
