//! Chunk geometry, zero detection and the root over a volume's chunk hashes. Pure.

use std::sync::OnceLock;

use crate::ids::ChunkHash;

/// Default chunk size: 64 KiB balances index size (32 bytes per chunk) against the bytes
/// sent for one small write.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// How a volume of `size` bytes splits into chunks of `chunk_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub chunk_size: u32,
}

impl Geometry {
    pub fn new(size: u64, chunk_size: u32) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        Geometry { size, chunk_size }
    }

    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    pub fn offset(&self, index: u64) -> u64 {
        index * self.chunk_size as u64
    }

    /// Length of chunk `index`; the last one may be short.
    pub fn len(&self, index: u64) -> u32 {
        let start = self.offset(index);
        (self.size.saturating_sub(start)).min(self.chunk_size as u64) as u32
    }
}

/// True when every byte is zero. Compares eight bytes at a time.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = unsafe { buf.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The hash of `len` zero bytes; the full-chunk case is computed once.
pub fn zero_hash(len: u32) -> ChunkHash {
    static DEFAULT: OnceLock<ChunkHash> = OnceLock::new();
    if len == DEFAULT_CHUNK_SIZE {
        return *DEFAULT.get_or_init(|| ChunkHash::of(&vec![0u8; DEFAULT_CHUNK_SIZE as usize]));
    }
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 4096];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(zeros.len());
        h.update(&zeros[..n]);
        left -= n;
    }
    ChunkHash(*h.finalize().as_bytes())
}

/// Accumulates the root of a volume: blake3 over the volume size, the chunk size and every
/// chunk hash in index order. Both ends compute it; equal roots mean equal volumes.
pub struct RootHasher {
    hasher: blake3::Hasher,
    count: u64,
}

impl RootHasher {
    pub fn new(geometry: Geometry) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("lifeboat volume root v1");
        hasher.update(&geometry.size.to_le_bytes());
        hasher.update(&geometry.chunk_size.to_le_bytes());
        RootHasher { hasher, count: 0 }
    }

    pub fn push(&mut self, hash: &ChunkHash) {
        self.hasher.update(&hash.0);
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn finish(&self) -> ChunkHash {
        ChunkHash(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn geometry_counts_a_short_last_chunk() {
        let g = Geometry::new(10 * 4096 + 5, 4096);
        assert_eq!(g.chunk_count(), 11);
        assert_eq!(g.len(10), 5);
        assert_eq!(g.len(0), 4096);
        assert_eq!(Geometry::new(0, 4096).chunk_count(), 0);
    }

    #[test]
    fn zero_hash_matches_hash_of_zeros() {
        for len in [1u32, 4096, 5000, DEFAULT_CHUNK_SIZE] {
            assert_eq!(zero_hash(len), ChunkHash::of(&vec![0; len as usize]));
        }
    }

    proptest! {
        #[test]
        fn is_zero_agrees_with_naive(mut v in proptest::collection::vec(0u8..2, 0..300), at in 0usize..300) {
            let naive = v.iter().all(|&b| b == 0);
            prop_assert_eq!(is_zero(&v), naive);
            if !v.is_empty() {
                let i = at % v.len();
                v[i] = 7;
                prop_assert!(!is_zero(&v[..]));
            }
        }
    }
}
