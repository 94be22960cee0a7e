//! `archiver backup` against a real server, restored by hand with tar + zstd and checked by
//! pg_verifybackup.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn zstd_d(src: &std::path::Path, dst: &std::path::Path) {
    let out = Command::new("zstd")
        .args(["-q", "-d", "-f", "-o"])
        .arg(dst)
        .arg(src)
        .output()
        .unwrap();
    must(out, "zstd -d");
}

/// Unpacks one backup object (`<name>.zst`, a tar) into `into` with only zstd and tar.
fn extract(dir: &TestDir, repo: &Path, id: &str, name: &str, into: &Path) {
    let tar = dir.join(name);
    zstd_d(&repo.join(format!("backups/{id}/{name}.zst")), &tar);
    must(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(into)
            .output()
            .unwrap(),
        "tar -x",
    );
}

/// Adds the manifest to an unpacked backup, unpacks the archived WAL of timeline 1, and runs
/// pg_verifybackup on the result.
fn verify_by_hand(dir: &TestDir, repo: &Path, id: &str, restore: &Path) {
    zstd_d(
        &repo.join(format!("backups/{id}/backup_manifest.zst")),
        &restore.join("backup_manifest"),
    );
    let waldir = dir.join("wal");
    std::fs::create_dir(&waldir).unwrap();
    for e in std::fs::read_dir(repo.join("wal/00000001"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(seg) = name.strip_suffix(".zst").filter(|n| !n.contains("partial")) {
            zstd_d(&e.path(), &waldir.join(seg));
        }
    }
    let out = Command::new(pg_bin().join("pg_verifybackup"))
        .arg("-w")
        .arg(&waldir)
        .arg(restore)
        .output()
        .unwrap();
    must(out, "pg_verifybackup");
}

#[test]
fn backup_under_load_verifies_and_is_listed() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::spawn(&dir, "stream", &["stream", "--repo", &r, "-d", &ci]);
    a.wait_log("streaming started", T);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let mut load = pg.pgbench_background(&["-c", "2", "-T", "4"]);

    let out = archiver(&[
        "backup",
        "--repo",
        &r,
        "-d",
        &ci,
        "--checkpoint",
        "fast",
        "--label",
        "under load",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(load.wait().unwrap().success());
    assert_eq!(rec["status"], "complete");
    assert_eq!(rec["label"], "under load");
    assert!(rec["backup_label"]
        .as_str()
        .unwrap()
        .contains("LABEL: under load"));
    let id = rec["id"].as_str().unwrap().to_string();
    let keys: Vec<&str> = rec["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            format!("backups/{id}/base.tar.zst"),
            format!("backups/{id}/backup_manifest.zst")
        ]
    );
    assert!(rec["size_bytes"].as_u64().unwrap() > 20 << 20);
    assert!(rec["stored_bytes"].as_u64().unwrap() < rec["size_bytes"].as_u64().unwrap());

    // Listed as complete.
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "complete");

    // By hand, with only zstd and tar: the data directory, its manifest, and the WAL.
    let restore = dir.join("restore");
    std::fs::create_dir(&restore).unwrap();
    extract(&dir, &repo, &id, "base.tar", &restore);
    verify_by_hand(&dir, &repo, &id, &restore);
    assert!(a.term().success());
}

#[test]
fn backup_without_wal_is_recorded_failed() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    // No streamer: the backup's WAL never reaches the repository.
    let out = archiver(&[
        "backup",
        "--repo",
        &r,
        "-d",
        &pg.conninfo("postgres"),
        "--checkpoint",
        "fast",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no `archiver stream` is running"), "{err}");
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["status"], "failed");
    assert!(list[0]["error"]
        .as_str()
        .unwrap()
        .contains("no `archiver stream`"));
    // An unknown id for info is refused.
    let out = archiver(&["info", "--repo", &r, "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn backup_interrupted_by_a_terminated_walsender_is_failed() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::spawn(&dir, "stream", &["stream", "--repo", &r, "-d", &ci]);
    a.wait_log("streaming started", T);
    pg.pgbench(&["-i", "-s", "3", "-q"]);
    // Slow the backup down (1 MB/s) so it is surely still running when its walsender dies.
    let mut b = Archiver::spawn(
        &dir,
        "backup",
        &[
            "backup",
            "--repo",
            &r,
            "-d",
            &ci,
            "--checkpoint",
            "fast",
            "--max-rate",
            "1024",
        ],
    );
    wait_until("the backup's walsender", T, || {
        pg.psql(
            "select count(*) from pg_stat_replication where application_name = 'archiver backup'",
        ) == "1"
    });
    std::thread::sleep(Duration::from_millis(500));
    pg.psql("select pg_terminate_backend(pid) from pg_stat_replication where application_name = 'archiver backup'");
    let st = b.wait(T);
    assert_eq!(st.code(), Some(1), "{}", b.log_text());
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["status"], "failed", "{list}");
    assert!(!list[0]["error"].as_str().unwrap().is_empty());
    // The next backup is unaffected.
    let out = archiver(&["backup", "--repo", &r, "-d", &ci, "--checkpoint", "fast"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[1]["status"], "complete");
    assert!(a.term().success());
}

#[test]
fn backup_with_a_tablespace_and_several_databases() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ts = dir.join("ts");
    std::fs::create_dir(&ts).unwrap();
    chown_pg(&ts);
    pg.psql(&format!("create tablespace ts location '{}'", ts.display()));
    pg.psql("create database db1");
    pg.psql("create database db2 tablespace ts");
    pg.psql("create table in_ts tablespace ts as select generate_series(1, 50000) x");
    let oid = pg.psql("select oid from pg_tablespace where spcname = 'ts'");

    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::spawn(&dir, "stream", &["stream", "--repo", &r, "-d", &ci]);
    a.wait_log("streaming started", T);
    let out = archiver(&[
        "backup",
        "--repo",
        &r,
        "-d",
        &ci,
        "--checkpoint",
        "fast",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = rec["id"].as_str().unwrap().to_string();
    assert_eq!(rec["tablespaces"][0]["oid"].to_string(), oid);
    assert_eq!(rec["tablespaces"][0]["location"], ts.to_str().unwrap());
    let keys: Vec<&str> = rec["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert!(
        keys.contains(&format!("backups/{id}/{oid}.tar.zst").as_str()),
        "{keys:?}"
    );

    // Restored by hand: the tablespace archive goes below pg_tblspc/<oid>; pg_verifybackup agrees.
    let restore = dir.join("restore");
    let ts_dir = restore.join(format!("pg_tblspc/{oid}"));
    std::fs::create_dir_all(&ts_dir).unwrap();
    extract(&dir, &repo, &id, "base.tar", &restore);
    extract(&dir, &repo, &id, &format!("{oid}.tar"), &ts_dir);
    verify_by_hand(&dir, &repo, &id, &restore);
    assert!(std::fs::read_to_string(restore.join("tablespace_map"))
        .unwrap()
        .contains(ts.to_str().unwrap()));
    assert!(a.term().success());
}
