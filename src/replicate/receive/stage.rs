//! Staging, on a blocking thread: each message of a volume goes through the
//! [`super::intake`] machine, and each verified chunk is written to the volume's staging
//! log (or, on a first full sync, to a fresh replica beside its path) after its replica
//! blocks are reserved, so a full disk fails the cycle before its group commit.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::sync::mpsc;

use super::intake::{Intake, ReplicaChunks, Step, Verified};
use crate::engine::chunk::Geometry;
use crate::failpoint;
use crate::ids::{ChunkHash, Gen, ProtectionName, VolumeName};
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::VolumeMsg;
use crate::store::{Store, VolumeRecord};
use crate::volume::replica::{FreshReplica, Reserver};
use crate::volume::staging::StagingWriter;

/// Where a volume's incoming chunks go.
pub struct Target {
    /// The staging log, or with `fresh` the new replica file.
    pub log: PathBuf,
    /// `None` for a CSI replica: a PVC the DR writer Job fills from the log, so there is
    /// nothing here to reserve blocks in or to read for patches.
    pub replica: Option<PathBuf>,
    pub fresh: bool,
    /// Staging stops before the staging file system has less free space than this.
    pub min_free: u64,
}

/// Free bytes on the file system holding `path`.
fn free_space(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Where verified chunks go: a staging log, or a fresh replica written in place.
enum Sink {
    Log(StagingWriter),
    Fresh(FreshReplica),
}

impl Sink {
    fn append(
        &mut self,
        geometry: Geometry,
        index: u64,
        hash: &ChunkHash,
        len: u32,
        chunk: &Verified,
    ) -> anyhow::Result<()> {
        match (self, chunk) {
            (Sink::Log(w), Verified::Data(b)) => w.append(index, hash, len, Some(b)),
            (Sink::Log(w), Verified::Zero) => w.append(index, hash, len, None),
            (Sink::Log(w), Verified::Patch(mask, data)) => {
                w.append_patch(index, hash, len, mask, data)
            }
            (Sink::Fresh(f), Verified::Data(b)) => f.write(geometry.offset(index), len, Some(b)),
            (Sink::Fresh(f), Verified::Zero) => f.write(geometry.offset(index), len, None),
            (Sink::Fresh(_), Verified::Patch(..)) => Err(anyhow::anyhow!(
                "chunk {index}: a patch cannot start a new replica"
            )),
        }
    }
    fn bytes(&self) -> u64 {
        match self {
            Sink::Log(w) => w.bytes,
            Sink::Fresh(f) => f.bytes,
        }
    }
    fn records(&self) -> u64 {
        match self {
            Sink::Log(w) => w.records,
            Sink::Fresh(f) => f.records,
        }
    }
    fn finish(self) -> anyhow::Result<PathBuf> {
        match self {
            Sink::Log(w) => w.finish(),
            Sink::Fresh(f) => f.finish(),
        }
    }
}

/// What patches are checked against: the replica file here, or (a CSI replica, no bytes
/// here) the writer Job that applies them.
enum Base {
    File(Option<std::fs::File>),
    Writer,
}

impl ReplicaChunks for Base {
    fn chunk(&self, offset: u64, len: u32) -> Option<std::io::Result<Vec<u8>>> {
        match self {
            Base::File(f) => f.chunk(offset, len),
            Base::Writer => None,
        }
    }
    fn patched_by_writer(&self) -> bool {
        matches!(self, Base::Writer)
    }
}

/// Stages one volume from `rx` until its `End`; returns its record at the new gen.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    store: &Store,
    prot: &ProtectionName,
    vol: &VolumeName,
    gen: Gen,
    base_gen: Gen,
    geometry: Geometry,
    target: &Target,
    mut rx: mpsc::Receiver<VolumeMsg>,
) -> Result<VolumeRecord, ReceiveError> {
    let mut intake = Intake::new(vol.clone(), geometry, store.index(prot, vol, base_gen));
    // A fresh replica's blocks are written, not promised (no reservation), and it has no
    // old chunks for patches; a staged volume patches the replica as it is (the
    // consistent point) and reserves the blocks it will write.
    let (mut sink, base, mut reserver) = match &target.replica {
        Some(replica) if target.fresh => {
            let fresh = FreshReplica::create(replica, geometry.size).map_err(ReceiveError::io)?;
            (Sink::Fresh(fresh), Base::File(None), Reserver::none())
        }
        _ => {
            let log = StagingWriter::create(&target.log, geometry).map_err(ReceiveError::io)?;
            let (base, reserver) = match &target.replica {
                Some(replica) => (
                    Base::File(std::fs::File::open(replica).ok()),
                    Reserver::open(replica).map_err(ReceiveError::io)?,
                ),
                None => (Base::Writer, Reserver::none()),
            };
            (Sink::Log(log), base, reserver)
        }
    };
    let staging_fs = target.log.parent().unwrap_or(&target.log).to_path_buf();
    let mut checked_at = 0u64;
    let failpoint_name = format!("dr-staging:{vol}");
    let mut put = |no, seg| store.write_segment(prot, vol, gen, no, &seg);
    while let Some(msg) = rx.blocking_recv() {
        match intake.handle(&msg, &base, &mut put)? {
            Step::Stage {
                index,
                hash,
                len,
                chunk,
            } => {
                // Reserve replica blocks now, so a full replica disk fails before the group
                // commit.
                if !matches!(chunk, Verified::Zero) {
                    reserver
                        .reserve(geometry.offset(index), len)
                        .with_context(|| {
                            let at = target.replica.as_deref().unwrap_or(Path::new(""));
                            format!("volume {vol}: replica {}", at.display())
                        })
                        .map_err(ReceiveError::io)?;
                }
                // Check the reserve every 8 MiB staged, before the disk is actually full.
                if target.min_free > 0 && sink.bytes() >= checked_at + (8 << 20) {
                    checked_at = sink.bytes();
                    let free = free_space(&staging_fs).map_err(ReceiveError::io)?;
                    if free < target.min_free {
                        return Err(ReceiveError::io(anyhow::anyhow!(
                            "staging stopped: {} has {free} bytes free, below min_free_space ({} bytes); nothing of this gen was applied",
                            staging_fs.display(),
                            target.min_free
                        )));
                    }
                }
                sink.append(geometry, index, &hash, len, &chunk)
                    .map_err(ReceiveError::io)?;
                if sink.records() == 1 {
                    failpoint::hit(&failpoint_name);
                }
            }
            Step::StageZeros { first, count } => {
                for index in first..first + count {
                    let len = geometry.len(index);
                    let hash = crate::engine::chunk::zero_hash(len);
                    sink.append(geometry, index, &hash, len, &Verified::Zero)
                        .map_err(ReceiveError::io)?;
                }
            }
            Step::Done(record) => {
                sink.finish().map_err(ReceiveError::io)?;
                return Ok(record);
            }
        }
    }
    Err(ReceiveError::link(anyhow::anyhow!(
        "volume {vol}: the stream ended before End"
    )))
}
