//! Re-reads a range of chunks of a replica and names those whose bytes no longer hash to
//! what the index says: one slice of the DR site's background scrub, short enough to run
//! between cycles under the protection's lock. Chunks wholly in a hole are zeros and are
//! not read. Blocking; memory is one chunk.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use anyhow::Result;

use crate::engine::chunk::{zero_hash, Geometry};
use crate::engine::holes::Holes;
use crate::ids::ChunkHash;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reread {
    /// Chunks whose bytes differ from the index (or that could not be read whole: the
    /// file is shorter than the volume).
    pub divergent: Vec<u64>,
    pub bytes_read: u64,
}

/// Re-reads `chunks` of `file` (a volume of `geometry`) against `expected`, the index's
/// hash of each chunk (None: the index has none, which is divergent too).
pub fn range(
    file: &File,
    geometry: Geometry,
    chunks: Range<u64>,
    mut expected: impl FnMut(u64) -> Result<Option<ChunkHash>>,
) -> Result<Reread> {
    let mut out = Reread::default();
    let mut holes = Holes::new(file);
    let meta = file.metadata()?;
    // A regular file shorter than the volume lacks its tail (a hole past the end is not
    // zeros the volume holds); block devices report no length here.
    let end = if meta.is_file() { meta.len() } else { u64::MAX };
    let mut buf = Vec::new();
    for i in chunks.start..chunks.end.min(geometry.chunk_count()) {
        let (offset, len) = (geometry.offset(i), geometry.len(i));
        let actual = if offset + len as u64 > end {
            None
        } else if holes.is_hole(offset, offset + len as u64) {
            Some(zero_hash(len))
        } else {
            buf.resize(len as usize, 0);
            match file.read_exact_at(&mut buf, offset) {
                Ok(()) => {
                    out.bytes_read += len as u64;
                    Some(ChunkHash::of(&buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                Err(e) => return Err(e.into()),
            }
        };
        let want = expected(i)?;
        if actual.is_none() || actual != want {
            out.divergent.push(i);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_a_hole_and_a_short_file_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let g = Geometry::new(4 * 4096, 4096);
        let mut bytes = vec![7u8; 3 * 4096];
        bytes.extend(vec![0u8; 4096]);
        let index: Vec<ChunkHash> = bytes.chunks(4096).map(ChunkHash::of).collect();
        // Chunk 2 flipped; chunk 3 a hole (zeros, as the index has it).
        bytes[2 * 4096 + 100] ^= 1;
        let f = File::create(&path).unwrap();
        f.write_all_at(&bytes[..3 * 4096], 0).unwrap();
        f.set_len(4 * 4096).unwrap();
        let f = File::open(&path).unwrap();
        let r = range(&f, g, 0..4, |i| Ok(index.get(i as usize).copied())).unwrap();
        assert_eq!(r.divergent, [2]);
        assert!(r.bytes_read <= 4 * 4096);
        // A slice reads only its chunks; one past the end is not a chunk.
        let r = range(&f, g, 1..9, |i| Ok(index.get(i as usize).copied())).unwrap();
        assert_eq!(r.divergent, [2]);
        // Truncated to two chunks: the missing ones cannot match.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096 + 10)
            .unwrap();
        let f = File::open(&path).unwrap();
        let r = range(&f, g, 0..4, |i| Ok(index.get(i as usize).copied())).unwrap();
        assert_eq!(r.divergent, [1, 2, 3]);
    }
}
