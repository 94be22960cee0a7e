//! Client-side encryption as a storage wrapper: every object written through [`Encrypted`] is
//! AES-256-GCM encrypted (after compression: the objects handed to it are already zstd), and
//! every object read back is authenticated before a byte of it is returned.
//!
//! Format of a stored object:
//! ```text
//! "ARCVENC1" | key id (8) | salt (16)                 header, 32 bytes
//! chunk 0 | chunk 1 | … | last chunk                  each: ciphertext of ≤ 64 KiB + 16-byte tag
//! ```
//! The object's AES key is HKDF-SHA256(master key, salt, "archiver object key v1"), a fresh
//! random salt per object, so nonces never repeat under one key: chunk `i`'s nonce is `i` (8
//! bytes, big-endian), three zero bytes and a last-chunk flag (the STREAM construction), which
//! makes truncation and reordering detectable. The associated data is the object's key, so an
//! object moved to another name does not authenticate. Every chunk but the last holds exactly
//! [`CHUNK`] bytes, so plaintext sizes and ranges map to stored ones without a lookup.
//!
//! The master key (32 bytes, from a file or an environment variable) is never stored: the
//! header carries only its id (8 bytes of HKDF output), so a wrong key is told apart from
//! damage. Invariants: nothing unauthenticated is returned; a wrong key, a missing key or a
//! damaged object is an error naming the object, never plaintext garbage.

use std::sync::Arc;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{ObjectMeta, ObjectWriter, Storage, StorageError, WriteMode};

pub const MAGIC: &[u8; 8] = b"ARCVENC1";
const HEADER_LEN: u64 = 32;
/// Plaintext bytes per chunk.
pub const CHUNK: u64 = 64 << 10;
const TAG: u64 = 16;
const SEALED_CHUNK: u64 = CHUNK + TAG;
/// Encrypted bytes handed to the inner writer at a time.
const FLUSH_AT: usize = 1 << 20;

/// The 32-byte master key. Its bytes never leave this module (no Debug, no Display).
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; 32],
    id: [u8; 8],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(id {})", hex::encode(self.id))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("cannot read the encryption key file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the encryption key variable {0} is not set")]
    MissingVar(String),
    #[error("the encryption key in {0} is not 32 bytes: give 64 hex digits (e.g. `openssl rand -hex 32`) or 32 raw bytes")]
    Malformed(String),
}

impl MasterKey {
    pub fn from_bytes(key: [u8; 32]) -> MasterKey {
        let mut id = [0u8; 8];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &key)
            .expand(b"archiver key id v1", &mut id)
            .expect("8 bytes is a valid HKDF length");
        MasterKey { key, id }
    }

    /// 64 hex digits (surrounding whitespace ignored) or exactly 32 raw bytes.
    pub fn parse(raw: &[u8], source: &str) -> Result<MasterKey, KeyError> {
        let text = std::str::from_utf8(raw).ok().map(str::trim);
        if let Some(t) = text.filter(|t| t.len() == 64) {
            if let Ok(v) = hex::decode(t) {
                return Ok(MasterKey::from_bytes(v.try_into().expect("32 bytes")));
            }
        }
        if raw.len() == 32 {
            return Ok(MasterKey::from_bytes(raw.try_into().expect("32 bytes")));
        }
        Err(KeyError::Malformed(source.to_string()))
    }

    pub fn from_file(path: &std::path::Path) -> Result<MasterKey, KeyError> {
        let raw = std::fs::read(path).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&raw, &path.display().to_string())
    }

    pub fn from_env(var: &str) -> Result<MasterKey, KeyError> {
        let v = std::env::var_os(var).ok_or_else(|| KeyError::MissingVar(var.to_string()))?;
        Self::parse(v.as_encoded_bytes(), &format!("${var}"))
    }

    /// The key's public id (hex), as stored in object headers.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    fn object_cipher(&self, salt: &[u8]) -> Aes256Gcm {
        let mut k = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &self.key)
            .expand(b"archiver object key v1", &mut k)
            .expect("32 bytes is a valid HKDF length");
        Aes256Gcm::new(&k.into())
    }
}

fn nonce(index: u64, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    n.into()
}

/// The plaintext size of a stored object of `stored` bytes, or None if no object of this
/// format has that size.
pub fn plain_size(stored: u64) -> Option<u64> {
    let body = stored.checked_sub(HEADER_LEN)?;
    let (full, rem) = (body / SEALED_CHUNK, body % SEALED_CHUNK);
    match rem {
        0 if full > 0 => Some(full * CHUNK),
        r if r >= TAG => Some(full * CHUNK + r - TAG),
        _ => None,
    }
}

/// Wraps a backend so that everything stored in it is encrypted with `key`.
#[derive(Debug, Clone)]
pub struct Encrypted {
    inner: Arc<dyn Storage>,
    key: MasterKey,
}

impl Encrypted {
    pub fn new(inner: Arc<dyn Storage>, key: MasterKey) -> Encrypted {
        Encrypted { inner, key }
    }

    /// A fresh header (random salt from the OS) and the object's cipher.
    fn new_header(&self) -> (Vec<u8>, Aes256Gcm) {
        let mut salt = [0u8; 16];
        aes_gcm::aead::OsRng.fill_bytes(&mut salt);
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&self.key.id);
        header.extend_from_slice(&salt);
        (header, self.key.object_cipher(&salt))
    }

    fn damaged(key: &str, reason: impl Into<String>) -> StorageError {
        StorageError::Undecryptable {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Checks a header; returns the object's cipher.
    fn open_header(&self, key: &str, header: &[u8]) -> Result<Aes256Gcm, StorageError> {
        if header.len() < HEADER_LEN as usize || &header[..8] != MAGIC {
            return Err(Self::damaged(
                key,
                "it is not encrypted (or its header is damaged), but this repository is configured with an encryption key",
            ));
        }
        if header[8..16] != self.key.id {
            return Err(Self::damaged(
                key,
                format!(
                    "it was encrypted with another key (key id {}; the configured key's id is {})",
                    hex::encode(&header[8..16]),
                    self.key.id_hex()
                ),
            ));
        }
        Ok(self.key.object_cipher(&header[16..32]))
    }

    /// Decrypts consecutive sealed chunks starting at chunk `first`. `at_end`: the data runs to
    /// the object's end, so its final chunk must be the last one.
    fn open_chunks(
        key: &str,
        cipher: &Aes256Gcm,
        first: u64,
        data: &[u8],
        at_end: bool,
    ) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::with_capacity(data.len());
        let chunks: Vec<&[u8]> = data.chunks(SEALED_CHUNK as usize).collect();
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let idx = first + i as u64;
            let final_here = i + 1 == n;
            let short = (c.len() as u64) < SEALED_CHUNK;
            // A short chunk can only be the last; a full final one may or may not be (unless
            // the data is known to end the object).
            let candidates: &[bool] = match (final_here, short, at_end) {
                (false, _, _) => &[false],
                (true, true, _) | (true, false, true) => &[true],
                (true, false, false) => &[false, true],
            };
            let aad = key.as_bytes();
            let plain = candidates.iter().find_map(|&last| {
                cipher
                    .decrypt(&nonce(idx, last), Payload { msg: c, aad })
                    .ok()
            });
            match plain {
                Some(p) => out.extend_from_slice(&p),
                None => {
                    return Err(Self::damaged(
                        key,
                        format!(
                            "chunk {idx} does not authenticate (damaged, truncated or renamed)"
                        ),
                    ))
                }
            }
        }
        Ok(out)
    }
}

struct EncWriter {
    key: String,
    inner: Box<dyn ObjectWriter>,
    cipher: Aes256Gcm,
    plain: BytesMut,
    sealed: BytesMut,
    index: u64,
    size: u64,
}

/// Appends chunk `index` of object `key`, sealed, to `out`.
fn seal_chunk(
    cipher: &Aes256Gcm,
    key: &str,
    index: u64,
    chunk: &[u8],
    last: bool,
    out: &mut BytesMut,
) {
    let ct = cipher
        .encrypt(
            &nonce(index, last),
            Payload {
                msg: chunk,
                aad: key.as_bytes(),
            },
        )
        .expect("AES-GCM encryption of a 64 KiB chunk cannot fail");
    out.extend_from_slice(&ct);
}

impl EncWriter {
    fn seal(&mut self, chunk: &[u8], last: bool) {
        seal_chunk(
            &self.cipher,
            &self.key,
            self.index,
            chunk,
            last,
            &mut self.sealed,
        );
        self.index += 1;
    }
}

#[async_trait]
impl ObjectWriter for EncWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        self.size += data.len() as u64;
        self.plain.extend_from_slice(&data);
        // Keep at least one byte back: the last chunk is sealed as such by `finish`.
        while self.plain.len() as u64 > CHUNK {
            let chunk = self.plain.split_to(CHUNK as usize);
            self.seal(&chunk, false);
        }
        if self.sealed.len() >= FLUSH_AT {
            let out = self.sealed.split().freeze();
            self.inner.write(out).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
        let rest = self.plain.split();
        self.seal(&rest, true);
        let out = self.sealed.split().freeze();
        self.inner.write(out).await?;
        self.inner.finish().await?;
        Ok(self.size)
    }

    async fn abort(self: Box<Self>) {
        self.inner.abort().await;
    }
}

#[async_trait]
impl Storage for Encrypted {
    async fn writer_with(
        &self,
        key: &str,
        mode: WriteMode,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let mut inner = self.inner.writer_with(key, mode).await?;
        let (header, cipher) = self.new_header();
        inner.write(Bytes::from(header)).await?;
        Ok(Box::new(EncWriter {
            key: key.to_string(),
            inner,
            cipher,
            plain: BytesMut::new(),
            sealed: BytesMut::new(),
            index: 0,
            size: 0,
        }))
    }

    async fn put_with(&self, key: &str, data: Bytes, mode: WriteMode) -> Result<(), StorageError> {
        // Sealed into one buffer, then one atomic put (no multipart for small objects).
        let (header, cipher) = self.new_header();
        let mut out = BytesMut::with_capacity(
            header.len() + data.len() + (data.len() / CHUNK as usize + 1) * TAG as usize,
        );
        out.extend_from_slice(&header);
        let mut chunks = data.chunks(CHUNK as usize).peekable();
        let mut index = 0;
        if chunks.peek().is_none() {
            seal_chunk(&cipher, key, 0, &[], true, &mut out);
        }
        while let Some(c) = chunks.next() {
            seal_chunk(&cipher, key, index, c, chunks.peek().is_none(), &mut out);
            index += 1;
        }
        self.inner.put_with(key, out.freeze(), mode).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let raw = self.inner.get(key).await?;
        let cipher = self.open_header(key, &raw)?;
        let body = &raw[HEADER_LEN as usize..];
        if body.is_empty() {
            return Err(Self::damaged(key, "it is truncated (no chunks)"));
        }
        Ok(Bytes::from(Self::open_chunks(key, &cipher, 0, body, true)?))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (first, last) = (offset / CHUNK, (offset + len - 1) / CHUNK);
        let start = HEADER_LEN + first * SEALED_CHUNK;
        let want = (last - first + 1) * SEALED_CHUNK;
        // The header and the chunks in one request when the range starts at the beginning;
        // otherwise two (the header is needed for the object's key).
        let (header, data) = if first == 0 {
            let raw = self.inner.get_range(key, 0, HEADER_LEN + want).await?;
            let split = raw.len().min(HEADER_LEN as usize);
            (raw.slice(..split), raw.slice(split..))
        } else {
            let h = self.inner.get_range(key, 0, HEADER_LEN).await?;
            (h, self.inner.get_range(key, start, want).await?)
        };
        let cipher = self.open_header(key, &header)?;
        if data.is_empty() {
            return Ok(Bytes::new());
        }
        let at_end = (data.len() as u64) < want;
        let plain = Self::open_chunks(key, &cipher, first, &data, at_end)?;
        let skip = (offset - first * CHUNK) as usize;
        if skip >= plain.len() {
            return Ok(Bytes::new());
        }
        let end = (skip + len as usize).min(plain.len());
        Ok(Bytes::copy_from_slice(&plain[skip..end]))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        match self.inner.head(key).await? {
            None => Ok(None),
            Some(m) => Ok(Some(ObjectMeta {
                size: plain_size(m.size)
                    .ok_or_else(|| Self::damaged(key, format!("impossible size {}", m.size)))?,
                ..m
            })),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        // A size that fits no encrypted object is shown as stored; reading it fails.
        Ok(self
            .inner
            .list(prefix)
            .await?
            .into_iter()
            .map(|m| ObjectMeta {
                size: plain_size(m.size).unwrap_or(m.size),
                ..m
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsStorage;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    fn store(dir: &std::path::Path, k: MasterKey) -> (Arc<FsStorage>, Encrypted) {
        let fs = Arc::new(FsStorage::new(dir));
        (fs.clone(), Encrypted::new(fs, k))
    }

    #[tokio::test]
    async fn conforms_over_the_filesystem_backend() {
        let dir = tempfile::tempdir().unwrap();
        let (_, s) = store(dir.path(), key(1));
        crate::storage::conformance::run(&s).await;
    }

    #[test]
    fn sizes_map_both_ways() {
        for plain in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 77] {
            let chunks = plain.div_ceil(CHUNK).max(1);
            let stored = HEADER_LEN + plain + chunks * TAG;
            assert_eq!(plain_size(stored), Some(plain), "{plain}");
        }
        assert_eq!(plain_size(HEADER_LEN), None);
        assert_eq!(plain_size(HEADER_LEN + 5), None);
        assert_eq!(plain_size(3), None);
    }

    #[test]
    fn keys_parse_and_never_print() {
        let hexkey = "ab".repeat(32);
        let k = MasterKey::parse(format!("{hexkey}\n").as_bytes(), "f").unwrap();
        assert_eq!(k.key, [0xab; 32]);
        assert_eq!(MasterKey::parse(&[7u8; 32], "f").unwrap().key, [7; 32]);
        assert_eq!(
            MasterKey::parse(b"short", "f").unwrap_err(),
            KeyError::Malformed("f".into())
        );
        assert!(!format!("{k:?}").contains("abab"));
        assert_ne!(key(1).id, key(2).id);
    }

    #[tokio::test]
    async fn ranges_wrong_keys_and_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, s) = store(dir.path(), key(1));
        let data: Vec<u8> = (0..(CHUNK as usize * 5 + 1234))
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let mut w = s.writer("o/big").await.unwrap();
        for c in data.chunks(100_000) {
            w.write(Bytes::copy_from_slice(c)).await.unwrap();
        }
        w.finish().await.unwrap();
        s.put(
            "o/small",
            Bytes::copy_from_slice(&data[..CHUNK as usize * 2]),
        )
        .await
        .unwrap();
        // Stored bytes are not the plaintext, and sizes are the plaintext's.
        let raw = fs.get("o/big").await.unwrap();
        assert!(!raw.windows(64).any(|w| w == &data[1000..1064]));
        assert_eq!(
            s.head("o/big").await.unwrap().unwrap().size,
            data.len() as u64
        );
        assert_eq!(s.list("o/").await.unwrap()[1].size, CHUNK * 2);
        assert_eq!(
            &s.get("o/small").await.unwrap()[..],
            &data[..CHUNK as usize * 2]
        );
        let n = data.len() as u64;
        for (off, len) in [
            (0, 10),
            (CHUNK - 3, 6),
            (CHUNK, CHUNK),
            (2 * CHUNK + 5, 3 * CHUNK),
            (n - 1, 1),
            (n - 100, 1000),
            (n, 10),
            (n + CHUNK, 10),
        ] {
            let got = s.get_range("o/big", off, len).await.unwrap();
            let lo = (off as usize).min(data.len());
            let hi = ((off + len) as usize).min(data.len());
            assert_eq!(&got[..], &data[lo..hi], "range {off}+{len}");
        }
        // The exactly-chunk-sized object: full last chunk read by range up to the end.
        let got = s.get_range("o/small", CHUNK, CHUNK).await.unwrap();
        assert_eq!(&got[..], &data[CHUNK as usize..2 * CHUNK as usize]);

        // Another key: refused by id, naming both.
        let (_, other) = store(dir.path(), key(2));
        let e = other.get("o/big").await.unwrap_err();
        assert!(e.to_string().contains("another key"), "{e}");
        assert!(other.get_range("o/big", 0, 10).await.is_err());
        // A plaintext object in an encrypted store.
        fs.put("o/plain", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let e = s.get("o/plain").await.unwrap_err();
        assert!(e.to_string().contains("not encrypted"), "{e}");
        // A renamed object does not authenticate.
        fs.put("o/moved", raw.clone()).await.unwrap();
        assert!(matches!(
            s.get("o/moved").await,
            Err(StorageError::Undecryptable { .. })
        ));
        // One flipped bit anywhere in a chunk.
        let mut bad = raw.to_vec();
        bad[HEADER_LEN as usize + 3 * SEALED_CHUNK as usize + 10] ^= 1;
        fs.put("o/big", Bytes::from(bad)).await.unwrap();
        assert!(s.get("o/big").await.is_err());
        assert!(s.get_range("o/big", 3 * CHUNK, 5).await.is_err());
        assert_eq!(
            &s.get_range("o/big", 0, 5).await.unwrap()[..],
            &data[..5],
            "undamaged chunks still read"
        );
        // Truncated at a chunk boundary: the new final chunk was not sealed as the last.
        let cut = &raw[..(HEADER_LEN + 2 * SEALED_CHUNK) as usize];
        fs.put("o/big", Bytes::copy_from_slice(cut)).await.unwrap();
        assert!(s.get("o/big").await.is_err());
        assert!(s.get_range("o/big", CHUNK, 4 * CHUNK).await.is_err());
    }
}
