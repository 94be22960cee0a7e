//! Tiered repositories (`--config`): a local hot tier and a remote tier in a real moto server.
//! Stream and backup land in the hot tier and are shipped, encrypted, to the remote tier; the
//! growing partial segment is shipped every second, so a commit that never filled a segment is
//! offsite within seconds; the hot tier evicts what the remote tier holds verified; and after
//! the host is lost (kill -9, the hot tier deleted) a restore from the remote tier alone reaches
//! that commit. A wrong key is refused, changing nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// A moto server, with the environment set for it; None (the test says it is skipped) when
/// none is installed.
fn moto() -> Option<Moto> {
    let m = Moto::start();
    if m.is_none() {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
    }
    aws_env();
    m
}

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

/// `spool/tiers.json` of a hot tier: the lowest durable LSN of its tiers (None while any has
/// none).
fn durable_lsn(hot: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(hot.join("spool/tiers.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["tiers"]
        .as_array()?
        .iter()
        .map(|t| t["durable"]["lsn"].as_str().map(lsn))
        .collect::<Option<Vec<u64>>>()?
        .into_iter()
        .min()
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
    let Some(moto) = moto() else { return };
    let client = moto.bucket("offsite", false).await;
    moto.bucket("second", false).await;
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

[[remote]]
name = "second"
url = "s3://second/copy"
endpoint = "{}"
region = "us-east-1"
"#,
            hot.display(),
            key.display(),
            moto.endpoint,
            moto.endpoint
        ),
    );
    let c = cfg.to_str().unwrap();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::stream(
        &dir,
        "stream",
        &["--config", c, "-d", &ci, "--fsync-interval", "200ms"],
    );
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let out = succeeded(
        archiver_cmd(
            Command::new(archiver_bin())
                .args(["backup", "--config", c, "-d", &ci, "--checkpoint", "fast"])
                .env("ARCHIVER_LOG", "info,archiver::upload=debug"),
        ),
        "archiver",
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The archive went to both tiers while it was written, and only that way.
    let log = String::from_utf8_lossy(&out.stderr);
    let shipped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("base.tar.zst") && l.contains("uploaded"))
        .collect();
    assert_eq!(shipped.len(), 2, "{log}");
    assert!(
        shipped.iter().all(|l| l.contains("uploaded while written")),
        "{log}"
    );
    // The backup returned once the remote tier held it: encrypted, under the prefix.
    let keys = bucket_keys(&client, "offsite", "").await;
    let base = format!("site1/backups/{id}/base.tar.zst");
    assert!(keys.contains(&base), "{keys:?}");
    assert!(
        keys.contains(&format!("site1/catalog/{id}.json")),
        "{keys:?}"
    );
    assert!(keys.contains(&"site1/repo.json".to_string()), "{keys:?}");
    // The second copy (3-2-1) holds it too.
    let second = bucket_keys(&client, "second", "").await;
    assert!(
        second.contains(&format!("copy/backups/{id}/base.tar.zst")),
        "{second:?}"
    );
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
    // Two commits a couple of seconds apart, neither filling a segment: a time between them
    // is a target inside the partial segment.
    pg.psql("create table marker as select 42 as x");
    std::thread::sleep(Duration::from_millis(1100));
    let between = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into marker values (43)");
    let committed = lsn(&pg.psql("select pg_current_wal_flush_lsn()"));
    let t0 = Instant::now();
    wait_until("the remote tier holds the commit", T, || {
        durable_lsn(&hot).is_some_and(|d| d >= committed)
    });
    eprintln!("offsite lag of the commit: {:?}", t0.elapsed());
    // `archiver tiers` shows it, as a table or JSON.
    let out = succeeded(archiver(&["tiers", "--config", c, "--json"]), "archiver");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tiers"][0]["name"], "offsite");
    assert_eq!(v["tiers"][1]["name"], "second");
    assert!(lsn(v["tiers"][0]["durable"]["lsn"].as_str().unwrap()) >= committed);
    let out = archiver(&["tiers", "--config", c]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("offsite") && table.contains("s3://offsite/site1"),
        "{table}"
    );
    let partials: Vec<String> = bucket_keys(&client, "offsite", "")
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
        let keys = bucket_keys(&client, "offsite", "").await;
        if evicted(&keys) > 0 {
            break;
        }
        assert!(start.elapsed() < T, "nothing evicted:\n{}", a.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(hot.join("repo.json").exists() && hot.join(format!("catalog/{id}.json")).exists());
    // The WAL index and the relation names are shipped like every object.
    let mut shipped = false;
    for _ in 0..100 {
        let keys = bucket_keys(&client, "offsite", "").await;
        shipped = keys.iter().any(|k| k.starts_with("site1/index/00000001/"))
            && keys.iter().any(|k| k.starts_with("site1/relmaps/"));
        if shipped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(shipped, "no index or relmaps objects offsite");

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

    // The right key: restore from the remote tier alone — to a time inside the partial
    // segment, then to its end.
    pg.stop();
    let restore = |pgdata: &Path, target: Option<&str>| {
        let mut args = vec![
            "restore",
            "--config",
            c,
            "--pgdata",
            pgdata.to_str().unwrap(),
        ];
        if let Some(t) = target {
            args.extend_from_slice(&["--target-time", t]);
        }
        if is_root() {
            args.extend_from_slice(&["--owner", "postgres"]);
        }
        succeeded(archiver(&args), "archiver");
    };
    restore(&pgdata, Some(&between));
    let mut at_time = start_recovering(&dir, "restored", pgdata, None);
    assert_eq!(
        at_time.psql("select string_agg(x::text, ',') from marker"),
        "42"
    );
    at_time.stop();
    let latest = dir.join("restored-latest");
    restore(&latest, None);
    let restored = start_recovering(&dir, "restored-latest", latest, None);
    assert_eq!(
        restored.psql("select string_agg(x::text, ',' order by x) from marker"),
        "42,43"
    );
    assert_eq!(
        restored.psql("select count(*) from pgbench_accounts"),
        "200000"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_between_archiver_and_s3_lose_nothing() {
    let Some(moto) = moto() else { return };
    let client = moto.bucket("flaky", false).await;
    let proxy = FaultyProxy::start(&moto.endpoint);
    let dir = TestDir::new();
    let hot = dir.join("hot");
    let cfg = write_config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[upload]\npartial_upload_interval = \"1s\"\nconcurrency = 4\n\
             [[remote]]\nname = \"flaky\"\nurl = \"s3://flaky/r\"\nendpoint = \"{}\"\n",
            hot.display(),
            proxy.endpoint
        ),
    );
    let c = cfg.to_str().unwrap();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::stream(&dir, "stream", &["--config", c, "-d", &ci]);
    // Some poorly compressible data, so the backup's archive is a multipart upload.
    pg.psql(
        "create table r as select md5(random()::text) || md5(random()::text) as v \
         from generate_series(1, 400000)",
    );
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let mut load = pg.pgbench_background(&["-c", "2", "-T", "6"]);
    let out = succeeded(
        archiver(&[
            "backup",
            "--config",
            c,
            "-d",
            &ci,
            "--compress",
            "1",
            "--checkpoint",
            "fast",
        ]),
        "the backup completes and ships despite the faults",
    );
    let backup_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(load.wait().unwrap().success());
    pg.psql("select pg_switch_wal()");
    let flushed = lsn(&pg.psql("select pg_current_wal_flush_lsn()"));
    wait_until(
        "the remote tier catches up",
        Duration::from_secs(90),
        || durable_lsn(&hot).is_some_and(|d| d >= flushed),
    );
    assert!(a.term().success(), "{}", a.log_text());

    // Nothing acknowledged that the hot tier does not hold: the slot's position is covered by
    // complete segments identical to the server's, plus the spool's partial prefix.
    let restart =
        lsn(&pg.psql("select restart_lsn from pg_replication_slots where slot_name = 'archiver'"));
    let compared = assert_segments_match(&hot, 1, &pg.wal_dir());
    assert!(compared > 0);
    let seg = restart / (16 << 20);
    let off = (restart % (16 << 20)) as usize;
    if off > 0 {
        let name = format!("00000001{:08X}{:08X}", seg >> 8, seg & 0xff);
        let spool = std::fs::read(hot.join(format!("spool/{name}.partial"))).unwrap();
        let server = std::fs::read(pg.wal_dir().join(&name)).unwrap();
        assert!(
            spool[..off] == server[..off],
            "the acknowledged prefix of {name} is in the spool"
        );
    }

    // Every object of the hot tier is in the remote tier, whole and verified (read from the
    // S3 server directly, not through the proxy).
    let remote = bucket_keys(&client, "flaky", "").await;
    let mut checked = 0;
    let mut multipart = false;
    for k in walk_keys(&hot) {
        let rk = format!("r/{k}");
        assert!(remote.contains(&rk), "{k} is not in the remote tier");
        let body = object(&client, "flaky", &rk).await;
        assert!(
            body == std::fs::read(hot.join(&k)).unwrap(),
            "{k} differs in the remote tier"
        );
        if k.ends_with(".zst") {
            archiver::decode_bytes(&body).expect("the remote object verifies");
            multipart |= body.len() > archiver::PART_SIZE;
        }
        checked += 1;
    }
    assert!(checked > 5, "{checked}");
    assert!(multipart, "a multipart upload went through the faults");
    let faults = proxy.faults.load(std::sync::atomic::Ordering::Relaxed);
    let conns = proxy.connections.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        faults >= 5 && faults * 3 >= conns,
        "{faults} faults in {conns} connections"
    );
    let logs = a.log_text() + &backup_log;
    assert!(logs.contains("retrying"), "retries show in the logs");
    eprintln!("faults injected: {faults} in {conns} connections, objects checked: {checked}");
}

/// Object keys of a hot tier (not the spool).
fn walk_keys(hot: &Path) -> Vec<String> {
    walk(hot)
        .into_iter()
        .filter(|(k, m)| {
            !m.is_dir() && !k.contains(".tmp-") && k != "spool" && !k.starts_with("spool/")
        })
        .map(|(k, _)| k)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tier_configurations_fail_fast_and_change_nothing() {
    let Some(moto) = moto() else { return };
    let client = moto.bucket("exists", false).await;
    let dir = TestDir::new();
    let hot = dir.join("hot");
    let remote = |bucket: &str, endpoint: &str| {
        format!("[[remote]]\nname = \"r\"\nurl = \"s3://{bucket}/p\"\nendpoint = \"{endpoint}\"\n")
    };
    let hot_section = format!("[hot]\npath = \"{}\"\n", hot.display());
    // The server is never reached: every refusal comes first.
    let ci = "host=127.0.0.1 port=1 user=postgres";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{hot_section}{}", remote("missing", &moto.endpoint)),
            "NoSuchBucket",
        ),
        (
            format!("{hot_section}[upload]\nconcurency = 2\n"),
            "concurency",
        ),
        (
            format!(
                "{hot_section}[encryption]\nkey_file = \"{}\"\n{}",
                dir.join("no-such-key").display(),
                remote("exists", &moto.endpoint)
            ),
            "no-such-key",
        ),
        (
            format!(
                "{hot_section}{}sse = \"rot13\"\n",
                remote("exists", &moto.endpoint)
            ),
            "rot13",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let cfg = write_config(&dir, &format!("c{i}.toml"), text);
        for cmd in ["stream", "backup"] {
            let out = archiver(&[cmd, "--config", cfg.to_str().unwrap(), "-d", ci]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {text}: {err}");
            assert!(err.contains(needle), "{cmd}: {err}");
            assert!(!hot.exists(), "{cmd} created the hot tier: {err}");
        }
    }
    let out = archiver(&["list", "--config", dir.join("none.toml").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("none.toml"), "{err}");
    assert!(bucket_keys(&client, "exists", "").await.is_empty());

    // An S3 repository nobody answers for: refused within seconds, by readers and writers.
    let spool = dir.join("spool");
    for args in [
        vec!["list", "--repo", "s3://b/p"],
        vec![
            "stream",
            "--repo",
            "s3://b/p",
            "--spool-dir",
            spool.to_str().unwrap(),
            "-d",
            ci,
        ],
    ] {
        let t = Instant::now();
        let out = archiver_cmd(
            std::process::Command::new(archiver_bin())
                .args(&args)
                .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("could not reach"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(!spool.exists());
    }

    // Credentials the server does not accept: refused at once, the secret never printed.
    let Some(strict) = Moto::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]) else {
        return;
    };
    let cfg = write_config(
        &dir,
        "strict.toml",
        &format!("{hot_section}{}", remote("exists", &strict.endpoint)),
    );
    let out = archiver_cmd(
        std::process::Command::new(archiver_bin())
            .args(["stream", "--config", cfg.to_str().unwrap(), "-d", ci])
            .env("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    eprintln!("{err}");
    assert!(
        err.contains("InvalidAccessKeyId") || err.contains("credentials"),
        "{err}"
    );
    assert!(!err.contains("very-secret-value"), "{err}");
    assert!(!hot.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn object_lock_refuses_deleting_archived_objects() {
    let Some(moto) = moto() else { return };
    let client = moto.bucket("locked", true).await;
    let dir = TestDir::new();
    let hot = dir.join("hot");
    let cfg = write_config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[[remote]]\nname = \"locked\"\nurl = \"s3://locked/r\"\n\
             endpoint = \"{}\"\nobject_lock_mode = \"COMPLIANCE\"\nobject_lock_days = 1\n\
             sse = \"aws:kms\"\nsse_kms_key_id = \"alias/archiver-test\"\n",
            hot.display(),
            moto.endpoint
        ),
    );
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let c = cfg.to_str().unwrap();
    let out = succeeded(
        archiver(&["backup", "--config", c, "-d", &ci, "--checkpoint", "fast"]),
        "archiver",
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let key = format!("r/backups/{id}/base.tar.zst");
    let head = client
        .head_object()
        .bucket("locked")
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.object_lock_mode().map(|m| m.as_str()),
        Some("COMPLIANCE")
    );
    assert_eq!(
        head.server_side_encryption().map(|s| s.as_str()),
        Some("aws:kms")
    );
    assert_eq!(head.ssekms_key_id(), Some("alias/archiver-test"));
    let until = head.object_lock_retain_until_date().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now + 86_400 - 3600..now + 86_400 + 3600).contains(&until.secs()),
        "retained for a day: {until:?}"
    );
    // Deleting the object's version (what a compromised host would do) is refused.
    let version = head.version_id().unwrap().to_string();
    let del = client
        .delete_object()
        .bucket("locked")
        .key(&key)
        .version_id(&version)
        .send()
        .await;
    assert!(del.is_err(), "a locked version was deleted");
    let still = client
        .get_object()
        .bucket("locked")
        .key(&key)
        .version_id(&version)
        .send()
        .await;
    assert!(still.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tier_without_write_permission_fails_the_backup_at_once() {
    // moto checking credentials and IAM policies: a user who may list and read, not write.
    // AWS authorizes ListObjectsV2 as s3:ListBucket; moto 5.2 checks s3:ListObjectsV2; both named.
    let Some(moto) = Moto::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]) else {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    };
    aws_env();
    let python = Path::new(&std::env::var("ARCHIVER_TEST_MOTO").unwrap()).with_file_name("python");
    let out = succeeded(
        std::process::Command::new(python)
            .arg("-c")
            .arg(
                r#"
import boto3, json, sys
ep = sys.argv[1]
boto3.client("s3", endpoint_url=ep).create_bucket(Bucket="readonly")
iam = boto3.client("iam", endpoint_url=ep)
iam.create_user(UserName="ro")
iam.put_user_policy(UserName="ro", PolicyName="read", PolicyDocument=json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow",
                   "Action": ["s3:ListBucket", "s3:ListObjectsV2", "s3:GetObject"],
                   "Resource": "*"}]}))
k = iam.create_access_key(UserName="ro")["AccessKey"]
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
            )
            .arg(&moto.endpoint)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .unwrap(),
        "creating a read-only S3 user",
    );
    let creds = String::from_utf8(out.stdout).unwrap();
    let (id, secret) = creds.trim().split_once(' ').unwrap();
    let dir = TestDir::new();
    let cfg = write_config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[[remote]]\nname = \"ro\"\nurl = \"s3://readonly/r\"\nendpoint = \"{}\"\n",
            dir.join("hot").display(),
            moto.endpoint
        ),
    );
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let t = Instant::now();
    let out = archiver_cmd(
        std::process::Command::new(archiver_bin())
            .args(["backup", "--config", cfg.to_str().unwrap(), "-d"])
            .arg(pg.conninfo("postgres"))
            .args(["--checkpoint", "fast"])
            .env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("AccessDenied"), "{err}");
    assert!(err.contains("complete in the hot tier"), "{err}");
    assert!(!err.contains(secret), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(45),
        "not waited out: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_goes_on_while_the_remote_tier_is_down_and_catches_up() {
    if std::env::var("ARCHIVER_TEST_MOTO").map_or(true, |v| v.is_empty()) {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    }
    aws_env();
    // The remote tier's endpoint answers nothing yet.
    let port = free_port();
    let dir = TestDir::new();
    let hot = dir.join("hot");
    let cfg = write_config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[upload]\npartial_upload_interval = \"1s\"\n\
             [[remote]]\nname = \"later\"\nurl = \"s3://later/r\"\nendpoint = \"http://127.0.0.1:{port}\"\n",
            hot.display()
        ),
    );
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let stream = ["--config", cfg.to_str().unwrap(), "-d", &ci];
    // A new hot tier is not initialised while the remote tier cannot be seen.
    let out = archiver(&[&["stream"][..], &stream].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no repository yet"), "{err}");
    assert!(!hot.exists());
    // The repository is set up while S3 answers; then S3 goes away.
    let moto = Moto::start_on(port, &[]).unwrap();
    moto.bucket("later", false).await;
    let mut a = Archiver::stream(&dir, "stream-1", &stream);
    assert!(a.term().success());
    drop(moto);
    let mut a = Archiver::stream(&dir, "stream", &stream);
    assert!(
        a.log_text().contains("unreachable for now"),
        "{}",
        a.log_text()
    );
    // The hot tier keeps archiving; the tier's state says what is behind.
    pg.psql("create table t as select generate_series(1, 1000) x");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(&hot, &name, T);
    wait_until("the tier state shows the outage", T, || {
        std::fs::read_to_string(hot.join("spool/tiers.json")).is_ok_and(|t| {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
            v["tiers"][0]["pending_objects"].as_u64() > Some(0)
                && !v["tiers"][0]["last_error"].is_null()
        })
    });
    // S3 comes back (an empty server: moto keeps nothing): what was queued is shipped,
    // without a restart.
    let moto = Moto::start_on(port, &[]).unwrap();
    let client = moto.bucket("later", false).await;
    let key = format!("r/wal/{}/{name}.zst", &name[0..8]);
    let flushed = lsn(&pg.psql("select pg_current_wal_flush_lsn()"));
    let start = Instant::now();
    loop {
        let keys = bucket_keys(&client, "later", "r/").await;
        if keys.contains(&key) && durable_lsn(&hot).is_some_and(|d| d >= flushed) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not caught up: {keys:?}\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.term().success(), "{}", a.log_text());
}

/// Each tier expires under its own policy: the hot tier keeps the newest backup, the offsite
/// tier keeps more (`[remote.retention]`), and a tier under Object Lock refuses the removal —
/// reported as skipped, the backup still there to restore.
#[tokio::test(flavor = "multi_thread")]
async fn expire_applies_each_tiers_policy_and_skips_locked_objects() {
    let Some(moto) = moto() else { return };
    moto.bucket("offsite", false).await;
    let locked = moto.bucket("locked", true).await;
    let dir = TestDir::new();
    let hot = dir.join("hot");
    let cfg = write_config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[retention]\nkeep_last = 1\n\
             [[remote]]\nname = \"offsite\"\nurl = \"s3://offsite/r\"\nendpoint = \"{e}\"\n\
             [remote.retention]\nkeep_last = 3\n\
             [[remote]]\nname = \"locked\"\nurl = \"s3://locked/r\"\nendpoint = \"{e}\"\n\
             object_lock_mode = \"COMPLIANCE\"\nobject_lock_days = 1\n",
            hot.display(),
            e = moto.endpoint
        ),
    );
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let c = cfg.to_str().unwrap();
    // A streamer, so the WAL between the backups is archived too (verify checks it unbroken).
    let mut streamer = Archiver::stream(&dir, "stream", &["--config", c, "-d", &ci]);
    let backup = || archiver_ok(&["backup", "--config", c, "-d", &ci, "--checkpoint", "fast"]);
    let a = backup().trim().to_string();
    pg.psql("create table t as select 1 x");
    let b = backup().trim().to_string();
    assert!(streamer.term().success());

    let out = archiver_ok(&["expire", "--config", c, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tier = |name: &str| {
        v["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tier"] == name)
            .unwrap_or_else(|| panic!("{v}"))["report"]
            .clone()
    };
    // Hot: the older backup is gone there.
    assert_eq!(
        tier("hot")["removed_backups"],
        serde_json::json!([a]),
        "{v}"
    );
    assert!(!hot.join(format!("backups/{a}")).exists());
    assert!(hot.join(format!("catalog/{b}.json")).exists());
    // Offsite keeps both.
    assert_eq!(
        tier("offsite")["removed_backups"],
        serde_json::json!([]),
        "{v}"
    );
    // The locked tier plans the removal, and S3 refuses it: skipped, reported, still there.
    let l = tier("locked");
    assert_eq!(l["removed_backups"], serde_json::json!([]), "{v}");
    assert!(
        l["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains(&a)),
        "{v}"
    );
    let key = format!("r/backups/{a}/base.tar.zst");
    assert!(locked
        .head_object()
        .bucket("locked")
        .key(&key)
        .send()
        .await
        .is_ok());
    // A backup is gone once no tier holds it: A is still listed, from the remote tiers.
    let list: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["list", "--config", c, "--json"])).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&a.as_str()) && ids.contains(&b.as_str()),
        "{list}"
    );

    // verify reads every object as reads see it, then each remote tier on its own: a backup
    // archive missing from one tier fails that tier, named.
    let verify = || {
        let out = archiver(&["verify", "--config", c, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), v)
    };
    let (code, v) = verify();
    assert_eq!(code, Some(0), "{v}");
    let tiers: Vec<&str> = v["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["repository", "offsite", "locked"]);
    moto.client()
        .delete_object()
        .bucket("offsite")
        .key(format!("r/backups/{b}/base.tar.zst"))
        .send()
        .await
        .unwrap();
    let (code, v) = verify();
    assert_eq!(code, Some(1), "{v}");
    let offsite = &v["tiers"][1]["report"];
    assert_eq!(offsite["ok"], false, "{v}");
    assert!(
        offsite["backups"].to_string().contains("base.tar.zst"),
        "{v}"
    );
    assert_eq!(
        v["tiers"][0]["report"]["ok"], true,
        "the hot tier still has it: {v}"
    );
}
