//! Where a replica is written: replaying a verified staging log onto the replica file or
//! block device, then fsync. Replaying twice gives the same bytes (idempotent redo).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::engine::scan::volume_size;
use crate::engine::verify;
use crate::volume::staging::{Record, StagingReader};

#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub patched_chunks: u64,
    pub bytes_written: u64,
}

/// Reserves the blocks a staged chunk will need in the replica, without changing its
/// content (KEEP_SIZE allocation), so a full replica disk fails the cycle before its group
/// commit instead of during apply. Block devices and file systems without fallocate need
/// no reservation. fallocate moves the file's mtime, which the DR site's replica check
/// reads as a write from outside, so each reservation puts the mtime back.
pub struct Reserver {
    file: Option<File>,
    mtime: libc::timespec,
}

impl Reserver {
    pub fn open(path: &Path) -> Result<Reserver> {
        use std::os::unix::fs::MetadataExt;
        let f = open_replica(path)?;
        let m = f.metadata()?;
        let mtime = libc::timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        };
        let file = m.is_file().then_some(f);
        Ok(Reserver { file, mtime })
    }

    /// Reserves nothing.
    pub fn none() -> Reserver {
        Reserver {
            file: None,
            mtime: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        }
    }

    pub fn reserve(&mut self, off: u64, len: u32) -> Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        if rc == 0 {
            let times = [
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                self.mtime,
            ];
            if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("restore the replica's mtime after reserving space");
            }
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => {
                self.file = None;
                Ok(())
            }
            _ => Err(e).context("reserve space in the replica"),
        }
    }
}

/// Opens (creating a regular file if missing) the replica for writing.
fn open_replica(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open replica {}", path.display()))
}

fn write_zeros(f: &File, off: u64, len: u32, is_file: bool) -> std::io::Result<()> {
    if is_file {
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    f.write_all_at(&vec![0u8; len as usize], off)
}

/// Reads `len` bytes at `off`; bytes past the end of the file read as zeros (a replica
/// shorter than the volume it is growing into).
pub fn read_chunk(f: &File, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut at = 0;
    while at < buf.len() {
        match f.read_at(&mut buf[at..], off + at as u64) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Where a replica that does not exist yet is built by its first full sync: next to it, on
/// the same file system, so the group commit's apply is one rename.
pub fn fresh_path(replica: &Path) -> PathBuf {
    let mut s = replica.as_os_str().to_owned();
    s.push(".lifeboat-new");
    PathBuf::from(s)
}

/// Start write-back every this many bytes, so the final fsync finds little left to write.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// A replica being written whole, in place of a staging log: a first full sync writes each
/// verified chunk once instead of twice (log, then replica). Nobody reads it before the
/// group commit renames it over the (absent) replica, so the old state stays intact. A
/// cycle cut short leaves it, and the next first sync resumes it (see
/// `replicate::receive::hashes`).
pub struct FreshReplica {
    file: File,
    path: PathBuf,
    pub bytes: u64,
    pub records: u64,
    unflushed: u64,
    /// The file held a resumed sync's chunks: a zero chunk must be made zero, not left.
    resumed: bool,
}

impl FreshReplica {
    pub fn create(replica: &Path, size: u64) -> Result<Self> {
        let path = fresh_path(replica);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        // Not truncated: what an interrupted first sync wrote was hashed for the sender,
        // which sends only the chunks that differ (a fresh start has no file, or a file
        // whose chunks it compared just the same).
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("create new replica {}", path.display()))?;
        let resumed = file.metadata().is_ok_and(|m| m.len() > 0);
        file.set_len(size)
            .with_context(|| format!("size new replica {}", path.display()))?;
        Ok(FreshReplica {
            file,
            path,
            bytes: 0,
            records: 0,
            unflushed: 0,
            resumed,
        })
    }

    /// Writes a verified chunk of `len` bytes; zero chunks stay (or, resumed, become)
    /// holes.
    pub fn write(&mut self, off: u64, len: u32, bytes: Option<&[u8]>) -> Result<()> {
        self.records += 1;
        let Some(b) = bytes else {
            if self.resumed {
                write_zeros(&self.file, off, len, true).with_context(|| {
                    format!("zero new replica {} at byte {off}", self.path.display())
                })?;
            }
            return Ok(());
        };
        self.file
            .write_all_at(b, off)
            .with_context(|| format!("write new replica {} at byte {off}", self.path.display()))?;
        self.bytes += b.len() as u64;
        self.unflushed += b.len() as u64;
        if self.unflushed >= WRITEBACK_EVERY {
            self.unflushed = 0;
            // Asynchronous: queue what is written so far for the disk; never waits.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
        Ok(())
    }

    /// Fsyncs; after this the new replica survives a crash (it is installed at commit).
    pub fn finish(self) -> Result<PathBuf> {
        self.file
            .sync_all()
            .with_context(|| format!("fsync new replica {}", self.path.display()))?;
        Ok(self.path)
    }
}

/// Renames a committed fresh replica into place; idempotent (a redo after the rename finds
/// the replica there and the new file gone).
pub fn install(fresh: &Path, replica: &Path) -> Result<()> {
    match std::fs::rename(fresh, replica) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && replica.exists() => return Ok(()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("rename {} to {}", fresh.display(), replica.display()))
        }
    }
    super::sync_parent(replica)
}

/// Applies the staging log at `log` to the replica at `replica` and fsyncs it.
pub fn apply(log: &Path, replica: &Path) -> Result<ApplyStats> {
    apply_from(StagingReader::open(log)?, replica)
}

/// Applies a staging log read from `reader` to the replica at `replica` and fsyncs it.
/// A patch that does not give its chunk over the replica's bytes: the replica is not what
/// the index says it holds (changed out of band, or left part-written by an abandoned
/// gen). Nothing of the patch was written.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Diverged {
    pub chunk: u64,
    pub reason: String,
}

pub fn apply_from(mut reader: StagingReader, replica: &Path) -> Result<ApplyStats> {
    let log = reader.path().to_path_buf();
    let geometry = reader.geometry;
    let f = open_replica(replica)?;
    let is_file = f.metadata()?.is_file();
    if !is_file {
        let dev = volume_size(&f)?;
        if dev < geometry.size {
            bail!(
                "replica device {} has {dev} bytes; the volume needs {}",
                replica.display(),
                geometry.size
            );
        }
    }
    let mut stats = ApplyStats::default();
    while let Some(rec) = reader.next_record()? {
        match rec {
            Record::Data { index, bytes, .. } => {
                f.write_all_at(&bytes, geometry.offset(index))
                    .with_context(|| {
                        format!("write chunk {index} to replica {}", replica.display())
                    })?;
                stats.data_chunks += 1;
                stats.bytes_written += bytes.len() as u64;
            }
            Record::Zero { index, len } => {
                write_zeros(&f, geometry.offset(index), len, is_file).with_context(|| {
                    format!("zero chunk {index} of replica {}", replica.display())
                })?;
                stats.zero_chunks += 1;
            }
            Record::Patch {
                index,
                hash,
                len,
                mask,
                data,
            } => {
                // Overlaying the same blocks again gives the same chunk, so a redo after a
                // torn write of this very patch still verifies.
                let off = geometry.offset(index);
                let mut chunk = read_chunk(&f, off, len).with_context(|| {
                    format!("read chunk {index} of replica {}", replica.display())
                })?;
                let place = verify::patch(index, &hash, &mut chunk, &mask, &data).map_err(|e| {
                    anyhow::Error::new(Diverged {
                        chunk: index,
                        reason: format!(
                            "{}: {e} (a patch over replica {}); refusing to apply it",
                            log.display(),
                            replica.display()
                        ),
                    })
                })?;
                for (dst, src) in place {
                    f.write_all_at(&data[src], off + dst.start as u64)
                        .with_context(|| {
                            format!("write chunk {index} to replica {}", replica.display())
                        })?;
                }
                stats.patched_chunks += 1;
                stats.bytes_written += data.len() as u64;
            }
        }
    }
    if is_file {
        f.set_len(geometry.size)
            .with_context(|| format!("size replica {}", replica.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync replica {}", replica.display()))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::chunk::{zero_hash, Geometry};
    use crate::ids::ChunkHash;
    use crate::volume::staging::StagingWriter;

    #[test]
    fn applying_a_log_twice_gives_the_same_replica() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(4096 * 4 + 10, 4096);
        let log = dir.path().join("s/v.log");
        let mut w = StagingWriter::create(&log, g).unwrap();
        let a = vec![5u8; 4096];
        let tail = vec![6u8; 10];
        w.append(1, &ChunkHash::of(&a), 4096, Some(&a)).unwrap();
        w.append(2, &zero_hash(4096), 4096, None).unwrap();
        w.append(4, &ChunkHash::of(&tail), 10, Some(&tail)).unwrap();
        w.finish().unwrap();
        let replica = dir.path().join("r/v.img");
        std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
        std::fs::write(&replica, vec![1u8; 4096 * 6]).unwrap();
        apply(&log, &replica).unwrap();
        let once = std::fs::read(&replica).unwrap();
        apply(&log, &replica).unwrap();
        assert_eq!(std::fs::read(&replica).unwrap(), once);
        let mut expect = vec![1u8; 4096];
        expect.extend(&a);
        expect.extend(vec![0u8; 4096]);
        expect.extend(vec![1u8; 4096]);
        expect.extend(&tail);
        assert_eq!(once, expect);
    }

    #[test]
    fn a_patch_redone_over_a_torn_write_gives_the_same_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(16384, 16384);
        let old: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[100] ^= 0xff; // block 0
        new[12_000] ^= 0xff; // block 2
        let p =
            crate::engine::refine::diff(&new, &crate::engine::refine::block_hashes(&old)).unwrap();
        let log = dir.path().join("v.log");
        let mut w = StagingWriter::create(&log, g).unwrap();
        w.append_patch(0, &ChunkHash::of(&new), 16384, &p.mask, &p.data)
            .unwrap();
        w.finish().unwrap();
        let replica = dir.path().join("r.img");
        // A crash wrote block 0 of the patch but not block 2.
        let mut torn = old.clone();
        torn[..4096].copy_from_slice(&new[..4096]);
        std::fs::write(&replica, &torn).unwrap();
        apply(&log, &replica).unwrap();
        assert_eq!(std::fs::read(&replica).unwrap(), new);
        apply(&log, &replica).unwrap();
        assert_eq!(std::fs::read(&replica).unwrap(), new);
        // Over a chunk that is not the base it was made for, the patch is refused.
        let mut other = old.clone();
        other[5000] ^= 1; // block 1, which the patch does not carry
        std::fs::write(&replica, &other).unwrap();
        let err = apply(&log, &replica).unwrap_err();
        assert!(
            format!("{err:#}").contains("does not match its hash"),
            "{err:#}"
        );
        assert_eq!(std::fs::read(&replica).unwrap(), other);
    }

    #[test]
    fn a_corrupted_log_record_never_reaches_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(4096, 4096);
        let log = dir.path().join("v.log");
        let mut w = StagingWriter::create(&log, g).unwrap();
        let a = vec![5u8; 4096];
        w.append(0, &ChunkHash::of(&a), 4096, Some(&a)).unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&log).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&log, bytes).unwrap();
        let replica = dir.path().join("r.img");
        std::fs::write(&replica, vec![1u8; 4096]).unwrap();
        let err = apply(&log, &replica).unwrap_err();
        assert!(format!("{err:#}").contains("does not match its hash"));
        assert_eq!(std::fs::read(&replica).unwrap(), vec![1u8; 4096]);
    }
}
