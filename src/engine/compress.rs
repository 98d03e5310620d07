//! Chunk compression (zstd level 1) that is used only where it pays: a chunk is sent
//! compressed only if that saves at least 1/16 of its bytes, and after eight chunks in a
//! row that did not compress, only one chunk in sixteen is tried until one compresses
//! again, so incompressible data costs almost nothing.

use std::sync::atomic::{AtomicU32, Ordering};

/// Shared by the hashing threads of one volume's scan.
#[derive(Default)]
pub struct Compressor {
    misses: AtomicU32,
}

const LEVEL: i32 = 1;
const GIVE_UP_AFTER: u32 = 8;
const SAMPLE_EVERY: u64 = 16;

impl Compressor {
    /// The compressed bytes of `raw`, or `None` where compression does not pay.
    pub fn compress(&self, index: u64, raw: &[u8]) -> Option<Vec<u8>> {
        if self.misses.load(Ordering::Relaxed) >= GIVE_UP_AFTER && index % SAMPLE_EVERY != 0 {
            return None;
        }
        match zstd::bulk::compress(raw, LEVEL) {
            Ok(c) if c.len() <= raw.len() - raw.len() / 16 => {
                self.misses.store(0, Ordering::Relaxed);
                Some(c)
            }
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
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
        let c = Compressor::default();
        let text: Vec<u8> = b"INSERT INTO t VALUES (1, 'x');\n"
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let z = c.compress(0, &text).expect("text compresses");
        assert!(z.len() < text.len() / 4);
        assert_eq!(decompress(&z, 65536).unwrap(), text);
        assert!(
            decompress(&z, 1000).is_err(),
            "a bound below the real size must fail"
        );
    }

    #[test]
    fn incompressible_data_is_sampled_after_repeated_misses() {
        let c = Compressor::default();
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut rng_like = noise.clone();
        for i in 0..GIVE_UP_AFTER as u64 {
            rng_like.rotate_left(7);
            assert!(c.compress(i + 1, &blake_noise(i)).is_none());
        }
        // Now only every 16th index is tried; others are skipped without work.
        assert!(c.compress(17, &blake_noise(99)).is_none());
        let text = vec![b'a'; 65536];
        assert!(
            c.compress(17, &text).is_none(),
            "skipped: not a sampled index"
        );
        assert!(
            c.compress(32, &text).is_some(),
            "sampled index compresses and resets"
        );
        assert!(c.compress(33, &text).is_some());
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
