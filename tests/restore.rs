//! `archiver restore` end to end against real servers: back up, write, lose data, restore to a
//! point before the loss, start the restored cluster and compare.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// A primary with a streamer, a backup, and a table `t` whose history the tests replay.
struct Setup {
    dir: TestDir,
    pg: Pg,
    repo: PathBuf,
    r: String,
    streamer: Archiver,
    bin: PathBuf,
}

fn setup() -> Setup {
    // No autovacuum: the tests know every transaction the WAL holds.
    let Streaming {
        streamer,
        pg,
        repo,
        r,
        ci,
        dir,
    } = Streaming::start("autovacuum = off\n", &[]);
    pg.psql("create table t (id int primary key, v text); insert into t select g, 'v' || g from generate_series(1, 1000) g");
    archiver_ok(&["backup", "--repo", &r, "-d", &ci, "--checkpoint", "fast"]);
    // The server runs restore_command as the postgres user: a copy of the binary it can run.
    let bin = dir.join("archiver-bin");
    std::fs::copy(archiver_bin(), &bin).unwrap();
    Setup {
        dir,
        pg,
        repo,
        r,
        streamer,
        bin,
    }
}

impl Setup {
    /// A checksum of table `t` as the server sees it now (`-` if it does not exist).
    fn state(pg: &Pg) -> String {
        if pg.psql("select to_regclass('t') is null") == "t" {
            return "-".into();
        }
        pg.psql("select md5(string_agg(id || ':' || v, ',' order by id)) from t")
    }

    /// Makes the newest WAL archived: switch, wait for the segment.
    fn archive_now(&self) {
        self.pg.psql("select 1 from pg_switch_wal()");
        let name = self
            .pg
            .psql("select pg_walfile_name(pg_current_wal_lsn() - 1)");
        wait_archived(&self.repo, &name, T);
    }

    /// `archiver restore` into a new directory with `args`; returns the directory.
    fn restore(&self, name: &str, args: &[&str]) -> PathBuf {
        let pgdata = self.dir.join(name);
        let mut all = vec![
            "restore",
            "--repo",
            &self.r,
            "--pgdata",
            pgdata.to_str().unwrap(),
        ];
        if is_root() {
            all.extend_from_slice(&["--owner", "postgres"]);
        }
        all.extend_from_slice(args);
        let out = succeeded(archiver(&all), "archiver");
        // The stage totals: the tar stream is at least every byte of every file written, and
        // the final flush is part of the whole.
        let err = String::from_utf8_lossy(&out.stderr);
        let stages = log_numbers(&err, "restore stage totals");
        let files: u64 = walk(&pgdata).iter().map(|(_, m)| m.len()).sum();
        assert!(stages["raw_bytes"] >= files, "{files}: {err}");
        assert!(stages["sync_ms"] <= stages["wall_ms"], "{err}");
        pgdata
    }

    /// Starts a restored directory and waits until it is promoted.
    fn start(&self, name: &str, pgdata: PathBuf) -> Pg {
        start_recovering(&self.dir, name, pgdata, None)
    }
}

#[test]
fn restores_to_time_lsn_xid_name_and_immediate() {
    let mut s = setup();
    let at_backup = Setup::state(&s.pg);
    // Writes after the backup, each point recorded with the data as it was.
    s.pg.psql("update t set v = 'second' where id <= 100");
    let xid =
        s.pg.psql("begin; update t set v = 'xid' where id <= 10; select txid_current(); commit;");
    let xid = xid
        .lines()
        .find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty())
        .unwrap()
        .to_string();
    let at_xid = Setup::state(&s.pg);
    s.pg.psql("update t set v = 'lsn' where id <= 20");
    let lsn = s.pg.psql("select pg_current_wal_lsn()");
    let at_lsn = Setup::state(&s.pg);
    std::thread::sleep(Duration::from_millis(1100));
    let time = s.pg.psql("select clock_timestamp()");
    let at_time = at_lsn.clone();
    std::thread::sleep(Duration::from_millis(1100));
    s.pg.psql("update t set v = 'named' where id <= 30");
    s.pg.psql("select pg_create_restore_point('before_the_drop')");
    let at_name = Setup::state(&s.pg);
    s.pg.psql("insert into t values (5000, 'late')");
    s.pg.psql("drop table t");
    assert_eq!(Setup::state(&s.pg), "-");
    s.archive_now();

    // To a time (as PostgreSQL prints it, with its +00 zone).
    let d = s.restore("r-time", &["--target-time", &time]);
    let auto = std::fs::read_to_string(d.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("recovery_target_time = '"), "{auto}");
    assert!(d.join("recovery.signal").exists());
    let pg = s.start("r-time", d);
    assert_eq!(Setup::state(&pg), at_time);
    drop(pg);
    // To an LSN, a transaction, a restore point, the end of the backup.
    let pg = s.start("r-lsn", s.restore("r-lsn", &["--target-lsn", &lsn]));
    assert_eq!(Setup::state(&pg), at_lsn);
    drop(pg);
    let pg = s.start("r-xid", s.restore("r-xid", &["--target-xid", &xid]));
    assert_eq!(Setup::state(&pg), at_xid);
    drop(pg);
    let pg = s.start(
        "r-name",
        s.restore("r-name", &["--target-name", "before_the_drop"]),
    );
    assert_eq!(Setup::state(&pg), at_name);
    drop(pg);
    let pg = s.start(
        "r-immediate",
        s.restore("r-immediate", &["--target-immediate"]),
    );
    assert_eq!(Setup::state(&pg), at_backup);
    drop(pg);
    // Latest: everything, the drop included.
    let pg = s.start("r-latest", s.restore("r-latest", &[]));
    assert_eq!(Setup::state(&pg), "-");
    drop(pg);
    assert!(s.streamer.term().success());
}

/// A snapshot of every file under `p` (name, size) for "nothing changed" checks.
fn listing(p: &Path) -> Vec<(String, u64)> {
    walk(p).into_iter().map(|(n, m)| (n, m.len())).collect()
}

fn refused(s: &Setup, args: &[&str], code: i32, needle: &str) {
    let mut all = vec!["restore", "--repo", &s.r];
    all.extend_from_slice(args);
    let out = archiver(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

#[test]
fn dry_run_and_refusals_change_nothing() {
    let mut s = setup();
    s.pg.psql("insert into t values (2000, 'after')");
    // A restore point between two backups: planning finds it in the WAL and picks the older one.
    s.pg.psql("select pg_create_restore_point('between')");
    let ci = s.pg.conninfo("postgres");
    archiver_ok(&["backup", "--repo", &s.r, "-d", &ci, "--checkpoint", "fast"]);
    // A time after the last transaction (read-only statements write none), then WAL without
    // transactions (a restore point), archived.
    let after_last = s.pg.psql("select clock_timestamp()");
    s.pg.psql("select pg_create_restore_point('no_transaction')");
    s.archive_now();
    // The streamer stops first: its spool changes on its own (segments published and removed).
    assert!(s.streamer.term().success());
    let before = listing(&s.repo);
    let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(
        &archiver(&["list", "--repo", &s.r, "--json"]).stdout,
    )
    .unwrap()
    .as_array()
    .unwrap()
    .iter()
    .map(|b| b["id"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(ids.len(), 2);
    let plan_for = |args: &[&str]| -> serde_json::Value {
        let dry = s.dir.join("dry");
        let mut all = vec![
            "restore",
            "--repo",
            &s.r,
            "--pgdata",
            dry.to_str().unwrap(),
            "--dry-run",
            "--json",
        ];
        all.extend_from_slice(args);
        let out = succeeded(archiver(&all), "archiver");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        plan_for(&["--target-name", "between"])["backup_id"],
        ids[0].as_str()
    );
    assert_eq!(plan_for(&[])["backup_id"], ids[1].as_str());
    let pgdata = s.dir.join("new");
    let p = pgdata.to_str().unwrap();

    // Dry run: the plan lists the archived segments from the backup on, writes nothing.
    let out = succeeded(
        archiver(&[
            "restore",
            "--repo",
            &s.r,
            "--pgdata",
            p,
            "--dry-run",
            "--json",
        ]),
        "archiver",
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!pgdata.exists());
    let listed: Vec<&str> = plan["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let rec: serde_json::Value =
        serde_json::from_slice(&archiver(&["list", "--repo", &s.r, "--json"]).stdout).unwrap();
    let start = rec[1]["start_lsn"].as_str().unwrap();
    let first =
        s.pg.psql(&format!("select pg_walfile_name('{start}'::pg_lsn)"));
    let archived: Vec<String> = archived_segments(&s.repo, 1)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| *n >= first)
        .collect();
    assert_eq!(listed, archived);
    // The manifest, base.tar and every segment.
    assert_eq!(
        plan["objects_verified"].as_u64().unwrap(),
        2 + listed.len() as u64
    );
    assert!(plan["bytes_to_restore"].as_u64().unwrap() > 16 << 20);

    // A non-empty destination is refused and left alone.
    let busy = s.dir.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep"), "precious").unwrap();
    refused(&s, &["--pgdata", busy.to_str().unwrap()], 1, "not empty");
    assert_eq!(
        std::fs::read_to_string(busy.join("keep")).unwrap(),
        "precious"
    );
    // Targets outside the archive, with the reachable range in the message.
    refused(
        &s,
        &["--pgdata", p, "--target-time", "2001-01-01 00:00:00"],
        1,
        "the earliest is",
    );
    // A time without a zone is the machine's local time (TZ), and the refusal names the
    // instant in UTC.
    let out = archiver_cmd(
        std::process::Command::new(archiver_bin())
            .args(["restore", "--repo", &s.r, "--pgdata", p])
            .args(["--target-time", "2001-01-01 00:00:00"])
            .env("TZ", "Europe/Paris"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("time 2000-12-31T23:00:00"), "{err}");
    refused(
        &s,
        &["--pgdata", p, "--target-lsn", "FF/0"],
        1,
        "beyond the archive",
    );
    refused(
        &s,
        &["--pgdata", p, "--target-time", &after_last],
        1,
        "recovery stops only at a transaction after the target",
    );
    refused(
        &s,
        &["--pgdata", p, "--target-time", "2099-01-01 00:00:00"],
        1,
        "its newest WAL was received at",
    );
    refused(
        &s,
        &["--pgdata", p, "--backup", "19990101T000000Z"],
        1,
        "no backup with id",
    );
    // A transaction or restore point the archived WAL does not hold.
    refused(
        &s,
        &["--pgdata", p, "--target-xid", "4000000000"],
        1,
        "is not in the archived WAL",
    );
    refused(
        &s,
        &["--pgdata", p, "--target-name", "never_made"],
        1,
        "is not in the archived WAL",
    );
    // Bad or conflicting options are usage errors.
    refused(
        &s,
        &["--pgdata", p, "--target-time", "last tuesday"],
        2,
        "RFC 3339",
    );
    refused(
        &s,
        &["--pgdata", p, "--target-lsn", "0/1", "--target-xid", "5"],
        2,
        "cannot be used with",
    );
    refused(&s, &["--pgdata", p, "--target-lsn", "nope"], 2, "nope");
    refused(
        &s,
        &["--pgdata", p, "--tablespace-mapping", "/a=/b"],
        1,
        "no tablespace at /a",
    );
    assert!(!pgdata.exists());
    assert_eq!(
        listing(&s.repo),
        before,
        "refusals must not touch the repository"
    );

    // A corrupted backup object: the restore fails, names it, and removes what it wrote.
    let id = rec[1]["id"].as_str().unwrap();
    let obj = s.repo.join(format!("backups/{id}/base.tar.zst"));
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&obj, &bytes).unwrap();
    refused(&s, &["--pgdata", p], 1, "base.tar.zst");
    assert!(!pgdata.exists(), "a failed restore leaves nothing behind");
    refused(&s, &["--pgdata", p, "--dry-run"], 1, "corrupt");
    bytes[mid] ^= 0x40;
    std::fs::write(&obj, &bytes).unwrap();

    // A damaged WAL segment of the chain: --verify-wal finds it before anything is written.
    let wal_dir = s.repo.join("wal/00000001");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.to_string_lossy().contains("partial"))
        .collect();
    segs.sort();
    let seg = segs.last().unwrap();
    let mut wal = std::fs::read(seg).unwrap();
    let m = wal.len() / 2;
    wal[m] ^= 0x40;
    std::fs::write(seg, &wal).unwrap();
    let name = seg.file_name().unwrap().to_string_lossy();
    let name = name.trim_end_matches(".zst");
    refused(&s, &["--pgdata", p, "--verify-wal"], 1, name);
    assert!(!pgdata.exists(), "--verify-wal checks before writing");
    wal[m] ^= 0x40;
    std::fs::write(seg, &wal).unwrap();
}

#[test]
fn drill_restores_checks_and_records() {
    let mut s = setup();
    s.pg.psql("insert into t values (3000, 'drilled')");
    s.archive_now();
    let scratch = s.dir.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let good = s.dir.join("good.sql");
    std::fs::write(&good, "select 1 / count(*) from t where id = 3000;").unwrap();
    let bad = s.dir.join("bad.sql");
    std::fs::write(&bad, "select * from no_such_table;").unwrap();
    // Run the copy the postgres user can execute: it becomes the drill's restore_command.
    let drill = |sql: &Path| {
        archiver_cmd(
            std::process::Command::new(&s.bin)
                .args(["drill", "--repo", &s.r, "--json", "--pg-bin"])
                .arg(pg_bin())
                .arg("--scratch")
                .arg(&scratch)
                .arg("--check-sql")
                .arg(sql),
        )
    };
    let out = succeeded(drill(&good), "archiver");
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(res["passed"], true);
    assert!(res["seconds"].as_f64().unwrap() > 0.0);
    assert!(res["achieved_lsn"].as_str().is_some());
    // The last replayed commit's time, read from the server's text into an instant.
    let achieved: archiver::Timestamp = res["achieved_time"]
        .as_str()
        .expect("achieved_time recorded")
        .parse()
        .unwrap();
    assert!(
        archiver::Timestamp::now()
            .duration_since(achieved)
            .as_secs()
            < 3600
    );
    assert!(res["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "check-sql"));
    if pg_bin().join("pg_amcheck").exists() {
        assert!(
            res["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "pg_amcheck"),
            "{res}"
        );
    }
    // Binaries without pg_amcheck: the drill passes and says what it could not check.
    let no_amcheck = s.dir.join("bin-no-amcheck");
    std::fs::create_dir(&no_amcheck).unwrap();
    for e in std::fs::read_dir(pg_bin()).unwrap().flatten() {
        if e.file_name() != "pg_amcheck" {
            std::os::unix::fs::symlink(e.path(), no_amcheck.join(e.file_name())).unwrap();
        }
    }
    let out = succeeded(
        archiver_cmd(
            std::process::Command::new(&s.bin)
                .args(["drill", "--repo", &s.r, "--json", "--pg-bin"])
                .arg(&no_amcheck)
                .arg("--scratch")
                .arg(&scratch),
        ),
        "archiver",
    );
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(res["passed"], true, "{res}");
    let skipped = res["checks_skipped"].as_array().unwrap();
    assert!(
        skipped
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("pg_amcheck: not available")),
        "{res}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_amcheck: not available"));
    // A failing check fails the drill, and both results are in the catalog.
    let out = drill(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no_such_table"), "{err}");
    let list: serde_json::Value =
        serde_json::from_slice(&archiver(&["list", "--repo", &s.r, "--json"]).stdout).unwrap();
    let drills = list[0]["drills"].as_array().unwrap();
    assert_eq!(drills.len(), 3);
    assert_eq!(
        (
            drills[0]["passed"].as_bool(),
            drills[1]["passed"].as_bool(),
            drills[2]["passed"].as_bool()
        ),
        (Some(true), Some(true), Some(false))
    );
    // The record keeps what was checked and what could not be.
    assert!(drills[1]["checks_skipped"][0]
        .as_str()
        .unwrap()
        .contains("pg_amcheck"));
    // Binaries of another major version are refused before anything is done or recorded.
    match std::env::var("ARCHIVER_TEST_OTHER_PG_BIN")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(other) => {
            let out = archiver(&["drill", "--repo", &s.r, "--pg-bin", &other]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("the backup is PostgreSQL 15"), "{err}");
        }
        None => eprintln!("skipped: no other-major binaries (scripts/test.sh fetches them)"),
    }
    let table = String::from_utf8_lossy(&archiver(&["list", "--repo", &s.r]).stdout).into_owned();
    assert!(table.contains("FAILED"), "{table}");
    // Everything the drills made is gone, and no server is left running.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    assert!(s.streamer.term().success());
}

#[test]
fn tablespace_mapping_and_a_busy_tablespace_directory() {
    let mut s = setup();
    let ts = s.dir.join("ts");
    std::fs::create_dir(&ts).unwrap();
    chown_pg(&ts);
    s.pg.psql(&format!("create tablespace ts location '{}'", ts.display()));
    s.pg.psql("create table in_ts tablespace ts as select generate_series(1, 5000) x");
    let ci = s.pg.conninfo("postgres");
    archiver_ok(&["backup", "--repo", &s.r, "-d", &ci, "--checkpoint", "fast"]);
    s.archive_now();
    // The tablespace's own directory is in use (not empty): refused, nothing written.
    let out = archiver(&[
        "restore",
        "--repo",
        &s.r,
        "--pgdata",
        s.dir.join("r1").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tablespace directory") && err.contains("not empty"),
        "{err}"
    );
    assert!(!s.dir.join("r1").exists());
    // Mapped elsewhere: the restored cluster reads the table from the new place.
    let moved = s.dir.join("ts-moved");
    let mapping = format!("{}={}", ts.display(), moved.display());
    let d = s.restore(
        "r2",
        &["--tablespace-mapping", &mapping, "--target-immediate"],
    );
    assert!(std::fs::read_dir(&moved).unwrap().count() > 0);
    let pg = s.start("r2", d);
    assert_eq!(pg.psql("select count(*) from in_ts"), "5000");
    assert_eq!(
        pg.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts'"),
        moved.to_str().unwrap()
    );
    drop(pg);
    assert!(s.streamer.term().success());
}

#[test]
fn restores_onto_timeline_2_and_to_a_point_on_timeline_1_before_it() {
    let dir = TestDir::new();
    let mut primary = Pg::create(&dir, "primary", "", "");
    primary.start();
    let standby = Pg::standby_of(&dir, "standby", &primary);
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    // The streamer follows the standby, so it sees the promotion.
    let mut a = Archiver::stream(
        &dir,
        "stream",
        &["--repo", &r, "-d", &standby.conninfo("postgres")],
    );
    primary.psql("create table t (v text); insert into t values ('base')");
    archiver_ok(&[
        "backup",
        "--repo",
        &r,
        "-d",
        &primary.conninfo("postgres"),
        "--checkpoint",
        "fast",
    ]);
    primary.psql("insert into t values ('tli1')");
    let l1 = primary.psql("select pg_current_wal_lsn()");
    primary.psql("insert into t values ('tli1-late')");
    wait_until("the standby replays everything", T, || {
        standby.psql("select count(*) from t") == "3"
    });
    primary.stop();
    standby.promote();
    standby.psql("insert into t values ('tli2')");
    let name = current_walfile(&standby);
    standby.psql("select pg_switch_wal()");
    wait_archived(&repo, &name, T);
    assert!(a.term().success());

    let restore = |name: &str, args: &[&str]| -> Pg {
        let pgdata = dir.join(name);
        let mut all = vec![
            "restore",
            "--repo",
            &r,
            "--pgdata",
            pgdata.to_str().unwrap(),
        ];
        if is_root() {
            all.extend_from_slice(&["--owner", "postgres"]);
        }
        all.extend_from_slice(args);
        succeeded(archiver(&all), "archiver");
        start_recovering(&dir, name, pgdata, None)
    };
    let rows = |pg: &Pg| pg.psql("select string_agg(v, ',' order by v) from t");
    // Latest: along timeline 2, the promotion's write included.
    let pg = restore("latest", &[]);
    assert_eq!(rows(&pg), "base,tli1,tli1-late,tli2");
    drop(pg);
    // A point on timeline 1 before the promotion: it lies in timeline 1's last segment, which
    // the archive holds only as a partial; the plan says so.
    let out = succeeded(
        archiver(&[
            "restore",
            "--repo",
            &r,
            "--pgdata",
            dir.join("unused").to_str().unwrap(),
            "--target-timeline",
            "1",
            "--target-lsn",
            &l1,
            "--dry-run",
            "--json",
        ]),
        "archiver",
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let segs = plan["segments"].as_array().unwrap();
    assert_eq!(segs.last().unwrap()["partial"], true, "{plan}");
    assert_eq!(plan["timeline"], 1);
    let pg = restore("on-tli1", &["--target-timeline", "1", "--target-lsn", &l1]);
    assert_eq!(rows(&pg), "base,tli1");
    drop(pg);
}
