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

/// Runs `archiver backup --repo r -d ci --checkpoint fast --json` plus `extra`; asserts success
/// and returns the record and the log (stderr).
fn backup_ok(r: &str, ci: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec![
        "backup",
        "--repo",
        r,
        "-d",
        ci,
        "--checkpoint",
        "fast",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = succeeded(archiver(&args), "archiver");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (rec, err)
}

#[test]
fn backup_under_load_verifies_and_is_listed() {
    // Bound in this order, dropped in the reverse: the streamer first, the directory last.
    let Streaming {
        dir,
        ci,
        r,
        repo,
        pg,
        streamer: mut a,
    } = Streaming::start("", &[]);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.psql("create extension pgcrypto; analyze");
    let mut load = pg.pgbench_background(&["-c", "2", "-T", "4"]);

    let (rec, _) = backup_ok(&r, &ci, &["--label", "under load", "--environment", "prod"]);
    assert!(load.wait().unwrap().success());
    assert_eq!(rec["label"], "under load");
    // What the cluster held, read over SQL: databases, tables, rows, extensions, version.
    assert_eq!(rec["environment"], "prod");
    let contents = &rec["contents"];
    assert!(
        contents["server_version"]
            .as_str()
            .unwrap()
            .starts_with("PostgreSQL "),
        "{contents}"
    );
    let db = contents["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "postgres")
        .unwrap_or_else(|| panic!("{contents}"));
    assert_eq!(db["tables"], 4, "pgbench's four tables: {db}");
    assert!(db["estimated_rows"].as_u64().unwrap() >= 200_000, "{db}");
    assert!(db["size_bytes"].as_u64().unwrap() > 20 << 20, "{db}");
    assert!(
        db["extensions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "pgcrypto" && !e["version"].as_str().unwrap().is_empty()),
        "{db}"
    );
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

/// Starts an extracted backup as a cluster on a free port, recovering with `archiver wal-fetch`
/// to the end of the backup (`recovery_target = 'immediate'`) and promoting.
fn start_restored(dir: &TestDir, repo: &Path, restore: &Path) -> Pg {
    std::fs::write(restore.join("recovery.signal"), "").unwrap();
    let mut auto =
        std::fs::read_to_string(restore.join("postgresql.auto.conf")).unwrap_or_default();
    auto.push_str(&format!(
        "restore_command = '{} wal-fetch --repo {} %f %p'\nrecovery_target = 'immediate'\nrecovery_target_action = 'promote'\n",
        archiver_bin(),
        repo.display()
    ));
    std::fs::write(restore.join("postgresql.auto.conf"), auto).unwrap();
    let _ = std::fs::remove_file(restore.join("backup_manifest"));
    must(
        Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(restore)
            .output()
            .unwrap(),
        "chown",
    );
    std::fs::set_permissions(restore, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    start_recovering(dir, "restored", restore.to_path_buf(), None)
}

/// pgbench's invariant: every committed transaction moved the same delta in all four tables.
fn pgbench_consistent(pg: &Pg) {
    let sums = pg.psql(
        "select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history) \
         and (select sum(tbalance) from pgbench_tellers) = (select coalesce(sum(delta), 0) from pgbench_history) \
         and (select sum(bbalance) from pgbench_branches) = (select coalesce(sum(delta), 0) from pgbench_history)",
    );
    assert_eq!(sums, "t", "pgbench tables are inconsistent");
}

#[test]
fn backup_without_streamer_fetches_its_wal_and_restores_as_a_cluster() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.psql("create table marker(t text); insert into marker values ('before')");
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    // No `archiver stream`: the backup fetches its own WAL over its connection.
    let mut load = pg.pgbench_background(&["-c", "2", "-T", "3"]);
    let (rec, err) = backup_ok(&r, &pg.conninfo("postgres"), &[]);
    assert!(err.contains("fetching the backup's WAL"), "{err}");
    // The stage totals account for every byte: received raw, stored as the catalog says.
    let stages = log_numbers(&err, "backup stage totals");
    let objects = rec["objects"].as_array().unwrap();
    let sum = |f: &str| objects.iter().map(|o| o[f].as_u64().unwrap()).sum::<u64>();
    assert_eq!(stages["received_bytes"], sum("size_bytes"), "{err}");
    assert_eq!(stages["stored_bytes"], sum("stored_bytes"), "{err}");
    assert_eq!(stages["objects"], objects.len() as u64);
    for f in [
        "receive_ms",
        "encode_ms",
        "check_ms",
        "write_ms",
        "finish_ms",
    ] {
        assert!(stages.contains_key(f), "{f}: {err}");
    }
    assert!(load.wait().unwrap().success());
    let id = rec["id"].as_str().unwrap().to_string();
    pg.psql("insert into marker values ('after')");
    // The temporary slot went with the backup's connection.
    assert_eq!(pg.psql("select count(*) from pg_replication_slots"), "0");
    // Every segment from start to stop is archived and identical to the server's.
    let start: String = rec["start_lsn"].as_str().unwrap().into();
    let first = pg.psql(&format!("select pg_walfile_name('{start}'::pg_lsn)"));
    let segs = archived_segments(&repo, 1);
    assert_eq!(
        segs[0].0,
        first,
        "{:?}",
        segs.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    assert!(assert_segments_match(&repo, 1, &pg.wal_dir()) >= 1);

    let restore = dir.join("restore");
    std::fs::create_dir(&restore).unwrap();
    extract(&dir, &repo, &id, "base.tar", &restore);
    verify_by_hand(&dir, &repo, &id, &restore);
    let restored = start_restored(&dir, &repo, &restore);
    pgbench_consistent(&restored);
    assert_eq!(
        restored.psql("select string_agg(t, ',') from marker"),
        "before"
    );
    let accounts = restored.psql("select count(*) from pgbench_accounts");
    assert_eq!(accounts, "100000");

    // info for an unknown id is refused.
    let out = archiver(&["info", "--repo", &r, "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn streamer_resumes_behind_wal_a_backup_archived_ahead_of_it() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let args = ["--repo", &r, "-d", &ci];
    let mut a = Archiver::stream(&dir, "stream", &args);
    pg.psql("create table t as select generate_series(1, 10000) x");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(&repo, &name, T);
    assert!(a.term().success());
    // While no streamer runs, WAL moves on, and a backup archives its own segments ahead.
    for _ in 0..3 {
        pg.psql("insert into t select generate_series(1, 10000); select pg_switch_wal()");
    }
    archiver_ok(&["backup", "--repo", &r, "-d", &ci, "--checkpoint", "fast"]);
    // The streamer restarts from where it stopped, not after the backup's WAL: no gap.
    let mut a = Archiver::stream(&dir, "stream2", &args);
    pg.psql("insert into t select generate_series(1, 10000)");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(&repo, &name, T);
    assert!(a.term().success());
    assert!(assert_segments_match(&repo, 1, &pg.wal_dir()) >= 6);
}

#[test]
fn backup_interrupted_by_a_terminated_walsender_is_failed() {
    // Bound in this order, dropped in the reverse: the streamer first, the directory last.
    let Streaming {
        dir,
        ci,
        r,
        repo,
        pg,
        streamer: mut a,
    } = Streaming::start("", &[]);
    pg.pgbench(&["-i", "-s", "3", "-q"]);
    // Slow the backup down (1 MB/s) so it is surely still running when its walsender dies.
    let slow = [
        "backup",
        "--repo",
        &r,
        "-d",
        &ci,
        "--checkpoint",
        "fast",
        "--max-rate",
        "1024",
    ];
    let mut b = Archiver::spawn(&dir, "backup", &slow);
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
    // A backup killed outright stays `running` until the next one finds its process gone.
    let walsenders = || {
        pg.psql(
            "select count(*) from pg_stat_replication where application_name = 'archiver backup'",
        )
    };
    let recorded = |n: usize| {
        let out = archiver(&["list", "--repo", &r, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|l| l.as_array().is_some_and(|a| a.len() == n))
    };
    // The terminated walsender may linger a moment after its client is gone.
    wait_until("the first backup's walsender gone", T, || {
        walsenders() == "0"
    });
    let mut k = Archiver::spawn(&dir, "backup-killed", &slow);
    wait_until("the second backup recorded and streaming", T, || {
        walsenders() == "1" && recorded(2)
    });
    k.kill9();
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[1]["status"], "running", "{list}");
    // A backup stopped by SIGTERM (a service stop) records itself failed before it exits.
    wait_until("the killed backup's walsender gone", T, || {
        walsenders() == "0"
    });
    let mut t = Archiver::spawn(&dir, "backup-termed", &slow);
    wait_until("the third backup recorded and streaming", T, || {
        walsenders() == "1" && recorded(3)
    });
    t.signal(libc::SIGTERM);
    let st = t.wait(T);
    assert_eq!(st.code(), Some(1), "{}", t.log_text());
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[2]["status"], "failed", "{list}");
    assert!(
        list[2]["error"]
            .as_str()
            .unwrap()
            .contains("interrupted by SIGTERM"),
        "{list}"
    );
    // The next backup is unaffected, and records the killed one as failed.
    archiver_ok(&["backup", "--repo", &r, "-d", &ci, "--checkpoint", "fast"]);
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[1]["status"], "failed", "{list}");
    assert!(list[1]["error"].as_str().unwrap().contains("interrupted"));
    assert_eq!(list[3]["status"], "complete");
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("backup-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(a.term().success());
}

#[test]
fn server_compressed_backup_with_a_tablespace_and_several_databases() {
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
    let mut a = Archiver::stream(&dir, "stream", &["--repo", &r, "-d", &ci]);
    // The server compresses; archiver stores its zstd frames and still checks every file.
    let (rec, err) = backup_ok(&r, &ci, &["--server-compress"]);
    assert!(err.contains("all files match the backup manifest"), "{err}");
    let id = rec["id"].as_str().unwrap().to_string();
    assert!(rec["stored_bytes"].as_u64().unwrap() < rec["size_bytes"].as_u64().unwrap() / 2);
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

#[test]
fn backup_from_a_standby_restores_as_a_cluster() {
    let dir = TestDir::new();
    let mut primary = Pg::create(&dir, "primary", "", "");
    primary.start();
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    let standby = Pg::standby_of(&dir, "standby", &primary);
    primary.psql("create table marker as select 'on the standby' t");
    wait_until("the standby replays the marker", T, || {
        standby.psql("select count(*) from pg_class where relname = 'marker'") == "1"
    });
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let ci = standby.conninfo("postgres");
    let mut a = Archiver::stream(&dir, "stream", &["--repo", &r, "-d", &ci]);
    // Idle primary: the backup's stop segment stays unfinished on the standby, so the streamer
    // cannot archive it. After its grace period (half of --wal-timeout) the backup fetches the
    // WAL itself and archives the stop segment partial.
    let (rec, err) = backup_ok(&r, &ci, &["--wal-timeout", "12s"]);
    assert!(
        err.contains("`archiver stream` has not archived the backup's WAL yet"),
        "{err}"
    );
    assert!(
        err.contains("archived the stop segment as partial"),
        "{err}"
    );
    assert!(a.term().success());
    let id = rec["id"].as_str().unwrap().to_string();

    let restore = dir.join("restore");
    std::fs::create_dir(&restore).unwrap();
    extract(&dir, &repo, &id, "base.tar", &restore);
    // A standby's data directory carries its standby.signal; this restore is a new primary.
    let _ = std::fs::remove_file(restore.join("standby.signal"));
    let restored = start_restored(&dir, &repo, &restore);
    assert_eq!(restored.psql("select t from marker"), "on the standby");
    pgbench_consistent(&restored);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    /// None when this process may not mount (not root, or no CAP_SYS_ADMIN in a container).
    fn mount(at: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// How a full disk is tested: the repository lives on a 24 MB tmpfs mounted for the test, and the
/// database holds ~40 MB of incompressible data, so the backup's first object cannot fit.
#[test]
fn backup_into_a_full_disk_fails_cleanly() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = TestDir::new();
    let Some(fs) = SmallFs::mount(&dir.join("small"), "24m") else {
        eprintln!("skipped: this environment does not allow mounting a tmpfs");
        return;
    };
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    pg.psql(
        "create extension pgcrypto; create table r (b bytea); \
         insert into r select gen_random_bytes(1000) from generate_series(1, 40000)",
    );
    let repo = fs.0.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let args = ["backup", "--repo", &r, "-d", &ci, "--checkpoint", "fast"];
    // Less free space than the databases' size: refused before anything is written.
    let out = archiver(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("free") && err.contains("databases"), "{err}");
    assert!(!repo.join("catalog").exists(), "nothing written");
    // Past that check, the disk fills during the backup.
    let out = archiver(&[&args[..], &["--skip-space-check"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("base.tar"),
        "the error names the object: {err}"
    );
    // Recorded failed, never complete; the half-written object is gone and the space free again.
    let out = archiver(&["list", "--repo", &r, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["status"], "failed", "{list}");
    let id = list[0]["id"].as_str().unwrap();
    let left: Vec<_> = std::fs::read_dir(repo.join("backups").join(id))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(pg.psql("select count(*) from pg_replication_slots") == "0");
    drop(fs);
}
