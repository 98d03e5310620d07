//! Chunk verification, in one place. A chunk is checked against its blake3 hash before it
//! touches disk when it arrives at the DR site, again when its staging record is read back
//! for the redo, and a block patch once more when it is laid over the replica. Every one of
//! those checks is a function here; callers add where the chunk came from.
//!
//! Pure: the replica chunk a patch completes is read by the caller.

use std::borrow::Cow;

use crate::engine::chunk::zero_hash;
use crate::engine::refine::{self, Placement};
use crate::ids::ChunkHash;

/// Why a chunk was refused. The texts name the chunk; callers prefix the volume or file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("chunk {index} does not match its hash")]
    Hash { index: u64 },
    #[error("zero marker {index} carries a non-zero hash")]
    Zero { index: u64 },
    #[error("compressed chunk {index}: {reason}")]
    Compressed { index: u64, reason: String },
    #[error("patch {index}: {reason}")]
    Patch { index: u64, reason: String },
}

/// Raw bytes of chunk `index`, which must be `len` bytes long and hash to `hash`.
pub fn data(index: u64, hash: &ChunkHash, len: u32, bytes: &[u8]) -> Result<(), Rejected> {
    if bytes.len() != len as usize || ChunkHash::of(bytes) != *hash {
        return Err(Rejected::Hash { index });
    }
    Ok(())
}

/// A zero marker: its hash must be the hash of `len` zero bytes.
pub fn zero(index: u64, hash: &ChunkHash, len: u32) -> Result<(), Rejected> {
    if zero_hash(len) != *hash {
        return Err(Rejected::Zero { index });
    }
    Ok(())
}

/// A zstd-compressed chunk, inflated to exactly `len` bytes (never more: a hostile stream
/// cannot inflate memory) and checked against `hash`.
pub fn compressed(index: u64, hash: &ChunkHash, len: u32, z: &[u8]) -> Result<Vec<u8>, Rejected> {
    let raw = crate::engine::compress::decompress(z, len)
        .map_err(|reason| Rejected::Compressed { index, reason })?;
    data(index, hash, len, &raw)?;
    Ok(raw)
}

/// The block data of a patch as sent: inflated if compressed, and as long as `mask` says
/// for a chunk of `len` bytes.
pub fn patch_data<'a>(
    index: u64,
    len: u32,
    mask: &[u8],
    data: &'a [u8],
    compressed: bool,
) -> Result<Cow<'a, [u8]>, Rejected> {
    let bad = |reason: String| Rejected::Patch { index, reason };
    let need = refine::patch_data_len(len as usize, mask).map_err(bad)?;
    if compressed {
        crate::engine::compress::decompress(data, need as u32)
            .map(Cow::Owned)
            .map_err(bad)
    } else if data.len() != need {
        Err(bad(format!(
            "{} bytes of blocks; its bitmap needs {need}",
            data.len()
        )))
    } else {
        Ok(Cow::Borrowed(data))
    }
}

/// Lays a patch over `chunk` (the replica's bytes of chunk `index`) in place and checks the
/// result against `hash`, the hash of the whole new chunk. Returns where each block went.
/// On a mismatch `chunk` holds the overlay, which the caller must not write.
pub fn patch(
    index: u64,
    hash: &ChunkHash,
    chunk: &mut [u8],
    mask: &[u8],
    data: &[u8],
) -> Result<Vec<Placement>, Rejected> {
    let place =
        refine::apply(chunk, mask, data).map_err(|reason| Rejected::Patch { index, reason })?;
    if ChunkHash::of(chunk) != *hash {
        return Err(Rejected::Hash { index });
    }
    Ok(place)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_encoding_is_checked_against_its_hash() {
        let bytes = vec![7u8; 8192];
        let h = ChunkHash::of(&bytes);
        assert_eq!(data(3, &h, 8192, &bytes), Ok(()));
        assert_eq!(
            data(3, &h, 8192, &bytes[..4096]),
            Err(Rejected::Hash { index: 3 })
        );
        assert_eq!(
            data(3, &ChunkHash::of(b"other"), 8192, &bytes),
            Err(Rejected::Hash { index: 3 })
        );
        assert_eq!(zero(0, &zero_hash(8192), 8192), Ok(()));
        assert_eq!(zero(0, &h, 8192), Err(Rejected::Zero { index: 0 }));
        let z = zstd::bulk::compress(&bytes, 1).unwrap();
        assert_eq!(compressed(1, &h, 8192, &z).unwrap(), bytes);
    }

    #[test]
    fn a_compressed_chunk_cannot_inflate_beyond_its_length() {
        let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 1).unwrap();
        let err = compressed(1, &zero_hash(65536), 65536, &bomb).unwrap_err();
        assert!(
            matches!(err, Rejected::Compressed { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("compressed chunk 1"));
    }

    #[test]
    fn a_patch_must_fit_its_bitmap_and_complete_the_chunk() {
        let old = vec![1u8; 8192];
        let mut new = old.clone();
        new[5000] = 9;
        let h = ChunkHash::of(&new);
        let p = refine::diff(&new, &refine::block_hashes(&old)).unwrap();
        let blocks = patch_data(0, 8192, &p.mask, &p.data, false).unwrap();
        let mut chunk = old.clone();
        patch(0, &h, &mut chunk, &p.mask, &blocks).unwrap();
        assert_eq!(chunk, new);
        // Over another base the same patch gives another chunk.
        let mut other = old.clone();
        other[0] = 2;
        assert_eq!(
            patch(0, &h, &mut other, &p.mask, &blocks),
            Err(Rejected::Hash { index: 0 })
        );
        let short = patch(2, &h, &mut old.clone(), &p.mask, &blocks[..100]).unwrap_err();
        assert!(
            short.to_string().contains("its bitmap needs 4096"),
            "{short}"
        );
        let wide = patch_data(2, 8192, &[0b1, 0], &blocks, false).unwrap_err();
        assert!(wide.to_string().contains("bitmap of 2 bytes"), "{wide}");
    }
}
