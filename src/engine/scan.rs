//! Where chunks are hashed: reads a snapshot in chunk order, skips holes (SEEK_DATA /
//! SEEK_HOLE), hashes each batch on all cores, and compares with the base index.
//!
//! Blocking code: call it from a blocking thread. A reader thread keeps one batch ahead of
//! the hashers so reading and hashing overlap; memory is two batches, whatever the volume.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::engine::chunk::{is_zero, zero_hash, Geometry};
use crate::engine::compress;
use crate::engine::extents;
use crate::engine::holes::Holes;
use crate::engine::narrow::{Narrow, Unlisted};
use crate::ids::ChunkHash;

/// Bytes read per batch; the batch is hashed in parallel.
const BATCH_BYTES: u64 = 8 * 1024 * 1024;

/// What the scan says about one chunk.
#[derive(Debug)]
pub enum Content {
    /// Same hash as the base: nothing to send.
    Unchanged,
    /// Changed and all zero (or a hole): send a marker.
    Zero,
    /// Changed: send these bytes.
    Data(Vec<u8>),
    /// Changed: send these zstd-compressed bytes (the hash is of the raw chunk).
    Compressed(Vec<u8>),
}

#[derive(Debug)]
pub struct Scanned {
    pub index: u64,
    pub hash: ChunkHash,
    pub content: Content,
    /// The base had this chunk (the DR replica holds an older version of it).
    pub based: bool,
    /// Zero content: the consecutive zero chunks from `index` this stands for (1 from the
    /// scan; a sender may merge a run into one).
    pub zeros: u64,
}

/// How the scan finds and hands on changed chunks.
#[derive(Default, Clone, Copy)]
pub struct ScanOptions<'a> {
    /// The base gen's reflink snapshot: ranges whose extents it shares with this snapshot
    /// are unchanged and are neither read nor hashed (see [`crate::engine::extents`]).
    pub base_snapshot: Option<&'a Path>,
    /// Compress changed chunks where it pays.
    pub compress: bool,
    /// Keep chunks the base had raw (uncompressed): they are refined into block patches,
    /// which are compressed instead.
    pub raw_if_based: bool,
    /// A changed block tracking answer: only its chunks are read, the others are the
    /// base's or zeros as it says (see [`crate::engine::narrow`]).
    pub narrow: Option<&'a Narrow>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ScanStats {
    pub chunks: u64,
    pub bytes_scanned: u64,
    pub chunks_changed: u64,
    pub bytes_changed: u64,
    pub zero_chunks_changed: u64,
    pub hole_chunks: u64,
    /// Chunks known unchanged from extents shared with the base snapshot (not read).
    pub shared_chunks: u64,
    pub shared_bytes: u64,
    pub compressed_chunks: u64,
    /// Raw bytes of compressed chunks minus their compressed size.
    pub compression_saved: u64,
    /// Bytes actually read from the snapshot.
    pub bytes_read: u64,
    /// Chunks a changed block tracking answer left out (not read).
    pub unlisted_chunks: u64,
}

/// Size of a regular file or block device.
pub fn volume_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // Block devices report length 0 in metadata; seeking to the end tells the real size.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64)
}

struct Batch {
    first: u64,
    // None marks a chunk in a hole.
    bufs: Vec<Option<Vec<u8>>>,
    // Chunks whose extents the base snapshot shares, or that a changed-block list leaves
    // out of a delta: unchanged, not read.
    shared: Vec<bool>,
    // Bytes read for the batch.
    read: u64,
}

/// Finds the chunks of a batch that share their extents with the base snapshot; turns
/// itself off at the first error (a file system without FIEMAP reads everything).
struct Shared<'a> {
    base: Option<File>,
    new: &'a File,
}

impl Shared<'_> {
    fn batch(&mut self, geometry: Geometry, first: u64, last: u64) -> Vec<bool> {
        let n = (last - first) as usize;
        let Some(base) = &self.base else {
            return vec![false; n];
        };
        let range =
            geometry.offset(first)..geometry.offset(last - 1) + geometry.len(last - 1) as u64;
        let same = extents::extents(base, range.clone())
            .and_then(|a| Ok(extents::identical(&a, &extents::extents(self.new, range)?)));
        match same {
            Ok(same) => (first..last)
                .map(|i| {
                    let off = geometry.offset(i);
                    extents::covered(&same, off..off + geometry.len(i) as u64)
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "no extent map; reading every chunk");
                self.base = None;
                vec![false; n]
            }
        }
    }
}

/// One chunk's buffer (if read), hash and zero flag, and whether it changed and the base
/// had it: what its content is made from.
type ChunkFacts<'a> = (
    (Option<Vec<u8>>, &'a (ChunkHash, bool)),
    (&'a bool, &'a bool),
);

/// Scans `path` as `geometry`, calling `base` for the base hash of each chunk in order and
/// `emit` for every chunk (changed or not, so the caller can build the new index).
pub fn scan_file(
    path: &Path,
    geometry: Geometry,
    mut base: impl FnMut(u64) -> Result<Option<ChunkHash>>,
    mut emit: impl FnMut(Scanned) -> Result<()>,
    progress: &AtomicU64,
    options: ScanOptions<'_>,
) -> Result<ScanStats> {
    let file = File::open(path).with_context(|| format!("open snapshot {}", path.display()))?;
    let size = volume_size(&file)?;
    anyhow::ensure!(
        size >= geometry.size,
        "{} is {size} bytes, shorter than the {} bytes being scanned",
        path.display(),
        geometry.size
    );
    let per_batch = (BATCH_BYTES / geometry.chunk_size as u64).max(2);
    let total = geometry.chunk_count();
    let (tx, rx) = mpsc::sync_channel::<std::io::Result<Batch>>(1);
    let mut stats = ScanStats::default();

    std::thread::scope(|scope| -> Result<()> {
        let file = &file;
        let base_snapshot = options.base_snapshot.and_then(|p| File::open(p).ok());
        let narrow = options.narrow;
        scope.spawn(move || {
            let mut holes = Holes::new(file);
            let mut shared_extents = Shared {
                base: base_snapshot,
                new: file,
            };
            let mut first = 0;
            while first < total {
                let last = (first + per_batch).min(total);
                let mut shared = shared_extents.batch(geometry, first, last);
                let mut bufs = Vec::with_capacity((last - first) as usize);
                let mut read = 0;
                for i in first..last {
                    let off = geometry.offset(i);
                    let len = geometry.len(i) as usize;
                    let unlisted = narrow.filter(|n| !n.listed.contains(i));
                    if let Some(n) = unlisted {
                        // Left out of a delta: the base's; of the allocated ranges: zeros.
                        shared[(i - first) as usize] |= n.unlisted == Unlisted::Base;
                        bufs.push(None);
                        continue;
                    }
                    if shared[(i - first) as usize] || holes.is_hole(off, off + len as u64) {
                        bufs.push(None);
                        continue;
                    }
                    let mut buf = vec![0u8; len];
                    if let Err(e) = file.read_exact_at(&mut buf, off) {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    read += len as u64;
                    bufs.push(Some(buf));
                }
                if tx
                    .send(Ok(Batch {
                        first,
                        bufs,
                        shared,
                        read,
                    }))
                    .is_err()
                {
                    return; // the consumer stopped (an error downstream)
                }
                first = last;
            }
        });

        for batch in rx {
            let mut batch = batch.with_context(|| format!("read {}", path.display()))?;
            stats.bytes_read += batch.read;
            // Unread chunks are holes unless their extents are shared with the base.
            let batch_holes: Vec<bool> = batch
                .bufs
                .iter()
                .zip(&batch.shared)
                .map(|(b, &shared)| b.is_none() && !shared)
                .collect();
            // A batch that read nothing (holes, extents shared with the base) has nothing to
            // hash or compress: waking the pool for it cost more than the work, 131,072
            // times over for a 1 TiB sparse volume.
            let parallel = batch.read > 0;
            let hash_of = |(k, b): (usize, &Option<Vec<u8>>)| {
                let len = geometry.len(batch.first + k as u64);
                match b {
                    // Shared with the base: the base hash is filled in below.
                    None if batch.shared[k] => (ChunkHash([0; 32]), false),
                    None => (zero_hash(len), true),
                    Some(b) if is_zero(b) => (zero_hash(len), true),
                    Some(b) => (ChunkHash::of(b), false),
                }
            };
            let mut hashed: Vec<(ChunkHash, bool)> = if parallel {
                batch.bufs.par_iter().enumerate().map(hash_of).collect()
            } else {
                batch.bufs.iter().enumerate().map(hash_of).collect()
            };
            // The base compare walks the index in order; compressing the changed chunks
            // is parallel again.
            let mut changed = Vec::with_capacity(hashed.len());
            let mut based = Vec::with_capacity(hashed.len());
            for (k, slot) in hashed.iter_mut().enumerate() {
                let index = batch.first + k as u64;
                let b = base(index)?;
                if batch.shared[k] {
                    match b {
                        Some(h) => {
                            // Unchanged by construction, so whether it is zero never matters.
                            *slot = (h, false);
                            if options.narrow.is_none_or(|n| n.listed.contains(index)) {
                                stats.shared_chunks += 1;
                                stats.shared_bytes += geometry.len(index) as u64;
                            }
                        }
                        None => {
                            // Not in the base index after all (a grown volume): read it.
                            let mut buf = vec![0u8; geometry.len(index) as usize];
                            file.read_exact_at(&mut buf, geometry.offset(index))
                                .with_context(|| format!("read {}", path.display()))?;
                            stats.bytes_read += buf.len() as u64;
                            *slot = if is_zero(&buf) {
                                (zero_hash(buf.len() as u32), true)
                            } else {
                                (ChunkHash::of(&buf), false)
                            };
                            batch.bufs[k] = Some(buf);
                        }
                    }
                }
                changed.push(b != Some(slot.0));
                based.push(b.is_some());
            }
            let content_of =
                |((buf, (_, zero)), (&changed, &based)): ChunkFacts<'_>| match (changed, zero) {
                    (false, _) => Content::Unchanged,
                    (true, true) => Content::Zero,
                    (true, false) => {
                        let raw = buf.expect("non-zero chunk was read");
                        let try_it = options.compress && !(based && options.raw_if_based);
                        match try_it.then(|| compress::compress(&raw)).flatten() {
                            Some(z) => Content::Compressed(z),
                            None => Content::Data(raw),
                        }
                    }
                };
            // Only chunks read (here, or late for a grown volume) need the pool.
            let contents: Vec<Content> = if batch.bufs.iter().any(Option::is_some) {
                batch
                    .bufs
                    .into_par_iter()
                    .zip(hashed.par_iter())
                    .zip(changed.par_iter().zip(based.par_iter()))
                    .map(content_of)
                    .collect()
            } else {
                batch
                    .bufs
                    .into_iter()
                    .zip(hashed.iter())
                    .zip(changed.iter().zip(based.iter()))
                    .map(content_of)
                    .collect()
            };
            for (k, (content, (hash, _))) in contents.into_iter().zip(hashed).enumerate() {
                let index = batch.first + k as u64;
                let len = geometry.len(index) as u64;
                stats.chunks += 1;
                stats.bytes_scanned += len;
                if options.narrow.is_some_and(|n| !n.listed.contains(index)) {
                    stats.unlisted_chunks += 1;
                } else if batch_holes.get(k).copied().unwrap_or(false) {
                    stats.hole_chunks += 1;
                }
                match &content {
                    Content::Unchanged => {}
                    Content::Zero => {
                        stats.chunks_changed += 1;
                        stats.bytes_changed += len;
                        stats.zero_chunks_changed += 1;
                    }
                    Content::Data(_) => {
                        stats.chunks_changed += 1;
                        stats.bytes_changed += len;
                    }
                    Content::Compressed(z) => {
                        stats.chunks_changed += 1;
                        stats.bytes_changed += len;
                        stats.compressed_chunks += 1;
                        stats.compression_saved += len.saturating_sub(z.len() as u64);
                    }
                }
                emit(Scanned {
                    index,
                    hash,
                    content,
                    based: based[k],
                    zeros: 1,
                })?;
                progress.fetch_add(len, Ordering::Relaxed);
            }
        }
        Ok(())
    })?;
    anyhow::ensure!(
        stats.chunks == total,
        "scan of {} stopped after {} of {total} chunks",
        path.display(),
        stats.chunks
    );
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn scan_reports_changed_zero_and_hole_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        let cs = 4096u32;
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; cs as usize]).unwrap(); // 0: data
        f.write_all(&vec![0u8; cs as usize]).unwrap(); // 1: written zeros
        f.set_len(cs as u64 * 64 + 100).unwrap(); // 2..: hole, short last chunk
        f.write_all_at(b"x", cs as u64 * 64).unwrap(); // last chunk has data
        drop(f);
        let g = Geometry::new(cs as u64 * 64 + 100, cs);
        let mut seen = Vec::new();
        let progress = AtomicU64::new(0);
        let stats = scan_file(
            &p,
            g,
            |_| Ok(None),
            |s| {
                seen.push(s);
                Ok(())
            },
            &progress,
            ScanOptions::default(),
        )
        .unwrap();
        assert_eq!(stats.chunks, 65);
        assert_eq!(progress.load(Ordering::Relaxed), g.size);
        assert!(matches!(seen[0].content, Content::Data(_)));
        assert!(matches!(seen[1].content, Content::Zero));
        assert!(matches!(seen[30].content, Content::Zero));
        assert_eq!(seen[30].hash, zero_hash(cs));
        match &seen[64].content {
            Content::Data(d) => assert_eq!(d.len(), 100),
            other => panic!("last chunk was {other:?}"),
        }
        // Against itself as base nothing changed.
        let hashes: Vec<ChunkHash> = seen.iter().map(|s| s.hash).collect();
        let again = scan_file(
            &p,
            g,
            |i| Ok(hashes.get(i as usize).copied()),
            |s| {
                assert!(matches!(s.content, Content::Unchanged));
                Ok(())
            },
            &progress,
            ScanOptions::default(),
        )
        .unwrap();
        assert_eq!(again.chunks_changed, 0);
    }

    #[test]
    fn a_narrowed_scan_reads_only_the_listed_chunks() {
        use crate::engine::narrow::RangeSet;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        let cs = 4096u32;
        let g = Geometry::new(cs as u64 * 16, cs);
        std::fs::write(&p, vec![5u8; g.size as usize]).unwrap();
        let progress = AtomicU64::new(0);
        let mut hashes = Vec::new();
        scan_file(
            &p,
            g,
            |_| Ok(None),
            |s| {
                hashes.push(s.hash);
                Ok(())
            },
            &progress,
            ScanOptions::default(),
        )
        .unwrap();
        // Chunks 3 and 9 change; the delta lists 3 and 4 (4 rewritten with the same bytes).
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"new", 3 * 4096 + 10).unwrap();
        f.write_all_at(b"new", 9 * 4096).unwrap();
        let mut r = RangeSet::new(g, g.size);
        r.push(3 * 4096, 2 * 4096).unwrap();
        let narrow = r.finish(Unlisted::Base);
        let mut changed = Vec::new();
        let stats = scan_file(
            &p,
            g,
            |i| Ok(hashes.get(i as usize).copied()),
            |s| {
                if !matches!(s.content, Content::Unchanged) {
                    changed.push(s.index);
                }
                Ok(())
            },
            &progress,
            ScanOptions {
                narrow: Some(&narrow),
                ..Default::default()
            },
        )
        .unwrap();
        // Trusting the list: 9 is missed, which is what the mover's sample is for.
        assert_eq!(changed, vec![3]);
        assert_eq!(stats.bytes_read, 2 * 4096);
        assert_eq!(stats.unlisted_chunks, 14);
        assert_eq!(stats.shared_chunks, 0);
        // Allocated ranges of a first sync: the unlisted chunks are zeros, unread.
        let mut r = RangeSet::new(g, g.size);
        r.push(0, 4096).unwrap();
        let narrow = r.finish(Unlisted::Zero);
        let mut zeros = 0;
        let stats = scan_file(
            &p,
            g,
            |_| Ok(None),
            |s| {
                zeros += matches!(s.content, Content::Zero) as u64;
                Ok(())
            },
            &progress,
            ScanOptions {
                narrow: Some(&narrow),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((zeros, stats.bytes_read), (15, 4096));
    }
}
