//! The self-describing object format: a standard zstd frame, then a 64-byte zstd *skippable
//! frame* carrying archiver's trailer. `zstd -d` skips the trailer, so `zstd -d < obj > file`
//! recovers the raw bytes without archiver; archiver checks the SHA-256 of the stored body, the
//! raw size and the CRC-32 (IEEE) of the raw bytes on every read.
//!
//! The SHA-256 covers the stored body (every byte before the trailer), not the raw content: an
//! object can be checked without decompressing it (`head -c -64 obj | sha256sum`), and hashing
//! the compressed bytes costs a fraction of hashing the raw ones (a base backup of pgbench data
//! is ~20x smaller stored). The raw content is covered by the CRC-32 and the raw size.
//!
//! New frames carry no zstd content checksum ([`FRAME_CHECKSUM`]): it would be a third check of
//! what the two above already cover. Objects written before carry one, and zstd checks it when
//! it is there; the format is the same either way.
//!
//! Trailer layout (little-endian, as zstd frames are):
//! ```text
//! 0   u32  0x184D2A5E       skippable-frame magic
//! 4   u32  56               frame payload size
//! 8   [8]  "ARCHVR01"       format magic + version
//! 16  u8   kind             1 WAL segment, 2 partial WAL segment, 3 timeline history, 4 other
//! 17  [3]  0
//! 20  u32  crc32 of the raw bytes (IEEE, as crc32fast / zlib compute it)
//! 24  u64  raw size in bytes
//! 32  [32] sha256 of the stored body (all bytes before the trailer)
//! ```

use std::io::{Read, Write};

use bytes::Buf;
use sha2::{Digest, Sha256};

pub const TRAILER_LEN: usize = 64;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const FORMAT_MAGIC: &[u8; 8] = b"ARCHVR01";

/// Whether new zstd frames carry zstd's content checksum (an XXH64 of the raw bytes). Off: the
/// trailer's CRC-32 of the same raw bytes and SHA-256 of the stored body are checked on every
/// read, so it would be a third check, and it cost about a tenth of zstd level 1's time on
/// pgbench WAL (1.90 against 1.70 CPU-s per GB; docs/benchmarks.md). Decoding accepts frames
/// with or without one (zstd checks it when present), so objects written before still read.
const FRAME_CHECKSUM: bool = false;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    WalSegment = 1,
    PartialWalSegment = 2,
    History = 3,
    Other = 4,
    /// A WAL segment's index or restore points (`wal::index`).
    WalIndex = 5,
}

impl ObjectKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => ObjectKind::WalSegment,
            2 => ObjectKind::PartialWalSegment,
            3 => ObjectKind::History,
            4 => ObjectKind::Other,
            5 => ObjectKind::WalIndex,
            _ => return None,
        })
    }
}

/// What the trailer records about the raw content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub kind: ObjectKind,
    pub raw_size: u64,
    pub crc32: u32,
    pub sha256: [u8; 32],
}

impl ObjectInfo {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    fn trailer(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        t[4..8].copy_from_slice(&56u32.to_le_bytes());
        t[8..16].copy_from_slice(FORMAT_MAGIC);
        t[16] = self.kind as u8;
        t[20..24].copy_from_slice(&self.crc32.to_le_bytes());
        t[24..32].copy_from_slice(&self.raw_size.to_le_bytes());
        t[32..64].copy_from_slice(&self.sha256);
        t
    }

    pub fn parse_trailer(t: &[u8]) -> Result<Self, ObjectError> {
        if t.len() != TRAILER_LEN
            || (&t[0..]).get_u32_le() != SKIPPABLE_MAGIC
            || (&t[4..]).get_u32_le() != 56
            || &t[8..16] != FORMAT_MAGIC
        {
            return Err(ObjectError::Corrupt(
                "missing or damaged archiver trailer".into(),
            ));
        }
        Ok(ObjectInfo {
            kind: ObjectKind::from_u8(t[16])
                .ok_or_else(|| ObjectError::Corrupt(format!("unknown object kind {}", t[16])))?,
            crc32: (&t[20..]).get_u32_le(),
            raw_size: (&t[24..]).get_u64_le(),
            sha256: t[32..64].try_into().expect("the length was checked"),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object is corrupt: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Running CRC-32 + size over the raw bytes, SHA-256 over the stored body.
#[derive(Default)]
pub struct Hasher {
    crc: crc32fast::Hasher,
    sha: Sha256,
    size: u64,
}

impl Hasher {
    /// Raw content.
    pub fn update(&mut self, b: &[u8]) {
        self.crc.update(b);
        self.size += b.len() as u64;
    }
    /// Stored (compressed) bytes.
    pub fn update_stored(&mut self, b: &[u8]) {
        self.sha.update(b);
    }
    pub fn finish(self, kind: ObjectKind) -> ObjectInfo {
        ObjectInfo {
            kind,
            raw_size: self.size,
            crc32: self.crc.finalize(),
            sha256: self.sha.finalize().into(),
        }
    }
}

/// Checks a stored object's bytes as they stream by, without decompressing them: the SHA-256
/// of its body against the one its trailer records. Used where whole objects are copied or
/// read back (the uploader, hot-tier eviction); [`decode_body`] checks the content as well.
pub struct StoredCheck {
    /// The body's length, or `None` while the object's size is unknown (then the last
    /// [`TRAILER_LEN`] bytes seen are held back from the hash).
    body_len: Option<u64>,
    seen: u64,
    sha: Sha256,
    trailer: Vec<u8>,
}

impl StoredCheck {
    /// A check of an object of `stored_size` bytes (its body and its trailer).
    pub fn new(stored_size: u64) -> Self {
        StoredCheck {
            body_len: Some(stored_size.saturating_sub(TRAILER_LEN as u64)),
            seen: 0,
            sha: Sha256::new(),
            trailer: Vec::with_capacity(TRAILER_LEN),
        }
    }

    /// A check of an object whose size is known only at its end (one still being written).
    pub fn of_unknown_size() -> Self {
        StoredCheck {
            body_len: None,
            ..StoredCheck::new(0)
        }
    }

    /// The next bytes of the object, in order.
    pub fn update(&mut self, b: &[u8]) {
        self.seen += b.len() as u64;
        let Some(body_len) = self.body_len else {
            // Whatever falls out of the last TRAILER_LEN bytes is body.
            if b.len() >= TRAILER_LEN {
                self.sha.update(&self.trailer);
                self.trailer.clear();
                let (body, tail) = b.split_at(b.len() - TRAILER_LEN);
                self.sha.update(body);
                self.trailer.extend_from_slice(tail);
            } else {
                let out = (self.trailer.len() + b.len()).saturating_sub(TRAILER_LEN);
                self.sha.update(&self.trailer[..out]);
                self.trailer.drain(..out);
                self.trailer.extend_from_slice(b);
            }
            return;
        };
        let before = self.seen - b.len() as u64;
        let in_body = body_len.saturating_sub(before).min(b.len() as u64) as usize;
        self.sha.update(&b[..in_body]);
        self.trailer.extend_from_slice(&b[in_body..]);
    }

    /// After every byte: the trailer (raw bytes and parsed), if the body matches it.
    pub fn finish(self) -> Result<(Vec<u8>, ObjectInfo), ObjectError> {
        let info = ObjectInfo::parse_trailer(&self.trailer)?;
        if self.sha.finalize()[..] != info.sha256 {
            return Err(ObjectError::Corrupt(
                "its SHA-256 does not match its trailer".into(),
            ));
        }
        Ok((self.trailer, info))
    }
}

/// A writer that hashes what passes through it.
struct HashingWriter<'a, W> {
    inner: W,
    sha: &'a mut Sha256,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.sha.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<'a, R> {
    inner: R,
    sha: &'a mut Sha256,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        self.sha.update(&b[..n]);
        Ok(n)
    }
}

/// zstd's `minMatch` for `kind` at `level`, where it is not zstd's own: 5 for WAL below
/// level 3 (zstd picks 6 or more there, and 5 itself from level 3 on). Full-page images
/// repeat tuple headers and line pointers in runs that 6-byte matches miss: on pgbench WAL
/// level 1 stores 11% fewer bytes for the same CPU (13.2× → 14.8–15.0×); on WAL of bulk
/// inserts of random text, no change either way (docs/benchmarks.md). Any zstd decoder reads
/// the frames.
fn min_match(kind: ObjectKind, level: i32) -> Option<u32> {
    let wal = matches!(kind, ObjectKind::WalSegment | ObjectKind::PartialWalSegment);
    (wal && level < 3).then_some(WAL_MIN_MATCH)
}

const WAL_MIN_MATCH: u32 = 5;

/// Compresses everything from `raw` into `out` (zstd `level`) and appends the
/// trailer. Returns what the trailer records.
pub fn encode<R: Read, W: Write>(
    raw: R,
    out: W,
    kind: ObjectKind,
    level: i32,
) -> Result<ObjectInfo, ObjectError> {
    encode_sized(raw, out, kind, level, None)
}

/// [`encode`], told the raw size when it is known: zstd then sizes its tables and window to
/// the input (an index of ~100 KB gets a context of a few pages, not one for an unbounded
/// stream: 768 KiB of tables cleared, most of a WAL stream's page faults after the
/// segments'), and records the size in the frame header. A different size is an error.
fn encode_sized<R: Read, W: Write>(
    mut raw: R,
    out: W,
    kind: ObjectKind,
    level: i32,
    size: Option<u64>,
) -> Result<ObjectInfo, ObjectError> {
    let mut hasher = Hasher::default();
    let mut sha = Sha256::new();
    let mut enc = zstd::stream::Encoder::new(
        HashingWriter {
            inner: out,
            sha: &mut sha,
        },
        level,
    )?;
    enc.include_checksum(FRAME_CHECKSUM)?;
    if let Some(m) = min_match(kind, level) {
        enc.set_parameter(zstd::stream::raw::CParameter::MinMatch(m))?;
    }
    enc.set_pledged_src_size(size)?;
    let mut buf = vec![0u8; size.map_or(256 * 1024, |n| n.min(256 * 1024) as usize)];
    loop {
        let n = raw.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        enc.write_all(&buf[..n])?;
    }
    let mut out = enc.finish()?.inner;
    hasher.sha = sha;
    let info = hasher.finish(kind);
    out.write_all(&info.trailer())?;
    Ok(info)
}

/// Bytes per step of [`encode_contiguous`]: a multiple of every WAL page size PostgreSQL
/// allows (`XLOG_BLCKSZ` up to 32 KiB).
pub const CONTIGUOUS_STEP: usize = 256 * 1024;

/// [`encode`] for input that lies whole in memory and stays unchanged while this runs (a
/// complete spool segment, mapped): zstd reads it where it lies — its *stable input buffer*
/// (`ZSTD_c_stableInBuffer` in zstd.h) — instead of copying each chunk into a window of its
/// own and matching across the seams through its slower external-dictionary path. On
/// pgbench WAL that is ~15% less CPU than [`encode`] from a `read` loop (docs/benchmarks.md).
///
/// The input goes by in steps of [`CONTIGUOUS_STEP`]: `each(offset, step)` sees each step
/// first (to make a mapping's pages resident, to index the records), then the CRC-32 is
/// taken while the step is in cache, then zstd compresses it. An error from `each` ends the
/// encoding with that error. Appends the object (frame and trailer) to `out`; the frame
/// records the raw size.
pub fn encode_contiguous(
    raw: &[u8],
    out: &mut Vec<u8>,
    kind: ObjectKind,
    level: i32,
    mut each: impl FnMut(usize, &[u8]) -> std::io::Result<()>,
) -> Result<ObjectInfo, ObjectError> {
    use zstd::zstd_safe::zstd_sys as z;
    let cctx = StableInput::new(kind, level, raw.len() as u64)?;
    let mut hasher = Hasher::default();
    let mut input = z::ZSTD_inBuffer {
        src: raw.as_ptr().cast(),
        size: 0,
        pos: 0,
    };
    // SAFETY (for every call below): `input` points into `raw`, borrowed for this whole
    // function, and only its `size` grows, as `ZSTD_c_stableInBuffer` requires; zstd keeps
    // referring to it only until the frame ends, which happens before we return (or the
    // context is freed on an early return, by `StableInput`'s drop). `output` points into
    // `out`'s spare capacity, and `set_len` covers exactly the bytes zstd reports written.
    let mut off = 0;
    loop {
        let end = (off + CONTIGUOUS_STEP).min(raw.len());
        let step = &raw[off..end];
        each(off, step)?;
        hasher.update(step);
        input.size = end;
        let last = end == raw.len();
        let op = if last {
            z::ZSTD_EndDirective::ZSTD_e_end
        } else {
            z::ZSTD_EndDirective::ZSTD_e_continue
        };
        loop {
            out.reserve(CONTIGUOUS_STEP);
            let written = out.len();
            let mut output = z::ZSTD_outBuffer {
                dst: unsafe { out.as_mut_ptr().add(written) }.cast(),
                size: out.capacity() - written,
                pos: 0,
            };
            let left = zstd_result(unsafe {
                z::ZSTD_compressStream2(cctx.0.as_ptr(), &mut output, &mut input, op)
            })?;
            unsafe { out.set_len(written + output.pos) };
            hasher.update_stored(&out[written..]);
            let done = if last {
                left == 0
            } else {
                input.pos == input.size
            };
            if done {
                break;
            }
        }
        if last {
            break;
        }
        off = end;
    }
    let info = hasher.finish(kind);
    out.extend_from_slice(&info.trailer());
    Ok(info)
}

/// How far back zstd `level` refers in inputs of more than 256 KiB: its window, from zstd's
/// own table of default parameters (`ZSTD_defaultCParameters` in lib/compress/clevels.h;
/// negative levels use level 1's). A reader of mapped input may drop pages further behind
/// than this without zstd touching them again.
pub fn zstd_window(level: i32) -> usize {
    let log = match level {
        ..=1 => 19,
        2 => 20,
        3..=8 => 21,
        9..=16 => 22,
        _ => 23,
    };
    1 << log
}

/// A zstd compression context set up for [`encode_contiguous`], freed on drop.
struct StableInput(std::ptr::NonNull<zstd::zstd_safe::zstd_sys::ZSTD_CCtx>);

impl StableInput {
    fn new(kind: ObjectKind, level: i32, size: u64) -> Result<Self, ObjectError> {
        use zstd::zstd_safe::zstd_sys as z;
        let cctx = std::ptr::NonNull::new(unsafe { z::ZSTD_createCCtx() })
            .map(StableInput)
            .ok_or_else(|| std::io::Error::other("zstd: cannot allocate a context"))?;
        let c = cctx.0.as_ptr();
        // SAFETY: `c` is a live context; these only set parameters.
        unsafe {
            zstd_result(z::ZSTD_CCtx_setParameter(
                c,
                z::ZSTD_cParameter::ZSTD_c_compressionLevel,
                level,
            ))?;
            zstd_result(z::ZSTD_CCtx_setParameter(
                c,
                z::ZSTD_cParameter::ZSTD_c_checksumFlag,
                FRAME_CHECKSUM as i32,
            ))?;
            if let Some(m) = min_match(kind, level) {
                zstd_result(z::ZSTD_CCtx_setParameter(
                    c,
                    z::ZSTD_cParameter::ZSTD_c_minMatch,
                    m as i32,
                ))?;
            }
            // ZSTD_c_stableInBuffer, an alias of this one in zstd.h (1.5.x).
            zstd_result(z::ZSTD_CCtx_setParameter(
                c,
                z::ZSTD_cParameter::ZSTD_c_experimentalParam9,
                1,
            ))?;
            zstd_result(z::ZSTD_CCtx_setPledgedSrcSize(c, size))?;
        }
        Ok(cctx)
    }
}

impl Drop for StableInput {
    fn drop(&mut self) {
        // SAFETY: created by ZSTD_createCCtx, freed once.
        unsafe { zstd::zstd_safe::zstd_sys::ZSTD_freeCCtx(self.0.as_ptr()) };
    }
}

/// A zstd size-or-error code as a result.
fn zstd_result(code: usize) -> Result<usize, ObjectError> {
    use zstd::zstd_safe::zstd_sys as z;
    // SAFETY: plain functions of an integer; the name is a static C string.
    if unsafe { z::ZSTD_isError(code) } == 0 {
        return Ok(code);
    }
    let name = unsafe { std::ffi::CStr::from_ptr(z::ZSTD_getErrorName(code)) };
    Err(std::io::Error::other(format!("zstd: {}", name.to_string_lossy())).into())
}

/// Encodes an in-memory buffer into a new `Vec`.
pub fn encode_bytes(
    raw: &[u8],
    kind: ObjectKind,
    level: i32,
) -> Result<(Vec<u8>, ObjectInfo), ObjectError> {
    let mut out = Vec::with_capacity(raw.len() / 4 + TRAILER_LEN);
    let info = encode_sized(raw, &mut out, kind, level, Some(raw.len() as u64))?;
    Ok((out, info))
}

/// Reads the trailer of a whole stored object.
pub fn read_trailer(obj: &[u8]) -> Result<ObjectInfo, ObjectError> {
    if obj.len() < TRAILER_LEN {
        return Err(ObjectError::Corrupt(format!(
            "object too short ({} bytes)",
            obj.len()
        )));
    }
    ObjectInfo::parse_trailer(&obj[obj.len() - TRAILER_LEN..])
}

/// Decompresses `obj` into `out`, verifying the raw size, the CRC-32 and the SHA-256 recorded in
/// the trailer (and a zstd frame checksum, in objects that have one). On error `out` may hold a prefix: callers write to a
/// temporary location and publish only on success.
pub fn decode<W: Write>(obj: &[u8], out: W) -> Result<ObjectInfo, ObjectError> {
    let info = read_trailer(obj)?;
    decode_body(&obj[..obj.len() - TRAILER_LEN], &info, out)?;
    Ok(info)
}

/// Decompresses an object's body (everything before the trailer) from a reader, verifying it
/// against `info` (read separately, e.g. with a ranged read of the last [`TRAILER_LEN`] bytes).
/// Memory stays bounded whatever the object's size.
pub fn decode_body<R: Read, W: Write>(
    body: R,
    info: &ObjectInfo,
    mut out: W,
) -> Result<(), ObjectError> {
    let mut sha = Sha256::new();
    let mut hasher = Hasher::default();
    let mut sink_err: Option<std::io::Error> = None;
    {
        let reader = HashingReader {
            inner: body,
            sha: &mut sha,
        };
        let mut dec = zstd::stream::Decoder::new(reader)
            .map_err(|e| ObjectError::Corrupt(format!("zstd: {e}")))?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match dec.read(&mut buf) {
                Ok(n) => n,
                Err(e) => return Err(ObjectError::Corrupt(format!("zstd: {e}"))),
            };
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if hasher.size > info.raw_size {
                return Err(ObjectError::Corrupt(
                    "more data than the trailer records".into(),
                ));
            }
            // A failing destination does not end the read: damaged content often makes the
            // consumer fail first (a tar parser, say), and the checksums must still get the
            // chance to name the real cause.
            if sink_err.is_none() {
                if let Err(e) = out.write_all(&buf[..n]) {
                    sink_err = Some(e);
                }
            }
        }
        // Whatever the decoder left unread still belongs to the body's hash.
        std::io::copy(&mut dec.finish(), &mut std::io::sink())?;
    }
    hasher.sha = sha;
    let got = hasher.finish(info.kind);
    if got.sha256 != info.sha256 {
        return Err(ObjectError::Corrupt(format!(
            "checksum mismatch: the stored bytes hash to sha256 {}, the trailer records {}",
            got.sha256_hex(),
            info.sha256_hex()
        )));
    }
    if got.raw_size != info.raw_size {
        return Err(ObjectError::Corrupt(format!(
            "size {} does not match the recorded {}",
            got.raw_size, info.raw_size
        )));
    }
    if got.crc32 != info.crc32 {
        return Err(ObjectError::Corrupt(format!(
            "checksum mismatch: the content's crc32 is {:08x}, the trailer records {:08x}",
            got.crc32, info.crc32
        )));
    }
    match sink_err {
        Some(e) => Err(ObjectError::Io(e)),
        None => Ok(()),
    }
}

/// Incremental encoder for objects too large to hold: push raw chunks, store what comes out.
/// With `workers > 0` zstd compresses on its own threads, so the caller (a receive loop) mostly
/// copies bytes and never waits on compression.
pub struct StreamEncoder {
    enc: zstd::stream::Encoder<'static, Vec<u8>>,
    hasher: Hasher,
    kind: ObjectKind,
}

impl StreamEncoder {
    pub fn new(kind: ObjectKind, level: i32, workers: u32) -> Result<Self, ObjectError> {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), level)?;
        enc.include_checksum(FRAME_CHECKSUM)?;
        if workers > 0 {
            enc.multithread(workers)?;
        }
        Ok(StreamEncoder {
            enc,
            hasher: Hasher::default(),
            kind,
        })
    }

    /// Feeds raw bytes and appends the compressed bytes ready so far (often none) to `out`.
    /// The encoder's own output buffer keeps its capacity: no allocation per call.
    pub fn push(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<(), ObjectError> {
        self.hasher.update(raw);
        self.enc.write_all(raw)?;
        self.hasher.update_stored(self.enc.get_ref());
        out.append(self.enc.get_mut());
        Ok(())
    }

    /// Raw bytes pushed so far.
    #[cfg(test)]
    fn raw_size(&self) -> u64 {
        self.hasher.size
    }

    /// Ends the frame; returns the last compressed bytes (trailer included) and the object info.
    pub fn finish(self) -> Result<(Vec<u8>, ObjectInfo), ObjectError> {
        let mut tail = self.enc.finish()?;
        let mut hasher = self.hasher;
        hasher.update_stored(&tail);
        let info = hasher.finish(self.kind);
        tail.extend_from_slice(&info.trailer());
        Ok((tail, info))
    }
}

/// For content that arrives already zstd-compressed (a server-compressed base backup): the
/// compressed bytes are stored as they come, and decompressed on the side only to hash the raw
/// content (and hand it to the caller, e.g. to check files against a manifest). The object is
/// the sender's zstd frames followed by the usual trailer.
pub struct PassthroughEncoder {
    dec: zstd::stream::raw::Decoder<'static>,
    hasher: Hasher,
    kind: ObjectKind,
    raw: Vec<u8>,
    ended_frame: bool,
}

impl PassthroughEncoder {
    pub fn new(kind: ObjectKind) -> Result<Self, ObjectError> {
        Ok(PassthroughEncoder {
            dec: zstd::stream::raw::Decoder::new()?,
            hasher: Hasher::default(),
            kind,
            raw: Vec::with_capacity(1 << 20),
            ended_frame: true,
        })
    }

    /// Appends `compressed` to `out` unchanged and returns the raw bytes it decodes to (valid
    /// until the next call). Damaged input is an error.
    pub fn push(&mut self, compressed: &[u8], out: &mut Vec<u8>) -> Result<&[u8], ObjectError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        out.extend_from_slice(compressed);
        self.hasher.update_stored(compressed);
        self.raw.clear();
        let mut input = InBuffer::around(compressed);
        let mut chunk = [0u8; 128 * 1024];
        loop {
            let mut output = OutBuffer::around(&mut chunk[..]);
            let hint = self
                .dec
                .run(&mut input, &mut output)
                .map_err(|e| ObjectError::Corrupt(format!("zstd from the server: {e}")))?;
            let n = output.pos();
            self.raw.extend_from_slice(&chunk[..n]);
            self.ended_frame = hint == 0;
            if input.pos() == compressed.len() && n < chunk.len() {
                break;
            }
        }
        self.hasher.update(&self.raw);
        Ok(&self.raw)
    }

    /// Ends the object: the trailer (the sender's frames must be complete) and the info.
    pub fn finish(self) -> Result<(Vec<u8>, ObjectInfo), ObjectError> {
        if !self.ended_frame {
            return Err(ObjectError::Corrupt(
                "the compressed stream ended inside a zstd frame".into(),
            ));
        }
        let info = self.hasher.finish(self.kind);
        Ok((info.trailer().to_vec(), info))
    }
}

/// Decodes into a new `Vec`.
pub fn decode_bytes(obj: &[u8]) -> Result<(Vec<u8>, ObjectInfo), ObjectError> {
    let mut out = Vec::new();
    let info = decode(obj, &mut out)?;
    Ok((out, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32).map(|i| ((i / 7) % 256) as u8).collect()
    }

    #[test]
    fn a_stored_check_of_unknown_size_agrees_with_one_of_known_size() {
        let (obj, want) = encode_bytes(&sample(), ObjectKind::Other, 1).unwrap();
        // Chunkings that split the trailer every way: smaller, equal and larger than it.
        for chunk in [
            1,
            7,
            TRAILER_LEN - 1,
            TRAILER_LEN,
            TRAILER_LEN + 1,
            4096,
            obj.len(),
        ] {
            let (mut known, mut unknown) = (
                StoredCheck::new(obj.len() as u64),
                StoredCheck::of_unknown_size(),
            );
            for c in obj.chunks(chunk) {
                known.update(c);
                unknown.update(c);
            }
            let (t1, i1) = known.finish().unwrap();
            let (t2, i2) = unknown.finish().unwrap();
            assert_eq!((t1, &i1), (t2, &i2), "chunks of {chunk}");
            assert_eq!(i1, want);
        }
        // A damaged body or a missing byte is refused either way.
        let mut bad = obj.clone();
        bad[10] ^= 1;
        let mut c = StoredCheck::of_unknown_size();
        c.update(&bad);
        assert!(matches!(c.finish(), Err(ObjectError::Corrupt(_))));
        let mut c = StoredCheck::of_unknown_size();
        c.update(&obj[1..]);
        assert!(c.finish().is_err());
    }

    #[test]
    fn passthrough_stores_the_senders_frames_and_hashes_the_raw_bytes() {
        let raw = sample();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 5).unwrap();
        enc.include_checksum(true).unwrap();
        enc.write_all(&raw).unwrap();
        let compressed = enc.finish().unwrap();
        let mut p = PassthroughEncoder::new(ObjectKind::Other).unwrap();
        let mut obj = Vec::new();
        let mut seen = Vec::new();
        for c in compressed.chunks(1000) {
            seen.extend_from_slice(p.push(c, &mut obj).unwrap());
        }
        assert_eq!(seen, raw);
        assert_eq!(obj, compressed);
        let (tail, info) = p.finish().unwrap();
        obj.extend_from_slice(&tail);
        let (back, info2) = decode_bytes(&obj).unwrap();
        assert_eq!(back, raw);
        assert_eq!(info, info2);

        // Truncated mid-frame, or damaged (the frame checksum catches it): refused.
        let mut p = PassthroughEncoder::new(ObjectKind::Other).unwrap();
        p.push(&compressed[..compressed.len() / 2], &mut Vec::new())
            .unwrap();
        assert!(p.finish().is_err());
        let mut bad = compressed.clone();
        bad[compressed.len() / 2] ^= 0xff;
        let mut p = PassthroughEncoder::new(ObjectKind::Other).unwrap();
        let r = p
            .push(&bad, &mut Vec::new())
            .map(|_| ())
            .and_then(|_| p.finish().map(|_| ()));
        assert!(r.is_err());
    }

    #[test]
    fn a_failing_destination_does_not_hide_corruption() {
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("destination failed"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let raw = sample();
        let (obj, _) = encode_bytes(&raw, ObjectKind::Other, 1).unwrap();
        assert!(matches!(decode(&obj, Failing), Err(ObjectError::Io(_))));
        let mut bad = obj.clone();
        bad[obj.len() / 3] ^= 0x01;
        assert!(matches!(
            decode(&bad, Failing),
            Err(ObjectError::Corrupt(_))
        ));
    }

    #[test]
    fn every_wal_level_round_trips() {
        let raw = sample();
        let levels = crate::config::WAL_COMPRESS_LEVELS;
        for level in [*levels.start(), -1, 1, *levels.end()] {
            let (obj, info) = encode_bytes(&raw, ObjectKind::WalSegment, level).unwrap();
            assert!(obj.len() < raw.len() / 2, "level {level}: {}", obj.len());
            let (back, info2) = decode_bytes(&obj).unwrap();
            assert!(back == raw, "level {level}");
            assert_eq!(info2, info);
        }
    }

    #[test]
    fn round_trip() {
        let raw = sample();
        let (obj, info) = encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
        assert!(obj.len() < raw.len() / 10);
        assert_eq!(info.raw_size, raw.len() as u64);
        // The size was known, so the frame header records it.
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&obj).ok(),
            Some(Some(raw.len() as u64))
        );
        assert_eq!(read_trailer(&obj).unwrap(), info);
        // The SHA-256 is of the stored body, checkable without decompressing.
        let body_sha: [u8; 32] = Sha256::digest(&obj[..obj.len() - TRAILER_LEN]).into();
        assert_eq!(info.sha256, body_sha);
        assert_eq!(info.crc32, crc32fast::hash(&raw));
        let (back, info2) = decode_bytes(&obj).unwrap();
        assert_eq!(back, raw);
        assert_eq!(info2, info);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let raw = sample();
        let (obj, _) = encode_bytes(&raw, ObjectKind::History, 3).unwrap();
        // Flip bytes across the body and the trailer; every one must fail to decode.
        for pos in (0..obj.len())
            .step_by(obj.len() / 97 + 1)
            .chain([obj.len() - 1, 0, 20])
        {
            let mut bad = obj.clone();
            bad[pos] ^= 0x10;
            assert!(
                decode_bytes(&bad).is_err(),
                "flip at {pos} of {} went unnoticed",
                obj.len()
            );
        }
        assert!(decode_bytes(&obj[..obj.len() - 1]).is_err());
        assert!(decode_bytes(&obj[10..]).is_err());
        assert!(decode_bytes(b"short").is_err());
    }

    #[test]
    fn stream_encoder_matches_and_verifies() {
        let raw: Vec<u8> = (0..3_000_000u32).map(|i| ((i / 13) % 251) as u8).collect();
        for workers in [0, 2] {
            let mut e = StreamEncoder::new(ObjectKind::Other, 3, workers).unwrap();
            let mut obj = Vec::new();
            for chunk in raw.chunks(77_777) {
                e.push(chunk, &mut obj).unwrap();
            }
            assert_eq!(e.raw_size(), raw.len() as u64);
            let (tail, info) = e.finish().unwrap();
            obj.extend(tail);
            let (back, info2) = decode_bytes(&obj).unwrap();
            assert!(back == raw, "workers={workers}");
            assert_eq!(info, info2);
            // Streaming decode of the body with a separately read trailer.
            let t = read_trailer(&obj).unwrap();
            let mut out = Vec::new();
            decode_body(&obj[..obj.len() - TRAILER_LEN], &t, &mut out).unwrap();
            assert!(out == raw);
            let mut bad = obj.clone();
            bad[obj.len() / 3] ^= 4;
            assert!(decode_bytes(&bad).is_err());
        }
    }

    /// The zstd frame header's descriptor byte (after the 4-byte magic); bit 2 says whether a
    /// content checksum ends the frame (RFC 8878, 3.1.1.1.1).
    fn has_frame_checksum(obj: &[u8]) -> bool {
        obj[4] & 0b100 != 0
    }

    #[test]
    fn new_frames_carry_no_zstd_checksum_and_objects_with_one_still_read() {
        let raw = sample();
        let (obj, _) = encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
        assert!(!has_frame_checksum(&obj));
        let mut e = StreamEncoder::new(ObjectKind::Other, 3, 0).unwrap();
        let mut streamed = Vec::new();
        e.push(&raw, &mut streamed).unwrap();
        let (tail, _) = e.finish().unwrap();
        streamed.extend(tail);
        assert!(!has_frame_checksum(&streamed));

        // An object as earlier versions wrote it: the frame with its checksum, then the trailer.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_checksum(true).unwrap();
        enc.write_all(&raw).unwrap();
        let mut old = enc.finish().unwrap();
        assert!(has_frame_checksum(&old));
        let mut h = Hasher::default();
        h.update(&raw);
        h.update_stored(&old);
        let info = h.finish(ObjectKind::WalSegment);
        old.extend_from_slice(&info.trailer());
        let (back, info2) = decode_bytes(&old).unwrap();
        assert!(back == raw);
        assert_eq!(info2, info);
    }

    /// Input that compresses like WAL does, more than one step long, not a whole number of
    /// steps.
    fn long_sample() -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..3 * CONTIGUOUS_STEP + 12_345)
            .map(|i| {
                if i % 64 < 48 {
                    (i / 640) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    /// The frame zstd writes for `raw` at `level`, with `min_match` if given (one shot, the
    /// size pledged, no checksum: as the encoders here configure it).
    fn frame_with(raw: &[u8], level: i32, min_match: Option<u32>) -> Vec<u8> {
        use zstd::stream::raw::CParameter;
        let mut c = zstd::bulk::Compressor::new(level).unwrap();
        c.set_parameter(CParameter::ChecksumFlag(false)).unwrap();
        c.set_parameter(CParameter::ContentSizeFlag(true)).unwrap();
        if let Some(m) = min_match {
            c.set_parameter(CParameter::MinMatch(m)).unwrap();
        }
        c.compress(raw).unwrap()
    }

    #[test]
    fn wal_below_level_3_is_compressed_with_a_minimum_match_of_5_and_nothing_else_is() {
        // Runs that repeat in 5 bytes and differ in the 6th: 16 five-byte motifs, each followed
        // by a pseudo-random byte.
        let mut x = 0x2545_F491u32;
        let raw: Vec<u8> = (0..40_000u32)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let m = (x % 16) as u8;
                [m, m ^ 0x5A, 0x17, m.wrapping_mul(3), 0xC3, (x >> 8) as u8]
            })
            .collect();
        let body = |obj: &[u8]| obj[..obj.len() - TRAILER_LEN].to_vec();
        for (kind, level, want) in [
            (ObjectKind::WalSegment, 1, Some(5)),
            (ObjectKind::PartialWalSegment, 1, Some(5)),
            (ObjectKind::WalSegment, -1, Some(5)),
            (ObjectKind::WalSegment, 2, Some(5)),
            (ObjectKind::WalSegment, 3, None),
            (ObjectKind::Other, 1, None),
            (ObjectKind::History, 1, None),
        ] {
            assert_eq!(min_match(kind, level), want, "{kind:?} {level}");
            let frame = frame_with(&raw, level, want);
            let (obj, _) = encode_bytes(&raw, kind, level).unwrap();
            assert!(body(&obj) == frame, "{kind:?} at {level}, streamed");
            let mut out = Vec::new();
            encode_contiguous(&raw, &mut out, kind, level, |_, _| Ok(())).unwrap();
            assert!(body(&out) == frame, "{kind:?} at {level}, contiguous");
        }
        // And it matters on such input: the parameter is not a no-op here.
        let (five, six) = (frame_with(&raw, 1, Some(5)), frame_with(&raw, 1, None));
        assert!(
            five.len() < six.len(),
            "{} against {}",
            five.len(),
            six.len()
        );
    }

    #[test]
    fn contiguous_encoding_is_an_ordinary_object_and_shows_every_step_in_order() {
        for raw in [long_sample(), sample(), Vec::new()] {
            let mut out = b"before".to_vec();
            let mut seen = Vec::new();
            let mut next = 0;
            let info = encode_contiguous(&raw, &mut out, ObjectKind::WalSegment, 1, |off, s| {
                assert_eq!(off, next, "steps in order, none skipped");
                assert!(s.len() <= CONTIGUOUS_STEP);
                next += s.len();
                seen.extend_from_slice(s);
                Ok(())
            })
            .unwrap();
            assert!(seen == raw, "the steps cover the input");
            // Appended to what `out` held; the object reads back like any other, and its
            // trailer agrees with the streaming encoder's about the raw content.
            assert_eq!(&out[..6], b"before");
            let obj = &out[6..];
            let (back, read) = decode_bytes(obj).unwrap();
            assert!(back == raw);
            assert_eq!(read, info);
            let (_, streamed) = encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
            assert_eq!(
                (info.raw_size, info.crc32),
                (streamed.raw_size, streamed.crc32)
            );
            assert!(!has_frame_checksum(obj));
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(obj).unwrap(),
                Some(raw.len() as u64),
                "the frame records the raw size"
            );
            if !raw.is_empty() {
                assert!(obj.len() < raw.len() / 2, "{} of {}", obj.len(), raw.len());
            }
        }
    }

    #[test]
    fn zstd_window_is_the_window_zstd_writes_in_the_frame() {
        // Zeros compress fast at any level; 4.5 MiB is more than every window tried, so zstd
        // does not shrink it to the input.
        let raw = vec![0u8; 9 << 19];
        for level in [-3, 1, 2, 3, 8, 9] {
            let mut out = Vec::new();
            encode_contiguous(&raw, &mut out, ObjectKind::Other, level, |_, _| Ok(())).unwrap();
            // Frame header: magic (4), descriptor (bit 5: single segment, no window byte),
            // then the window descriptor (exponent, mantissa).
            assert_eq!(out[4] & 0x20, 0, "level {level}: a window descriptor");
            let (exp, mantissa) = ((out[5] >> 3) as u32, (out[5] & 7) as usize);
            let base = 1usize << (10 + exp);
            assert_eq!(
                base + base / 8 * mantissa,
                zstd_window(level),
                "level {level}"
            );
        }
    }

    #[test]
    fn contiguous_encoding_stops_at_the_first_failing_step() {
        let raw = long_sample();
        let mut out = Vec::new();
        let mut calls = 0;
        let e = encode_contiguous(&raw, &mut out, ObjectKind::WalSegment, 1, |off, _| {
            calls += 1;
            if off >= CONTIGUOUS_STEP {
                return Err(std::io::Error::other("disk on fire"));
            }
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        assert_eq!(calls, 2);
    }

    #[test]
    fn damaged_content_behind_a_matching_sha256_is_caught_by_the_crc32() {
        // Without zstd's own checksum the raw content is the CRC-32's to guard. Damage the
        // compressed body, then give the trailer the SHA-256 of the damaged body, as a bug
        // or a forger could: every such object must still fail to decode.
        let mut x = 12345u32;
        let raw: Vec<u8> = (0..300_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"abcdefgh"[(x >> 28) as usize % 8]
            })
            .collect();
        let (obj, info) = encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
        let body = obj.len() - TRAILER_LEN;
        let mut decoded_to_other_bytes = 0;
        for pos in (6..body).step_by(body / 301 + 1) {
            let mut bad = obj[..body].to_vec();
            bad[pos] ^= 0x20;
            let forged = ObjectInfo {
                sha256: Sha256::digest(&bad).into(),
                ..info.clone()
            };
            if zstd::stream::decode_all(&bad[..]).is_ok_and(|d| d.len() == raw.len()) {
                decoded_to_other_bytes += 1;
            }
            bad.extend_from_slice(&forged.trailer());
            assert!(decode_bytes(&bad).is_err(), "flip at {pos} went unnoticed");
        }
        // The flips that zstd alone would have taken are the ones the CRC-32 caught.
        assert!(decoded_to_other_bytes > 0);
    }

    #[test]
    fn plain_zstd_reads_it() {
        // The documented promise: the zstd frame decodes with any zstd decoder, skipping the trailer.
        let raw = sample();
        let (obj, _) = encode_bytes(&raw, ObjectKind::WalSegment, 1).unwrap();
        let plain = zstd::stream::decode_all(&obj[..]).unwrap();
        assert_eq!(plain, raw);
    }
}
