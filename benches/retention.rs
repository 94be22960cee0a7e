//! The retention planner at scale: a synthetic catalog of 10,000 backups (one an hour for
//! 14 months) and 1,000,000 WAL segments, under the policy users asked for (30 days rolling,
//! monthly for 12 months, quarterly for 7 years) plus hourlies. Target: under 1 s.
//!
//! `cargo bench --bench retention`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

use archiver::{
    plan_retention, BackupRecord, BackupStatus, Lsn, RetentionPolicy, SegmentName, Timestamp,
    WalObject,
};

const SEG: u64 = 16 << 20;
const BACKUPS: u64 = 10_000;
const SEGMENTS: u64 = 1_000_000;

fn catalog(now: Timestamp) -> Vec<BackupRecord> {
    (0..BACKUPS)
        .map(|i| {
            let start = now - Duration::from_secs((BACKUPS - i) * 3600);
            let segno = i * (SEGMENTS / BACKUPS);
            BackupRecord {
                id: format!("b{i:05}"),
                label: String::new(),
                status: BackupStatus::Complete,
                start_lsn: Lsn(segno * SEG + 0x28),
                stop_lsn: Some(Lsn(segno * SEG + 0x100)),
                timeline: 1,
                start_time: start,
                stop_time: Some(start + Duration::from_secs(60)),
                pg_version: 170000,
                system_identifier: "1".into(),
                size_bytes: 1 << 30,
                stored_bytes: 1 << 28,
                objects: vec![],
                tablespaces: vec![],
                backup_label: None,
                archiver_version: "bench".into(),
                error: None,
                drills: vec![],
                verified: None,
                contents: None,
                environment: None,
                parent: None,
            }
        })
        .collect()
}

fn wal() -> Vec<(WalObject, String, u64)> {
    (0..SEGMENTS)
        .map(|segno| {
            let s = SegmentName {
                tli: 1,
                segno,
                seg_size: SEG,
            };
            (
                WalObject::Segment(s),
                format!("wal/00000001/{s}.zst"),
                4 << 20,
            )
        })
        .collect()
}

fn planner(c: &mut Criterion) {
    let now = Timestamp::now();
    let backups = catalog(now);
    let wal = wal();
    let policy = RetentionPolicy {
        keep_within: Some(Duration::from_secs(30 * 86400)),
        keep_hourly: 48,
        keep_monthly: 12,
        keep_quarterly: 28,
        failed_grace: Duration::from_secs(86400),
        ..RetentionPolicy::default()
    };
    let mut g = c.benchmark_group("retention");
    g.sample_size(10);
    g.bench_function("plan 10k backups, 1M segments", |b| {
        b.iter(|| {
            let p = plan_retention(&backups, &wal, &[], &policy, now, SEG).unwrap();
            assert!(!p.wal.is_empty());
            p
        })
    });
    g.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
