//! The ordered compare: walks the base index in step with the scan, one segment at a time,
//! so deciding whether a chunk changed costs no point lookup. Pure.

use crate::engine::index::{segment_of, Segment, SEGMENT_CHUNKS};
use crate::ids::ChunkHash;

/// Yields the base hash of chunk `index` for monotonically increasing indexes, pulling
/// segments from an ordered iterator of `(segment number, segment)`.
pub struct BaseCursor<I> {
    segments: I,
    current: Option<(u64, Segment)>,
    exhausted: bool,
}

impl<I, E> BaseCursor<I>
where
    I: Iterator<Item = Result<(u64, Segment), E>>,
{
    pub fn new(segments: I) -> Self {
        BaseCursor {
            segments,
            current: None,
            exhausted: false,
        }
    }

    /// The base hash of `index`, or `None` where the base has no such chunk.
    /// Indexes must not decrease between calls.
    pub fn hash_at(&mut self, index: u64) -> Result<Option<ChunkHash>, E> {
        let want = segment_of(index);
        loop {
            match &self.current {
                Some((no, seg)) if *no == want => {
                    return Ok(seg.hashes.get((index % SEGMENT_CHUNKS) as usize).copied())
                }
                Some((no, _)) if *no > want => return Ok(None),
                _ if self.exhausted => return Ok(None),
                _ => match self.segments.next() {
                    Some(Ok(s)) => self.current = Some(s),
                    Some(Err(e)) => return Err(e),
                    None => {
                        self.exhausted = true;
                        self.current = None;
                    }
                },
            }
        }
    }
}

/// An empty base: every chunk counts as changed (a first sync with nothing to compare).
pub fn empty_base() -> BaseCursor<std::iter::Empty<Result<(u64, Segment), std::convert::Infallible>>>
{
    BaseCursor::new(std::iter::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::index::SegmentBuilder;
    use proptest::prelude::*;

    fn h(i: u64) -> ChunkHash {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&i.to_le_bytes());
        ChunkHash(b)
    }

    fn segments(n: u64) -> Vec<Result<(u64, Segment), ()>> {
        let mut b = SegmentBuilder::default();
        let mut out = Vec::new();
        for i in 0..n {
            out.extend(b.push(h(i)).map(Ok));
        }
        out.extend(b.finish().map(Ok));
        out
    }

    proptest! {
        #[test]
        fn cursor_returns_the_hash_stored_for_each_index(n in 0u64..4000, probes in proptest::collection::btree_set(0u64..6000, 0..200)) {
            let mut c = BaseCursor::new(segments(n).into_iter());
            for i in probes {
                let expect = if i < n { Some(h(i)) } else { None };
                prop_assert_eq!(c.hash_at(i).unwrap(), expect);
            }
        }
    }

    #[test]
    fn cursor_skips_missing_segments_without_inventing_hashes() {
        let mut segs = segments(3 * SEGMENT_CHUNKS);
        let _ = segs.remove(1);
        let mut c = BaseCursor::new(segs.into_iter());
        assert_eq!(c.hash_at(5).unwrap(), Some(h(5)));
        assert_eq!(c.hash_at(SEGMENT_CHUNKS + 5).unwrap(), None);
        assert_eq!(
            c.hash_at(2 * SEGMENT_CHUNKS + 5).unwrap(),
            Some(h(2 * SEGMENT_CHUNKS + 5))
        );
    }

    #[test]
    fn cursor_passes_errors_through() {
        let mut c = BaseCursor::new(vec![Err::<(u64, Segment), &str>("disk")].into_iter());
        assert_eq!(c.hash_at(0), Err("disk"));
    }
}
