//! Tiered repositories (`--config`): a local hot tier and a remote tier in a real moto server.
//! Stream and backup land in the hot tier and are shipped, encrypted, to the remote tier; the
//! growing partial segment is shipped every second, so a commit that never filled a segment is
//! offsite within seconds; the hot tier evicts what the remote tier holds verified; and after
//! the host is lost (kill -9, the hot tier deleted) a restore from the remote tier alone reaches
//! that commit. A wrong key is refused, changing nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// Credentials for moto; the same in every test of this binary (endpoints are per config).
fn aws_env() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::remove_var("AWS_ENDPOINT_URL");
}

pub fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn write_key(dir: &TestDir, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, hex_key(byte)).unwrap();
    // The recovering server's restore_command (as postgres) reads it too.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

fn hex_key(byte: u8) -> String {
    format!("{byte:02x}").repeat(32) + "\n"
}

fn write_config(dir: &TestDir, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// `spool/tiers.json` of a hot tier: the first tier's durable LSN, if any.
fn durable_lsn(hot: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(hot.join("spool/tiers.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["tiers"][0]["durable"]["lsn"].as_str().map(lsn)
}

pub async fn bucket_keys(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        for o in p.unwrap().contents() {
            out.push(o.key().unwrap().to_string());
        }
    }
    out
}

async fn object(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let o = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    o.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn offsite_within_seconds_and_restore_after_losing_the_hot_tier() {
    let Some(moto) = Moto::start() else {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    };
    aws_env();
    let client = moto.client();
    client
        .create_bucket()
        .bucket("offsite")
        .send()
        .await
        .unwrap();
    let dir = TestDir::new();
    let hot = dir.join("hot");
    let key = write_key(&dir, "key", 0x5a);
    let cfg = write_config(
        &dir,
        "archiver.toml",
        &format!(
            r#"
[hot]
path = "{}"
retention = "3s"

[upload]
partial_upload_interval = "1s"
concurrency = 3

[encryption]
key_file = "{}"

[[remote]]
name = "offsite"
url = "s3://offsite/site1"
endpoint = "{}"
region = "us-east-1"
storage_class = "STANDARD_IA"
"#,
            hot.display(),
            key.display(),
            moto.endpoint
        ),
    );
    let c = cfg.to_str().unwrap();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::spawn(
        &dir,
        "stream",
        &[
            "stream",
            "--config",
            c,
            "-d",
            &ci,
            "--fsync-interval",
            "200ms",
        ],
    );
    a.wait_log("streaming started", T);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let out = archiver(&["backup", "--config", c, "-d", &ci, "--checkpoint", "fast"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The backup returned once the remote tier held it: encrypted, under the prefix.
    let keys = bucket_keys(&client, "offsite").await;
    let base = format!("site1/backups/{id}/base.tar.zst");
    assert!(keys.contains(&base), "{keys:?}");
    assert!(
        keys.contains(&format!("site1/catalog/{id}.json")),
        "{keys:?}"
    );
    assert!(keys.contains(&"site1/repo.json".to_string()), "{keys:?}");
    let stored = object(&client, "offsite", &base).await;
    assert_eq!(&stored[..8], b"ARCVENC1", "remote objects are encrypted");
    let plain_hot = std::fs::read(hot.join(format!("backups/{id}/base.tar.zst"))).unwrap();
    assert!(
        !stored.windows(8).any(|w| w == b"ARCHVR01"),
        "no plaintext trailer"
    );
    assert_ne!(stored.len(), plain_hot.len());
    let head = client
        .head_object()
        .bucket("offsite")
        .key(&base)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.storage_class().map(|s| s.as_str()),
        Some("STANDARD_IA")
    );

    // A commit that fills no segment: offsite within seconds, through the partial segment.
    pg.psql("create table marker as select 42 as x");
    let committed = lsn(&pg.psql("select pg_current_wal_flush_lsn()"));
    let t0 = Instant::now();
    wait_until("the remote tier holds the commit", T, || {
        durable_lsn(&hot).is_some_and(|d| d >= committed)
    });
    eprintln!("offsite lag of the commit: {:?}", t0.elapsed());
    let partials: Vec<String> = bucket_keys(&client, "offsite")
        .await
        .into_iter()
        .filter(|k| k.ends_with(".partial.zst"))
        .collect();
    assert_eq!(
        partials.len(),
        1,
        "one partial, the current segment: {partials:?}"
    );

    // Hot-tier retention: segments older than 3 s leave the hot tier, once offsite.
    let evicted = |keys: &[String]| {
        keys.iter()
            .filter(|k| k.starts_with("site1/wal/00000001/") && !k.contains("partial"))
            .filter(|k| !hot.join(k.strip_prefix("site1/").unwrap()).exists())
            .count()
    };
    let start = Instant::now();
    loop {
        let keys = bucket_keys(&client, "offsite").await;
        if evicted(&keys) > 0 {
            break;
        }
        assert!(start.elapsed() < T, "nothing evicted:\n{}", a.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(hot.join("repo.json").exists() && hot.join(format!("catalog/{id}.json")).exists());

    // The host is lost: archiver killed, the hot tier gone.
    a.kill9();
    std::fs::remove_dir_all(&hot).unwrap();

    // A wrong key: refused with the reason, nothing written.
    let wrong = write_key(&dir, "wrong-key", 0x11);
    let bad = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(key.to_str().unwrap(), wrong.to_str().unwrap());
    let bad_cfg = write_config(&dir, "wrong.toml", &bad);
    let pgdata = dir.join("restored");
    let p = pgdata.to_str().unwrap();
    let out = archiver(&[
        "restore",
        "--config",
        bad_cfg.to_str().unwrap(),
        "--pgdata",
        p,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another key"), "{err}");
    assert!(!pgdata.exists());
    // No key at all: the objects say they are encrypted.
    let out = archiver_cmd(
        std::process::Command::new(archiver_bin())
            .args(["list", "--repo", "s3://offsite/site1"])
            .env("AWS_ENDPOINT_URL", &moto.endpoint),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("encrypted"), "{err}");

    // The right key: restore from the remote tier alone, up to the partial segment.
    let mut args = vec!["restore", "--config", c, "--pgdata", p];
    if is_root() {
        args.extend_from_slice(&["--owner", "postgres"]);
    }
    let out = archiver(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.stop();
    let restored = start_recovering(&dir, "restored", pgdata, None);
    assert_eq!(restored.psql("select x from marker"), "42");
    assert_eq!(
        restored.psql("select count(*) from pgbench_accounts"),
        "200000"
    );
}
