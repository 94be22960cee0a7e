//! The receive path on one core: decode XLogData → validate page headers → write to the spool
//! segment in place → at segment end compress (zstd) and checksum (SHA-256 + CRC-32) into the
//! stored object. Throughput is reported in bytes of WAL.
//!
//! `cargo bench --bench receive_path`

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use archiver::Spool;
use archiver::{decode_copy_data, ReplicationMessage};
use archiver::{encode_object, ObjectKind};
use archiver::{synthetic_wal, PageValidator};
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
    let wal = synthetic_wal(start, (SEG * SEGMENTS) as usize, 1, SYSID, SEG);
    let msgs = messages(&wal, start);
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), SEG).unwrap();

    let mut g = c.benchmark_group("receive_path");
    g.throughput(Throughput::Bytes(wal.len() as u64));
    g.sample_size(10);
    g.bench_function("decode_validate_write_compress_checksum", |b| {
        b.iter(|| {
            let mut v = PageValidator::new(SEG, SYSID, Some(0xD110), start, 1);
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
                    let file = std::fs::File::open(spool.partial_path(&seg)).unwrap();
                    let mut out = Vec::with_capacity(SEG as usize / 4);
                    encode_object(file, &mut out, ObjectKind::WalSegment, 1).unwrap();
                    stored += out.len();
                }
            }
            stored
        })
    });
    g.finish();
}

criterion_group!(benches, receive_path);
criterion_main!(benches);
