//! `BASE_BACKUP` for PostgreSQL 15+: the option list and the sans-IO decoder of the CopyOut
//! stream (`'n'` new archive, `'d'` data, `'p'` progress, `'m'` manifest follows), as sent by
//! `SendBaseBackup` / `bbsink_copystream` in `src/backend/backup/basebackup_copy.c`.

use bytes::{Buf, Bytes};

use crate::format::manifest::ChecksumAlgorithm;

/// `CHECKPOINT 'fast' | 'spread'`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    Fast,
    Spread,
}

/// Options of one base backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseBackupOptions {
    pub label: String,
    pub checkpoint: Checkpoint,
    /// `MAX_RATE` in kB/s (32..=1048576), if limited.
    pub max_rate_kb: Option<u32>,
    /// Ask the server to compress with zstd at this level.
    pub server_zstd_level: Option<i32>,
    /// With server compression: zstd worker threads on the server (`workers=N`; 0: compress in
    /// the walsender itself). One worker lets the walsender read the next file while the
    /// worker compresses (measured: half pg_basebackup's client-zstd time, docs/benchmarks.md).
    pub server_zstd_workers: u32,
    /// The manifest's per-file checksums.
    pub manifest_checksums: ChecksumAlgorithm,
    /// PostgreSQL 13 and 14: the unparenthesised command and one COPY per archive.
    pub legacy: bool,
    /// `INCREMENTAL` (PostgreSQL 17+): relative to the manifest uploaded just before on the
    /// same connection (`UPLOAD_MANIFEST`).
    pub incremental: bool,
}

/// Quotes a string literal for a replication command (`'` doubled; no backslash escapes, as
/// `standard_conforming_strings` is always on for these commands).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl BaseBackupOptions {
    /// The PG15+ parenthesised command: no WAL (the archive holds it), no wait for archiving
    /// (archiver waits for its own repository), a SHA-256 manifest, tablespace map and progress.
    pub fn command(&self) -> String {
        if self.legacy {
            return self.legacy_command();
        }
        let mut opts = vec![
            format!("LABEL {}", quote_literal(&self.label)),
            "PROGRESS".to_string(),
            format!(
                "CHECKPOINT '{}'",
                match self.checkpoint {
                    Checkpoint::Fast => "fast",
                    Checkpoint::Spread => "spread",
                }
            ),
            "WAL false".to_string(),
            "WAIT false".to_string(),
            "MANIFEST 'yes'".to_string(),
            format!("MANIFEST_CHECKSUMS '{}'", self.manifest_checksums.name()),
            "TABLESPACE_MAP".to_string(),
        ];
        if let Some(r) = self.max_rate_kb {
            opts.push(format!("MAX_RATE {r}"));
        }
        if self.incremental {
            opts.push("INCREMENTAL".to_string());
        }
        if let Some(level) = self.server_zstd_level {
            opts.push("COMPRESSION 'zstd'".to_string());
            if self.server_zstd_workers > 0 {
                opts.push(format!(
                    "COMPRESSION_DETAIL 'level={level},workers={}'",
                    self.server_zstd_workers
                ));
            } else {
                opts.push(format!("COMPRESSION_DETAIL 'level={level}'"));
            }
        }
        format!("BASE_BACKUP ({})", opts.join(", "))
    }
}

impl BaseBackupOptions {
    /// PostgreSQL 13 and 14 (`repl_gram.y` before 15): the same choices, unparenthesised;
    /// `NOWAIT` for `WAIT false`, `FAST` for a fast checkpoint. No server-side compression.
    fn legacy_command(&self) -> String {
        let mut opts = vec![
            format!("LABEL {}", quote_literal(&self.label)),
            "PROGRESS".to_string(),
        ];
        if self.checkpoint == Checkpoint::Fast {
            opts.push("FAST".into());
        }
        opts.push("NOWAIT".into());
        if let Some(r) = self.max_rate_kb {
            opts.push(format!("MAX_RATE {r}"));
        }
        opts.push("TABLESPACE_MAP".into());
        opts.push("MANIFEST 'yes'".into());
        opts.push(format!(
            "MANIFEST_CHECKSUMS '{}'",
            self.manifest_checksums.name()
        ));
        format!("BASE_BACKUP {}", opts.join(" "))
    }
}

/// One message of the BASE_BACKUP COPY stream.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyMessage {
    /// `'n'`: a new archive begins: its file name and the tablespace path (empty for the main
    /// data directory).
    NewArchive {
        name: String,
        tablespace_path: String,
    },
    /// `'d'`: bytes of the current archive or of the manifest.
    Data(Bytes),
    /// `'p'`: bytes sent so far (of all archives).
    Progress(u64),
    /// `'m'`: the manifest follows; later data belongs to it.
    Manifest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed BASE_BACKUP stream: {0}")]
pub struct CopyStreamError(pub String);

fn cstr(b: &mut Bytes) -> Result<String, CopyStreamError> {
    let end = b
        .iter()
        .position(|c| *c == 0)
        .ok_or_else(|| CopyStreamError("unterminated string".into()))?;
    let s = String::from_utf8(b.split_to(end).to_vec())
        .map_err(|_| CopyStreamError("string is not UTF-8".into()))?;
    b.advance(1);
    Ok(s)
}

/// Decodes the payload of one CopyData message.
pub fn decode(mut b: Bytes) -> Result<CopyMessage, CopyStreamError> {
    if b.is_empty() {
        return Err(CopyStreamError("empty CopyData".into()));
    }
    let msg = match b.get_u8() {
        b'n' => {
            let name = cstr(&mut b)?;
            let tablespace_path = cstr(&mut b)?;
            CopyMessage::NewArchive {
                name,
                tablespace_path,
            }
        }
        b'd' => return Ok(CopyMessage::Data(b)),
        b'p' => {
            if b.len() != 8 {
                return Err(CopyStreamError(
                    "progress message has the wrong length".into(),
                ));
            }
            CopyMessage::Progress(b.get_u64())
        }
        b'm' => CopyMessage::Manifest,
        t => {
            return Err(CopyStreamError(format!(
                "unknown message type {:?}",
                t as char
            )))
        }
    };
    if !b.is_empty() {
        return Err(CopyStreamError("trailing bytes after a message".into()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_text() {
        let o = BaseBackupOptions {
            label: "it's nightly".into(),
            checkpoint: Checkpoint::Fast,
            max_rate_kb: Some(1024),
            server_zstd_level: Some(3),
            server_zstd_workers: 0,
            manifest_checksums: ChecksumAlgorithm::Sha256,
            legacy: false,
            incremental: false,
        };
        assert_eq!(
            o.command(),
            "BASE_BACKUP (LABEL 'it''s nightly', PROGRESS, CHECKPOINT 'fast', WAL false, WAIT false, \
             MANIFEST 'yes', MANIFEST_CHECKSUMS 'SHA256', TABLESPACE_MAP, MAX_RATE 1024, \
             COMPRESSION 'zstd', COMPRESSION_DETAIL 'level=3')"
        );
        let o = BaseBackupOptions {
            label: "x".into(),
            checkpoint: Checkpoint::Spread,
            max_rate_kb: None,
            server_zstd_level: None,
            server_zstd_workers: 0,
            manifest_checksums: ChecksumAlgorithm::Crc32c,
            legacy: false,
            incremental: true,
        };
        assert!(o.command().contains("CHECKPOINT 'spread'") && !o.command().contains("MAX_RATE"));
        assert!(o.command().contains(", INCREMENTAL"));
        assert!(o.command().contains("MANIFEST_CHECKSUMS 'CRC32C'"));
        let o = BaseBackupOptions {
            server_zstd_level: Some(1),
            server_zstd_workers: 2,
            ..o
        };
        assert!(o
            .command()
            .ends_with("COMPRESSION 'zstd', COMPRESSION_DETAIL 'level=1,workers=2')"));
        let o = BaseBackupOptions {
            label: "it's old".into(),
            checkpoint: Checkpoint::Fast,
            max_rate_kb: Some(64),
            server_zstd_level: None,
            server_zstd_workers: 0,
            manifest_checksums: ChecksumAlgorithm::Crc32c,
            legacy: true,
            incremental: false,
        };
        assert_eq!(
            o.command(),
            "BASE_BACKUP LABEL 'it''s old' PROGRESS FAST NOWAIT MAX_RATE 64 TABLESPACE_MAP \
             MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
    }

    #[test]
    fn decodes_each_message() {
        assert_eq!(
            decode(Bytes::from_static(b"nbase.tar\0\0")).unwrap(),
            CopyMessage::NewArchive {
                name: "base.tar".into(),
                tablespace_path: String::new()
            }
        );
        assert_eq!(
            decode(Bytes::from_static(b"n16384.tar\0/srv/ts\0")).unwrap(),
            CopyMessage::NewArchive {
                name: "16384.tar".into(),
                tablespace_path: "/srv/ts".into()
            }
        );
        assert_eq!(
            decode(Bytes::from_static(b"dabc")).unwrap(),
            CopyMessage::Data(Bytes::from_static(b"abc"))
        );
        let mut p = vec![b'p'];
        p.extend_from_slice(&123_456u64.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(p)).unwrap(),
            CopyMessage::Progress(123_456)
        );
        assert_eq!(
            decode(Bytes::from_static(b"m")).unwrap(),
            CopyMessage::Manifest
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"x",
            b"nbase.tar",
            b"p123",
            b"mjunk",
            b"nbase.tar\0\0extra",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}
