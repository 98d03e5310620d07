//! Packed hash segments: the per-volume index stores `SEGMENT_CHUNKS` consecutive chunk
//! hashes in one value, so a scan compares by ordered iteration, not a lookup per chunk.
//! Pure: encoding and decoding only; the store keys them.

use crate::ids::ChunkHash;

/// Chunks per segment: 1024 hashes make a 32 KiB value, large enough to amortise a RocksDB
/// read, small enough to keep in memory per volume in flight.
pub const SEGMENT_CHUNKS: u64 = 1024;

const FORMAT_VERSION: u8 = 1;
/// A segment whose chunks all have one hash (a run of holes or zeros, typically): the count
/// and the hash, so a sparse volume's index grows with its data, not its size.
const UNIFORM: u8 = 2;

/// One decoded segment: the hashes of chunks `first..first + hashes.len()`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Segment {
    pub hashes: Vec<ChunkHash>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("index segment has format version {0}, expected {FORMAT_VERSION}")]
    Version(u8),
    #[error("index segment is {0} bytes, not 1 + a multiple of 32")]
    Length(usize),
    #[error(
        "uniform index segment is {0} bytes, not 37, or counts more than {SEGMENT_CHUNKS} chunks"
    )]
    Uniform(usize),
}

pub fn segment_of(chunk_index: u64) -> u64 {
    chunk_index / SEGMENT_CHUNKS
}

impl Segment {
    pub fn encode(&self) -> Vec<u8> {
        if let [first, rest @ ..] = &self.hashes[..] {
            if !rest.is_empty() && rest.iter().all(|h| h == first) {
                let mut out = Vec::with_capacity(1 + 4 + ChunkHash::LEN);
                out.push(UNIFORM);
                out.extend_from_slice(&(self.hashes.len() as u32).to_le_bytes());
                out.extend_from_slice(&first.0);
                return out;
            }
        }
        let mut out = Vec::with_capacity(1 + self.hashes.len() * ChunkHash::LEN);
        out.push(FORMAT_VERSION);
        for h in &self.hashes {
            out.extend_from_slice(&h.0);
        }
        out
    }

    pub fn decode(value: &[u8]) -> Result<Segment, SegmentError> {
        let (&version, rest) = value.split_first().ok_or(SegmentError::Length(0))?;
        if version == UNIFORM {
            let bad = || SegmentError::Uniform(value.len());
            let (count, hash) = rest.split_at_checked(4).ok_or_else(bad)?;
            let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as u64;
            let hash = ChunkHash::from_slice(hash).ok_or_else(bad)?;
            if count > SEGMENT_CHUNKS {
                return Err(bad());
            }
            return Ok(Segment {
                hashes: vec![hash; count as usize],
            });
        }
        if version != FORMAT_VERSION {
            return Err(SegmentError::Version(version));
        }
        if rest.len() % ChunkHash::LEN != 0 {
            return Err(SegmentError::Length(value.len()));
        }
        let hashes = rest
            .chunks_exact(ChunkHash::LEN)
            .map(|c| ChunkHash::from_slice(c).expect("exact chunk"))
            .collect();
        Ok(Segment { hashes })
    }
}

/// Collects hashes in chunk order and hands out full segments; the writer side of an index.
#[derive(Default)]
pub struct SegmentBuilder {
    next_index: u64,
    current: Segment,
}

impl SegmentBuilder {
    /// Appends the hash of the next chunk; returns a finished segment and its number.
    pub fn push(&mut self, hash: ChunkHash) -> Option<(u64, Segment)> {
        self.current.hashes.push(hash);
        self.next_index += 1;
        if self.next_index % SEGMENT_CHUNKS == 0 {
            let seg = std::mem::take(&mut self.current);
            Some((segment_of(self.next_index - 1), seg))
        } else {
            None
        }
    }

    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The last, partial segment, if any.
    pub fn finish(self) -> Option<(u64, Segment)> {
        if self.current.hashes.is_empty() {
            None
        } else {
            Some((segment_of(self.next_index - 1), self.current))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn segments_round_trip(seed in proptest::collection::vec(any::<[u8; 32]>(), 0..50)) {
            let seg = Segment { hashes: seed.into_iter().map(ChunkHash).collect() };
            prop_assert_eq!(Segment::decode(&seg.encode()).unwrap(), seg);
        }

        #[test]
        fn runs_of_one_hash_round_trip_in_37_bytes(n in 2usize..=1024, b in any::<u8>()) {
            let seg = Segment { hashes: vec![ChunkHash([b; 32]); n] };
            let bytes = seg.encode();
            prop_assert_eq!(bytes.len(), 37);
            prop_assert_eq!(Segment::decode(&bytes).unwrap(), seg);
        }

        #[test]
        fn builder_emits_every_hash_once_in_order(n in 0u64..5000) {
            let mut b = SegmentBuilder::default();
            let mut out = Vec::new();
            for i in 0..n {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&i.to_le_bytes());
                if let Some(s) = b.push(ChunkHash(h)) { out.push(s); }
            }
            out.extend(b.finish());
            let all: Vec<u64> = out.iter().flat_map(|(_, s)| s.hashes.iter().map(|h| u64::from_le_bytes(h.0[..8].try_into().unwrap()))).collect();
            prop_assert_eq!(all, (0..n).collect::<Vec<_>>());
            for (k, (no, _)) in out.iter().enumerate() { prop_assert_eq!(*no, k as u64); }
        }
    }

    #[test]
    fn decode_names_bad_version_and_length() {
        assert_eq!(Segment::decode(&[9]), Err(SegmentError::Version(9)));
        assert_eq!(Segment::decode(&[1, 2, 3]), Err(SegmentError::Length(3)));
        assert_eq!(Segment::decode(&[]), Err(SegmentError::Length(0)));
        let mut huge = vec![2];
        huge.extend_from_slice(&2000u32.to_le_bytes());
        huge.extend_from_slice(&[0; 32]);
        assert_eq!(Segment::decode(&huge), Err(SegmentError::Uniform(37)));
        assert_eq!(Segment::decode(&[2, 1, 0]), Err(SegmentError::Uniform(3)));
    }
}
