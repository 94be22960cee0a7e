//! `archiver expire` against a real server and a real repository: the plan of a policy, the
//! removal, and every kept backup restoring afterwards — while the streamer keeps streaming.
//!
//! Ages: the backups are real, taken minutes apart; their catalog records are then back-dated
//! through the library (`Repo::put_backup`, which seals the record as `archiver` does), so the
//! policy sees backups 40 days, 10 days and 1 hour old. No clock is faked in the product.

mod common;

use std::sync::Arc;
use std::time::Duration;

use archiver::{BackupStatus, FsStorage, Repo, Timestamp};
use common::*;

const T: Duration = Duration::from_secs(60);

/// Sets a backup's start (and stop, a minute later) to `age` ago.
async fn back_date(repo: &Repo, id: &str, age: Duration) {
    let mut rec = repo.get_backup(id).await.unwrap();
    let start = Timestamp::now() - age;
    rec.start_time = start;
    rec.stop_time = Some(start + Duration::from_secs(60));
    repo.put_backup(&rec).await.unwrap();
}

fn wal_objects(repo: &std::path::Path) -> Vec<String> {
    walk(&repo.join("wal"))
        .into_iter()
        .filter(|(k, m)| m.is_file() && !k.starts_with("history"))
        .map(|(k, _)| k)
        .collect()
}

fn expire(s: &Streaming, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["expire", "--repo", &s.r, "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&archiver_ok(&all)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn expire_keeps_the_window_and_every_kept_backup_restores() {
    let s = Streaming::start("", &[]);
    let switch = |marker: i32| {
        s.pg.psql(&format!("insert into marker values ({marker})"));
        let name = current_walfile(&s.pg);
        s.pg.psql("select pg_switch_wal()");
        wait_archived(&s.repo, &name, T);
    };
    s.pg.psql("create table marker (x int)");
    switch(0);
    let a = s.backup();
    switch(1);
    let b = s.backup();
    switch(2);
    let c = s.backup();
    switch(3);
    let repo = Repo::open(Arc::new(FsStorage::new(s.repo.clone())), "repo")
        .await
        .unwrap();
    back_date(&repo, &a, Duration::from_secs(40 * 86400)).await;
    back_date(&repo, &b, Duration::from_secs(10 * 86400)).await;
    back_date(&repo, &c, Duration::from_secs(3600)).await;
    let b_start = repo.get_backup(&b).await.unwrap().start_lsn;

    // Bad input changes nothing: no policy, a bad count, a bad duration.
    let before = walk(&s.repo).len();
    for (args, code, needle) in [
        (vec![], 1, "keeps nothing"),
        (vec!["--keep-daily", "-1"], 2, "--keep-daily"),
        (vec!["--keep-within", "3 fortnights"], 2, "--keep-within"),
    ] {
        let mut all = vec!["expire", "--repo", s.r.as_str()];
        all.extend_from_slice(&args);
        let out = archiver(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(walk(&s.repo).len(), before);

    // The plan of a 7-day window: the 40-day-old backup goes, the 10-day-old one is the base
    // of the window, the new one is inside it. A dry run removes nothing.
    let wal_before = wal_objects(&s.repo);
    let plan = expire(&s, &["--keep-within", "7d", "--dry-run"]);
    let verdicts = plan["plan"]["backups"].as_array().unwrap();
    let keep: Vec<(&str, bool)> = verdicts
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v["keep"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        keep,
        [(a.as_str(), false), (b.as_str(), true), (c.as_str(), true)]
    );
    assert!(verdicts[1]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("PITR reaches its start"));
    let to_remove = plan["plan"]["wal"].as_array().unwrap().len();
    let ranges = plan["plan"]["wal_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{plan}");
    assert_eq!(ranges[0]["timeline"], 1);
    assert_eq!(ranges[0]["objects"].as_u64().unwrap() as usize, to_remove);
    assert!(to_remove >= 2, "{plan}");
    assert!(plan["bytes_freed"].as_u64().unwrap() > 0);
    assert_eq!(wal_objects(&s.repo), wal_before);
    assert!(s.repo.join(format!("catalog/{a}.json")).exists());

    let relmaps = || -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(s.repo.join("relmaps"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                u64::from_str_radix(n.strip_suffix(".zst")?, 16).ok()
            })
            .collect();
        v.sort();
        v
    };
    let relmaps_before = relmaps();

    // For real: the backup's objects and record go, and the WAL before B's start segment.
    let done = expire(&s, &["--keep-within", "7d"]);
    assert_eq!(done["removed_backups"], serde_json::json!([a]));
    assert_eq!(
        done["removed_wal_objects"].as_u64().unwrap() as usize,
        to_remove
    );
    assert!(!s.repo.join(format!("backups/{a}")).exists());
    assert!(!s.repo.join(format!("catalog/{a}.json")).exists());
    let b_seg = b_start.0 / (16 << 20);
    let wal_after = wal_objects(&s.repo);
    assert_eq!(wal_after.len(), wal_before.len() - to_remove);
    for k in &wal_after {
        let segno = u64::from_str_radix(&k[9..17], 16).unwrap() * 0x100
            + u64::from_str_radix(&k[17..25], 16).unwrap();
        assert!(segno >= b_seg, "{k} lies before backup {b}'s start");
    }
    // The index objects went with their segments, and only those.
    let indexed: Vec<String> = std::fs::read_dir(s.repo.join("index/00000001"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().replace(".points", ""))
        .filter(|n| n.ends_with(".zst"))
        .collect();
    let segments: Vec<String> = wal_after
        .iter()
        .filter(|k| !k.contains(".partial") && !k.contains("history"))
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect();
    assert!(!indexed.is_empty());
    for n in &indexed {
        assert!(segments.contains(n), "index {n} left without its segment");
    }
    for n in &segments {
        assert!(indexed.contains(n), "segment {n} lost its index");
    }
    // Relation-name snapshots: of those taken before the oldest kept WAL only the newest stays
    // (it names files dropped after it); the later ones all stay.
    let oldest_kept = segments
        .iter()
        .map(|n| {
            (u64::from_str_radix(&n[8..16], 16).unwrap() * 0x100
                + u64::from_str_radix(&n[16..24], 16).unwrap())
                * (16 << 20)
        })
        .min()
        .unwrap();
    let newest_before = relmaps_before.iter().filter(|&&l| l < oldest_kept).max();
    let want: Vec<u64> = relmaps_before
        .iter()
        .copied()
        .filter(|&l| l >= oldest_kept || Some(&l) == newest_before)
        .collect();
    assert_eq!(
        relmaps(),
        want,
        "before {relmaps_before:x?}, oldest kept WAL {oldest_kept:x}"
    );
    let gone = relmaps_before.len() - want.len();
    assert!(
        gone >= 1,
        "no snapshot to expire: {relmaps_before:x?}, oldest kept WAL {oldest_kept:x}"
    );
    assert_eq!(done["removed_relmaps"].as_u64().unwrap() as usize, gone);
    assert_eq!(plan["removed_relmaps"], done["removed_relmaps"]);
    // A second expire finds nothing more to do.
    let again = expire(&s, &["--keep-within", "7d"]);
    assert_eq!(again["removed_backups"], serde_json::json!([]));
    assert_eq!(again["removed_wal_objects"], 0);
    assert_eq!(again["removed_relmaps"], 0);

    // The streamer went on meanwhile; every kept backup restores to the archive's end.
    switch(4);
    for (id, name) in [(&b, "restored-b"), (&c, "restored-c")] {
        let pgdata = s.dir.join(name);
        let p = pgdata.to_str().unwrap();
        archiver_ok(&[
            "restore",
            "--repo",
            &s.r,
            "--backup",
            id,
            "--pgdata",
            p,
            "--dry-run",
        ]);
        let mut args = vec![
            "restore",
            "--repo",
            &s.r,
            "--backup",
            id,
            "--pgdata",
            pgdata.to_str().unwrap(),
        ];
        if is_root() {
            args.extend_from_slice(&["--owner", "postgres"]);
        }
        archiver_ok(&args);
        let restored = start_recovering(&s.dir, name, pgdata, None);
        assert_eq!(
            restored.psql("select string_agg(x::text, ',' order by x) from marker"),
            "0,1,2,3,4",
            "backup {id}"
        );
    }

    // An expire interrupted after marking a backup: it is never restorable again, and the next
    // expire removes it whatever the policy says.
    let mut rec = repo.get_backup(&c).await.unwrap();
    rec.status = BackupStatus::Expiring;
    repo.put_backup(&rec).await.unwrap();
    let nowhere = s.dir.join("not-restored");
    let out = archiver(&[
        "restore",
        "--repo",
        &s.r,
        "--backup",
        &c,
        "--pgdata",
        nowhere.to_str().unwrap(),
        "--dry-run",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&c), "{err}");
    let done = expire(&s, &["--keep-last", "10"]);
    assert_eq!(done["removed_backups"], serde_json::json!([c]));
    assert!(!s.repo.join(format!("backups/{c}")).exists());
    let list: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["list", "--repo", &s.r, "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], b.as_str());
}

/// kill -9 at several moments of an expire: each time the repository verifies, and the next
/// expire finishes the job. (The kill moments are timed, so some may fall before or after the
/// removals; the property holds at every one.)
#[tokio::test(flavor = "multi_thread")]
async fn an_expire_killed_at_any_moment_leaves_a_repository_that_verifies() {
    let s = Streaming::start("", &[]);
    s.pg.psql("create table marker (x int)");
    let repo = Repo::open(Arc::new(FsStorage::new(s.repo.clone())), "repo")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..4u64 {
        s.pg.psql("insert into marker select generate_series(1, 50000)");
        let name = current_walfile(&s.pg);
        s.pg.psql("select pg_switch_wal()");
        wait_archived(&s.repo, &name, T);
        ids.push(s.backup());
        back_date(
            &repo,
            &ids[i as usize],
            Duration::from_secs((10 - i) * 86400),
        )
        .await;
    }
    // The same streamer log: `expire` takes its own process.
    for (n, delay_ms) in [5u64, 30, 80].into_iter().enumerate() {
        let mut e = Archiver::spawn(
            &s.dir,
            &format!("expire-{n}"),
            &["expire", "--repo", &s.r, "--keep-last", "1"],
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        e.kill9();
        let out = archiver(&["verify", "--repo", &s.r, "--json"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "after a kill at {delay_ms} ms:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let done = expire(&s, &["--keep-last", "1"]);
    assert!(done["plan"]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| { v["keep"] == true || v["id"] != ids[3].as_str() }));
    let list: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["list", "--repo", &s.r, "--json"])).unwrap();
    let left: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [ids[3].as_str()]);
    archiver_ok(&["verify", "--repo", &s.r]);
    // One expire at a time: a second one, while the first holds the lock, is refused.
    let _lock = archiver::RepoLock::acquire(&s.repo.join("spool/expire.lock")).unwrap();
    let out = archiver(&["expire", "--repo", &s.r, "--keep-last", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another expire is running"), "{err}");
}
