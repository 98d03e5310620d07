//! A SnapshotMetadata service stand-in: the gRPC API a CSI driver's
//! `external-snapshot-metadata` sidecar serves (`snapshotmetadata.SnapshotMetadata`,
//! `GetMetadataAllocated` and `GetMetadataDelta`, server streaming, TLS), answered from
//! the cluster stand-in's backing files ([`super::cluster`]): the allocated ranges of a
//! snapshot file from SEEK_DATA/SEEK_HOLE, the delta between two from their extent maps
//! (FIEMAP: blocks of the target not sharing physical blocks with the base, unless a hole
//! in both), in 4 KiB blocks coalesced into VARIABLE_LENGTH ranges. It registers its
//! `SnapshotMetadataService` object (named after the driver, with address, audience and
//! CA) in the test API server.
//!
//! As the sidecar does, it authenticates the `security_token` (a token the kubelet
//! stand-in projected, with this service's audience: else UNAUTHENTICATED) and authorizes
//! its ServiceAccount to `get` the target VolumeSnapshot in the request's namespace with
//! the API server's RBAC (else PERMISSION_DENIED); a missing or unready snapshot is
//! NOT_FOUND / UNAVAILABLE, an unknown base handle INVALID_ARGUMENT. The messages are
//! written out here from the upstream `schema.proto`, apart from the client's.
//!
//! What it does not model: `starting_offset` and `max_results` (one message per 1024
//! ranges, from offset 0), FIXED_LENGTH answers, token expiry, and the sidecar's calls
//! to the driver (it reads the files itself). `Mode::Lie` makes it drop ranges from its
//! deltas, as a broken tracker would; `Mode::Fail` answers every call UNAVAILABLE.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde_json::json;
use tonic::{Request, Response, Status};

use super::cluster::Tokens;
use super::kubeapi::KubeApi;
use super::rbac::{request_info, User};

mod msg {
    //! From kubernetes-csi/external-snapshot-metadata `proto/schema.proto`.
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
    pub struct GetMetadataAllocatedResponse {
        #[prost(int32, tag = "1")]
        pub block_metadata_type: i32,
        #[prost(int64, tag = "2")]
        pub volume_capacity_bytes: i64,
        #[prost(message, repeated, tag = "3")]
        pub block_metadata: Vec<BlockMetadata>,
    }
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct GetMetadataDeltaRequest {
        #[prost(string, tag = "1")]
        pub security_token: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub base_snapshot_id: String,
        #[prost(string, tag = "4")]
        pub target_snapshot_name: String,
        #[prost(int64, tag = "5")]
        pub starting_offset: i64,
        #[prost(int32, tag = "6")]
        pub max_results: i32,
    }
    pub type GetMetadataDeltaResponse = GetMetadataAllocatedResponse;
    pub const VARIABLE_LENGTH: i32 = 2;
}

const BLOCK: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Honest,
    /// Deltas keep only their first range.
    Lie,
    /// Every call fails UNAVAILABLE.
    Fail,
}

/// One call as the service saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: &'static str,
    pub namespace: String,
    pub snapshot: String,
    pub base: Option<String>,
    /// The answer's ranges and bytes, or the refusal.
    pub result: Result<(u64, u64), String>,
}

pub struct MetadataService {
    pub address: SocketAddr,
    pub audience: String,
    pub mode: Arc<Mutex<Mode>>,
    pub calls: Arc<Mutex<Vec<Call>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    // Dropped after the server's thread ends: the API server's runtime must not be the
    // last one dropped inside the server's.
    _api: KubeApi,
}

impl Drop for MetadataService {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone)]
struct Svc {
    api: KubeApi,
    tokens: Tokens,
    audience: String,
    mode: Arc<Mutex<Mode>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl MetadataService {
    /// Serves on 127.0.0.1 and registers the driver's SnapshotMetadataService.
    pub fn start(api: &KubeApi, tokens: Tokens, driver: &str, audience: &str) -> MetadataService {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let svc = Svc {
            api: api.clone(),
            tokens,
            audience: audience.into(),
            mode: Arc::new(Mutex::new(Mode::Honest)),
            calls: Default::default(),
        };
        let (mode, calls) = (svc.mode.clone(), svc.calls.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(
                    tokio::net::TcpListener::from_std(listener).unwrap(),
                );
                let tls = tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
                tonic::transport::Server::builder()
                    .tls_config(tls)
                    .unwrap()
                    .serve_with_incoming_shutdown(svc, incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        api.add_type(
            "cbt.storage.k8s.io",
            "v1beta1",
            "SnapshotMetadataService",
            "snapshotmetadataservices",
            false,
        );
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(cert.cert.pem());
        api.seed(
            json!({"apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
            "metadata": {"name": driver},
            "spec": {"address": address.to_string(), "audience": audience, "caCert": ca}}),
        );
        MetadataService {
            address,
            audience: audience.into(),
            mode,
            calls,
            stop: Some(stop),
            thread: Some(thread),
            _api: api.clone(),
        }
    }

    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl tonic::server::NamedService for Svc {
    const NAME: &'static str = "snapshotmetadata.SnapshotMetadata";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Answer =
    futures::stream::Iter<std::vec::IntoIter<Result<msg::GetMetadataAllocatedResponse, Status>>>;

impl tower::Service<http::Request<tonic::body::Body>> for Svc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/snapshotmetadata.SnapshotMetadata/GetMetadataAllocated" => {
                    let codec = tonic_prost::ProstCodec::<
                        msg::GetMetadataAllocatedResponse,
                        msg::GetMetadataAllocatedRequest,
                    >::default();
                    tonic::server::Grpc::new(codec)
                        .server_streaming(Allocated(me), req)
                        .await
                }
                "/snapshotmetadata.SnapshotMetadata/GetMetadataDelta" => {
                    let codec = tonic_prost::ProstCodec::<
                        msg::GetMetadataDeltaResponse,
                        msg::GetMetadataDeltaRequest,
                    >::default();
                    tonic::server::Grpc::new(codec)
                        .server_streaming(Delta(me), req)
                        .await
                }
                other => Status::unimplemented(format!("no method {other}")).into_http(),
            })
        })
    }
}

struct Allocated(Svc);
struct Delta(Svc);

impl tonic::server::ServerStreamingService<msg::GetMetadataAllocatedRequest> for Allocated {
    type Response = msg::GetMetadataAllocatedResponse;
    type ResponseStream = Answer;
    type Future = BoxFuture<Result<Response<Answer>, Status>>;
    fn call(&mut self, r: Request<msg::GetMetadataAllocatedRequest>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let r = r.into_inner();
            let answer = svc
                .authorize(&r.security_token, &r.namespace, &r.snapshot_name)
                .and_then(|target| allocated(&target));
            svc.answer(
                "GetMetadataAllocated",
                &r.namespace,
                &r.snapshot_name,
                None,
                answer,
            )
        })
    }
}

impl tonic::server::ServerStreamingService<msg::GetMetadataDeltaRequest> for Delta {
    type Response = msg::GetMetadataDeltaResponse;
    type ResponseStream = Answer;
    type Future = BoxFuture<Result<Response<Answer>, Status>>;
    fn call(&mut self, r: Request<msg::GetMetadataDeltaRequest>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let r = r.into_inner();
            let lie = *svc.mode.lock().unwrap() == Mode::Lie;
            let answer = svc
                .authorize(&r.security_token, &r.namespace, &r.target_snapshot_name)
                .and_then(|target| {
                    let base = PathBuf::from(&r.base_snapshot_id);
                    if r.base_snapshot_id.is_empty() || !base.is_file() {
                        return Err(Status::invalid_argument(format!(
                            "base snapshot {:?} not found",
                            r.base_snapshot_id
                        )));
                    }
                    let (cap, mut ranges) = delta(&base, &target)?;
                    if lie {
                        ranges.truncate(1);
                    }
                    Ok((cap, ranges))
                });
            let base = Some(r.base_snapshot_id.clone());
            svc.answer(
                "GetMetadataDelta",
                &r.namespace,
                &r.target_snapshot_name,
                base,
                answer,
            )
        })
    }
}

impl Svc {
    /// The target snapshot's file, once the token's ServiceAccount may get it.
    fn authorize(&self, token: &str, ns: &str, snapshot: &str) -> Result<PathBuf, Status> {
        if *self.mode.lock().unwrap() == Mode::Fail {
            return Err(Status::unavailable("the driver is not answering"));
        }
        let issued = self.tokens.lock().unwrap().get(token).cloned();
        let Some(issued) = issued.filter(|i| i.audience == self.audience) else {
            return Err(Status::unauthenticated("invalid security token"));
        };
        let user = User::service_account(&issued.namespace, &issued.service_account);
        let path =
            format!("/apis/snapshot.storage.k8s.io/v1/namespaces/{ns}/volumesnapshots/{snapshot}");
        if let Err(why) = self
            .api
            .subject_access_review(&user, &request_info("GET", &path, &[]))
        {
            return Err(Status::permission_denied(why));
        }
        let g = "snapshot.storage.k8s.io";
        let vs = self
            .api
            .get(g, "volumesnapshots", ns, snapshot)
            .ok_or_else(|| {
                Status::not_found(format!("VolumeSnapshot {ns}/{snapshot} not found"))
            })?;
        if vs["status"]["readyToUse"] != true {
            return Err(Status::unavailable(format!(
                "VolumeSnapshot {ns}/{snapshot} is not ready"
            )));
        }
        let content = vs["status"]["boundVolumeSnapshotContentName"]
            .as_str()
            .unwrap_or("");
        let handle = self
            .api
            .get(g, "volumesnapshotcontents", "", content)
            .and_then(|c| c["status"]["snapshotHandle"].as_str().map(PathBuf::from))
            .ok_or_else(|| {
                Status::unavailable(format!("{ns}/{snapshot} has no snapshot handle"))
            })?;
        Ok(handle)
    }

    fn answer(
        &self,
        method: &'static str,
        ns: &str,
        snapshot: &str,
        base: Option<String>,
        answer: Result<(u64, Vec<(u64, u64)>), Status>,
    ) -> Result<Response<Answer>, Status> {
        let result = match &answer {
            Ok((_, r)) => Ok((r.len() as u64, r.iter().map(|(_, l)| l).sum())),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        };
        self.calls.lock().unwrap().push(Call {
            method,
            namespace: ns.into(),
            snapshot: snapshot.into(),
            base,
            result,
        });
        let (cap, ranges) = answer?;
        let msgs: Vec<_> = ranges
            .chunks(1024)
            .map(|c| {
                Ok(msg::GetMetadataAllocatedResponse {
                    block_metadata_type: msg::VARIABLE_LENGTH,
                    volume_capacity_bytes: cap as i64,
                    block_metadata: c
                        .iter()
                        .map(|&(o, l)| msg::BlockMetadata {
                            byte_offset: o as i64,
                            size_bytes: l as i64,
                        })
                        .collect(),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(msgs)))
    }
}

fn io(e: std::io::Error) -> Status {
    Status::internal(e.to_string())
}

/// Blocks of `file` that hold data (SEEK_DATA/SEEK_HOLE), as ranges.
fn data_blocks(file: &std::fs::File, size: u64) -> Vec<bool> {
    use std::os::unix::io::AsRawFd;
    let mut out = vec![false; size.div_ceil(BLOCK) as usize];
    let mut pos = 0i64;
    while (pos as u64) < size {
        let d = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(file.as_raw_fd(), d, libc::SEEK_HOLE) };
        let h = if h < 0 { size as i64 } else { h };
        for b in (d as u64 / BLOCK)..(h as u64).div_ceil(BLOCK).min(out.len() as u64) {
            out[b as usize] = true;
        }
        pos = h;
    }
    out
}

fn coalesce(blocks: &[bool], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &on) in blocks.iter().enumerate() {
        if !on {
            continue;
        }
        let start = i as u64 * BLOCK;
        let len = BLOCK.min(size - start);
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

fn allocated(target: &std::path::Path) -> Result<(u64, Vec<(u64, u64)>), Status> {
    let f = std::fs::File::open(target).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    Ok((size, coalesce(&data_blocks(&f, size), size)))
}

fn delta(
    base: &std::path::Path,
    target: &std::path::Path,
) -> Result<(u64, Vec<(u64, u64)>), Status> {
    use lifeboat::engine::extents::{covered, extents, identical};
    let (b, t) = (
        std::fs::File::open(base).map_err(io)?,
        std::fs::File::open(target).map_err(io)?,
    );
    let size = t.metadata().map_err(io)?.len();
    let same = identical(
        &extents(&b, 0..size).map_err(io)?,
        &extents(&t, 0..size).map_err(io)?,
    );
    let (bd, td) = (data_blocks(&b, size), data_blocks(&t, size));
    let changed: Vec<bool> = (0..td.len())
        .map(|i| {
            let r = i as u64 * BLOCK..(i as u64 * BLOCK + BLOCK).min(size);
            let hole_in_both = !td[i] && !bd.get(i).copied().unwrap_or(false);
            !covered(&same, r) && !hole_in_both
        })
        .collect();
    Ok((size, coalesce(&changed, size)))
}
