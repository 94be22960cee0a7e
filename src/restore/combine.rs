//! Incremental backups (PostgreSQL 17+) restored the way `pg_combinebackup` combines them, in
//! layers: the chain's full backup is extracted first, then each incremental backup over it in
//! order. A layer's whole files replace the earlier ones; its `INCREMENTAL.<name>` files are
//! applied to `<name>` block by block as they stream (never a whole relation in memory); files
//! the layer's manifest no longer lists are removed. Every layer's bytes are checked against
//! its own manifest on the way (the incremental files are listed there as sent), and the final
//! directory gets a manifest of its own, as `pg_combinebackup` writes one: the newest backup's,
//! with each reconstructed file's real size and checksum, so `pg_verifybackup` can check it.
//!
//! The incremental file (`src/backend/backup/basebackup_incremental.c`,
//! `src/bin/pg_combinebackup/reconstruct.c`): `INCREMENTAL_MAGIC`, the number of blocks, the
//! truncation block length, the block numbers (all uint32, native order), padded to a multiple
//! of `BLCKSZ` when it holds blocks; then the blocks in the order of their numbers. Blocks at or
//! beyond the truncation length are not taken from earlier backups; blocks no backup holds
//! below the file's final length read as zeroes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::manifest::{ChecksumAlgorithm, FileHasher};

/// `INCREMENTAL_MAGIC`.
pub const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;
/// `BLCKSZ`.
pub const BLCKSZ: u64 = 8192;
/// The prefix of an incremental file's name.
pub const PREFIX: &str = "INCREMENTAL.";

/// The path a tar entry restores to when it is an incremental file (`base/5/INCREMENTAL.16384`
/// → `base/5/16384`), else `None`.
pub fn reconstructed_name(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let rel = name.strip_prefix(PREFIX)?;
    Some(match dir {
        Some(d) => format!("{d}/{rel}"),
        None => rel.to_string(),
    })
}

/// Applies one incremental file, fed as it streams, to the file an earlier layer restored.
#[derive(Debug)]
pub struct Applier {
    path: PathBuf,
    file: File,
    header: Vec<u8>,
    /// (block count, truncation block length, header length with padding).
    shape: Option<(u32, u32, usize)>,
    blocks: Vec<u32>,
    /// Bytes of block data received.
    data: u64,
}

fn err(path: &Path, what: impl std::fmt::Display) -> String {
    format!("{}: {what}", path.display())
}

impl Applier {
    /// Opens `path`, the file an earlier backup of the chain restored (it must exist: the
    /// server sends an incremental file only for a file its parent's manifest lists).
    pub fn open(path: &Path) -> Result<Applier, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                err(
                    path,
                    format!("the earlier backups of the chain do not hold it ({e})"),
                )
            })?;
        Ok(Applier {
            path: path.to_path_buf(),
            file,
            header: Vec::new(),
            shape: None,
            blocks: Vec::new(),
            data: 0,
        })
    }

    pub fn feed(&mut self, mut d: &[u8]) -> Result<(), String> {
        while !d.is_empty() {
            if self.in_header() {
                // Header bytes: first the fixed part, then the block numbers and padding.
                let want = self.shape.map_or(12, |(_, _, h)| h);
                let take = (want - self.header.len()).min(d.len());
                self.header.extend_from_slice(&d[..take]);
                d = &d[take..];
                if self.header.len() == want {
                    self.parse_header()?;
                }
                continue;
            }
            let block = (self.data / BLCKSZ) as usize;
            let within = self.data % BLCKSZ;
            let Some(&blkno) = self.blocks.get(block) else {
                return Err(err(&self.path, "more block data than the header announces"));
            };
            let take = ((BLCKSZ - within) as usize).min(d.len());
            self.file
                .write_all_at(&d[..take], blkno as u64 * BLCKSZ + within)
                .map_err(|e| err(&self.path, e))?;
            self.data += take as u64;
            d = &d[take..];
        }
        Ok(())
    }

    /// Still reading the header: before its fixed part is parsed, or while the block numbers
    /// come (the parsed header is cleared once complete).
    fn in_header(&self) -> bool {
        self.shape.is_none() || !self.header.is_empty()
    }

    fn parse_header(&mut self) -> Result<(), String> {
        let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
        match self.shape {
            None => {
                let magic = u32_at(&self.header, 0);
                if magic != INCREMENTAL_MAGIC {
                    return Err(err(
                        &self.path,
                        format!("not an incremental file (magic {magic:#x})"),
                    ));
                }
                let n = u32_at(&self.header, 4);
                let trunc = u32_at(&self.header, 8);
                // A sanity bound (4 times a default 1 GB relation segment), so a damaged
                // count cannot make us allocate gigabytes for its block numbers.
                if n as u64 > (1 << 30) / BLCKSZ * 4 {
                    return Err(err(
                        &self.path,
                        format!("{n} blocks: implausibly many for one relation segment"),
                    ));
                }
                let mut hlen = 12 + 4 * n as usize;
                if n > 0 {
                    hlen = hlen.div_ceil(BLCKSZ as usize) * BLCKSZ as usize;
                }
                self.shape = Some((n, trunc, hlen));
                if hlen == 12 {
                    self.header.clear();
                    self.start()?;
                }
            }
            Some((n, _, _)) => {
                self.blocks = (0..n as usize)
                    .map(|i| u32_at(&self.header, 12 + 4 * i))
                    .collect();
                self.header.clear();
                self.start()?;
            }
        }
        Ok(())
    }

    /// Header read: blocks at or beyond the truncation length no longer come from before.
    fn start(&mut self) -> Result<(), String> {
        let (_, trunc, _) = self.shape.expect("header parsed");
        let len = self.file.metadata().map_err(|e| err(&self.path, e))?.len();
        let keep = len.min(trunc as u64 * BLCKSZ);
        if keep < len {
            self.file.set_len(keep).map_err(|e| err(&self.path, e))?;
        }
        Ok(())
    }

    /// All of it received: the file's final length (blocks no backup holds are zeroes).
    /// Returns that length.
    pub fn finish(self) -> Result<u64, String> {
        let Some((n, trunc, _)) = self.shape.filter(|_| self.header.is_empty()) else {
            return Err(err(
                &self.path,
                "the incremental file ends inside its header",
            ));
        };
        if self.data != n as u64 * BLCKSZ {
            return Err(err(
                &self.path,
                format!(
                    "{} bytes of blocks, the header announces {n} blocks",
                    self.data
                ),
            ));
        }
        let end = self
            .blocks
            .iter()
            .map(|b| (*b as u64 + 1) * BLCKSZ)
            .max()
            .unwrap_or(0)
            .max(trunc as u64 * BLCKSZ);
        let len = self.file.metadata().map_err(|e| err(&self.path, e))?.len();
        if len < end {
            self.file.set_len(end).map_err(|e| err(&self.path, e))?;
        }
        Ok(end)
    }
}

/// Makes a combined directory's `backup_label` a full backup's, as `pg_combinebackup` does:
/// without the `INCREMENTAL FROM LSN` / `INCREMENTAL FROM TLI` lines (PostgreSQL refuses to
/// start a directory whose label still says it is incremental). Returns the new size and
/// checksum.
pub fn make_label_full(pgdata: &Path, algo: ChecksumAlgorithm) -> std::io::Result<(u64, String)> {
    let path = pgdata.join("backup_label");
    let text = std::fs::read_to_string(&path)?;
    let kept: String = text
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("INCREMENTAL FROM "))
        .collect();
    std::fs::write(&path, kept.as_bytes())?;
    file_digest(&path, algo)
}

/// Removes the files an earlier layer wrote that the newer backup's manifest no longer lists
/// (dropped relations, removed files), in each of the layer's archive directories. The WAL
/// directory and `backup_manifest` are not the manifest's to list and stay. Returns how many
/// files went.
pub fn remove_unlisted(
    archives: &[super::extract::Archive],
    manifest: &crate::format::manifest::Manifest,
) -> std::io::Result<usize> {
    fn walk(
        dir: &Path,
        rel: &str,
        top: bool,
        manifest: &crate::format::manifest::Manifest,
        n: &mut usize,
    ) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}{name}");
            let ft = e.file_type()?;
            if ft.is_dir() {
                if top && rel.is_empty() && (name == "pg_wal" || name == "pg_tblspc") {
                    continue;
                }
                walk(&e.path(), &format!("{path}/"), false, manifest, n)?;
            } else if ft.is_file()
                && !manifest.files.contains_key(&path)
                && !manifest.files.contains_key(&format!("{rel}{PREFIX}{name}"))
                && path != "backup_manifest"
            {
                std::fs::remove_file(e.path())?;
                *n += 1;
            }
        }
        Ok(())
    }
    let mut n = 0;
    for a in archives {
        let prefix = a
            .tablespace
            .map(|o| format!("pg_tblspc/{o}/"))
            .unwrap_or_default();
        walk(&a.dest, &prefix, true, manifest, &mut n)?;
    }
    Ok(n)
}

/// A file's size and manifest checksum, read from disk.
pub fn file_digest(path: &Path, algo: ChecksumAlgorithm) -> std::io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut h = FileHasher::new(algo);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finish()))
}

/// The newest backup's manifest made the restored directory's: each `INCREMENTAL.<name>` entry
/// becomes `<name>` with the reconstructed size and checksum (`rebuilt`, by reconstructed
/// path; other files of `rebuilt`, `backup_label`, get theirs too), and the
/// `Manifest-Checksum` is computed anew. PostgreSQL writes one file entry per
/// line; other lines are kept as they are.
pub fn rewrite_manifest(
    raw: &[u8],
    rebuilt: &HashMap<String, (u64, String)>,
    algo: ChecksumAlgorithm,
) -> Result<Vec<u8>, String> {
    use sha2::Digest;
    let text = std::str::from_utf8(raw).map_err(|_| "the manifest is not UTF-8".to_string())?;
    let mut out = String::with_capacity(text.len());
    let mut done = 0usize;
    for line in text.split_inclusive('\n') {
        if line.starts_with("\"Manifest-Checksum\"") {
            let sum = hex::encode(sha2::Sha256::digest(out.as_bytes()));
            out.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
            return if done == rebuilt.len() {
                Ok(out.into_bytes())
            } else {
                Err(format!(
                    "the manifest lists {done} of the {} reconstructed files",
                    rebuilt.len()
                ))
            };
        }
        let body = line.trim_end_matches('\n');
        let (json, comma) = match body.strip_suffix(',') {
            Some(j) => (j, ","),
            None => (body, ""),
        };
        let entry: Option<serde_json::Value> = json
            .trim_start()
            .starts_with("{ \"Path\"")
            .then(|| serde_json::from_str(json).ok())
            .flatten();
        let rebuilt_entry = entry.as_ref().and_then(|v| {
            let path = v["Path"].as_str()?;
            let name = reconstructed_name(path).unwrap_or_else(|| path.to_string());
            let (size, sum) = rebuilt.get(&name)?;
            Some((name, *size, sum.clone(), v["Last-Modified"].clone()))
        });
        match rebuilt_entry {
            Some((name, size, sum, modified)) => {
                done += 1;
                out.push_str(&format!(
                    "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": {modified}, \"Checksum-Algorithm\": \"{}\", \"Checksum\": \"{sum}\" }}{comma}\n",
                    serde_json::Value::String(name),
                    algo.name()
                ));
            }
            None => out.push_str(line),
        }
    }
    Err("the manifest has no Manifest-Checksum line".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incremental(blocks: &[(u32, u8)], trunc: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&INCREMENTAL_MAGIC.to_ne_bytes());
        v.extend_from_slice(&(blocks.len() as u32).to_ne_bytes());
        v.extend_from_slice(&trunc.to_ne_bytes());
        for (b, _) in blocks {
            v.extend_from_slice(&b.to_ne_bytes());
        }
        if !blocks.is_empty() {
            v.resize(v.len().div_ceil(BLCKSZ as usize) * BLCKSZ as usize, 0);
        }
        for (_, fill) in blocks {
            v.extend(std::iter::repeat_n(*fill, BLCKSZ as usize));
        }
        v
    }

    fn apply(prior: &[u8], inc: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        let dir = std::env::temp_dir().join(format!(
            "archiver-combine-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("16384");
        std::fs::write(&p, prior).unwrap();
        let mut a = Applier::open(&p)?;
        for c in inc.chunks(chunk) {
            a.feed(c)?;
        }
        let len = a.finish()?;
        let out = std::fs::read(&p).unwrap();
        assert_eq!(out.len() as u64, len);
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(out)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn blocks(fills: &[u8]) -> Vec<u8> {
        fills
            .iter()
            .flat_map(|f| std::iter::repeat_n(*f, BLCKSZ as usize))
            .collect()
    }

    #[test]
    fn applies_blocks_truncates_and_extends() {
        let prior = blocks(&[1, 2, 3, 4]);
        // Blocks 1 and 5 changed; the relation was 6 blocks long: 0, 2, 3 from before, 4 zero.
        let inc = incremental(&[(1, 9), (5, 8)], 6);
        for chunk in [1, 100, 8192, 1 << 20] {
            assert_eq!(
                apply(&prior, &inc, chunk).unwrap(),
                blocks(&[1, 9, 3, 4, 0, 8]),
                "chunk {chunk}"
            );
        }
        // Truncated to 2 blocks, block 0 changed.
        assert_eq!(
            apply(&prior, &incremental(&[(0, 7)], 2), 333).unwrap(),
            blocks(&[7, 2])
        );
        // Nothing changed, truncated to nothing: an empty file.
        assert_eq!(
            apply(&prior, &incremental(&[], 0), 5).unwrap(),
            Vec::<u8>::new()
        );
        // Unchanged and as long as before.
        assert_eq!(apply(&prior, &incremental(&[], 4), 5).unwrap(), prior);
    }

    #[test]
    fn refuses_damaged_files() {
        let prior = blocks(&[1]);
        let mut bad = incremental(&[(0, 1)], 1);
        bad[0] ^= 1;
        assert!(apply(&prior, &bad, 64)
            .unwrap_err()
            .contains("not an incremental file"));
        let inc = incremental(&[(0, 1)], 1);
        assert!(apply(&prior, &inc[..inc.len() - 1], 64)
            .unwrap_err()
            .contains("header announces 1 blocks"));
        assert!(apply(&prior, &inc[..10], 64)
            .unwrap_err()
            .contains("inside its header"));
        let mut extra = inc.clone();
        extra.extend_from_slice(&[0; 10]);
        assert!(apply(&prior, &extra, 64)
            .unwrap_err()
            .contains("more block data"));
        assert!(Applier::open(Path::new("/nonexistent/16384"))
            .unwrap_err()
            .contains("do not hold it"));
    }

    #[test]
    fn names() {
        assert_eq!(
            reconstructed_name("base/5/INCREMENTAL.16384").as_deref(),
            Some("base/5/16384")
        );
        assert_eq!(reconstructed_name("INCREMENTAL.x").as_deref(), Some("x"));
        assert_eq!(reconstructed_name("base/5/16384"), None);
    }

    #[test]
    fn manifest_rewritten_with_its_checksum() {
        use sha2::Digest;
        let head = "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"Files\": [\n\
{ \"Path\": \"backup_label\", \"Size\": 3, \"Last-Modified\": \"2026-12-04 22:15:08 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"aa\" },\n\
{ \"Path\": \"base/5/INCREMENTAL.16384\", \"Size\": 16396, \"Last-Modified\": \"2026-12-04 22:15:08 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"bb\" }\n\
],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/8000028\", \"End-LSN\": \"0/8000120\" }\n],\n";
        let raw = format!(
            "{head}\"Manifest-Checksum\": \"{}\"}}\n",
            hex::encode(sha2::Sha256::digest(head.as_bytes()))
        );
        crate::format::manifest::Manifest::parse(raw.as_bytes()).unwrap();
        let rebuilt = HashMap::from([("base/5/16384".to_string(), (49152u64, "cc".to_string()))]);
        let out = rewrite_manifest(raw.as_bytes(), &rebuilt, ChecksumAlgorithm::Crc32c).unwrap();
        let m = crate::format::manifest::Manifest::parse(&out)
            .expect("a valid manifest, checksum included");
        assert_eq!(m.files["base/5/16384"].size, 49152);
        assert!(!m.files.contains_key("base/5/INCREMENTAL.16384"));
        assert_eq!(m.files["backup_label"].size, 3);
        let missing = HashMap::from([("base/5/99".to_string(), (1u64, "dd".to_string()))]);
        assert!(rewrite_manifest(raw.as_bytes(), &missing, ChecksumAlgorithm::Crc32c).is_err());
    }
}
