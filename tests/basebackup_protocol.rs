//! The BASE_BACKUP protocol against a real server: archives, manifest and positions.

mod common;

use std::process::Command;

use archiver::basebackup::protocol::{BaseBackupOptions, Checkpoint};
use archiver::basebackup::run::{base_backup, BackupSink};
use archiver::pg::conninfo::{ConnInfo, ProcessEnv};
use archiver::pg::{Connection, PgError};
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
    async fn new_archive(&mut self, name: &str, _path: &str) -> Result<(), PgError> {
        self.names.push(name.to_string());
        self.cur = Some(std::fs::File::create(self.dir.join(name))?);
        Ok(())
    }
    async fn manifest(&mut self) -> Result<(), PgError> {
        self.names.push("backup_manifest".into());
        self.cur = Some(std::fs::File::create(self.dir.join("backup_manifest"))?);
        Ok(())
    }
    async fn data(&mut self, data: Bytes) -> Result<(), PgError> {
        use std::io::Write;
        self.cur.as_mut().unwrap().write_all(&data)?;
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

    // A second command on the same connection still works (the protocol ended cleanly).
    archiver::pg::replication::identify_system(&mut conn)
        .await
        .unwrap();
}
