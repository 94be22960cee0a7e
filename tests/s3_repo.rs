//! A repository in S3 (a real moto server): list, info, wal-fetch, restore (dry run and real)
//! read it through the S3 backend, and the restored cluster recovers from it. Stream and backup
//! into S3 are refused for now (they need local state: the tiered configuration).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel.starts_with("spool") {
            continue;
        }
        if p.is_dir() {
            files(root, &p, out);
        } else {
            out.push(rel);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_from_an_s3_repository() {
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
    let client = moto.client();
    client.create_bucket().bucket("arch").send().await.unwrap();

    // A repository made locally (stream + backup), then copied into the bucket.
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let local = dir.join("repo");
    let l = local.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::spawn(&dir, "stream", &["stream", "--repo", &l, "-d", &ci]);
    a.wait_log("streaming started", T);
    pg.psql("create table t as select generate_series(1, 5000) x");
    let out = archiver(&["backup", "--repo", &l, "-d", &ci, "--checkpoint", "fast"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql("insert into t select generate_series(1, 100)");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(&local, &name, T);
    assert!(a.term().success());
    let mut keys = Vec::new();
    files(&local, &local, &mut keys);
    for k in &keys {
        let body = std::fs::read(local.join(k)).unwrap();
        client
            .put_object()
            .bucket("arch")
            .key(format!("site1/{k}"))
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    let r = "s3://arch/site1";

    // list / info read the catalog from S3.
    let out = archiver(&["list", "--repo", r, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["status"], "complete");
    // wal-fetch serves a segment from S3, byte-identical.
    let dest = dir.join("seg");
    let out = archiver(&[
        "wal-fetch",
        "--repo",
        r,
        "--prefetch",
        "0",
        &name,
        dest.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(pg.wal_dir().join(&name)).unwrap());
    // Dry run, then a restore that recovers from S3 and starts.
    let pgdata = dir.join("restored");
    let p = pgdata.to_str().unwrap();
    let out = archiver(&["restore", "--repo", r, "--pgdata", p, "--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pgdata.exists());
    let mut args = vec!["restore", "--repo", r, "--pgdata", p];
    if is_root() {
        args.extend_from_slice(&["--owner", "postgres"]);
    }
    let out = archiver(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf_path = pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&conf_path).unwrap();
    assert!(text.contains("--repo s3://arch/site1 %f %p"), "{text}");
    let restored = start_recovering(&dir, "restored", pgdata, None);
    assert_eq!(restored.psql("select count(*) from t"), "5100");

    // Stream and backup into S3 are refused, and leave the bucket untouched.
    let out = archiver(&["stream", "--repo", "s3://arch/new", "-d", &ci]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs a local repository directory"), "{err}");
    let out = archiver(&["backup", "--repo", "s3://arch/new", "-d", &ci]);
    assert_eq!(out.status.code(), Some(1));
    let listed = client
        .list_objects_v2()
        .bucket("arch")
        .prefix("new/")
        .send()
        .await
        .unwrap();
    assert!(listed.contents().is_empty());
}
