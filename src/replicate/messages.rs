//! The messages of each stream, typed by where they may appear. The wire has one enum
//! ([`Msg`]); each state of a stream accepts a few of its variants. They are converted here,
//! once, so a machine's `handle` matches only what can arrive in its state and anything
//! else is refused in one place with what was expected.

use serde_bytes::ByteBuf;

use crate::ids::{ChunkHash, Epoch, Gen, Point};
use crate::net::wire::{Msg, Payload, Refusal, VolumeMeta};

/// What the unexpected message was: its kind, for the error.
pub type Unexpected = &'static str;

/// The first message of a stream opened by the primary.
#[derive(Debug, Clone, PartialEq)]
pub enum Opening {
    /// A cycle of `protection`, by a primary at `epoch`.
    Prepare { protection: String, epoch: Epoch },
    /// A refinement stream for one volume of a running cycle.
    Refine {
        protection: String,
        volume: String,
        size: u64,
        chunk_size: u32,
    },
    /// A mover's stream of one volume of a running cycle.
    Join {
        protection: String,
        cycle: crate::ids::CycleId,
        volume: String,
        chunk_size: u32,
    },
    /// A DR writer's request for a committed gen's staging log of one volume.
    Fetch {
        protection: String,
        gen: crate::ids::Gen,
        volume: String,
    },
    /// The peer's failback request (see [`Msg::Failback`]).
    Failback { protection: String },
    /// A DR reader's hashes of one replica, for a verify of consistent gen `gen`.
    Verify {
        protection: String,
        gen: crate::ids::Gen,
        volume: String,
    },
}

impl TryFrom<Msg> for Opening {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::Prepare { protection, epoch } => Ok(Opening::Prepare { protection, epoch }),
            Msg::RefineOpen {
                protection,
                volume,
                size,
                chunk_size,
            } => Ok(Opening::Refine {
                protection,
                volume,
                size,
                chunk_size,
            }),
            Msg::Join {
                protection,
                cycle,
                volume,
                chunk_size,
            } => Ok(Opening::Join {
                protection,
                cycle,
                volume,
                chunk_size,
            }),
            Msg::Fetch {
                protection,
                gen,
                volume,
            } => Ok(Opening::Fetch {
                protection,
                gen,
                volume,
            }),
            Msg::Failback { protection } => Ok(Opening::Failback { protection }),
            Msg::VerifyOpen {
                protection,
                gen,
                volume,
            } => Ok(Opening::Verify {
                protection,
                gen,
                volume,
            }),
            other => Err(other.kind()),
        }
    }
}

/// The primary's plan for the gen, after `Prepared`.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleStart {
    pub point: Point,
    pub base: Option<Point>,
    pub volumes: Vec<VolumeMeta>,
}

impl TryFrom<Msg> for CycleStart {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::Cycle {
                point,
                base,
                volumes,
            } => Ok(CycleStart {
                point,
                base,
                volumes,
            }),
            other => Err(other.kind()),
        }
    }
}

/// Between `Cycle` and `Commit`, outside a volume's chunks.
#[derive(Debug, Clone, PartialEq)]
pub enum CycleMsg {
    HashRequest {
        volume: String,
        chunk_size: u32,
    },
    Begin {
        volume: String,
        size: u64,
        chunk_size: u32,
    },
    Manifests(Vec<u8>),
    Commit(Gen),
}

impl TryFrom<Msg> for CycleMsg {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::HashRequest { volume, chunk_size } => {
                Ok(CycleMsg::HashRequest { volume, chunk_size })
            }
            Msg::Begin {
                volume,
                size,
                chunk_size,
            } => Ok(CycleMsg::Begin {
                volume,
                size,
                chunk_size,
            }),
            Msg::Manifests { bundle } => Ok(CycleMsg::Manifests(bundle.into_vec())),
            Msg::Commit { gen } => Ok(CycleMsg::Commit(gen)),
            other => Err(other.kind()),
        }
    }
}

/// Between a volume's `Begin` and its `End`.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumeMsg {
    Chunk {
        index: u64,
        hash: ChunkHash,
        payload: Payload,
    },
    End {
        volume: String,
        chunk_count: u64,
        root: ChunkHash,
    },
    ZeroRun {
        first: u64,
        count: u64,
    },
}

impl TryFrom<Msg> for VolumeMsg {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::Chunk {
                index,
                hash,
                payload,
            } => Ok(VolumeMsg::Chunk {
                index,
                hash,
                payload,
            }),
            Msg::End {
                volume,
                chunk_count,
                root,
            } => Ok(VolumeMsg::End {
                volume,
                chunk_count,
                root,
            }),
            Msg::ZeroRun { first, count } => Ok(VolumeMsg::ZeroRun { first, count }),
            other => Err(other.kind()),
        }
    }
}

/// The DR site's answer to `Prepare`.
#[derive(Debug, Clone, PartialEq)]
pub enum PrepareAnswer {
    Prepared {
        epoch: Epoch,
        point: Option<Point>,
        repair: Vec<String>,
    },
    Refused(Refusal),
}

impl TryFrom<Msg> for PrepareAnswer {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::Prepared {
                epoch,
                point,
                repair,
            } => Ok(PrepareAnswer::Prepared {
                epoch,
                point,
                repair,
            }),
            Msg::Refused(r) => Ok(PrepareAnswer::Refused(r)),
            other => Err(other.kind()),
        }
    }
}

/// The DR site's answer to `Commit`.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitAnswer {
    Committed(Point),
    Refused(Refusal),
}

impl TryFrom<Msg> for CommitAnswer {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::Committed { point } => Ok(CommitAnswer::Committed(point)),
            Msg::Refused(r) => Ok(CommitAnswer::Refused(r)),
            other => Err(other.kind()),
        }
    }
}

/// The DR site's answer to a `HashRequest`, one message at a time.
#[derive(Debug, Clone, PartialEq)]
pub enum HashAnswer {
    Segment { segment: u64, packed: ByteBuf },
    End { volume: String },
    Refused(Refusal),
}

impl TryFrom<Msg> for HashAnswer {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::HashSegment { segment, packed } => Ok(HashAnswer::Segment { segment, packed }),
            Msg::HashEnd { volume, .. } => Ok(HashAnswer::End { volume }),
            Msg::Refused(r) => Ok(HashAnswer::Refused(r)),
            other => Err(other.kind()),
        }
    }
}

/// The DR site's answer to a `BlockHashRequest`.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockAnswer {
    Hashes { index: u64, packed: ByteBuf },
    Refused(Refusal),
}

impl TryFrom<Msg> for BlockAnswer {
    type Error = Unexpected;
    fn try_from(m: Msg) -> Result<Self, Unexpected> {
        match m {
            Msg::BlockHashes { index, packed } => Ok(BlockAnswer::Hashes { index, packed }),
            Msg::Refused(r) => Ok(BlockAnswer::Refused(r)),
            other => Err(other.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stream_state_takes_only_its_messages() {
        let commit = Msg::Commit { gen: Gen(3) };
        assert_eq!(
            CycleMsg::try_from(commit.clone()),
            Ok(CycleMsg::Commit(Gen(3)))
        );
        assert_eq!(VolumeMsg::try_from(commit.clone()), Err("Commit"));
        assert_eq!(Opening::try_from(commit.clone()), Err("Commit"));
        assert_eq!(CommitAnswer::try_from(commit), Err("Commit"));
        let refused = Msg::Refused(Refusal::Busy);
        assert_eq!(
            PrepareAnswer::try_from(refused.clone()),
            Ok(PrepareAnswer::Refused(Refusal::Busy))
        );
        assert_eq!(CycleMsg::try_from(refused), Err("Refused"));
    }
}
