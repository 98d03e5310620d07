//! Change detection from shared extents: two reflink snapshots of one volume share the
//! physical blocks of every range nobody wrote between them. Where both snapshots map a
//! logical range to the same physical blocks, the bytes are the same, so the scanner need
//! neither read nor hash it; the base index already has its hash. This is what makes an
//! idle or lightly written cycle cost a few ioctls instead of a read of the whole volume.
//!
//! Only plain extents count: anything delayed, unwritten, inline, encoded (compressed) or
//! of unknown location is treated as changed and read. FIEMAP with FIEMAP_FLAG_SYNC is
//! asked per window, so memory follows the window's fragmentation, not the volume's size.

use std::fs::File;
use std::ops::Range;
use std::os::unix::io::AsRawFd;

/// One mapped extent: logical bytes `logical..logical+len` live at `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL,
/// UNWRITTEN: the physical address does not identify the bytes.
const NOT_COMPARABLE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;
const BATCH: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct RawMap {
    start: u64,
    length: u64,
    flags: u32,
    mapped: u32,
    count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// The comparable extents of `file` overlapping `range`, in logical order.
pub fn extents(file: &File, range: Range<u64>) -> std::io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let mut map = Box::new(RawMap {
            start,
            length: range.end - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        });
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *map) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let got = &map.extents[..map.mapped as usize];
        let Some(last) = got.last() else { break };
        for e in got {
            if e.flags & NOT_COMPARABLE == 0 {
                out.push(Extent {
                    logical: e.logical,
                    physical: e.physical,
                    len: e.length,
                });
            }
        }
        if last.flags & FIEMAP_EXTENT_LAST != 0 || (map.mapped as usize) < BATCH {
            break;
        }
        start = last.logical + last.length;
    }
    Ok(out)
}

/// Logical ranges where `a` and `b` map to the same physical bytes, merged, in order.
/// Both inputs are in logical order (as FIEMAP returns them).
pub fn identical(a: &[Extent], b: &[Extent]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        let lo = x.logical.max(y.logical);
        let hi = (x.logical + x.len).min(y.logical + y.len);
        // Same physical address for the same logical offset over the overlap.
        if lo < hi && x.physical.wrapping_sub(x.logical) == y.physical.wrapping_sub(y.logical) {
            match out.last_mut() {
                Some(r) if r.end == lo => r.end = hi,
                _ => out.push(lo..hi),
            }
        }
        if x.logical + x.len <= y.logical + y.len {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Whether `chunk` lies wholly inside one of the merged, ordered `ranges`.
pub fn covered(ranges: &[Range<u64>], chunk: Range<u64>) -> bool {
    let k = ranges.partition_point(|r| r.end <= chunk.start);
    ranges
        .get(k)
        .is_some_and(|r| r.start <= chunk.start && chunk.end <= r.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
        }
    }

    #[test]
    fn shared_ranges_are_found_and_merged_and_rewritten_ones_are_not() {
        // Base: one extent. New: the same blocks except 8192..12288, rewritten elsewhere.
        let a = [e(0, 1_000_000, 65536)];
        let b = [
            e(0, 1_000_000, 8192),
            e(8192, 5_000_000, 4096),
            e(12288, 1_012_288, 53248),
        ];
        let same = identical(&a, &b);
        assert_eq!(same, vec![0..8192, 12288..65536]);
        assert!(covered(&same, 0..8192));
        assert!(!covered(&same, 0..16384));
        assert!(covered(&same, 16384..65536));
        // Adjacent shared extents merge into one range.
        let a2 = [e(0, 100, 10), e(10, 110, 10)];
        assert_eq!(identical(&a2, &[e(0, 100, 20)]), vec![0..20]);
        // Same physical start but different logical offsets are different bytes.
        assert!(identical(&[e(0, 100, 10)], &[e(10, 100, 10)]).is_empty());
    }

    #[test]
    fn reflink_copies_share_extents_until_written() {
        // Runs wherever the temp dir supports reflink (XFS, btrfs); elsewhere FICLONE fails
        // and there is nothing to test. The device tests cover XFS explicitly.
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![7u8; 1 << 20]).unwrap();
        let fa = File::open(&a).unwrap();
        let b = dir.path().join("b");
        let fb = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(&b)
            .unwrap();
        if unsafe { libc::ioctl(fb.as_raw_fd(), 0x4004_9409 as _, fa.as_raw_fd()) } != 0 {
            return;
        }
        fb.write_all_at(&[1u8; 4096], 65536).unwrap();
        let same = identical(
            &extents(&fa, 0..1 << 20).unwrap(),
            &extents(&fb, 0..1 << 20).unwrap(),
        );
        assert!(covered(&same, 0..65536));
        assert!(!covered(&same, 65536..69632));
        assert!(covered(&same, 131072..1 << 20));
    }
}
