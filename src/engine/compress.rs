//! Chunk compression (zstd level 1) that is used only where it pays. Before any zstd work
//! a chunk's byte histogram is sampled: data whose order-0 entropy is near 8 bits a byte
//! (already compressed, encrypted, random) cannot shrink worth the work and is sent as it
//! is, at the cost of about 3 µs a chunk. Other chunks are compressed and sent compressed
//! if that saves at least 1/64 of their bytes.
//!
//! Per chunk, not per run of chunks: a tar of mixed files or a database with compressed
//! and plain tables changes its nature from one chunk to the next.

const LEVEL: i32 = 1;
/// A chunk goes compressed if that saves at least 1/64 of it: below that the DR site's
/// decompression is not worth the bytes.
const MIN_SAVING: usize = 64;
/// Bytes sampled for the histogram: every 32nd byte of a 64 KiB chunk.
const SAMPLES: usize = 2048;
/// Estimated bits per byte above which a chunk is not tried. Uniform random bytes estimate
/// at 7.91 (+-0.01) from 2048 samples; below that, chunks of compressed files still carry
/// headers and padding that zstd shrinks by a few percent.
const MAX_ENTROPY: f64 = 7.85;

/// Order-0 entropy of a sample of `raw`, in bits per byte.
pub fn sampled_entropy(raw: &[u8]) -> f64 {
    let stride = (raw.len() / SAMPLES).max(1);
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in raw.iter().step_by(stride) {
        counts[*b as usize] += 1;
        n += 1;
    }
    let n = n as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// The compressed bytes of `raw`, or `None` where compression does not pay.
pub fn compress(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 64 || sampled_entropy(raw) > MAX_ENTROPY {
        return None;
    }
    match zstd::bulk::compress(raw, LEVEL) {
        Ok(c) if c.len() <= raw.len() - raw.len() / MIN_SAVING => Some(c),
        _ => None,
    }
}

/// Decompresses a chunk that must be exactly `len` bytes.
pub fn decompress(bytes: &[u8], len: u32) -> Result<Vec<u8>, String> {
    let out = zstd::bulk::decompress(bytes, len as usize).map_err(|e| format!("zstd: {e}"))?;
    if out.len() != len as usize {
        return Err(format!(
            "decompressed to {} bytes, expected {len}",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_compresses_and_round_trips() {
        let text: Vec<u8> = b"INSERT INTO t VALUES (1, 'x');\n"
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let z = compress(&text).expect("text compresses");
        assert!(z.len() < text.len() / 4);
        assert_eq!(decompress(&z, 65536).unwrap(), text);
        assert!(
            decompress(&z, 1000).is_err(),
            "a bound below the real size must fail"
        );
    }

    #[test]
    fn random_data_is_skipped_without_zstd_and_each_chunk_is_judged_alone() {
        for seed in 0..8 {
            let noise = blake_noise(seed);
            assert!(sampled_entropy(&noise) > MAX_ENTROPY);
            assert!(compress(&noise).is_none());
        }
        // Right after incompressible chunks, a compressible one still compresses.
        let text = vec![b'a'; 65536];
        assert!(compress(&text).is_some());
        // Half text, half noise: worth it.
        let mut mixed = blake_noise(1);
        mixed[..32768].copy_from_slice(&text[..32768]);
        assert!(compress(&mixed).is_some());
    }

    fn blake_noise(seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(65536);
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        let mut r = h.finalize_xof();
        out.resize(65536, 0);
        r.fill(&mut out);
        out
    }
}
