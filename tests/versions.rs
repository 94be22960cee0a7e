//! Another major version: PostgreSQL 14's BASE_BACKUP protocol (one COPY per tablespace, the
//! unparenthesised command), its backup restored and started with its own binaries. Runs when
//! scripts/test.sh has fetched PostgreSQL 14 (ARCHIVER_TEST_OTHER_PG_BIN); says it is skipped
//! otherwise.

mod common;

use std::path::PathBuf;

use common::*;

#[test]
fn postgresql_14_backup_with_a_tablespace_restores_and_starts() {
    let Some(bin) = std::env::var("ARCHIVER_TEST_OTHER_PG_BIN")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        eprintln!("skipped: no PostgreSQL 14 binaries (scripts/test.sh fetches them)");
        return;
    };
    let bin = PathBuf::from(bin);
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
