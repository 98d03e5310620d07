//! Sub-chunk refinement: for a changed chunk the DR site reports 16-byte blake3 hashes of
//! its replica's 4 KiB blocks, and the primary sends only the blocks that differ (a patch:
//! a bitmap and the blocks in order). The DR site overlays the patch on its replica's chunk
//! and checks the full chunk hash, so a wrong or forged block hash can cost bytes, never
//! correctness.
//!
//! Pure functions; the wire and the replica reads live elsewhere.

/// Refinement granularity: the page size most databases write in.
pub const BLOCK: usize = 4096;
/// Bytes kept of each block hash. 128 bits: a collision would need 2^64 work, and even one
/// only fails the cycle's verification.
pub const BLOCK_HASH: usize = 16;

fn blocks(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len.div_ceil(BLOCK)).map(move |b| b * BLOCK..((b + 1) * BLOCK).min(len))
}

/// Bitmap bytes for a chunk of `len` bytes.
pub fn mask_len(len: usize) -> usize {
    len.div_ceil(BLOCK).div_ceil(8)
}

/// Packed truncated hashes of the 4 KiB blocks of `chunk`.
pub fn block_hashes(chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len().div_ceil(BLOCK) * BLOCK_HASH);
    for r in blocks(chunk.len()) {
        out.extend_from_slice(&blake3::hash(&chunk[r]).as_bytes()[..BLOCK_HASH]);
    }
    out
}

/// A patch: which blocks differ, and their new bytes in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub mask: Vec<u8>,
    pub data: Vec<u8>,
}

/// The blocks of `new` whose hash differs from `theirs` (the DR site's packed block
/// hashes). `None` when the patch would not be smaller than the whole chunk, or when
/// `theirs` does not describe a chunk of this length (the replica is shorter: send all).
pub fn diff(new: &[u8], theirs: &[u8]) -> Option<Patch> {
    let n = new.len().div_ceil(BLOCK);
    if theirs.len() != n * BLOCK_HASH {
        return None;
    }
    let mut mask = vec![0u8; mask_len(new.len())];
    let mut data = Vec::new();
    for (b, r) in blocks(new.len()).enumerate() {
        let h = blake3::hash(&new[r.clone()]);
        if h.as_bytes()[..BLOCK_HASH] != theirs[b * BLOCK_HASH..(b + 1) * BLOCK_HASH] {
            mask[b / 8] |= 1 << (b % 8);
            data.extend_from_slice(&new[r]);
        }
    }
    // Sending the whole chunk costs no more than bitmap plus all blocks.
    (data.len() + mask.len() < new.len()).then_some(Patch { mask, data })
}

fn is_set(mask: &[u8], b: usize) -> bool {
    mask[b / 8] & (1 << (b % 8)) != 0
}

/// Bytes of block data a patch with `mask` carries for a chunk of `len` bytes; errors when
/// the bitmap does not fit the chunk.
pub fn patch_data_len(len: usize, mask: &[u8]) -> Result<usize, String> {
    if mask.len() != mask_len(len) {
        return Err(format!(
            "patch bitmap of {} bytes for a chunk of {len} bytes (expected {})",
            mask.len(),
            mask_len(len)
        ));
    }
    let n = len.div_ceil(BLOCK);
    if (n..mask.len() * 8).any(|b| is_set(mask, b)) {
        return Err("patch bitmap marks blocks beyond the chunk".into());
    }
    Ok(blocks(len)
        .enumerate()
        .filter(|(b, _)| is_set(mask, *b))
        .map(|(_, r)| r.len())
        .sum())
}

/// Where one patched block goes in the chunk, and where it is in the patch data.
pub type Placement = (std::ops::Range<usize>, std::ops::Range<usize>);

/// The byte ranges of the chunk (length `len`) that a patch with `mask` replaces, paired
/// with their ranges in the patch data. Errors when the mask or data do not fit `len`.
pub fn ranges(len: usize, mask: &[u8], data_len: usize) -> Result<Vec<Placement>, String> {
    let need = patch_data_len(len, mask)?;
    if need != data_len {
        return Err(format!(
            "patch carries {data_len} bytes; its bitmap needs {need}"
        ));
    }
    let mut out = Vec::new();
    let mut at = 0;
    for (b, r) in blocks(len).enumerate() {
        if is_set(mask, b) {
            let n = r.len();
            out.push((r, at..at + n));
            at += n;
        }
    }
    Ok(out)
}

/// Overlays a patch on `base` (the replica's chunk) in place; returns where each block
/// went, for a caller that writes only those blocks back.
pub fn apply(base: &mut [u8], mask: &[u8], data: &[u8]) -> Result<Vec<Placement>, String> {
    let place = ranges(base.len(), mask, data.len())?;
    for (dst, src) in &place {
        base[dst.clone()].copy_from_slice(&data[src.clone()]);
    }
    Ok(place)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_patch_carries_only_the_changed_blocks_and_rebuilds_the_chunk() {
        let old = chunk(65536, 1);
        let mut new = old.clone();
        new[5] ^= 1; // block 0
        new[9 * 4096 + 17] ^= 1; // block 9
        let p = diff(&new, &block_hashes(&old)).unwrap();
        assert_eq!(p.mask, vec![0b0000_0001, 0b0000_0010]);
        assert_eq!(p.data.len(), 2 * BLOCK);
        let mut rebuilt = old.clone();
        apply(&mut rebuilt, &p.mask, &p.data).unwrap();
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn short_last_block_and_unrelated_chunks() {
        let old = chunk(10_000, 1); // blocks of 4096, 4096, 1808
        let mut new = old.clone();
        new[9_999] ^= 0xff;
        let p = diff(&new, &block_hashes(&old)).unwrap();
        assert_eq!(p.mask, vec![0b100]);
        assert_eq!(p.data.len(), 1808);
        let mut rebuilt = old.clone();
        apply(&mut rebuilt, &p.mask, &p.data).unwrap();
        assert_eq!(rebuilt, new);
        // Every block differs: the whole chunk is cheaper.
        assert_eq!(diff(&chunk(10_000, 2), &block_hashes(&old)), None);
        // Hashes of a chunk of another length: send the whole chunk.
        assert_eq!(diff(&new, &block_hashes(&old[..4096])), None);
    }

    #[test]
    fn malformed_patches_are_named() {
        let mut base = chunk(8192, 0);
        assert!(apply(&mut base, &[0b01, 0], &[0; 4096])
            .unwrap_err()
            .contains("bitmap of 2 bytes"));
        assert!(apply(&mut base, &[0b11], &[0; 4096])
            .unwrap_err()
            .contains("carries 4096 bytes; its bitmap needs 8192"));
        assert!(apply(&mut base, &[0b100], &[])
            .unwrap_err()
            .contains("beyond the chunk"));
        assert_eq!(base, chunk(8192, 0), "a refused patch changes nothing");
    }
}
