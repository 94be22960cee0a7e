//! `archiver check` against real servers: a healthy one passes; `wal_level = minimal`, no free
//! replication slot, a role without REPLICATION and another cluster's repository each fail,
//! naming the check, what was found and what is needed.

mod common;

use common::*;

fn check(pg: &Pg, user: &str, repo: &std::path::Path) -> (Option<i32>, Vec<serde_json::Value>) {
    let out = archiver(&[
        "check",
        "--repo",
        repo.to_str().unwrap(),
        "-d",
        &format!("{} dbname=postgres", pg.conninfo(user)),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v.as_array().unwrap().clone())
}

fn status<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a str {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:#?}"))["status"]
        .as_str()
        .unwrap()
}

#[test]
fn check_passes_a_healthy_server_and_names_each_problem() {
    let dir = TestDir::new();
    let repo = dir.join("repo");
    let mut pg = Pg::create(&dir, "pg", "max_replication_slots = 2\n", "");
    pg.start();

    // Healthy: nothing failed; every check is there; the repository is left as it was.
    let (code, checks) = check(&pg, "postgres", &repo);
    assert_eq!(code, Some(0), "{checks:#?}");
    for name in [
        "replication connection",
        "server version",
        "REPLICATION privilege",
        "wal_level",
        "free WAL senders",
        "replication slot",
        "free disk",
        "clock skew",
        "repository writable",
        "system identifier",
    ] {
        assert_ne!(status(&checks, name), "failed", "{name}: {checks:#?}");
    }
    assert_eq!(status(&checks, "clock skew"), "ok");
    assert!(
        walk(&repo).iter().all(|(_, m)| m.is_dir()),
        "the probe object is removed"
    );
    let text = archiver_ok(&[
        "check",
        "--repo",
        repo.to_str().unwrap(),
        "-d",
        &pg.conninfo("postgres"),
    ]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains("wal_level")),
        "{text}"
    );

    // Our slot holds WAL: weighed against max_slot_wal_keep_size (-1: unbounded, a warning).
    pg.psql("select pg_create_physical_replication_slot('archiver', true)");
    let (_, checks) = check(&pg, "postgres", &repo);
    assert_eq!(
        status(&checks, "WAL held by the slot"),
        "warning",
        "{checks:#?}"
    );

    // No free slot (another one takes the last), and ours is gone.
    pg.psql("select pg_drop_replication_slot('archiver')");
    pg.psql(
        "select pg_create_physical_replication_slot('a'), pg_create_physical_replication_slot('b')",
    );
    let (code, checks) = check(&pg, "postgres", &repo);
    assert_eq!(code, Some(1));
    assert_eq!(status(&checks, "replication slot"), "failed", "{checks:#?}");
    pg.psql("select pg_drop_replication_slot('a'), pg_drop_replication_slot('b')");

    // A role without REPLICATION.
    pg.psql("create role plain login");
    let (code, checks) = check(&pg, "plain", &repo);
    assert_eq!(code, Some(1));
    assert_eq!(status(&checks, "replication connection"), "failed");
    assert_eq!(
        status(&checks, "REPLICATION privilege"),
        "failed",
        "{checks:#?}"
    );

    // Another cluster's repository.
    let other = Pg::create_fresh(&dir, "other", "");
    let mut other = other;
    other.start();
    archiver_ok(&[
        "backup",
        "--repo",
        repo.to_str().unwrap(),
        "-d",
        &other.conninfo("postgres"),
        "--checkpoint",
        "fast",
    ]);
    let (code, checks) = check(&pg, "postgres", &repo);
    assert_eq!(code, Some(1));
    assert_eq!(
        status(&checks, "system identifier"),
        "failed",
        "{checks:#?}"
    );
    other.stop();

    // wal_level = minimal: no replication at all; SQL still says why.
    let mut minimal = Pg::create(
        &dir,
        "minimal",
        "wal_level = minimal\nmax_wal_senders = 0\n",
        "",
    );
    minimal.start();
    let (code, checks) = check(&minimal, "postgres", &dir.join("repo2"));
    assert_eq!(code, Some(1));
    assert_eq!(status(&checks, "replication connection"), "failed");
    assert_eq!(status(&checks, "wal_level"), "failed", "{checks:#?}");
    let found = checks.iter().find(|c| c["name"] == "wal_level").unwrap()["found"].clone();
    assert_eq!(found, "minimal");
}
