//! Bad input: a clear message, a non-zero exit, and nothing changed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use common::*;

/// Every file under `p` with its size and mtime, to prove a refused run changed nothing.
fn snapshot(p: &Path) -> BTreeMap<String, (u64, SystemTime)> {
    walk(p)
        .into_iter()
        .filter(|(_, m)| !m.is_dir())
        .map(|(k, m)| (k, (m.len(), m.modified().unwrap())))
        .collect()
}

fn refused(args: &[&str], needle: &str) -> String {
    let out = archiver(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail with exit 1:\n{err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    err
}

#[test]
fn unreachable_server_and_malformed_conninfo() {
    let dir = TestDir::new();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();
    let port = free_port().to_string();
    refused(
        &[
            "stream",
            "--repo",
            r,
            "-d",
            &format!("host=127.0.0.1 port={port} sslmode=disable"),
        ],
        "could not connect",
    );
    refused(
        &["stream", "--repo", r, "-d", "host=127.0.0.1 port=notaport"],
        "invalid port",
    );
    refused(
        &["stream", "--repo", r, "-d", "host='unterminated"],
        "unterminated quoted string",
    );
    refused(
        &["stream", "--repo", r, "-d", "postgresql://[::1/db"],
        "IPv6",
    );
    refused(
        &["stream", "--repo", r, "-d", "bogus_option=1"],
        "invalid connection option",
    );
    refused(
        &[
            "stream",
            "--repo",
            r,
            "-d",
            "host=127.0.0.1",
            "--slot",
            "Bad-Slot",
        ],
        "invalid characters",
    );
    assert!(!repo.exists(), "nothing may be created");
    // A missing --repo is a usage error.
    let out = archiver(&["stream", "-d", "host=127.0.0.1"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn server_side_refusals() {
    let dir = TestDir::new();
    // wal_level = minimal allows no WAL senders at all.
    let mut minimal = Pg::create(
        &dir,
        "minimal",
        "wal_level = minimal\nmax_wal_senders = 0\n",
        "",
    );
    minimal.start();
    let repo = dir.join("repo-minimal");
    let r = repo.to_str().unwrap();
    refused(
        &["stream", "--repo", r, "-d", &minimal.conninfo("postgres")],
        "max_wal_senders",
    );
    assert!(!repo.exists());
    minimal.stop();

    // No free WAL sender: one streamer holds the only one.
    let mut one = Pg::create(&dir, "one", "max_wal_senders = 1\n", "");
    one.start();
    let repo_a = dir.join("repo-a");
    let mut a = Archiver::stream(
        &dir,
        "a",
        &[
            "--repo",
            repo_a.to_str().unwrap(),
            "-d",
            &one.conninfo("postgres"),
        ],
    );
    let repo_b = dir.join("repo-b");
    refused(
        &[
            "stream",
            "--repo",
            repo_b.to_str().unwrap(),
            "-d",
            &one.conninfo("postgres"),
            "--slot",
            "b",
        ],
        "max_wal_senders",
    );
    assert!(!repo_b.exists());
    // A backup finds no free WAL sender either, and records nothing.
    refused(
        &[
            "backup",
            "--repo",
            repo_b.to_str().unwrap(),
            "-d",
            &one.conninfo("postgres"),
        ],
        "max_wal_senders",
    );
    assert!(!repo_b.exists());
    assert!(a.term().success());
}

#[test]
fn repository_refusals() {
    let dir = TestDir::new();
    let mut pg1 = Pg::create(&dir, "pg1", "", "");
    pg1.start();
    let mut pg2 = Pg::create_fresh(&dir, "pg2", "");
    pg2.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();

    let mut a = Archiver::stream(&dir, "a", &["--repo", &r, "-d", &pg1.conninfo("postgres")]);
    // A second streamer on the same repository is refused while the first keeps going.
    let err = refused(
        &[
            "stream",
            "--repo",
            &r,
            "-d",
            &pg1.conninfo("postgres"),
            "--slot",
            "second",
        ],
        "locked by another archiver process",
    );
    assert!(err.contains(&a.pid().to_string()), "{err}");
    // Another repository on the slot the first streamer holds: refused, suggesting --slot.
    let other = dir.join("other-repo");
    let err = refused(
        &[
            "stream",
            "--repo",
            other.to_str().unwrap(),
            "-d",
            &pg1.conninfo("postgres"),
        ],
        "is active for PID",
    );
    assert!(err.contains("--slot NAME"), "{err}");
    assert!(a.term().success());
    // No repository named at all: a usage error that says how to name one.
    let out = archiver(&["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--config") && err.contains("ARCHIVER_REPO"),
        "{err}"
    );

    // Another cluster (a different system identifier) is refused and the repository is untouched.
    let before = snapshot(&repo);
    refused(
        &["stream", "--repo", &r, "-d", &pg2.conninfo("postgres")],
        "another cluster",
    );
    assert_eq!(snapshot(&repo), before);
    assert_eq!(
        pg2.psql("select count(*) from pg_replication_slots"),
        "0",
        "no slot may be created on the wrong server"
    );
    // A backup of another cluster is refused too: nothing recorded, nothing stored.
    refused(
        &["backup", "--repo", &r, "-d", &pg2.conninfo("postgres")],
        "another cluster",
    );
    assert_eq!(snapshot(&repo), before);

    // A non-empty directory that is not a repository is refused.
    let foreign = dir.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "keep me").unwrap();
    let before = snapshot(&foreign);
    refused(
        &[
            "stream",
            "--repo",
            foreign.to_str().unwrap(),
            "-d",
            &pg1.conninfo("postgres"),
        ],
        "not an archiver repository",
    );
    assert_eq!(snapshot(&foreign), before);

    // A repository path that is a file.
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    refused(
        &[
            "stream",
            "--repo",
            file.to_str().unwrap(),
            "-d",
            &pg1.conninfo("postgres"),
        ],
        "not a directory",
    );
}

#[test]
fn unwritable_repository_directory() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ro = dir.join("readonly");
    std::fs::create_dir(&ro).unwrap();
    let repo = ro.join("repo");
    // A copy of the binary the postgres user can execute wherever the checkout lives.
    let bin = dir.join("archiver-bin");
    std::fs::copy(archiver_bin(), &bin).unwrap();
    let mut cmd = std::process::Command::new(&bin);
    cmd.args([
        "stream",
        "--repo",
        repo.to_str().unwrap(),
        "-d",
        &pg.conninfo("postgres"),
    ]);
    if let Some((uid, gid)) = pg_ids() {
        // Root can write anywhere: run as postgres against a root-owned directory.
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    } else {
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    }
    let out = archiver_cmd(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        err.contains("repo"),
        "the message names the repository: {err}"
    );
    assert!(!repo.exists());
}
