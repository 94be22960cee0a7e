//! A gap is not a dead end: when the WAL the repository needs is gone from the server, `stream`
//! exits 3 saying what to do; `stream --accept-gap` records the gap and continues the same
//! repository, a backup is possible at once, and restores work on both sides of the gap but
//! never across it. Slots archiver created and no longer streams from are reported.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn stream_args<'a>(repo: &'a str, ci: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--repo", repo, "-d", ci, "--progress-interval", "1s"];
    v.extend_from_slice(extra);
    v
}

fn switch_and_wait(pg: &Pg, repo: &std::path::Path) {
    pg.psql("insert into filler select generate_series(1, 1000)");
    let name = current_walfile(pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(repo, &name, T);
}

fn restore_args<'a>(repo: &'a str, pgdata: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["restore", "--repo", repo, "--pgdata", pgdata];
    v.extend_from_slice(extra);
    if is_root() && !extra.contains(&"--dry-run") {
        v.extend_from_slice(&["--owner", "postgres"]);
    }
    v
}

fn markers(pg: &Pg) -> String {
    pg.psql("select string_agg(x::text, ',' order by x) from marker")
}

#[test]
fn a_gap_is_recorded_and_never_crossed() {
    let dir = TestDir::new();
    // Keep as little WAL as the server allows, so removed segments are really gone.
    let mut pg = Pg::create(
        &dir,
        "pg",
        "wal_keep_size = 0\nmax_wal_size = '32MB'\nmin_wal_size = '32MB'\n",
        "",
    );
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();
    let ci = pg.conninfo("postgres");
    pg.psql("create table filler(x int); create table marker(x int)");
    let backup = |label: &str| {
        archiver_ok(&[
            "backup",
            "--repo",
            r,
            "-d",
            &ci,
            "--checkpoint",
            "fast",
            "--label",
            label,
        ])
    };

    // Window 1: backup A, commits 1 and 2.
    let mut a = Archiver::stream(&dir, "stream1", &stream_args(r, &ci, &[]));
    backup("A");
    pg.psql("insert into marker values (1)");
    std::thread::sleep(Duration::from_millis(1100));
    let mid = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into marker values (2)");
    switch_and_wait(&pg, &repo);
    assert!(a.term().success());

    // A stream on another slot: the slot archiver created before is named as not streamed
    // from (it retains WAL on the server), at start and in its progress lines.
    let mut b = Archiver::stream(
        &dir,
        "stream-other-slot",
        &stream_args(r, &ci, &["--slot", "second"]),
    );
    b.wait_log("abandoned_slots", T);
    let log = b.log_text();
    assert!(
        log.contains("not streamed from") && log.contains("archiver (restart_lsn"),
        "{log}"
    );
    assert!(b.term().success());

    // While archiver is down, its slots are dropped and the server recycles the WAL it needs.
    // Commit 3 lies in WAL that nobody archived.
    pg.psql(
        "select pg_drop_replication_slot('archiver'); select pg_drop_replication_slot('second')",
    );
    pg.psql("insert into marker values (3)");
    std::thread::sleep(Duration::from_millis(1100));
    let in_gap = pg.psql("select now()::text");
    for _ in 0..4 {
        pg.psql("insert into filler select generate_series(1, 20000); select pg_switch_wal()");
        pg.psql("checkpoint");
    }
    let mut c = Archiver::spawn_stream(&dir, "stream-gone", &stream_args(r, &ci, &[]));
    let st = c.wait(T);
    let log = c.log_text();
    assert_eq!(st.code(), Some(3), "{log}");
    assert!(
        log.contains("no longer available on the server") && log.contains("--accept-gap"),
        "{log}"
    );
    assert!(
        !log.contains("start a new repository"),
        "the way forward is not a new repository: {log}"
    );

    // --accept-gap continues the same repository; a backup is possible at once.
    let mut d = Archiver::spawn_stream(&dir, "stream-gap", &stream_args(r, &ci, &["--accept-gap"]));
    d.wait_log("accepted a gap in the archive", T);
    d.wait_log("streaming started", T);
    backup("B");
    pg.psql("insert into marker values (4)");
    switch_and_wait(&pg, &repo);
    assert!(d.term().success());

    // The catalog records the gap and the recovery windows on each side of it.
    let v: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["info", "--repo", r, "--json"])).unwrap();
    let gaps = v["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{v}");
    let g = &gaps[0];
    assert_eq!(g["timeline"], 1, "{v}");
    assert!(g["at"].is_string() && g["from_lsn"].is_string() && g["to_lsn"].is_string());
    let w = v["recovery_windows"].as_array().unwrap();
    assert_eq!(w.len(), 2, "{v}");
    let list: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["list", "--repo", r, "--json"])).unwrap();
    let id_of = |label: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["label"] == label)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (id_a, id_b) = (id_of("A"), id_of("B"));
    assert_eq!(w[0]["backup"], id_a.as_str(), "{v}");
    assert_eq!(w[0]["to_lsn"], g["from_lsn"], "{v}");
    assert_eq!(w[1]["backup"], id_b.as_str(), "{v}");
    let slots: Vec<&str> = v["replication_slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        slots.contains(&"archiver") && slots.contains(&"second"),
        "{v}"
    );
    let text = archiver_ok(&["list", "--repo", r]);
    assert!(
        text.contains("gap:") && text.contains("recovery window 2: from the end of backup"),
        "{text}"
    );

    // A target inside the gap is refused, naming both windows, and nothing is written.
    let refused_dir = dir.join("refused");
    let out = archiver(&restore_args(
        r,
        refused_dir.to_str().unwrap(),
        &["--target-time", &in_gap],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("gap") && err.contains(&id_a) && err.contains(&id_b),
        "{err}"
    );
    assert!(!refused_dir.exists() || std::fs::read_dir(&refused_dir).unwrap().next().is_none());
    // A time before the gap is planned from A.
    let dry = archiver_ok(&restore_args(
        r,
        dir.join("dry").to_str().unwrap(),
        &["--target-time", &mid, "--dry-run", "--json"],
    ));
    let p: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(p["backup_id"], id_a.as_str(), "{dry}");

    // Before the gap: backup A to the end of its window (every commit it received).
    let before = dir.join("before");
    archiver_ok(&restore_args(
        r,
        before.to_str().unwrap(),
        &["--backup", &id_a],
    ));
    let mut restored = start_recovering(&dir, "before", before, None);
    assert_eq!(markers(&restored), "1,2");
    restored.stop();
    // After it: latest, from B.
    let latest = dir.join("latest");
    archiver_ok(&restore_args(r, latest.to_str().unwrap(), &[]));
    let restored = start_recovering(&dir, "latest", latest, None);
    assert_eq!(markers(&restored), "1,2,3,4");
}
