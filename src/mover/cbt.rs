//! Changed block tracking for a mover: the Kubernetes SnapshotMetadata API
//! (`GetMetadataDelta` between the base gen's snapshot and this one, or
//! `GetMetadataAllocated` without a base) over gRPC with TLS, as the CSI driver's
//! `external-snapshot-metadata` sidecar serves it, read into a [`Narrow`]; and the check
//! that keeps the hash index the truth: a sample of the chunks the answer leaves out is
//! read and compared with what they should be (the base hash, or zeros). Any error, a list
//! that breaks the API's rules, or one sampled chunk that differs, and the mover scans the
//! whole device instead, saying why.
//!
//! The messages are the API's (`proto/schema.proto` of kubernetes-csi/
//! external-snapshot-metadata, with `base_snapshot_id`, the CSI handle, as of v0.2),
//! written out with prost's derive so no protoc runs at build time.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

use crate::engine::chunk::{is_zero, zero_hash, Geometry};
use crate::engine::narrow::{sample, Narrow, RangeSet, Unlisted};
use crate::ids::ChunkHash;

/// What the daemon tells a mover about its driver's SnapshotMetadata service.
#[derive(Debug, Clone)]
pub struct CbtJob {
    /// HOST:PORT, as the SnapshotMetadataService names it.
    pub address: String,
    /// The service's CA bundle (PEM).
    pub ca_pem: Vec<u8>,
    /// The audience-scoped ServiceAccount token (a projected volume's file).
    pub token_file: PathBuf,
    /// The target snapshot: a VolumeSnapshot in `namespace` (the movers' own copy).
    pub namespace: String,
    pub snapshot: String,
    /// The base gen's snapshot handle: a delta against it; none: the allocated ranges.
    pub base_id: Option<String>,
    /// The share of the chunks an answer leaves out that are read anyway (at least
    /// [`MIN_SAMPLE`] of them).
    pub sample: f64,
}

/// Chunks read to check an answer, whatever `sample` says (all of them when fewer).
pub const MIN_SAMPLE: u64 = 32;

/// Decodes the `caCert` of a SnapshotMetadataService (base64 of PEM, as the CRD stores
/// bytes).
pub fn decode_ca(b64: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("the SnapshotMetadataService caCert is not base64")
}

pub mod proto {
    //! The SnapshotMetadata API's messages.

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct BlockMetadata {
        #[prost(int64, tag = "1")]
        pub byte_offset: i64,
        #[prost(int64, tag = "2")]
        pub size_bytes: i64,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct GetMetadataAllocatedRequest {
        #[prost(string, tag = "1")]
        pub security_token: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub snapshot_name: String,
        #[prost(int64, tag = "4")]
        pub starting_offset: i64,
        #[prost(int32, tag = "5")]
        pub max_results: i32,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct GetMetadataDeltaRequest {
        #[prost(string, tag = "1")]
        pub security_token: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        /// The base snapshot's CSI handle.
        #[prost(string, tag = "3")]
        pub base_snapshot_id: String,
        #[prost(string, tag = "4")]
        pub target_snapshot_name: String,
        #[prost(int64, tag = "5")]
        pub starting_offset: i64,
        #[prost(int32, tag = "6")]
        pub max_results: i32,
    }

    /// The response of both calls (the same fields and tags).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct MetadataResponse {
        #[prost(int32, tag = "1")]
        pub block_metadata_type: i32,
        #[prost(int64, tag = "2")]
        pub volume_capacity_bytes: i64,
        #[prost(message, repeated, tag = "3")]
        pub block_metadata: Vec<BlockMetadata>,
    }

    pub const SERVICE: &str = "snapshotmetadata.SnapshotMetadata";
    pub const ALLOCATED: &str = "/snapshotmetadata.SnapshotMetadata/GetMetadataAllocated";
    pub const DELTA: &str = "/snapshotmetadata.SnapshotMetadata/GetMetadataDelta";
}

/// What the service said, and what reading it cost.
#[derive(Debug)]
pub struct Answer {
    pub narrow: Narrow,
    pub ranges: u64,
    pub bytes: u64,
}

/// Asks the service for the ranges of the snapshot (a delta against `base_id`, or the
/// allocated ones) and reads them into a chunk set for `geometry`.
pub async fn ask(job: &CbtJob, geometry: Geometry) -> Result<Answer> {
    let token = std::fs::read_to_string(&job.token_file)
        .with_context(|| format!("read the CBT token {}", job.token_file.display()))?;
    let (host, _) = job.address.rsplit_once(':').ok_or_else(|| {
        anyhow!(
            "SnapshotMetadata address {:?}: expected HOST:PORT",
            job.address
        )
    })?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&job.ca_pem))
        .domain_name(host.trim_matches(['[', ']']));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", job.address))
        .with_context(|| format!("SnapshotMetadata address {:?}", job.address))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connect to the SnapshotMetadata service at {}", job.address))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .with_context(|| format!("the SnapshotMetadata service at {}", job.address))?;
    let token = token.trim().to_string();
    let (mut stream, unlisted) = match &job.base_id {
        Some(base) => {
            let req = proto::GetMetadataDeltaRequest {
                security_token: token,
                namespace: job.namespace.clone(),
                base_snapshot_id: base.clone(),
                target_snapshot_name: job.snapshot.clone(),
                starting_offset: 0,
                max_results: 0,
            };
            let path = http::uri::PathAndQuery::from_static(proto::DELTA);
            let r = grpc
                .server_streaming(tonic::Request::new(req), path, codec())
                .await
                .map_err(|s| status_error("GetMetadataDelta", &s))?;
            (r.into_inner(), Unlisted::Base)
        }
        None => {
            let req = proto::GetMetadataAllocatedRequest {
                security_token: token,
                namespace: job.namespace.clone(),
                snapshot_name: job.snapshot.clone(),
                starting_offset: 0,
                max_results: 0,
            };
            let path = http::uri::PathAndQuery::from_static(proto::ALLOCATED);
            let r = grpc
                .server_streaming(tonic::Request::new(req), path, codec())
                .await
                .map_err(|s| status_error("GetMetadataAllocated", &s))?;
            (r.into_inner(), Unlisted::Zero)
        }
    };
    let mut set: Option<RangeSet> = None;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| status_error("the metadata stream", &s))?
    {
        let cap = u64::try_from(msg.volume_capacity_bytes).unwrap_or(0);
        let set = match &mut set {
            Some(s) => s,
            None => {
                if cap < geometry.size {
                    bail!(
                        "the SnapshotMetadata service says the volume holds {cap} bytes, fewer than the snapshot's {}",
                        geometry.size
                    );
                }
                set.insert(RangeSet::new(geometry, cap))
            }
        };
        for b in msg.block_metadata {
            set.push(b.byte_offset, b.size_bytes)?;
        }
    }
    let set = set.unwrap_or_else(|| RangeSet::new(geometry, geometry.size));
    let (ranges, bytes) = (set.ranges, set.bytes);
    Ok(Answer {
        narrow: set.finish(unlisted),
        ranges,
        bytes,
    })
}

/// Requests of type `Q`, answered by the metadata stream (both calls answer alike).
fn codec<Q>() -> tonic_prost::ProstCodec<Q, proto::MetadataResponse> {
    tonic_prost::ProstCodec::default()
}

fn status_error(call: &str, s: &tonic::Status) -> anyhow::Error {
    anyhow!("{call}: {:?}: {}", s.code(), s.message())
}

/// A chunk the answer left out that is not what the answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub chunk: u64,
    pub sampled: u64,
}

/// Reads the sampled unlisted chunks of `device` and compares each with what the answer
/// says it is: `base(i)`'s hash for a delta, zeros for the allocated ranges. A chunk the
/// base does not know cannot be checked and is skipped (the scan reads it anyway).
/// Returns the bytes read and the first mismatch.
pub fn check(
    device: &std::path::Path,
    geometry: Geometry,
    narrow: &Narrow,
    share: f64,
    seed: u64,
    mut base: impl FnMut(u64) -> Result<Option<ChunkHash>>,
) -> Result<(u64, Option<Mismatch>)> {
    let unlisted = geometry.chunk_count() - narrow.listed.len();
    let n = ((unlisted as f64 * share.clamp(0.0, 1.0)).ceil() as u64).max(MIN_SAMPLE);
    let picks = sample(narrow, geometry, n, seed);
    let f = File::open(device).with_context(|| format!("open {}", device.display()))?;
    let mut read = 0u64;
    let mut buf = Vec::new();
    for &i in &picks {
        let want = match narrow.unlisted {
            Unlisted::Zero => Some(zero_hash(geometry.len(i))),
            Unlisted::Base => base(i)?,
        };
        let Some(want) = want else { continue };
        buf.resize(geometry.len(i) as usize, 0);
        f.read_exact_at(&mut buf, geometry.offset(i))
            .with_context(|| format!("read {}", device.display()))?;
        read += buf.len() as u64;
        let got = if is_zero(&buf) {
            zero_hash(buf.len() as u32)
        } else {
            ChunkHash::of(&buf)
        };
        if got != want {
            return Ok((
                read,
                Some(Mismatch {
                    chunk: i,
                    sampled: picks.len() as u64,
                }),
            ));
        }
    }
    Ok((read, None))
}
