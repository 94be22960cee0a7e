//! The repository holds a full copy of the database (password hashes in `pg_authid`
//! included): whatever the umask, archiver creates its directories 0700 and its files 0600 — in
//! the repository, its spool, a restored data directory and wal-fetch's prefetch directory —
//! and warns when an existing repository is open to other users.
//!
//! Alone in its test binary: the umask is process-wide, and this test sets it to 000.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// Every directory and file under `root` with its permission bits, `root` included.
fn modes(root: &Path) -> Vec<(String, bool, u32)> {
    let top = std::fs::symlink_metadata(root).unwrap();
    std::iter::once((String::new(), top))
        .chain(walk(root))
        .filter(|(_, m)| !m.file_type().is_symlink())
        .map(|(rel, m)| {
            let p = root.join(rel).display().to_string();
            (p, m.is_dir(), m.permissions().mode() & 0o777)
        })
        .collect()
}

fn assert_private(root: &Path) -> usize {
    let all = modes(root);
    let wrong: Vec<_> = all
        .iter()
        .filter(|(_, dir, mode)| *mode != if *dir { 0o700 } else { 0o600 })
        .map(|(p, _, m)| format!("{p} {m:04o}"))
        .collect();
    assert!(wrong.is_empty(), "not 0700/0600: {wrong:#?}");
    all.len()
}

#[test]
fn everything_archiver_writes_is_private_whatever_the_umask() {
    // SAFETY: umask has no preconditions; this binary runs this one test.
    unsafe { libc::umask(0) };
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();

    let mut a = Archiver::stream(&dir, "stream", &["--repo", r, "-d", &ci]);
    archiver_ok(&["backup", "--repo", r, "-d", &ci, "--checkpoint", "fast"]);
    pg.psql("create table t as select generate_series(1, 1000) x");
    let walfile = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(&repo, &walfile, T);
    assert!(a.term().success());
    let n = assert_private(&repo);
    assert!(n > 10, "the repository holds {n} entries");

    // A restored data directory: as PostgreSQL requires it.
    let restored = dir.join("restored");
    let mut args = vec![
        "restore",
        "--repo",
        r,
        "--pgdata",
        restored.to_str().unwrap(),
    ];
    if is_root() {
        args.extend_from_slice(&["--owner", "postgres"]);
    }
    archiver_ok(&args);
    let wrong: Vec<_> = modes(&restored)
        .into_iter()
        .filter(|(_, _, m)| m & 0o077 != 0)
        .collect();
    assert!(wrong.is_empty(), "open to others: {wrong:#?}");
    let root_mode = std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777;
    assert_eq!(root_mode, 0o700);
    if is_root() {
        use std::os::unix::fs::MetadataExt;
        let (uid, _) = pg_ids().unwrap();
        assert!(modes(&restored)
            .iter()
            .all(|(p, _, _)| std::fs::metadata(p).unwrap().uid() == uid));
    }

    // wal-fetch's prefetch directory and the segments it writes.
    let first = std::fs::read_dir(repo.join("wal/00000001"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".zst").map(str::to_string)
        })
        .filter(|n| n.len() == 24)
        .min()
        .unwrap();
    let pg_wal = dir.join("fetch/pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    std::fs::set_permissions(dir.join("fetch"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&pg_wal, std::fs::Permissions::from_mode(0o700)).unwrap();
    archiver_ok(&[
        "wal-fetch",
        "--repo",
        r,
        "--prefetch",
        "2",
        &first,
        pg_wal.join(&first).to_str().unwrap(),
    ]);
    let prefetch = pg_wal.join(".archiver-prefetch");
    wait_until("the prefetch worker wrote a segment", T, || {
        std::fs::read_dir(&prefetch).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().len() == 24)
        })
    });
    // Let the worker finish (its lock released) before reading the modes.
    std::thread::sleep(Duration::from_millis(500));
    assert_private(&pg_wal);

    // An existing repository open to others is warned about by every command that opens it.
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = succeeded(archiver(&["list", "--repo", r]), "archiver");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("open to other users") && err.contains("0755"),
        "{err}"
    );
    let out = archiver(&["info", "--repo", r, "--json"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("open to other users"));
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = archiver(&["list", "--repo", r]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("open to other users"));

    // Run as root, what archiver created took the owner of the directory it went into (the
    // test directory's: postgres), so the restored cluster's restore_command can read it; a
    // repository its user cannot read is refused before anything is written.
    if let Some((uid, _)) = pg_ids() {
        use std::os::unix::fs::MetadataExt;
        assert!(modes(&repo)
            .iter()
            .all(|(p, _, _)| std::fs::metadata(p).unwrap().uid() == uid));
        std::os::unix::fs::chown(&repo, Some(0), Some(0)).unwrap();
        let target = dir.join("refused");
        let out = archiver(&[
            "restore",
            "--repo",
            r,
            "--pgdata",
            target.to_str().unwrap(),
            "--owner",
            "postgres",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("restore_command runs as postgres") && err.contains("cannot read"),
            "{err}"
        );
        assert!(!target.exists(), "nothing written");
    }
}
