//! One volume arriving at the DR site, from `Begin` to `End`, as a pure machine: chunks in
//! index order within the volume, each verified against its hash before anything is
//! staged (a patch over the replica's chunk), unsent chunks taken from the base index, and
//! the new index and root built on the way. The root must equal the primary's at `End`.
//!
//! The base index, the replica's chunks and the index writer are given, so the rules are
//! tested with in-memory ones; the staging shell supplies RocksDB and the replica file.

use std::borrow::Cow;

use crate::engine::chunk::{zero_hash, Geometry, RootHasher};
use crate::engine::diff::BaseCursor;
use crate::engine::index::{Segment, SegmentBuilder};
use crate::engine::verify;
use crate::ids::{ChunkHash, VolumeName};
use crate::net::wire::Payload;
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::VolumeMsg;
use crate::store::VolumeRecord;

/// The replica's bytes of a chunk, which a block patch completes.
pub trait ReplicaChunks {
    /// `None` when this site has no replica to read.
    fn chunk(&self, offset: u64, len: u32) -> Option<std::io::Result<Vec<u8>>>;
    /// The replica is written elsewhere (a CSI replica PVC, by its writer Job), which
    /// checks each patch against its chunk hash before it writes it; a patch is staged
    /// with only its blocks checked here.
    fn patched_by_writer(&self) -> bool {
        false
    }
}

impl ReplicaChunks for Option<std::fs::File> {
    fn chunk(&self, offset: u64, len: u32) -> Option<std::io::Result<Vec<u8>>> {
        self.as_ref()
            .map(|f| crate::volume::replica::read_chunk(f, offset, len))
    }
}

/// A verified chunk, as it is kept until the group commit.
#[derive(Debug, PartialEq)]
pub enum Verified<'a> {
    Data(Cow<'a, [u8]>),
    Zero,
    /// Block bitmap and blocks over the replica's chunk.
    Patch(&'a [u8], Cow<'a, [u8]>),
}

/// What the shell does with one message.
#[derive(Debug, PartialEq)]
pub enum Step<'a> {
    /// Stage this verified chunk (and reserve its replica blocks).
    Stage {
        index: u64,
        hash: ChunkHash,
        len: u32,
        chunk: Verified<'a>,
    },
    /// Stage `count` zero chunks from `first` (their hashes are in the index already).
    StageZeros { first: u64, count: u64 },
    /// The volume is complete and its root matches.
    Done(VolumeRecord),
}

pub struct Intake<I> {
    volume: VolumeName,
    geometry: Geometry,
    base: BaseCursor<I>,
    next: u64,
    builder: SegmentBuilder,
    root: RootHasher,
}

impl<I> Intake<I>
where
    I: Iterator<Item = anyhow::Result<(u64, Segment)>>,
{
    pub fn new(volume: VolumeName, geometry: Geometry, base: I) -> Self {
        Intake {
            volume,
            geometry,
            base: BaseCursor::new(base),
            next: 0,
            builder: SegmentBuilder::default(),
            root: RootHasher::new(geometry),
        }
    }

    fn protocol(&self, what: String) -> ReceiveError {
        ReceiveError::protocol(format!("volume {}: {what}", self.volume))
    }

    /// Index and root take the hashes of chunks `next..upto` from the base.
    fn fill(
        &mut self,
        upto: u64,
        put: &mut impl FnMut(u64, Segment) -> anyhow::Result<()>,
    ) -> Result<(), ReceiveError> {
        let count = self.geometry.chunk_count();
        if upto < self.next || upto > count {
            return Err(self.protocol(format!(
                "chunk {upto} is out of order or beyond its {count} chunks"
            )));
        }
        for j in self.next..upto {
            let h = self
                .base
                .hash_at(j)
                .map_err(ReceiveError::store)?
                .ok_or_else(|| {
                    self.protocol(format!("chunk {j} was neither sent nor in the base index"))
                })?;
            self.push(h, put)?;
        }
        self.next = upto;
        Ok(())
    }

    fn push(
        &mut self,
        h: ChunkHash,
        put: &mut impl FnMut(u64, Segment) -> anyhow::Result<()>,
    ) -> Result<(), ReceiveError> {
        self.root.push(&h);
        if let Some((no, seg)) = self.builder.push(h) {
            put(no, seg).map_err(ReceiveError::store)?;
        }
        Ok(())
    }

    /// The next message of the volume. `put` receives each finished index segment.
    pub fn handle<'m>(
        &mut self,
        msg: &'m VolumeMsg,
        replica: &impl ReplicaChunks,
        put: &mut impl FnMut(u64, Segment) -> anyhow::Result<()>,
    ) -> Result<Step<'m>, ReceiveError> {
        match msg {
            VolumeMsg::Chunk {
                index,
                hash,
                payload,
            } => {
                let (index, hash) = (*index, *hash);
                self.fill(index, put)?;
                let count = self.geometry.chunk_count();
                if index == count {
                    return Err(
                        self.protocol(format!("chunk {index} is beyond its {count} chunks"))
                    );
                }
                let len = self.geometry.len(index);
                let chunk = self.verify(index, &hash, len, payload, replica)?;
                self.push(hash, put)?;
                self.next = index + 1;
                Ok(Step::Stage {
                    index,
                    hash,
                    len,
                    chunk,
                })
            }
            VolumeMsg::ZeroRun { first, count } => {
                let (first, count) = (*first, *count);
                let chunks = self.geometry.chunk_count();
                let end = first
                    .checked_add(count)
                    .filter(|&e| count > 0 && e <= chunks)
                    .ok_or_else(|| {
                        self.protocol(format!(
                            "zero run of {count} chunks from {first} is empty or beyond its {chunks} chunks"
                        ))
                    })?;
                self.fill(first, put)?;
                for i in first..end {
                    self.push(zero_hash(self.geometry.len(i)), put)?;
                }
                self.next = end;
                Ok(Step::StageZeros { first, count })
            }
            VolumeMsg::End {
                volume,
                chunk_count,
                root,
            } => {
                if volume != self.volume.as_str() {
                    return Err(ReceiveError::protocol(format!(
                        "unexpected End of volume {volume:?} while receiving volume {}",
                        self.volume
                    )));
                }
                self.fill(*chunk_count, put)?;
                if let Some((no, seg)) = std::mem::take(&mut self.builder).finish() {
                    put(no, seg).map_err(ReceiveError::store)?;
                }
                let got = self.root.finish();
                if got != *root {
                    return Err(ReceiveError::corrupt(format!(
                        "volume {}: root {} differs from the primary's {}; the replica would not equal the snapshot, so nothing was applied",
                        self.volume,
                        got.short(),
                        root.short()
                    )));
                }
                Ok(Step::Done(VolumeRecord {
                    size: self.geometry.size,
                    chunk_size: self.geometry.chunk_size,
                    root: got,
                }))
            }
        }
    }

    fn verify<'m>(
        &self,
        index: u64,
        hash: &ChunkHash,
        len: u32,
        payload: &'m Payload,
        replica: &impl ReplicaChunks,
    ) -> Result<Verified<'m>, ReceiveError> {
        let rejected = |r| ReceiveError::rejected(self.volume.as_str(), r);
        Ok(match payload {
            Payload::Data(b) => {
                verify::data(index, hash, len, b).map_err(rejected)?;
                Verified::Data(Cow::Borrowed(&b[..]))
            }
            Payload::Zstd(z) => Verified::Data(Cow::Owned(
                verify::compressed(index, hash, len, z).map_err(rejected)?,
            )),
            Payload::Zero => {
                verify::zero(index, hash, len).map_err(rejected)?;
                Verified::Zero
            }
            Payload::Patch { mask, data } | Payload::PatchZstd { mask, data } => {
                let compressed = matches!(payload, Payload::PatchZstd { .. });
                let blocks =
                    verify::patch_data(index, len, mask, data, compressed).map_err(rejected)?;
                let Some(chunk) = replica.chunk(self.geometry.offset(index), len) else {
                    if replica.patched_by_writer() {
                        return Ok(Verified::Patch(&mask[..], blocks));
                    }
                    return Err(rejected(verify::Rejected::Patch {
                        index,
                        reason: "this site has no replica to patch".into(),
                    }));
                };
                let mut chunk = chunk.map_err(|e| {
                    ReceiveError::io(anyhow::Error::new(e).context(format!(
                        "volume {}: read replica chunk {index}",
                        self.volume
                    )))
                })?;
                verify::patch(index, hash, &mut chunk, mask, &blocks).map_err(rejected)?;
                Verified::Patch(&mask[..], blocks)
            }
        })
    }
}
