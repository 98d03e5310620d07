//! What changed block tracking (CBT) tells a scan, pure: the chunks a storage system's
//! changed-range list touches, and what the chunks it leaves out are (the base's, for a
//! delta between two snapshots; zeros, for the allocated ranges of one). The hash index
//! stays the truth: a list only narrows what is read, and a sample of the chunks it leaves
//! out is read anyway to catch a list that lies ([`sample`]).
//!
//! Memory is one bit per chunk (2 MiB for 1 TiB at 64 KiB chunks), whatever the list's
//! length.

use crate::engine::chunk::Geometry;

/// A set of chunk indexes, one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
    count: u64,
}

impl ChunkSet {
    pub fn new(chunks: u64) -> Self {
        ChunkSet {
            words: vec![0; chunks.div_ceil(64) as usize],
            count: chunks,
        }
    }

    pub fn insert(&mut self, i: u64) {
        debug_assert!(i < self.count);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    pub fn contains(&self, i: u64) -> bool {
        i < self.count && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// How many chunks are in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }
}

/// What a chunk the list leaves out holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlisted {
    /// The base snapshot's bytes (GetMetadataDelta): the base hash.
    Base,
    /// Zeros (GetMetadataAllocated: never written).
    Zero,
}

/// The chunks to read, and what the others are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Narrow {
    pub listed: ChunkSet,
    pub unlisted: Unlisted,
}

/// Why a range list cannot be used: each names the range and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range {offset}+{size} is empty or negative")]
    Empty { offset: i64, size: i64 },
    #[error("range {offset}+{size} starts before the end of the one before it ({prev_end})")]
    OutOfOrder {
        offset: i64,
        size: i64,
        prev_end: u64,
    },
    #[error("range {offset}+{size} ends past the volume's capacity of {volume} bytes")]
    PastEnd { offset: i64, size: i64, volume: u64 },
}

/// Builds the set from ranges as the SnapshotMetadata API sends them: strictly
/// increasing, not overlapping, inside the volume. A list breaking a rule is refused
/// whole (the caller scans everything).
#[derive(Debug)]
pub struct RangeSet {
    set: ChunkSet,
    geometry: Geometry,
    capacity: u64,
    prev_end: u64,
    pub ranges: u64,
    pub bytes: u64,
}

impl RangeSet {
    /// `capacity`: the volume's size as the service states it (at least the bytes moved).
    pub fn new(geometry: Geometry, capacity: u64) -> Self {
        RangeSet {
            set: ChunkSet::new(geometry.chunk_count()),
            geometry,
            capacity,
            prev_end: 0,
            ranges: 0,
            bytes: 0,
        }
    }

    pub fn push(&mut self, offset: i64, size: i64) -> Result<(), RangeError> {
        if size <= 0 || offset < 0 {
            return Err(RangeError::Empty { offset, size });
        }
        let (start, len) = (offset as u64, size as u64);
        if self.ranges > 0 && start < self.prev_end {
            return Err(RangeError::OutOfOrder {
                offset,
                size,
                prev_end: self.prev_end,
            });
        }
        let end = start.saturating_add(len);
        if end > self.capacity {
            return Err(RangeError::PastEnd {
                offset,
                size,
                volume: self.capacity,
            });
        }
        self.prev_end = end;
        self.ranges += 1;
        self.bytes += len;
        // The bytes moved may stop short of the capacity (a restore rounded up): what
        // lies past them is not read.
        if start >= self.geometry.size {
            return Ok(());
        }
        let cs = self.geometry.chunk_size as u64;
        let last = (end.min(self.geometry.size) - 1) / cs;
        for i in start / cs..=last {
            self.set.insert(i);
        }
        Ok(())
    }

    pub fn finish(self, unlisted: Unlisted) -> Narrow {
        Narrow {
            listed: self.set,
            unlisted,
        }
    }
}

/// Up to `n` of the chunks the list leaves out, evenly spread over them with a random
/// start (`seed`), in increasing order: the ones a scan reads anyway to check the list.
/// Evenly, so a lie confined to one region is as likely found as one spread out.
pub fn sample(narrow: &Narrow, geometry: Geometry, n: u64, seed: u64) -> Vec<u64> {
    let total = geometry.chunk_count();
    let unlisted = total - narrow.listed.len();
    let n = n.min(unlisted);
    if n == 0 {
        return Vec::new();
    }
    // The j-th pick is unlisted chunk number floor((j + u) * unlisted / n), u in [0, 1).
    let off = (seed % 1024) as u128;
    let pick = |j: u64| ((j as u128 * 1024 + off) * unlisted as u128 / (n as u128 * 1024)) as u64;
    let mut out = Vec::with_capacity(n as usize);
    let (mut k, mut next) = (0u64, pick(0));
    for i in 0..total {
        if narrow.listed.contains(i) {
            continue;
        }
        if k == next {
            out.push(i);
            if out.len() as u64 == n {
                break;
            }
            next = pick(out.len() as u64);
        }
        k += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Geometry {
        Geometry::new(10 * 4096 + 100, 4096)
    }

    #[test]
    fn ranges_mark_every_chunk_they_touch() {
        let mut r = RangeSet::new(g(), g().size);
        r.push(0, 1).unwrap(); // chunk 0
        r.push(4096 * 2 + 4000, 200).unwrap(); // chunks 2 and 3
        r.push(4096 * 10, 100).unwrap(); // the short last chunk
        let n = r.finish(Unlisted::Base);
        let listed: Vec<u64> = (0..11).filter(|&i| n.listed.contains(i)).collect();
        assert_eq!(listed, vec![0, 2, 3, 10]);
        assert_eq!(n.listed.len(), 4);
    }

    #[test]
    fn a_list_breaking_the_apis_rules_is_refused_naming_the_range() {
        let mut r = RangeSet::new(g(), g().size);
        r.push(8192, 4096).unwrap();
        assert_eq!(
            r.push(8000, 10),
            Err(RangeError::OutOfOrder {
                offset: 8000,
                size: 10,
                prev_end: 12288
            })
        );
        let mut r = RangeSet::new(g(), g().size);
        assert!(matches!(r.push(0, 0), Err(RangeError::Empty { .. })));
        assert!(matches!(r.push(-5, 10), Err(RangeError::Empty { .. })));
        let e = r.push(1 << 30, 4096).unwrap_err();
        assert!(matches!(e, RangeError::PastEnd { .. }));
        assert!(
            e.to_string()
                .contains("past the volume's capacity of 41060 bytes"),
            "{e}"
        );
    }

    #[test]
    fn the_sample_spreads_over_the_unlisted_chunks_only() {
        let geometry = Geometry::new(1000 * 4096, 4096);
        let mut r = RangeSet::new(geometry, geometry.size);
        r.push(0, 100 * 4096).unwrap();
        let n = r.finish(Unlisted::Base);
        let s = sample(&n, geometry, 30, 7);
        assert_eq!(s.len(), 30);
        assert!(s.iter().all(|&i| i >= 100));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        // Spread: from the first stride to the last.
        assert!(s[0] < 130 && *s.last().unwrap() > 950, "{s:?}");
        // Fewer unlisted chunks than asked: all of them.
        assert_eq!(sample(&n, Geometry::new(103 * 4096, 4096), 30, 1).len(), 3);
    }
}
