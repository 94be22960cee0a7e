//! The BASE_BACKUP protocol against a real server: archives, manifest and positions.

mod common;

use std::process::Command;

use archiver::Connection;
use archiver::{base_backup, BackupError, BackupSink};
use archiver::{BaseBackupOptions, Checkpoint};
use archiver::{ConnInfo, ProcessEnv};
use async_trait::async_trait;
use bytes::Bytes;
use common::*;

/// Writes each archive and the manifest to plain files.
struct FileSink {
    dir: std::path::PathBuf,
    cur: Option<std::fs::File>,
    names: Vec<String>,
    progress: u64,
}

#[async_trait]
impl BackupSink for FileSink {
    async fn new_archive(&mut self, name: &str, _path: &str) -> Result<(), BackupError> {
        self.names.push(name.to_string());
        self.cur = Some(std::fs::File::create(self.dir.join(name)).map_err(BackupError::sink)?);
        Ok(())
    }
    async fn manifest(&mut self) -> Result<(), BackupError> {
        self.names.push("backup_manifest".into());
        self.cur = Some(
            std::fs::File::create(self.dir.join("backup_manifest")).map_err(BackupError::sink)?,
        );
        Ok(())
    }
    async fn data(&mut self, data: Bytes) -> Result<(), BackupError> {
        use std::io::Write;
        self.cur
            .as_mut()
            .unwrap()
            .write_all(&data)
            .map_err(BackupError::sink)?;
        Ok(())
    }
    fn progress(&mut self, done: u64) {
        self.progress = done;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn base_backup_streams_archives_and_manifest() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    pg.psql("create table t as select generate_series(1, 10000) x");
    let ci = ConnInfo::parse(Some(&pg.conninfo("postgres")), &ProcessEnv).unwrap();
    let mut conn = Connection::connect(&ci, Some("true"), "archiver-test")
        .await
        .unwrap();
    let out = dir.join("backup");
    std::fs::create_dir(&out).unwrap();
    let mut sink = FileSink {
        dir: out.clone(),
        cur: None,
        names: vec![],
        progress: 0,
    };
    let opts = BaseBackupOptions {
        label: "it's a test".into(),
        checkpoint: Checkpoint::Fast,
        max_rate_kb: None,
        server_zstd_level: None,
        server_zstd_workers: 0,
        manifest_checksums: archiver::ChecksumAlgorithm::Sha256,
        legacy: false,
        incremental: false,
    };
    let r = base_backup(&mut conn, &opts, &mut sink).await.unwrap();
    assert_eq!(sink.names, ["base.tar", "backup_manifest"]);
    assert!(r.stop_lsn >= r.start_lsn && r.start_lsn.is_valid());
    assert_eq!((r.start_tli, r.stop_tli), (1, 1));
    assert_eq!(r.tablespaces.len(), 1, "only the main data directory");
    assert!(
        sink.progress > 1_000_000,
        "progress reported: {}",
        sink.progress
    );
    drop(sink);

    // The archive is a plain tar with the label; the manifest is the server's JSON.
    let list = must(
        Command::new("tar")
            .arg("-tf")
            .arg(out.join("base.tar"))
            .output()
            .unwrap(),
        "tar -t",
    );
    for f in ["PG_VERSION", "backup_label", "global/pg_control"] {
        assert!(list.lines().any(|l| l == f), "{f} missing from base.tar");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("backup_manifest")).unwrap()).unwrap();
    assert_eq!(manifest["PostgreSQL-Backup-Manifest-Version"], 1);
    let label = must(
        Command::new("tar")
            .arg("-xOf")
            .arg(out.join("base.tar"))
            .arg("backup_label")
            .output()
            .unwrap(),
        "tar -xO",
    );
    assert!(label.contains("LABEL: it's a test"), "{label}");
    assert!(
        label.contains(&format!("START WAL LOCATION: {}", r.start_lsn)),
        "{label}"
    );

    // Every file of base.tar matches the manifest (size and SHA-256), and all are present.
    use archiver::TarReader;
    use archiver::{ChecksumAlgorithm, FileDigests, Manifest, ManifestError};
    let raw_manifest = std::fs::read(out.join("backup_manifest")).unwrap();
    let m = Manifest::parse(&raw_manifest).unwrap();
    assert_eq!(m.wal_ranges.len(), 1);
    assert_eq!(
        (m.wal_ranges[0].start, m.wal_ranges[0].end),
        (r.start_lsn, r.stop_lsn)
    );
    let tar = std::fs::read(out.join("base.tar")).unwrap();
    let verify = |tar: &[u8]| -> Result<usize, String> {
        let mut d = FileDigests::new(ChecksumAlgorithm::Sha256);
        d.start_archive(None);
        let mut reader = TarReader::new();
        for chunk in tar.chunks(70_001) {
            reader
                .feed(chunk, &mut |e| {
                    d.event(&e);
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
        }
        m.verify(&d).map_err(|e| e.to_string())
    };
    let n = verify(&tar).unwrap();
    assert!(n > 500, "{n} files verified");
    // One flipped byte inside PG_VERSION's content is caught and named.
    let pos = tar.windows(11).position(|w| w == b"PG_VERSION\0").unwrap() + 512;
    let mut bad = tar.clone();
    bad[pos] ^= 0x01;
    let err = verify(&bad).unwrap_err();
    assert!(
        err.contains("PG_VERSION") && err.contains("sha256"),
        "{err}"
    );
    // A damaged manifest is refused.
    let mut bad_manifest = raw_manifest.clone();
    let at = bad_manifest.windows(4).position(|w| w == b"Size").unwrap();
    bad_manifest[at + 8] ^= 0x01;
    assert!(matches!(
        Manifest::parse(&bad_manifest),
        Err(ManifestError::ChecksumMismatch) | Err(ManifestError::Invalid(_))
    ));

    // A second command on the same connection still works (the protocol ended cleanly).
    archiver::identify_system(&mut conn).await.unwrap();
}
