//! The receive path on one core: decode XLogData → validate page headers → write to the spool
//! segment in place → at segment end compress (zstd) and checksum (SHA-256 + CRC-32) into the
//! stored object — without and with the WAL index (every record's CRC-32C checked, commits,
//! restore points and snapshots collected, as the publisher does). The WAL is made of real
//! records in a pgbench-like mix (`synth::pgbench_like`). Throughput is reported in bytes of
//! WAL; `index_only` is the record decoding alone.
//!
//! `cargo bench --bench receive_path`

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use archiver::synth::{lay_out, pgbench_like};
use archiver::Spool;
use archiver::{decode_copy_data, ReplicationMessage};
use archiver::{encode_contiguous, encode_object, ObjectKind};
use archiver::{Indexer, PageValidator};
use archiver::{Lsn, SegmentName};

const SEG: u64 = 16 << 20;
const SEGMENTS: u64 = 4;
const CHUNK: usize = 128 * 1024; // the walsender's MAX_SEND_SIZE
const SYSID: u64 = 7_000_000_000_000_000_001;

fn messages(wal: &[u8], start: Lsn) -> Vec<Bytes> {
    wal.chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            let mut m = BytesMut::with_capacity(25 + c.len());
            m.put_u8(b'w');
            m.put_u64(start.0 + (i * CHUNK) as u64);
            m.put_u64(start.0 + wal.len() as u64);
            m.put_i64(0);
            m.put_slice(c);
            m.freeze()
        })
        .collect()
}

fn receive_path(c: &mut Criterion) {
    let start = Lsn(SEG);
    let (wal, _) = lay_out(
        start,
        (SEG * SEGMENTS) as usize,
        1,
        SYSID,
        SEG,
        0xD110,
        pgbench_like(1000, 800_000_000_000_000),
    );
    let msgs = messages(&wal, start);
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), SEG).unwrap();

    let mut g = c.benchmark_group("receive_path");
    g.throughput(Throughput::Bytes(wal.len() as u64));
    g.sample_size(10);
    for index in [false, true] {
        let name = if index {
            "decode_validate_write_compress_checksum_index"
        } else {
            "decode_validate_write_compress_checksum"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), start, 1);
                let mut ix = Indexer::new(SEG, 16);
                let mut cur = None;
                let mut stored = 0usize;
                for m in &msgs {
                    let ReplicationMessage::XLogData {
                        start: at, data, ..
                    } = decode_copy_data(m.clone()).unwrap()
                    else {
                        unreachable!()
                    };
                    v.feed(at, &data).unwrap();
                    let seg = SegmentName::containing(1, at, SEG);
                    let f = cur.get_or_insert_with(|| spool.open_partial(seg).unwrap());
                    f.write_at(at.segment_offset(SEG), &data).unwrap();
                    if f.written == SEG {
                        let f = cur.take().unwrap();
                        let seg = f.seg;
                        drop(f);
                        let raw = std::fs::read(spool.partial_path(&seg)).unwrap();
                        let mut out = Vec::with_capacity(SEG as usize / 4);
                        encode_object(&raw[..], &mut out, ObjectKind::WalSegment, 1).unwrap();
                        if index {
                            stored += ix.index(&seg, &raw).unwrap().xacts.len();
                        }
                        stored += out.len();
                    }
                }
                stored
            })
        });
    }
    // zstd alone, the way the publisher feeds it (a streaming encoder in 256 KiB writes) and
    // one-shot over the whole segment (issue 16: where the compression time goes).
    g.bench_function("zstd_streaming_256k", |b| {
        b.iter(|| {
            let mut n = 0;
            for seg_bytes in wal.chunks(SEG as usize) {
                let mut enc =
                    zstd::stream::Encoder::new(Vec::with_capacity(SEG as usize / 4), 1).unwrap();
                enc.include_checksum(true).unwrap();
                for c in seg_bytes.chunks(256 * 1024) {
                    std::io::Write::write_all(&mut enc, c).unwrap();
                }
                n += enc.finish().unwrap().len();
            }
            n
        })
    });
    // The whole object encoding (zstd, CRC-32, SHA-256, trailer) as the publisher did it
    // before (a streaming encoder fed 256 KiB reads) and as it does now for a mapped segment
    // (zstd reading the segment in place).
    g.bench_function("object_streaming", |b| {
        b.iter(|| {
            let mut n = 0;
            for seg_bytes in wal.chunks(SEG as usize) {
                let mut out = Vec::with_capacity(SEG as usize / 4);
                encode_object(seg_bytes, &mut out, ObjectKind::WalSegment, 1).unwrap();
                n += out.len();
            }
            n
        })
    });
    g.bench_function("object_contiguous", |b| {
        b.iter(|| {
            let mut n = 0;
            for seg_bytes in wal.chunks(SEG as usize) {
                let mut out = Vec::with_capacity(SEG as usize / 4);
                encode_contiguous(
                    seg_bytes,
                    &mut out,
                    ObjectKind::WalSegment,
                    1,
                    |_, _| Ok(()),
                )
                .unwrap();
                n += out.len();
            }
            n
        })
    });
    g.bench_function("zstd_one_shot", |b| {
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.include_checksum(true).unwrap();
        b.iter(|| {
            let mut n = 0;
            for seg_bytes in wal.chunks(SEG as usize) {
                n += c.compress(seg_bytes).unwrap().len();
            }
            n
        })
    });
    g.bench_function("index_only", |b| {
        b.iter(|| {
            let mut ix = Indexer::new(SEG, 16);
            let mut n = 0;
            for (i, seg_bytes) in wal.chunks(SEG as usize).enumerate() {
                let seg = SegmentName::new(1, 1 + i as u64, SEG);
                n += ix.index(&seg, seg_bytes).unwrap().xacts.len();
            }
            assert!(n > 100_000);
            n
        })
    });
    g.finish();
}

criterion_group!(benches, receive_path);
criterion_main!(benches);
