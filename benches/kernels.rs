//! Kernel benchmarks: chunk hashing at 4 KiB to 4 MiB chunks, the ordered index compare, and
//! the wire codec, each with throughput in bytes. `cargo bench --bench kernels`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifeboat::engine::chunk::is_zero;
use lifeboat::engine::diff::BaseCursor;
use lifeboat::engine::index::SegmentBuilder;
use lifeboat::ids::ChunkHash;
use lifeboat::net::wire::{decode_body, encode_frame, Msg, Payload};
use rayon::prelude::*;

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_right(13) as u8)
        .collect()
}

fn hashing(c: &mut Criterion) {
    let buf = data(64 << 20);
    let mut g = c.benchmark_group("hash 64 MiB");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(10);
    for cs in [4usize << 10, 64 << 10, 1 << 20, 4 << 20] {
        g.bench_with_input(BenchmarkId::new("one core", cs), &cs, |b, &cs| {
            b.iter(|| buf.chunks(cs).map(ChunkHash::of).count())
        });
        g.bench_with_input(BenchmarkId::new("all cores", cs), &cs, |b, &cs| {
            b.iter(|| buf.par_chunks(cs).map(ChunkHash::of).count())
        });
    }
    g.bench_function("zero check", |b| {
        b.iter(|| buf.chunks(64 << 10).filter(|c| is_zero(c)).count())
    });
    g.finish();
}

fn index_compare(c: &mut Criterion) {
    // The index of a 64 GiB volume at 64 KiB chunks: 1 Mi hashes.
    let n = 1u64 << 20;
    let mut builder = SegmentBuilder::default();
    let mut segs = Vec::new();
    for i in 0..n {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        segs.extend(builder.push(ChunkHash(h)));
    }
    segs.extend(builder.finish());
    let encoded: Vec<(u64, Vec<u8>)> = segs.iter().map(|(no, s)| (*no, s.encode())).collect();
    let mut g = c.benchmark_group("index compare");
    g.throughput(Throughput::Bytes(n * 64 * 1024)); // volume bytes covered
    g.sample_size(10);
    g.bench_function("1 Mi chunks, decode + compare", |b| {
        b.iter(|| {
            let it = encoded
                .iter()
                .map(|(no, v)| lifeboat::engine::index::Segment::decode(v).map(|s| (*no, s)));
            let mut cursor = BaseCursor::new(it);
            let mut same = 0u64;
            for i in 0..n {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&i.to_le_bytes());
                if cursor.hash_at(i).unwrap() == Some(ChunkHash(h)) {
                    same += 1;
                }
            }
            assert_eq!(same, n);
        })
    });
    g.finish();
}

fn wire(c: &mut Criterion) {
    let chunk = data(64 << 10);
    let msg = Msg::Chunk {
        index: 12345,
        hash: ChunkHash::of(&chunk),
        payload: Payload::Data(serde_bytes::ByteBuf::from(chunk)),
    };
    let mut frame = Vec::new();
    encode_frame(&msg, &mut frame).unwrap();
    let mut g = c.benchmark_group("wire 64 KiB chunk frame");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(frame.len());
        b.iter(|| {
            out.clear();
            encode_frame(&msg, &mut out).unwrap();
        })
    });
    g.bench_function("decode", |b| b.iter(|| decode_body(&frame[4..]).unwrap()));
    g.finish();
}

/// What compression costs a changed chunk: the histogram check alone on incompressible data
/// (the common case it must keep cheap), and zstd on text.
fn compression(c: &mut Criterion) {
    use lifeboat::engine::compress::compress;
    let random = data(64 << 10);
    let text: Vec<u8> = b"INSERT INTO t VALUES (1, 'lifeboat');\n"
        .iter()
        .cycle()
        .take(64 << 10)
        .copied()
        .collect();
    let mut g = c.benchmark_group("compress 64 KiB chunk");
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function("random (skipped by the histogram)", |b| {
        b.iter(|| compress(&random))
    });
    g.bench_function("text (zstd -1)", |b| b.iter(|| compress(&text)));
    g.finish();
}

/// Block hashes and a patch for a 64 KiB chunk with one changed 4 KiB block.
fn refinement(c: &mut Criterion) {
    use lifeboat::engine::refine;
    let old = data(64 << 10);
    let mut new = old.clone();
    new[20_000] ^= 1;
    let theirs = refine::block_hashes(&old);
    let mut g = c.benchmark_group("refine 64 KiB chunk");
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function("block hashes", |b| b.iter(|| refine::block_hashes(&old)));
    g.bench_function("diff", |b| b.iter(|| refine::diff(&new, &theirs)));
    g.finish();
}

criterion_group!(
    benches,
    hashing,
    index_compare,
    wire,
    compression,
    refinement
);
criterion_main!(benches);
