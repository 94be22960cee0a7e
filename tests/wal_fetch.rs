//! `archiver wal-fetch`: verified, atomic, and refusing damaged or absent files.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn fetches_verified_segments_and_refuses_missing_or_corrupt() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let mut a = Archiver::stream(
        &dir,
        "stream",
        &["--repo", &r, "-d", &pg.conninfo("postgres")],
    );
    pg.psql("create table t as select generate_series(1, 100000) x");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(&repo, &name, T);
    assert!(a.term().success());

    // A good fetch: byte-identical to the server's segment, no temp files left behind.
    let out_dir = dir.join("restore");
    std::fs::create_dir(&out_dir).unwrap();
    let dest = out_dir.join("RECOVERYXLOG");
    archiver_ok(&[
        "wal-fetch",
        "--repo",
        &r,
        "--prefetch",
        "0",
        &name,
        dest.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(pg.wal_dir().join(&name)).unwrap());
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        1,
        "only the fetched file"
    );
    // ARCHIVER_REPO works in place of --repo.
    let dest_env = out_dir.join("via-env");
    succeeded(
        archiver_cmd(
            std::process::Command::new(archiver_bin())
                .args(["wal-fetch", &name, dest_env.to_str().unwrap()])
                .env("ARCHIVER_REPO", &r),
        ),
        "archiver",
    );

    // Missing: exit 1 (PostgreSQL reads "not in the archive"), nothing written.
    let missing = out_dir.join("missing");
    let out = archiver(&[
        "wal-fetch",
        "--repo",
        &r,
        "0000000100000000000000FF",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the archive"));
    assert!(!missing.exists());
    let out = archiver(&[
        "wal-fetch",
        "--repo",
        &r,
        "00000009.history",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!missing.exists());

    // Corrupt: one flipped byte in the middle of the object, or a truncated object: exit 126
    // (PostgreSQL aborts recovery instead of ending it early), named, nothing written.
    let obj = repo.join(format!("wal/00000001/{name}.zst"));
    let good = std::fs::read(&obj).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    for (what, bytes) in [
        ("flipped", bad),
        ("truncated", good[..good.len() - 100].to_vec()),
    ] {
        std::fs::write(&obj, &bytes).unwrap();
        let dest = out_dir.join(format!("corrupt-{what}"));
        let out = archiver(&["wal-fetch", "--repo", &r, &name, dest.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(126), "{what}: {err}");
        assert!(
            err.contains("corrupt") && err.contains(&name),
            "{what}: {err}"
        );
        assert!(!dest.exists(), "{what}: nothing may be written");
    }
    // The fetched files only (besides the prefetch directory of the ARCHIVER_REPO fetch, which
    // did not disable prefetching).
    let mut left: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".archiver-prefetch")
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["RECOVERYXLOG", "via-env"],
        "no temp files left behind"
    );

    // Not a repository: refused, exit 126.
    let out = archiver(&[
        "wal-fetch",
        "--repo",
        dir.join("nope").to_str().unwrap(),
        &name,
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an archiver repository"));

    // With --log-format json every stderr line is a JSON event, the error included.
    let out = archiver(&[
        "--log-format",
        "json",
        "wal-fetch",
        "--repo",
        dir.join("nope").to_str().unwrap(),
        &name,
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(126));
    let err = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(
        events.iter().any(|e| e["level"] == "ERROR"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("not an archiver repository")),
        "{err}"
    );
}

#[test]
fn prefetches_the_next_segments() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let mut a = Archiver::stream(
        &dir,
        "stream",
        &["--repo", &r, "-d", &pg.conninfo("postgres")],
    );
    pg.psql("create table t (x int)");
    let first = current_walfile(&pg);
    let mut names = vec![];
    for _ in 0..4 {
        names.push(current_walfile(&pg));
        pg.psql("insert into t select generate_series(1, 1000); select pg_switch_wal()");
    }
    wait_archived(&repo, names.last().unwrap(), T);
    assert!(a.term().success());
    assert_eq!(names[0], first);

    let wal = dir.join("pg_wal");
    std::fs::create_dir(&wal).unwrap();
    let dest = wal.join("RECOVERYXLOG");
    let fetch = |name: &str| {
        archiver_ok(&[
            "wal-fetch",
            "--repo",
            &r,
            "--prefetch",
            "3",
            name,
            dest.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(pg.wal_dir().join(name)).unwrap(),
            "{name} differs from the server's"
        );
    };
    // The first fetch starts a worker that brings the next three.
    fetch(&names[0]);
    let pre = wal.join(".archiver-prefetch");
    let idle = || !archiver::RepoLock::is_held(&pre.join(".lock"));
    wait_until("three segments prefetched", T, || {
        names[1..4].iter().all(|n| pre.join(n).exists())
    });
    // The next one is served from there (renamed into place), and is the server's segment.
    fetch(&names[1]);
    assert!(!pre.join(&names[1]).exists());
    // A later worker clears what recovery has moved past: a new one, or the one still
    // running, which goes on from the segment asked for last.
    fetch(&names[3]);
    wait_until("consumed segments removed", T, || {
        !pre.join(&names[2]).exists() && idle()
    });

    // Recovery moves on while a worker runs (here the test holds its lock, as one would): the
    // fetch starts no worker, and the running one, once through, goes on from there.
    let lock = pre.join(".lock");
    let mut held = None;
    wait_until("the prefetch lock", T, || {
        held = archiver::RepoLock::acquire(&lock).ok();
        held.is_some()
    });
    fetch(&names[2]);
    drop(held);
    assert!(!pre.join(&names[3]).exists(), "a worker started");
    // The worker that held the lock, started for the first segment: its first round brings
    // the next three; then, seeing the request for names[2], it clears up to there.
    archiver_ok(&[
        "wal-fetch",
        "--repo",
        &r,
        "--prefetch",
        "3",
        "--prefetch-worker",
        pre.to_str().unwrap(),
        &names[0],
        "/dev/null",
    ]);
    assert!(pre.join(&names[3]).exists());
    for n in &names[1..3] {
        assert!(
            !pre.join(n).exists(),
            "{n} left behind: the worker stopped at its first round"
        );
    }
}
