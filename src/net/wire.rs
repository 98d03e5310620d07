//! The wire protocol: message types, a versioned hello, and length-limited framing.
//!
//! A frame is a 4-byte big-endian length followed by one bincode-encoded [`Msg`]. The codec
//! is pure; [`FrameReader`] and [`FrameWriter`] wire it to QUIC streams.
//!
//! One connection per pair. The first stream carries `Hello`/`HelloAck`. Each cycle opens a
//! stream: `Prepare` → `Prepared | Refused`, then `Cycle`, and per volume an optional
//! `HashRequest` (answered by `HashSegment`s and `HashEnd`), then `Begin`, `Chunk`s in
//! index order and `End`; finally `Commit` → `Committed | Refused`.
//!
//! Sub-chunk refinement runs beside a volume's transfer on a stream of its own, so the
//! chunk stream never waits on it: `RefineOpen`, then `BlockHashRequest`s, each answered in
//! order by `BlockHashes` (empty when the DR site cannot read that chunk).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::engine::chunk::MAX_CHUNK_SIZE;
use crate::ids::{ChunkHash, CycleId, Epoch, Gen, Point};
use crate::net::limit::RateLimit;

/// ALPN of the replication protocol; a client offering anything else gets no connection.
pub const ALPN: &[u8] = b"lifeboat/1";
/// Bumped on any incompatible change of [`Msg`].
pub const PROTOCOL_VERSION: u32 = 5;
/// The largest frame: one chunk at the largest chunk size plus its header.
pub const MAX_FRAME: usize = MAX_CHUNK_SIZE as usize + 4096;

const CONFIG: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
> = bincode::config::standard()
    .with_big_endian()
    .with_limit::<MAX_FRAME>();

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// All-zero chunk or hole: the receiver writes zeros (or punches a hole).
    Zero,
    Data(ByteBuf),
    /// The chunk compressed with zstd; the hash is of the raw bytes.
    Zstd(ByteBuf),
    /// The blocks that differ from the DR site's replica (see [`crate::engine::refine`]);
    /// the hash is of the whole new chunk.
    Patch {
        mask: ByteBuf,
        data: ByteBuf,
    },
    /// A patch whose block data is zstd-compressed.
    PatchZstd {
        mask: ByteBuf,
        data: ByteBuf,
    },
}

/// Why a receiver will not take a cycle. Each is a different action for the sender.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the DR site is at epoch {theirs} and this site at epoch {ours}: the DR site failed over; this site is fenced and stops replicating")]
    StaleEpoch { ours: Epoch, theirs: Epoch },
    #[error("the DR site has failed over this protection (epoch {epoch}, recovered gen {}) and accepts no replication", gen.map_or("none".to_string(), |g| g.to_string()))]
    FailedOver { epoch: Epoch, gen: Option<Gen> },
    #[error("the DR site has no protection named {0:?}")]
    UnknownProtection(String),
    #[error("the DR site's protection has no volume named {0:?} (its volumes: {1})")]
    UnknownVolume(String, String),
    #[error("the cycle's base {sent:?} is not the DR site's consistent point {have:?}")]
    BaseMismatch {
        sent: Option<Point>,
        have: Option<Point>,
    },
    #[error("the DR site is busy with another cycle of this protection")]
    Busy,
    #[error("the DR site rejected the stream: {0}")]
    Invalid(String),
    #[error("the DR site could not store the cycle: {0}")]
    Storage(String),
    /// Replicas changed outside lifeboat; the DR site repairs them on the next cycle.
    #[error("the DR site found its replicas changed outside lifeboat: {0}; the next cycle repairs them by hash exchange")]
    ReplicaDamaged(String),
    /// The connecting site is not the one this site pairs with.
    #[error("{0}")]
    WrongPeer(String),
    /// This site sends the protection itself (it has not recorded a failback the peer
    /// believes in, or never had one): not a fence.
    #[error("{0}")]
    NotReceiving(String),
    /// A failback this site cannot take, and why.
    #[error("{0}")]
    NoFailback(String),
}

/// The role a site says it plays in the hello: two primaries (or two DR sites) configured
/// by mistake find out at once.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRole {
    Primary,
    Dr,
}

impl std::fmt::Display for SiteRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SiteRole::Primary => "primary",
            SiteRole::Dr => "dr",
        })
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        version: u32,
        site: String,
        role: SiteRole,
    },
    HelloAck {
        version: u32,
        site: String,
        role: SiteRole,
    },
    Prepare {
        protection: String,
        epoch: Epoch,
    },
    Prepared {
        epoch: Epoch,
        point: Option<Point>,
        /// Volumes whose replicas this site is repairing: the primary exchanges their
        /// hashes instead of diffing against its base.
        repair: Vec<String>,
    },
    Refused(Refusal),
    Cycle {
        point: Point,
        base: Option<Point>,
        volumes: Vec<VolumeMeta>,
    },
    /// Resync: the sender asks for the receiver's hashes of a replica.
    HashRequest {
        volume: String,
        chunk_size: u32,
    },
    HashSegment {
        segment: u64,
        packed: ByteBuf,
    },
    HashEnd {
        volume: String,
        chunk_count: u64,
    },
    Begin {
        volume: String,
        size: u64,
        chunk_size: u32,
    },
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
    /// `count` consecutive all-zero chunks (or holes) from `first`: one frame for a run, so
    /// a sparse volume's wire bytes grow with its data, not its size. Each chunk's hash is
    /// the hash of its length in zeros.
    ZeroRun {
        first: u64,
        count: u64,
    },
    Commit {
        gen: Gen,
    },
    /// Kubernetes mode: the gen's manifest bundle, sent before `Commit`; it commits with
    /// the gen's data.
    Manifests {
        bundle: ByteBuf,
    },
    /// Opens a refinement stream for one volume of a running cycle.
    RefineOpen {
        protection: String,
        volume: String,
        size: u64,
        chunk_size: u32,
    },
    BlockHashRequest {
        index: u64,
    },
    /// Packed 16-byte hashes of the replica's 4 KiB blocks of chunk `index`.
    BlockHashes {
        index: u64,
        packed: ByteBuf,
    },
    Committed {
        point: Point,
    },
    /// Kubernetes mode: a mover (a Job on the node its snapshot attaches to) joins the
    /// running cycle `cycle` of `protection` with one volume's stream: its hash request,
    /// then `Begin`, chunks and `End`, as the cycle stream would carry them.
    Join {
        protection: String,
        cycle: CycleId,
        volume: String,
        chunk_size: u32,
    },
    /// The DR site staged a joined volume durably: its mover may report success.
    Staged {
        volume: String,
        root: ChunkHash,
    },
    /// Kubernetes mode, DR site: a writer (a Job attaching the replica PVC, with the DR
    /// site's own certificate) asks its daemon for the staging log of `volume` of the
    /// committed gen `gen`.
    Fetch {
        protection: String,
        gen: Gen,
        volume: String,
    },
    /// Failback: the site that sent `protection` (fenced since the peer failed over) asks
    /// the peer to send it from now on. The peer answers `TurnedAround` or `Refused`.
    Failback {
        protection: String,
    },
    /// The failed-over site sends `protection` from now on, at `epoch`; `gen` is the gen it
    /// failed over at (the last one both sites had).
    TurnedAround {
        epoch: Epoch,
        gen: Option<Gen>,
    },
    /// The next bytes of the staging log.
    LogPart {
        bytes: ByteBuf,
    },
    /// The log ended after `bytes` bytes.
    LogEnd {
        bytes: u64,
    },
    /// Kubernetes mode, DR site: a reader Job (attaching the replica PVC read-only, with
    /// the DR site's own certificate) sends the hashes of the replica of `volume`, as
    /// `HashSegment`s then `HashEnd`, for its daemon's verify of consistent gen `gen`.
    VerifyOpen {
        protection: String,
        gen: Gen,
        volume: String,
    },
    /// The daemon compared `chunks` chunks with its index; `divergent` differ.
    Verified {
        chunks: u64,
        divergent: u64,
    },
}

impl Msg {
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::HelloAck { .. } => "HelloAck",
            Msg::Prepare { .. } => "Prepare",
            Msg::Prepared { .. } => "Prepared",
            Msg::Manifests { .. } => "Manifests",
            Msg::Refused(_) => "Refused",
            Msg::Cycle { .. } => "Cycle",
            Msg::HashRequest { .. } => "HashRequest",
            Msg::HashSegment { .. } => "HashSegment",
            Msg::HashEnd { .. } => "HashEnd",
            Msg::Begin { .. } => "Begin",
            Msg::Chunk { .. } => "Chunk",
            Msg::End { .. } => "End",
            Msg::ZeroRun { .. } => "ZeroRun",
            Msg::Commit { .. } => "Commit",
            Msg::Committed { .. } => "Committed",
            Msg::RefineOpen { .. } => "RefineOpen",
            Msg::BlockHashRequest { .. } => "BlockHashRequest",
            Msg::BlockHashes { .. } => "BlockHashes",
            Msg::Join { .. } => "Join",
            Msg::Staged { .. } => "Staged",
            Msg::Fetch { .. } => "Fetch",
            Msg::Failback { .. } => "Failback",
            Msg::TurnedAround { .. } => "TurnedAround",
            Msg::LogPart { .. } => "LogPart",
            Msg::LogEnd { .. } => "LogEnd",
            Msg::VerifyOpen { .. } => "VerifyOpen",
            Msg::Verified { .. } => "Verified",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame has {0} bytes after the message")]
    Trailing(usize),
    #[error("peer sent {got} where {expected} was expected")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("stream closed by the peer before {0}")]
    Closed(&'static str),
    #[error("stream: {0}")]
    Stream(String),
}

/// Appends one frame (length + message) to `out`.
pub fn encode_frame(msg: &Msg, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_std_write(msg, out, CONFIG)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(WireError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads a frame header; refuses lengths over the limit before allocating.
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes one message body (without the length header).
pub fn decode_body(body: &[u8]) -> Result<Msg, WireError> {
    let (msg, used) = bincode::serde::decode_from_slice::<Msg, _>(body, CONFIG)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(WireError::Trailing(body.len() - used));
    }
    Ok(msg)
}

/// Reads frames from a QUIC receive stream.
pub struct FrameReader {
    stream: quinn::RecvStream,
    buf: Vec<u8>,
    pub bytes: u64,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream) -> Self {
        FrameReader {
            stream,
            buf: Vec::new(),
            bytes: 0,
        }
    }

    /// The next message; `None` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Msg>, WireError> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(WireError::Stream(e.to_string())),
        }
        let len = frame_len(header)?;
        self.buf.resize(len, 0);
        self.stream
            .read_exact(&mut self.buf)
            .await
            .map_err(|e| WireError::Stream(e.to_string()))?;
        self.bytes += 4 + len as u64;
        decode_body(&self.buf).map(Some)
    }

    /// Tells the peer to stop sending on this stream (after a refusal).
    pub fn stop(&mut self) {
        let _ = self.stream.stop(0u32.into());
    }

    /// The next message, which must exist.
    pub async fn expect(&mut self, what: &'static str) -> Result<Msg, WireError> {
        self.next().await?.ok_or(WireError::Closed(what))
    }
}

/// Bytes of queued frames that trigger a write.
const CORK: usize = 256 << 10;

/// Writes frames to a QUIC send stream, reusing one buffer.
pub struct FrameWriter {
    stream: quinn::SendStream,
    buf: Vec<u8>,
    limit: Option<Arc<RateLimit>>,
    pub bytes: u64,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
        FrameWriter {
            stream,
            buf: Vec::new(),
            limit: None,
            bytes: 0,
        }
    }

    /// Holds every frame to the pair's bandwidth cap.
    pub fn with_limit(mut self, limit: Option<Arc<RateLimit>>) -> Self {
        self.limit = limit;
        self
    }

    /// Sends `msg` and everything queued before it.
    pub async fn send(&mut self, msg: &Msg) -> Result<u64, WireError> {
        let n = self.encode(msg)?;
        self.flush().await?;
        Ok(n)
    }

    /// Queues `msg` and sends once [`CORK`] bytes are queued: a stream of chunk frames
    /// goes out in large writes, which fill QUIC packets (compressed chunks end mid-packet)
    /// and wake the connection less often. [`FrameWriter::send`] and
    /// [`FrameWriter::flush`] send the rest; call one before waiting for an answer.
    pub async fn queue(&mut self, msg: &Msg) -> Result<u64, WireError> {
        let n = self.encode(msg)?;
        if self.buf.len() >= CORK {
            self.flush().await?;
        }
        Ok(n)
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(l) = &self.limit {
            l.take(self.buf.len() as u64).await;
        }
        let res = self.stream.write_all(&self.buf).await;
        self.buf.clear();
        res.map_err(|e| WireError::Stream(e.to_string()))
    }

    fn encode(&mut self, msg: &Msg) -> Result<u64, WireError> {
        let before = self.buf.len();
        encode_frame(msg, &mut self.buf)?;
        let n = (self.buf.len() - before) as u64;
        self.bytes += n;
        Ok(n)
    }

    pub fn finish(&mut self) {
        debug_assert!(self.buf.is_empty(), "finish with unsent frames");
        let _ = self.stream.finish();
    }
}
