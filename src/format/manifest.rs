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

/// The per-file checksums archiver asks the server for and checks (`MANIFEST_CHECKSUMS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChecksumAlgorithm {
    /// CRC-32C, PostgreSQL's default: hardware-accelerated on both sides, enough to catch
    /// damage (each archive object also carries its own SHA-256).
    Crc32c,
    Sha256,
}

impl ChecksumAlgorithm {
    /// The manifest's and the command's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32c => "CRC32C",
            ChecksumAlgorithm::Sha256 => "SHA256",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "CRC32C" => Some(ChecksumAlgorithm::Crc32c),
            "SHA256" => Some(ChecksumAlgorithm::Sha256),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    /// The file's checksum in lowercase hex, when the manifest has one we can check.
    pub checksum: Option<(ChecksumAlgorithm, String)>,
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
            let checksum = f
                .algorithm
                .as_deref()
                .and_then(ChecksumAlgorithm::parse)
                .zip(f.checksum.map(|c| c.to_ascii_lowercase()));
            files.insert(
                path,
                FileEntry {
                    size: f.size,
                    checksum,
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

/// A running checksum of one file.
pub enum FileHasher {
    Crc32c(u32),
    Sha256(Box<Sha256>),
}

impl FileHasher {
    pub fn new(algo: ChecksumAlgorithm) -> Self {
        match algo {
            ChecksumAlgorithm::Crc32c => FileHasher::Crc32c(0),
            ChecksumAlgorithm::Sha256 => FileHasher::Sha256(Box::default()),
        }
    }

    pub fn update(&mut self, d: &[u8]) {
        match self {
            FileHasher::Crc32c(c) => *c = crc32c::crc32c_append(*c, d),
            FileHasher::Sha256(h) => h.update(d),
        }
    }

    /// Hex as PostgreSQL writes it: a CRC-32C is its four bytes in memory order
    /// (`pg_checksum_final` copies the `uint32`), i.e. little-endian on every supported platform
    /// we run on.
    pub fn finish(self) -> String {
        match self {
            FileHasher::Crc32c(c) => hex::encode(c.to_le_bytes()),
            FileHasher::Sha256(h) => hex::encode(h.finalize()),
        }
    }
}

/// Size and checksum of every regular file of the streamed archives, collected as tar events
/// arrive (the manifest comes last), then checked with [`Manifest::verify`].
pub struct FileDigests {
    algo: ChecksumAlgorithm,
    files: HashMap<String, (u64, String)>,
    cur: Option<(String, FileHasher, u64)>,
    prefix: String,
}

impl FileDigests {
    pub fn new(algo: ChecksumAlgorithm) -> Self {
        FileDigests {
            algo,
            files: HashMap::new(),
            cur: None,
            prefix: String::new(),
        }
    }

    /// A new archive: `base.tar` holds paths as they are; a tablespace archive `<oid>.tar` holds
    /// paths below `pg_tblspc/<oid>/` in the manifest.
    pub fn start_archive(&mut self, tablespace_oid: Option<u32>) {
        self.prefix = tablespace_oid
            .map(|o| format!("pg_tblspc/{o}/"))
            .unwrap_or_default();
    }

    /// Takes in the files another collector saw (another archive of the same backup).
    pub fn merge(&mut self, other: FileDigests) {
        self.files.extend(other.files);
    }

    pub fn event(&mut self, e: &TarEvent<'_>) {
        match e {
            TarEvent::Entry {
                path,
                kind: EntryKind::File,
                ..
            } => {
                self.cur = Some((
                    format!("{}{path}", self.prefix),
                    FileHasher::new(self.algo),
                    0,
                ))
            }
            TarEvent::Entry { .. } => self.cur = None,
            TarEvent::Data(d) => {
                if let Some((_, h, n)) = self.cur.as_mut() {
                    h.update(d);
                    *n += d.len() as u64;
                }
            }
            TarEvent::EntryEnd => {
                if let Some((path, h, n)) = self.cur.take() {
                    self.files.insert(path, (n, h.finish()));
                }
            }
        }
    }
}

impl Manifest {
    /// The checksum algorithm of the manifest's files (the first file that has one).
    pub fn algorithm(&self) -> Option<ChecksumAlgorithm> {
        self.files
            .values()
            .find_map(|f| f.checksum.as_ref().map(|(a, _)| *a))
    }

    /// Every file received matches the manifest (size, checksum) and none is missing. Returns
    /// the number of files checked. A manifest checksum of another algorithm than the one
    /// computed is an error (the server was asked for that one).
    pub fn verify(&self, got: &FileDigests) -> Result<usize, ManifestError> {
        for (path, (size, sum)) in &got.files {
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
            match &entry.checksum {
                Some((algo, want)) if *algo == got.algo => {
                    if want != sum {
                        return Err(ManifestError::FileMismatch {
                            path: path.clone(),
                            reason: format!(
                                "{} {sum}, the manifest says {want}",
                                algo.name().to_ascii_lowercase()
                            ),
                        });
                    }
                }
                other => {
                    return Err(ManifestError::FileMismatch {
                        path: path.clone(),
                        reason: format!(
                            "the manifest has no {} checksum for it ({:?})",
                            got.algo.name(),
                            other.as_ref().map(|(a, _)| a.name())
                        ),
                    })
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
