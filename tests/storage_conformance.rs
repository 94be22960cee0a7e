//! Every storage backend passes the same conformance suite.

mod common;

use common::Moto;

use archiver::FsStorage;

#[tokio::test(flavor = "multi_thread")]
async fn fs_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsStorage::new(dir.path().join("store"));
    archiver::conformance::run(&s).await;
    // No temporary files are left behind by atomic puts.
    let leftovers: Vec<_> = common::walk(dir.path())
        .into_iter()
        .filter(|(p, _)| p.contains(".tmp-"))
        .map(|(p, _)| p)
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_backend_conforms() {
    let Some(moto) = Moto::start() else {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    };
    let client = moto.client();
    client.create_bucket().bucket("repo").send().await.unwrap();
    let s = archiver::S3Storage::with_client(client.clone(), "s3://repo/some/prefix").unwrap();
    archiver::conformance::run(&s).await;

    // A large object streams as a multipart upload and reads back whole and by range.
    let big: Vec<u8> = (0..(archiver::PART_SIZE * 2 + 12345))
        .map(|i| (i % 251) as u8)
        .collect();
    let mut w = archiver::Storage::writer(&s, "big/object").await.unwrap();
    for chunk in big.chunks(3 << 20) {
        w.write(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(w.finish().await.unwrap(), big.len() as u64);
    assert_eq!(archiver::Storage::get(&s, "big/object").await.unwrap(), big);
    // One chunk of several parts: its whole parts go out without a copy, the rest buffered.
    let mut w = archiver::Storage::writer(&s, "big/one-chunk")
        .await
        .unwrap();
    w.write(bytes::Bytes::from(big.clone())).await.unwrap();
    assert_eq!(w.finish().await.unwrap(), big.len() as u64);
    assert_eq!(
        archiver::Storage::get(&s, "big/one-chunk").await.unwrap(),
        big
    );
    // Its parts were uploaded with their CRC-32 declared: the store checked each and holds a
    // checksum of the whole object (S3: built from the parts', `<base64>-<parts>`).
    let head = client
        .head_object()
        .bucket("repo")
        .key("some/prefix/big/object")
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    let crc = head.checksum_crc32().unwrap_or_default();
    assert!(crc.len() >= 8, "no CRC-32 of the whole object: {crc:?}");
    let r = archiver::Storage::get_range(&s, "big/object", 8 << 20, 100)
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

    // Client-side encryption over S3 meets the same contract.
    let inner = archiver::S3Storage::with_client(client.clone(), "s3://repo/enc").unwrap();
    let enc = archiver::Encrypted::new(
        std::sync::Arc::new(inner),
        archiver::MasterKey::from_bytes([9; 32]),
    );
    archiver::conformance::run(&enc).await;
}

/// Upload bodies go out unsigned by default — the CRC-32 header (signed) is what the store
/// checks them against — and with their SHA-256 in the signature when `sign_payload` is on.
/// Either way every request is signed and the content reads back whole.
#[tokio::test(flavor = "multi_thread")]
async fn s3_upload_bodies_are_signed_only_when_asked() {
    let Some(moto) = Moto::start() else {
        eprintln!("skipped: no moto_server (scripts/test.sh installs it)");
        return;
    };
    moto.bucket("signing", false).await;
    let big: Vec<u8> = (0..archiver::PART_SIZE + 4321)
        .map(|i| (i % 253) as u8)
        .collect();
    for sign in [None, Some(false), Some(true)] {
        let proxy = common::RecordingProxy::start(&moto.endpoint);
        let client = aws_sdk_s3::Client::from_conf(
            moto.client()
                .config()
                .to_builder()
                .endpoint_url(&proxy.endpoint)
                .build(),
        );
        let opts = archiver::S3Options {
            sign_payload: sign,
            ..Default::default()
        };
        let s = archiver::S3Storage::with_client_options(client, "s3://signing/p", opts).unwrap();
        archiver::Storage::put(&s, "small", bytes::Bytes::from_static(b"small object"))
            .await
            .unwrap();
        let mut w = archiver::Storage::writer(&s, "big").await.unwrap();
        w.write(bytes::Bytes::from(big.clone())).await.unwrap();
        w.finish().await.unwrap();
        assert_eq!(
            archiver::Storage::get(&s, "small").await.unwrap(),
            &b"small object"[..]
        );
        assert_eq!(archiver::Storage::get(&s, "big").await.unwrap(), big);

        let hashes = proxy.header_of("PUT", "x-amz-content-sha256");
        let crcs = proxy.header_of("PUT", "x-amz-checksum-crc32");
        let auth = proxy.header_of("PUT", "authorization");
        // One PUT for the small object, two parts for the big one.
        assert_eq!(hashes.len(), 3, "{sign:?}: {hashes:?}");
        for ((h, c), a) in hashes.iter().zip(&crcs).zip(&auth) {
            if sign == Some(true) {
                assert!(
                    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{sign:?}: {h:?}"
                );
            } else {
                assert_eq!(h, "UNSIGNED-PAYLOAD", "{sign:?}");
            }
            assert!(!c.is_empty(), "{sign:?}: a body without its CRC-32");
            assert!(
                a.starts_with("AWS4-HMAC-SHA256") && a.contains("x-amz-checksum-crc32"),
                "{sign:?}: the CRC-32 header is not signed: {a}"
            );
        }
    }
}
