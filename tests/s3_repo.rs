//! A repository in S3 (a real moto server), written and read through the S3 backend alone:
//! `stream` and `backup` into `--repo s3://…` (with a local `--spool-dir`), then list, info,
//! wal-fetch, a dry run and a point-in-time restore from it; the restored cluster recovers
//! through `wal-fetch` from S3. Stream into S3 without a spool directory is refused.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn stream_backup_and_restore_entirely_in_s3() {
    let Some(moto) = Moto::start() else {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    };
    // The one test in this binary: its environment is every child's (archiver, pg_ctl and so
    // the server's restore_command).
    std::env::set_var("AWS_ENDPOINT_URL", &moto.endpoint);
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let client = moto.bucket("arch", false).await;

    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let r = "s3://arch/site1";

    // Without --spool-dir, a default one per repository URL (under XDG_STATE_HOME here), said
    // in --help. A bucket that does not exist is refused, and nothing is created.
    let state = dir.join("state");
    std::env::set_var("XDG_STATE_HOME", &state);
    let help = String::from_utf8_lossy(&archiver(&["stream", "--help"]).stdout).into_owned();
    assert!(help.contains("XDG_STATE_HOME"), "{help}");
    let out = archiver(&["backup", "--repo", "s3://nobucket/x", "-d", &ci]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("NoSuchBucket"), "{err}");
    assert!(!state.exists(), "a refused command creates nothing");
    let spool = dir.join("spool");
    let sp = spool.to_str().unwrap();
    let out = archiver(&[
        "backup",
        "--repo",
        "s3://nobucket/x",
        "--spool-dir",
        sp,
        "-d",
        &ci,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("NoSuchBucket"), "{err}");
    assert!(bucket_keys(&client, "arch", "").await.is_empty());

    let mut a = Archiver::stream(
        &dir,
        "stream",
        &[
            "--repo",
            r,
            "--spool-dir",
            sp,
            "-d",
            &ci,
            "--partial-upload-interval",
            "1s",
        ],
    );
    pg.psql("create table t as select generate_series(1, 5000) x");
    // The segment being received is shipped as it grows, straight into S3 too.
    let current = current_walfile(&pg);
    let partial = format!("site1/wal/{}/{current}.partial.zst", &current[0..8]);
    let start = std::time::Instant::now();
    while !bucket_keys(&client, "arch", "site1/wal/")
        .await
        .contains(&partial)
    {
        assert!(
            start.elapsed() < T,
            "{partial} not shipped:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    archiver_ok(&[
        "backup",
        "--repo",
        r,
        "--spool-dir",
        sp,
        "-d",
        &ci,
        "--checkpoint",
        "fast",
    ]);
    pg.psql("insert into t select generate_series(1, 100)");
    std::thread::sleep(Duration::from_millis(1100));
    let target = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into t select generate_series(1, 7)");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    let key = format!("site1/wal/{}/{name}.zst", &name[0..8]);
    let start = std::time::Instant::now();
    while !bucket_keys(&client, "arch", "site1/wal/")
        .await
        .contains(&key)
    {
        assert!(
            start.elapsed() < T,
            "{key} not in the bucket:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.term().success());
    // Everything is in the bucket; the spool holds no objects.
    let all = bucket_keys(&client, "arch", "site1/").await;
    assert!(all.contains(&"site1/repo.json".to_string()), "{all:?}");
    assert!(all.iter().any(|k| k.ends_with("base.tar.zst")), "{all:?}");

    // list / info read the catalog from S3.
    let out = succeeded(archiver(&["list", "--repo", r, "--json"]), "archiver");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["status"], "complete");
    // wal-fetch serves a segment from S3, byte-identical.
    let dest = dir.join("seg");
    archiver_ok(&[
        "wal-fetch",
        "--repo",
        r,
        "--prefetch",
        "0",
        &name,
        dest.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(pg.wal_dir().join(&name)).unwrap());
    // Dry run, then a point-in-time restore that recovers from S3 and starts.
    let pgdata = dir.join("restored");
    let p = pgdata.to_str().unwrap();
    let tt = ["--target-time", target.as_str()];
    let mut args = vec!["restore", "--repo", r, "--pgdata", p, "--dry-run", "--json"];
    args.extend_from_slice(&tt);
    succeeded(archiver(&args), "archiver");
    assert!(!pgdata.exists());
    let mut args = vec!["restore", "--repo", r, "--pgdata", p];
    args.extend_from_slice(&tt);
    if is_root() {
        args.extend_from_slice(&["--owner", "postgres"]);
    }
    succeeded(archiver(&args), "archiver");
    let conf_path = pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&conf_path).unwrap();
    assert!(text.contains("--repo s3://arch/site1 %f %p"), "{text}");
    let restored = start_recovering(&dir, "restored", pgdata, None);
    assert_eq!(
        restored.psql("select count(*) from t"),
        "5100",
        "the row inserted after the target time is not there"
    );
}
