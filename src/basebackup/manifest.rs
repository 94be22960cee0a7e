//! The server's `backup_manifest` (format version 1 and 2): parsing, its own
//! `Manifest-Checksum`, and per-file verification of a streamed archive against it — the checks
//! `pg_verifybackup` makes, done while the bytes arrive.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::tar::{EntryKind, TarEvent};
use crate::wal::Lsn;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("backup manifest is not valid: {0}")]
    Invalid(String),
    #[error("backup manifest checksum mismatch: the manifest is damaged")]
    ChecksumMismatch,
    #[error("file {path} does not match the backup manifest: {reason}")]
    FileMismatch { path: String, reason: String },
    #[error("files listed in the backup manifest are missing from the archives: {0:?}")]
    Missing(Vec<String>),
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

#[derive(Deserialize)]
struct RawRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
    #[serde(rename = "Files")]
    files: Vec<RawFile>,
    #[serde(rename = "WAL-Ranges", default)]
    wal_ranges: Vec<RawRange>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    /// SHA-256 in hex, when the manifest uses SHA256 checksums.
    pub sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalRange {
    pub timeline: u32,
    pub start: Lsn,
    pub end: Lsn,
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub files: HashMap<String, FileEntry>,
    pub wal_ranges: Vec<WalRange>,
}

impl Manifest {
    /// Parses a manifest and verifies its `Manifest-Checksum` (SHA-256 of every byte up to and
    /// including the newline before the `"Manifest-Checksum"` line).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let invalid = |m: String| ManifestError::Invalid(m);
        let key = b"\"Manifest-Checksum\"";
        let at = bytes
            .windows(key.len())
            .rposition(|w| w == key)
            .ok_or_else(|| invalid("no Manifest-Checksum".into()))?;
        let nl = bytes[..at]
            .iter()
            .rposition(|b| *b == b'\n')
            .ok_or_else(|| invalid("no newline before Manifest-Checksum".into()))?;
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let want = v["Manifest-Checksum"]
            .as_str()
            .ok_or_else(|| invalid("Manifest-Checksum is not a string".into()))?;
        if hex::encode(Sha256::digest(&bytes[..=nl])) != want.to_ascii_lowercase() {
            return Err(ManifestError::ChecksumMismatch);
        }
        let raw: RawManifest = serde_json::from_value(v).map_err(|e| invalid(e.to_string()))?;
        if !(1..=2).contains(&raw.version) {
            return Err(invalid(format!(
                "unsupported manifest version {}",
                raw.version
            )));
        }
        let mut files = HashMap::new();
        for f in raw.files {
            let path = match (f.path, f.encoded_path) {
                (Some(p), _) => p,
                (None, Some(e)) => {
                    let b =
                        hex::decode(&e).map_err(|_| invalid(format!("bad Encoded-Path {e}")))?;
                    String::from_utf8_lossy(&b).into_owned()
                }
                (None, None) => return Err(invalid("a file without a path".into())),
            };
            let sha256 = match f.algorithm.as_deref() {
                Some("SHA256") => f.checksum.map(|c| c.to_ascii_lowercase()),
                _ => None,
            };
            files.insert(
                path,
                FileEntry {
                    size: f.size,
                    sha256,
                },
            );
        }
        let wal_ranges = raw
            .wal_ranges
            .into_iter()
            .map(|r| {
                Ok(WalRange {
                    timeline: r.timeline,
                    start: r
                        .start
                        .parse()
                        .map_err(|_| invalid(format!("bad Start-LSN {}", r.start)))?,
                    end: r
                        .end
                        .parse()
                        .map_err(|_| invalid(format!("bad End-LSN {}", r.end)))?,
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        Ok(Manifest { files, wal_ranges })
    }
}

/// Size and SHA-256 of every regular file of the streamed archives, collected as tar events
/// arrive (the manifest comes last), then checked with [`Manifest::verify`].
#[derive(Debug, Default)]
pub struct FileDigests {
    files: HashMap<String, (u64, String)>,
    cur: Option<(String, Sha256, u64)>,
    prefix: String,
}

impl FileDigests {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new archive: `base.tar` holds paths as they are; a tablespace archive `<oid>.tar` holds
    /// paths below `pg_tblspc/<oid>/` in the manifest.
    pub fn start_archive(&mut self, tablespace_oid: Option<u32>) {
        self.prefix = tablespace_oid
            .map(|o| format!("pg_tblspc/{o}/"))
            .unwrap_or_default();
    }

    pub fn event(&mut self, e: &TarEvent<'_>) {
        match e {
            TarEvent::Entry {
                path,
                kind: EntryKind::File,
                ..
            } => self.cur = Some((format!("{}{path}", self.prefix), Sha256::new(), 0)),
            TarEvent::Entry { .. } => self.cur = None,
            TarEvent::Data(d) => {
                if let Some((_, h, n)) = self.cur.as_mut() {
                    h.update(d);
                    *n += d.len() as u64;
                }
            }
            TarEvent::EntryEnd => {
                if let Some((path, h, n)) = self.cur.take() {
                    self.files.insert(path, (n, hex::encode(h.finalize())));
                }
            }
        }
    }
}

impl Manifest {
    /// Every file received matches the manifest (size, SHA-256) and none is missing. Returns the
    /// number of files checked.
    pub fn verify(&self, got: &FileDigests) -> Result<usize, ManifestError> {
        for (path, (size, sha)) in &got.files {
            let entry = self
                .files
                .get(path)
                .ok_or_else(|| ManifestError::FileMismatch {
                    path: path.clone(),
                    reason: "not listed in the manifest".into(),
                })?;
            if entry.size != *size {
                return Err(ManifestError::FileMismatch {
                    path: path.clone(),
                    reason: format!("{size} bytes, the manifest says {}", entry.size),
                });
            }
            if let Some(want) = &entry.sha256 {
                if want != sha {
                    return Err(ManifestError::FileMismatch {
                        path: path.clone(),
                        reason: format!("sha256 {sha}, the manifest says {want}"),
                    });
                }
            }
        }
        let mut missing: Vec<String> = self
            .files
            .keys()
            .filter(|p| !got.files.contains_key(*p))
            .cloned()
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(ManifestError::Missing(missing));
        }
        Ok(got.files.len())
    }
}
