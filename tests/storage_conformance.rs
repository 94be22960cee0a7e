//! Every storage backend passes the same conformance suite.

use archiver::storage::fs::FsStorage;

#[tokio::test(flavor = "multi_thread")]
async fn fs_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsStorage::new(dir.path().join("store"));
    archiver::storage::conformance::run(&s).await;
    // No temporary files are left behind by atomic puts.
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(p: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// A moto S3 server on a free port, stopped (by PID) when dropped.
struct Moto(std::process::Child, u16);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> Option<Moto> {
    let bin = std::env::var("ARCHIVER_TEST_MOTO")
        .ok()
        .filter(|v| !v.is_empty())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let m = Moto(child, port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "moto_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Some(m)
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_backend_conforms() {
    let Some(m) = moto() else {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    };
    let endpoint = format!("http://127.0.0.1:{}", m.1);
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .endpoint_url(&endpoint)
        .force_path_style(true)
        .build();
    let client = aws_sdk_s3::Client::from_conf(conf);
    client.create_bucket().bucket("repo").send().await.unwrap();
    let s = archiver::storage::s3::S3Storage::with_client(client.clone(), "s3://repo/some/prefix")
        .unwrap();
    archiver::storage::conformance::run(&s).await;

    // A large object streams as a multipart upload and reads back whole and by range.
    let big: Vec<u8> = (0..(archiver::storage::s3::PART_SIZE * 2 + 12345))
        .map(|i| (i % 251) as u8)
        .collect();
    let mut w = archiver::storage::Storage::writer(&s, "big/object")
        .await
        .unwrap();
    for chunk in big.chunks(3 << 20) {
        w.write(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(w.finish().await.unwrap(), big.len() as u64);
    assert_eq!(
        archiver::storage::Storage::get(&s, "big/object")
            .await
            .unwrap(),
        big
    );
    let r = archiver::storage::Storage::get_range(&s, "big/object", 8 << 20, 100)
        .await
        .unwrap();
    assert_eq!(r, big[8 << 20..(8 << 20) + 100]);
    // Objects live under the prefix; no multipart upload is left open.
    let listed = client
        .list_objects_v2()
        .bucket("repo")
        .send()
        .await
        .unwrap();
    assert!(listed
        .contents()
        .iter()
        .all(|o| o.key().unwrap().starts_with("some/prefix/")));
    let uploads = client
        .list_multipart_uploads()
        .bucket("repo")
        .send()
        .await
        .unwrap();
    assert!(uploads.uploads().is_empty());
}
