//! The uploader alone: one stored object shipped from a hot tier (filesystem) to an S3 tier by
//! `upload::upload_object` — ranged reads of the hot copy, its SHA-256 checked against its
//! trailer, a streamed multipart upload — with nothing else competing. Reports MB/s per round.
//! Run by scripts/bench-tiered.sh against its moto server:
//!
//! `ARCHIVER_BENCH_S3=http://127.0.0.1:PORT ARCHIVER_BENCH_OBJECT=path/to/base.tar.zst
//!  cargo bench --bench upload`  (bucket `bench-upload` must exist; AWS_* credentials set;
//!  PARTS=n parts in flight, default 8)

use std::sync::Arc;

use archiver::FsStorage;
use archiver::RemoteTier;
use archiver::Storage;
use archiver::{S3Options, S3Storage};

fn main() {
    let (Ok(endpoint), Ok(path)) = (
        std::env::var("ARCHIVER_BENCH_S3"),
        std::env::var("ARCHIVER_BENCH_OBJECT"),
    ) else {
        eprintln!("skipped: set ARCHIVER_BENCH_S3 and ARCHIVER_BENCH_OBJECT (scripts/bench-tiered.sh does)");
        return;
    };
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let hot = FsStorage::new(dir.path());
        let body = std::fs::read(&path).unwrap();
        let mb = body.len() as f64 / 1e6;
        let s3 = S3Storage::with_options(
            "s3://bench-upload/u",
            S3Options {
                endpoint: Some(endpoint),
                // PARTS: parts in flight (default 8, as a tier's part_concurrency).
                part_concurrency: std::env::var("PARTS").ok().and_then(|p| p.parse().ok()),
                ..S3Options::default()
            },
        )
        .await
        .unwrap();
        let tier = RemoteTier {
            name: "bench".into(),
            url: "s3://bench-upload/u".into(),
            storage: Arc::new(s3),
        };
        for r in 0..rounds {
            let key = format!(
                "backups/{}-{r}/base.tar.zst",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
            );
            hot.put(&key, bytes::Bytes::from(body.clone()))
                .await
                .unwrap();
            let t = std::time::Instant::now();
            let sent = archiver::upload_object(&hot, &tier, &key, None)
                .await
                .unwrap();
            let s = t.elapsed().as_secs_f64();
            assert_eq!(sent, body.len() as u64);
            println!("uploader {:.1} MB/s ({mb:.0} MB in {s:.2} s)", mb / s);
        }
    });
}
