//! The primary's group snapshots in local mode: every volume of the group is snapshotted
//! between the protection's pre and post commands, by reflink (FICLONE) where the file
//! system shares extents, else by a sparse copy. The method used is reported per volume.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::config::{Protection, SnapshotMode};
use crate::engine::chunk::is_zero;
use crate::engine::scan::volume_size;
use crate::ids::{now_ms, Gen, VolumeName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Reflink,
    Copy,
    /// A CSI snapshot, moved by a mover Job (Kubernetes mode).
    Csi,
}

#[derive(Debug, Clone)]
pub struct VolumeSnapshot {
    pub name: VolumeName,
    pub path: PathBuf,
    pub size: u64,
    pub method: Method,
}

#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    pub gen: Gen,
    pub taken_at_ms: u64,
    pub volumes: Vec<VolumeSnapshot>,
    /// First pre command start to last post command end.
    pub freeze: Duration,
}

pub fn gen_dir(prot: &Protection, gen: Gen) -> PathBuf {
    prot.snapshot_dir
        .join(prot.name.as_str())
        .join(gen.0.to_string())
}

/// Takes the group snapshot of `prot` as `gen` inside `rules` (pre rules, the snapshot of
/// every volume, post rules); `report` gets the freeze window and failed actions either way.
pub async fn take(
    prot: &Protection,
    gen: Gen,
    rules: &crate::rules::run::Rules,
    report: &mut crate::rules::run::FreezeReport,
) -> Result<GroupSnapshot, crate::rules::run::Barrier> {
    let dir = gen_dir(prot, gen);
    let vols = prot.volumes.clone();
    let mode = prot.snapshot;
    let body = async move {
        let taken_at_ms = now_ms();
        let volumes = tokio::task::spawn_blocking(move || -> Result<Vec<VolumeSnapshot>> {
            if dir.exists() {
                fs::remove_dir_all(&dir)
                    .with_context(|| format!("clear stale {}", dir.display()))?;
            }
            super::create_private_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
            vols.iter()
                .map(|v| {
                    let dest = dir.join(v.name.as_str());
                    let (size, method) =
                        snapshot_volume(&v.path, &dest, mode).with_context(|| {
                            format!("snapshot volume {} ({})", v.name, v.path.display())
                        })?;
                    Ok(VolumeSnapshot {
                        name: v.name.clone(),
                        path: dest,
                        size,
                        method,
                    })
                })
                .collect()
        })
        .await
        .context("snapshot task")??;
        Ok((taken_at_ms, volumes))
    };
    let (taken_at_ms, volumes) = rules.around(body, report).await?;
    Ok(GroupSnapshot {
        gen,
        taken_at_ms,
        volumes,
        freeze: report.freeze,
    })
}

/// Removes snapshot gens of `prot` other than `keep`.
pub fn prune(prot: &Protection, keep: &[Gen]) -> Result<()> {
    remove(stale(prot, keep))
}

/// Snapshot gen directories of `prot` other than `keep`.
pub fn stale(prot: &Protection, keep: &[Gen]) -> Vec<PathBuf> {
    let root = prot.snapshot_dir.join(prot.name.as_str());
    let Ok(entries) = fs::read_dir(&root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|g| !keep.contains(&Gen(g)))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes snapshot directories (on XFS, freeing a fragmented reflink copy can take a
/// while, so callers may do it off the cycle's path).
pub fn remove(dirs: Vec<PathBuf>) -> Result<()> {
    for d in dirs {
        fs::remove_dir_all(&d).with_context(|| format!("remove old snapshot {}", d.display()))?;
    }
    Ok(())
}

const FICLONE: libc::c_ulong = 0x4004_9409;

pub(crate) fn reflink(src: &File, dest: &File) -> std::io::Result<()> {
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Snapshots one volume to `dest`; returns its size and the method used.
pub fn snapshot_volume(src: &Path, dest: &Path, mode: SnapshotMode) -> Result<(u64, Method)> {
    let s = open_volume(src)?;
    let size = volume_size(&s).with_context(|| format!("size of {}", src.display()))?;
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .with_context(|| format!("create snapshot {}", dest.display()))?;
    if mode != SnapshotMode::Copy && s.metadata()?.is_file() {
        match reflink(&s, &d) {
            Ok(()) => return Ok((size, Method::Reflink)),
            Err(e) if mode == SnapshotMode::Reflink => bail!(
                "reflink of {} failed ({e}); snapshot = \"reflink\" needs XFS or btrfs with the snapshot_dir on the same file system, or set snapshot = \"auto\"",
                src.display()
            ),
            Err(_) => {}
        }
    } else if mode == SnapshotMode::Reflink {
        bail!(
            "{} is not a regular file; snapshot = \"reflink\" works only for files",
            src.display()
        );
    }
    sparse_copy(&s, &d, size)?;
    Ok((size, Method::Copy))
}

/// Opens a volume for reading: a regular file or a block device. Opened without blocking,
/// so a FIFO (or anything else) in its place fails at once, by name, instead of hanging
/// the cycle; a symlink to `/dev/null` is a character device and is refused too.
pub fn open_volume(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let ft = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .file_type();
    if !(ft.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&ft)) {
        bail!(
            "{} is {}; a volume is a regular file or a block device",
            path.display(),
            crate::volume::stamp::kind_name(&ft)
        );
    }
    Ok(f)
}

/// Copies `size` bytes, leaving holes where the source reads as zeros. Only the source's
/// data ranges are read (SEEK_DATA / SEEK_HOLE), so a sparse volume costs what its data
/// costs, not its size; a source that cannot say (a block device) is read whole.
fn sparse_copy(src: &File, dest: &File, size: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let Some((start, end)) = next_data(src, at, size)? else {
            break;
        };
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)
                .with_context(|| format!("read source at byte {off}"))?;
            if !is_zero(&buf[..n]) {
                dest.write_all_at(&buf[..n], off)
                    .with_context(|| format!("write snapshot at byte {off}"))?;
            }
            off += n as u64;
        }
        at = end;
    }
    dest.set_len(size).context("size snapshot")?;
    Ok(())
}

/// The next range of `f` at or after `at` that may hold data, cut at `size`; None when
/// only holes follow. Where the file system or device cannot tell, everything may.
fn next_data(f: &File, at: u64, size: u64) -> Result<Option<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((at, size))),
            _ => Err(anyhow::Error::new(e).context(format!("find data after byte {at}"))),
        };
    }
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Ok(Some((data as u64, size)));
    }
    let (start, end) = ((data as u64).min(size), (hole as u64).min(size));
    Ok((start < end).then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_snapshot_is_byte_identical_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 3 << 20];
        data[5] = 1;
        data[(2 << 20) + 7] = 9;
        fs::write(&src, &data).unwrap();
        let dest = dir.path().join("snap");
        let (size, method) = snapshot_volume(&src, &dest, SnapshotMode::Copy).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(method, Method::Copy);
        assert_eq!(fs::read(&dest).unwrap(), data);
        // Auto falls back to copy where reflink is unsupported (and reflinks where it is).
        let (_, m) = snapshot_volume(&src, &dest, SnapshotMode::Auto).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), data, "method {m:?}");
    }

    /// Bytes this thread has read through read syscalls so far.
    fn thread_read_bytes() -> u64 {
        fs::read_to_string("/proc/thread-self/io")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_copy_snapshot_of_a_sparse_volume_reads_its_data_not_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("sparse");
        let f = File::create(&src).unwrap();
        let size = 1u64 << 30;
        f.set_len(size).unwrap();
        // 3 MiB of data in three places of a 1 GiB file.
        let mut want = Vec::new();
        for (i, off) in [0u64, 400 << 20, size - (1 << 20)].into_iter().enumerate() {
            let block = vec![i as u8 + 1; 1 << 20];
            f.write_all_at(&block, off).unwrap();
            want.push((off, block));
        }
        drop(f);
        let dest = dir.path().join("snap");
        let before = thread_read_bytes();
        let (got, method) = snapshot_volume(&src, &dest, SnapshotMode::Copy).unwrap();
        let read = thread_read_bytes() - before;
        assert_eq!((got, method), (size, Method::Copy));
        assert!(
            read < 16 << 20,
            "read {read} bytes of a 1 GiB volume holding 3 MiB"
        );
        let d = File::open(&dest).unwrap();
        assert_eq!(d.metadata().unwrap().len(), size);
        for (off, block) in want {
            let mut back = vec![0u8; block.len()];
            d.read_exact_at(&mut back, off).unwrap();
            assert_eq!(back, block, "at {off}");
        }
        // The holes read as zeros, and stay holes.
        let mut gap = vec![1u8; 1 << 20];
        d.read_exact_at(&mut gap, 200 << 20).unwrap();
        assert!(is_zero(&gap));
        use std::os::unix::fs::MetadataExt;
        assert!(d.metadata().unwrap().blocks() * 512 < 16 << 20);
    }
}
