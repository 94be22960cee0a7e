//! `archiver list` / `archiver info` over a repository's catalog.

mod common;

use std::sync::Arc;

use archiver::FsStorage;
use archiver::Lsn;
use archiver::Repo;
use archiver::{BackupRecord, BackupStatus, Tablespace};
use archiver::{ServerInfo, SystemInfo};
use common::*;

fn record(id: &str, start: &str, status: BackupStatus) -> BackupRecord {
    BackupRecord {
        id: id.into(),
        label: format!("label-{id}"),
        status,
        start_lsn: Lsn(0x0300_0028),
        stop_lsn: (status == BackupStatus::Complete).then_some(Lsn(0x0300_0138)),
        timeline: 1,
        start_time: start.parse().unwrap(),
        stop_time: None,
        pg_version: 150018,
        system_identifier: "42".into(),
        size_bytes: 30 << 20,
        stored_bytes: 4 << 20,
        objects: vec![],
        tablespaces: vec![Tablespace {
            oid: 16384,
            location: "/srv/ts".into(),
        }],
        backup_label: Some("START WAL LOCATION: 0/3000028".into()),
        archiver_version: "test".into(),
        error: None,
        drills: vec![],
        verified: None,
        contents: None,
        environment: None,
        parent: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_info() {
    let dir = TestDir::new();
    let server = ServerInfo {
        system: SystemInfo {
            system_identifier: 42,
            timeline: 1,
            xlogpos: Lsn(0),
        },
        version_num: 150018,
        wal_segment_size: 16 << 20,
    };
    let repo = Repo::open_or_init(Arc::new(FsStorage::new(dir.join("repo"))), "repo", &server)
        .await
        .unwrap();
    let r = dir.join("repo");
    let r = r.to_str().unwrap();

    // Empty catalog.
    let out = succeeded(archiver(&["list", "--repo", r, "--json"]), "archiver");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );

    let newer = record(
        "20261122T100000Z",
        "2026-11-22T10:00:00Z",
        BackupStatus::Complete,
    );
    let older = record(
        "20261121T100000Z",
        "2026-11-21T10:00:00Z",
        BackupStatus::Failed,
    );
    repo.put_backup(&newer).await.unwrap();
    repo.put_backup(&older).await.unwrap();

    // JSON: an array of the records, oldest first, with the documented fields.
    let out = succeeded(archiver(&["list", "--repo", r, "--json"]), "archiver");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["id"], older.id);
    assert_eq!(arr[1]["status"], "complete");
    assert_eq!(arr[1]["stop_lsn"], "0/3000138");
    for field in [
        "id",
        "label",
        "status",
        "start_lsn",
        "stop_lsn",
        "timeline",
        "start_time",
        "stop_time",
        "pg_version",
        "system_identifier",
        "size_bytes",
        "stored_bytes",
        "objects",
        "tablespaces",
        "backup_label",
        "archiver_version",
    ] {
        assert!(arr[1].get(field).is_some(), "field {field} missing");
    }

    // The table names both, oldest first.
    let out = archiver(&["list", "--repo", r]);
    let text = String::from_utf8_lossy(&out.stdout);
    let (a, b) = (text.find(&older.id).unwrap(), text.find(&newer.id).unwrap());
    assert!(a < b && text.starts_with("ID"), "{text}");
    assert!(
        text.contains("30.0 MB") && text.contains("failed"),
        "{text}"
    );

    // info: one record in full; an unknown id is an error.
    let out = archiver(&["info", "--repo", r, &newer.id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["label"], newer.label);
    let out = archiver(&["info", "--repo", r, &newer.id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("/srv/ts"));
    let out = archiver(&["info", "--repo", r, "20990101T000000Z"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backup with id 20990101T000000Z"));
}
