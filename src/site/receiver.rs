//! The DR site's side of a cycle: accept the primary's connection, check its epoch and base,
//! verify and stage every chunk, write one group-commit record when the whole group is
//! staged, apply it to the replicas, and only then acknowledge.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Protection;
use crate::engine::chunk::{zero_hash, Geometry, RootHasher, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::engine::diff::BaseCursor;
use crate::engine::index::SegmentBuilder;
use crate::engine::refine;
use crate::engine::scan::{scan_file, volume_size, ScanOptions};
use crate::failpoint;
use crate::ids::{now_ms, ChunkHash, Epoch, Gen};
use crate::metrics::ErrorKind;
use crate::net::quic::negotiated_lifeboat;
use crate::net::wire::{FrameReader, FrameWriter, Msg, Payload, Refusal, PROTOCOL_VERSION};
use crate::site::recovery::{self, staging_dir};
use crate::site::status::ErrorReport;
use crate::site::{KindError, Site, WithKind};
use crate::store::schema::{RECORD_VERSION, SCRATCH};
use crate::store::{
    Batch, CommitRecord, PointRecord, ProtectionRecord, StagedVolume, Store, VolumeRecord,
};
use crate::volume::replica::{self, FreshReplica, Reserver};
use crate::volume::staging::StagingWriter;

/// Why a cycle stopped at the DR site.
enum Fail {
    /// Told to the primary as a refusal.
    Refuse(Refusal, ErrorKind),
    Error(KindError),
}

impl From<KindError> for Fail {
    fn from(e: KindError) -> Self {
        Fail::Error(e)
    }
}

fn invalid(msg: impl Into<String>) -> Fail {
    Fail::Refuse(Refusal::Invalid(msg.into()), ErrorKind::Protocol)
}

type R<T> = Result<T, Fail>;

/// How long a new cycle waits for a superseded one to let go of the protection.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The next frame, unless the cycle was superseded or the site is failing over.
async fn next_frame(r: &mut FrameReader, token: &CancellationToken, what: &'static str) -> R<Msg> {
    tokio::select! {
        m = r.expect(what) => peer_err(m),
        _ = token.cancelled() => Err(Fail::Error(KindError {
            kind: ErrorKind::Peer,
            error: anyhow!("cycle superseded by a newer attempt or a failover"),
        })),
    }
}

fn peer_err<T>(r: Result<T, crate::net::wire::WireError>) -> R<T> {
    r.kind(ErrorKind::Peer).map_err(Fail::Error)
}

/// Accepts peer connections until cancelled.
pub async fn serve(
    site: Arc<Site>,
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let (site, cancel2, t2) = (site.clone(), cancel.clone(), tracker.clone());
        tracker.spawn(async move { connection(site, incoming, cancel2, t2).await });
    }
}

async fn connection(
    site: Arc<Site>,
    incoming: quinn::Incoming,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "refused a peer connection (TLS handshake failed)");
            site.metrics.error("", ErrorKind::Tls);
            return;
        }
    };
    if !negotiated_lifeboat(&conn) {
        tracing::warn!(%remote, "refused a peer that did not negotiate the lifeboat ALPN");
        site.metrics.error("", ErrorKind::Tls);
        conn.close(1u32.into(), b"lifeboat ALPN required");
        return;
    }
    let peer = match hello(&site, &conn).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%remote, error = %format!("{e:#}"), "peer hello failed");
            conn.close(2u32.into(), b"hello failed");
            return;
        }
    };
    tracing::info!(%remote, peer = %peer, "primary connected");
    loop {
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => { conn.close(0u32.into(), b"shutting down"); return }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => { tracing::info!(%remote, reason = %e, "primary disconnected"); return }
            },
        };
        let (site, peer) = (site.clone(), peer.clone());
        tracker.spawn(async move {
            stream(site, peer, FrameWriter::new(send), FrameReader::new(recv)).await
        });
    }
}

async fn hello(site: &Site, conn: &quinn::Connection) -> anyhow::Result<String> {
    let (send, recv) = conn.accept_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    match r.expect("Hello").await? {
        Msg::Hello {
            version,
            site: peer,
        } => {
            w.send(&Msg::HelloAck {
                version: PROTOCOL_VERSION,
                site: site.config.site_name.clone(),
            })
            .await?;
            w.finish();
            anyhow::ensure!(
                version == PROTOCOL_VERSION,
                "peer {peer} speaks protocol version {version}, this site {PROTOCOL_VERSION}"
            );
            Ok(peer)
        }
        other => Err(anyhow!("expected Hello, got {}", other.kind())),
    }
}

async fn stream(site: Arc<Site>, peer: String, mut w: FrameWriter, mut r: FrameReader) {
    let (protection, epoch) = match r.next().await {
        Ok(Some(Msg::Prepare { protection, epoch })) => (protection, epoch),
        Ok(Some(Msg::RefineOpen {
            protection,
            volume,
            size,
            chunk_size,
        })) => {
            let result = serve_block_hashes(
                &site,
                &protection,
                &volume,
                size,
                chunk_size,
                &mut w,
                &mut r,
            )
            .await;
            if let Err(e) = result {
                // Like a cycle, a refused refinement stream tells the primary why.
                let e = match e {
                    Fail::Refuse(refusal, _) => {
                        let message = refusal.to_string();
                        let _ = w.send(&Msg::Refused(refusal)).await;
                        message
                    }
                    Fail::Error(e) => e.to_string(),
                };
                w.finish();
                r.stop();
                tracing::warn!(peer = %peer, protection = %protection, volume = %volume, error = %e, "refinement stream failed");
            }
            return;
        }
        Ok(None) => return,
        Ok(Some(other)) => {
            let _ = w
                .send(&Msg::Refused(Refusal::Invalid(format!(
                    "expected Prepare, got {}",
                    other.kind()
                ))))
                .await;
            return;
        }
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "bad first frame on a cycle stream");
            return;
        }
    };
    let result = cycle(&site, &protection, epoch, &mut w, &mut r).await;
    let known = site.config.protection(&protection).is_some();
    let label = if known { protection.as_str() } else { "" };
    let refusal = match result {
        Ok(()) => {
            site.metrics
                .received_bytes
                .with_label_values(&[label])
                .inc_by(r.bytes);
            return;
        }
        Err(Fail::Refuse(refusal, kind)) => {
            site.metrics.error(label, kind);
            tracing::warn!(protection = %protection, peer = %peer, %refusal, "refused a replication cycle");
            if known {
                let report = ErrorReport {
                    kind,
                    message: format!("refused replication from {peer} (epoch {epoch}): {refusal}"),
                    at_ms: now_ms(),
                };
                site.live
                    .update(&protection, |l| l.last_refusal = Some(report));
            }
            refusal
        }
        Err(Fail::Error(e)) => {
            tracing::warn!(protection = %protection, peer = %peer, error = %e, "replication cycle failed");
            if known {
                site.note_error(&protection, &e);
            }
            match e.kind {
                ErrorKind::Store | ErrorKind::Io => Refusal::Storage(format!("{:#}", e.error)),
                _ => Refusal::Invalid(format!("{:#}", e.error)),
            }
        }
    };
    let _ = w.send(&Msg::Refused(refusal)).await;
    w.finish();
    r.stop();
}

/// Answers a refinement stream: for each requested chunk, the block hashes of this site's
/// replica, in request order. Read-only: whatever it answers, the chunk stream verifies
/// every patched chunk against its full hash before staging it.
async fn serve_block_hashes(
    site: &Arc<Site>,
    protection: &str,
    volume: &str,
    size: u64,
    chunk_size: u32,
    w: &mut FrameWriter,
    r: &mut FrameReader,
) -> R<()> {
    let refuse = |refusal: Refusal| Fail::Refuse(refusal, ErrorKind::Refused);
    let prot = site
        .config
        .protection(protection)
        .ok_or_else(|| refuse(Refusal::UnknownProtection(protection.to_string())))?
        .with_volumes([volume]);
    let path = prot.volume(volume).map(|v| v.path.clone()).ok_or_else(|| {
        let names: Vec<&str> = prot.volumes.iter().map(|v| v.name.as_str()).collect();
        refuse(Refusal::UnknownVolume(volume.to_string(), names.join(", ")))
    })?;
    check_chunk_size(chunk_size)?;
    let geometry = Geometry::new(size, chunk_size);
    let (req_tx, mut req_rx) = mpsc::channel::<u64>(64);
    let (resp_tx, mut resp_rx) = mpsc::channel::<Msg>(64);
    let worker = tokio::task::spawn_blocking(move || {
        // No replica (or an unreadable one): empty answers, and the chunks go whole.
        let f = std::fs::File::open(&path).ok();
        while let Some(index) = req_rx.blocking_recv() {
            let packed = match &f {
                Some(f) if index < geometry.chunk_count() => {
                    replica::read_chunk(f, geometry.offset(index), geometry.len(index))
                        .map(|c| refine::block_hashes(&c))
                        .unwrap_or_default()
                }
                _ => Vec::new(),
            };
            let answer = Msg::BlockHashes {
                index,
                packed: ByteBuf::from(packed),
            };
            if resp_tx.blocking_send(answer).is_err() {
                break;
            }
        }
    });
    let reading = async {
        // Owned here: when reading ends the worker sees the end of its requests.
        let req_tx = req_tx;
        while let Some(m) = peer_err(r.next().await)? {
            match m {
                Msg::BlockHashRequest { index } => {
                    if req_tx.send(index).await.is_err() {
                        break;
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "unexpected {} on a refinement stream",
                        other.kind()
                    )))
                }
            }
        }
        Ok(())
    };
    let writing = async {
        while let Some(m) = resp_rx.recv().await {
            peer_err(w.queue(&m).await)?;
            // The primary waits for these: send whenever no more are ready.
            if resp_rx.is_empty() {
                peer_err(w.flush().await)?;
            }
        }
        peer_err(w.flush().await)?;
        w.finish();
        Ok(())
    };
    let result = tokio::try_join!(reading, writing).map(|_| ());
    worker.await.kind(ErrorKind::Io)?;
    result
}

fn persist(store: &Store, prot: &str, rec: &ProtectionRecord) -> R<()> {
    let mut b = Batch::default();
    b.put_protection(prot, rec);
    store
        .write(b, true)
        .kind(ErrorKind::Store)
        .map_err(Fail::Error)
}

fn failed_over(rec: &ProtectionRecord) -> Fail {
    Fail::Refuse(
        Refusal::FailedOver {
            epoch: rec.epoch,
            gen: rec.point.as_ref().map(|p| p.point.gen),
        },
        ErrorKind::Fenced,
    )
}

async fn blocking<T: Send + 'static>(
    kind: ErrorKind,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> R<T> {
    let r = tokio::task::spawn_blocking(f).await.kind(kind)?;
    Ok(r.kind(kind)?)
}

async fn cycle(
    site: &Arc<Site>,
    protection: &str,
    epoch: Epoch,
    w: &mut FrameWriter,
    r: &mut FrameReader,
) -> R<()> {
    let prot = site
        .config
        .protection(protection)
        .ok_or_else(|| {
            Fail::Refuse(
                Refusal::UnknownProtection(protection.to_string()),
                ErrorKind::Refused,
            )
        })?
        .clone();
    let guard = site.guard(protection).expect("a guard per protection");
    // Refuse a stale or fenced peer before it can disturb anything in flight.
    let rec = site.record(protection).kind(ErrorKind::Store)?;
    if rec.failed_over.is_some() || guard.failing_over.load(Ordering::SeqCst) {
        return Err(failed_over(&rec));
    }
    if epoch < rec.epoch {
        return Err(Fail::Refuse(
            Refusal::StaleEpoch {
                ours: epoch,
                theirs: rec.epoch,
            },
            ErrorKind::Fenced,
        ));
    }
    let token = guard.supersede();
    let _lock = tokio::time::timeout(LOCK_WAIT, guard.lock.lock())
        .await
        .map_err(|_| Fail::Refuse(Refusal::Busy, ErrorKind::Refused))?;
    let mut rec = site.record(protection).kind(ErrorKind::Store)?;
    if rec.failed_over.is_some() || guard.failing_over.load(Ordering::SeqCst) {
        return Err(failed_over(&rec));
    }
    // A gen committed but not yet applied (an apply that failed) is finished first.
    {
        let (store, config, p) = (site.store.clone(), site.config.clone(), prot.clone());
        blocking(ErrorKind::Io, move || {
            recovery::finish_pending(&store, &config, &p)
        })
        .await?;
        rec = site.record(protection).kind(ErrorKind::Store)?;
    }
    if epoch > rec.epoch {
        rec.epoch = epoch;
        persist(&site.store, protection, &rec)?;
    }
    let have = rec.point.as_ref().map(|p| p.point);
    peer_err(
        w.send(&Msg::Prepared {
            epoch: rec.epoch,
            point: have,
        })
        .await,
    )?;
    let msg = tokio::select! {
        m = r.next() => match peer_err(m)? { Some(m) => m, None => return Ok(()) },
        _ = token.cancelled() => return Ok(()),
    };
    let Msg::Cycle {
        point,
        base,
        volumes,
    } = msg
    else {
        return Err(invalid(format!("expected Cycle, got {}", msg.kind())));
    };
    if base.is_some() && base != have {
        return Err(Fail::Refuse(
            Refusal::BaseMismatch { sent: base, have },
            ErrorKind::Refused,
        ));
    }
    // Kubernetes mode: the group is the primary's selection of PVCs this cycle.
    let prot = prot.with_volumes(volumes.iter().map(|v| v.name.as_str()));
    let group: Vec<String> = prot.volumes.iter().map(|v| v.name.to_string()).collect();
    let mut sent: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
    sent.sort();
    let mut expected = group.clone();
    expected.sort();
    if sent != expected {
        let unknown = sent.iter().find(|v| !expected.contains(v));
        return Err(match unknown {
            Some(v) => Fail::Refuse(
                Refusal::UnknownVolume(v.clone(), group.join(", ")),
                ErrorKind::Refused,
            ),
            None => invalid(format!(
                "the cycle sends volumes [{}] but this site's group is [{}]",
                sent.join(", "),
                group.join(", ")
            )),
        });
    }
    {
        let (store, config, p) = (site.store.clone(), site.config.clone(), prot.clone());
        blocking(ErrorKind::Io, move || {
            recovery::discard_staging(&store, &config, &p)
        })
        .await?;
    }
    let result: R<()> = async {
        let stage_dir =
            staging_dir(&site.config, protection).join(format!("{}-{}", point.gen, point.cycle));
        let mut bases: HashMap<String, Gen> = HashMap::new();
        let mut staged: BTreeMap<String, (PathBuf, VolumeRecord)> = BTreeMap::new();
        let mut fresh_volumes = BTreeSet::new();
        let mut manifests: Option<Vec<u8>> = None;
        loop {
            if guard.failing_over.load(Ordering::SeqCst) {
                return Err(failed_over(&rec));
            }
            match next_frame(r, &token, "Commit").await? {
                Msg::HashRequest { volume, chunk_size } => {
                    let v = prot.volume(&volume).ok_or_else(|| {
                        invalid(format!("hash request for unknown volume {volume:?}"))
                    })?;
                    check_chunk_size(chunk_size)?;
                    let gen =
                        serve_hashes(site, &prot, &rec, v.path.clone(), &volume, chunk_size, w)
                            .await?;
                    bases.insert(volume, gen);
                }
                Msg::Begin {
                    volume,
                    size,
                    chunk_size,
                } => {
                    if !group.contains(&volume) || staged.contains_key(&volume) {
                        return Err(invalid(format!("unexpected Begin for volume {volume:?}")));
                    }
                    check_chunk_size(chunk_size)?;
                    let base_gen = match bases.get(&volume) {
                        Some(g) => *g,
                        None => rec
                            .point
                            .as_ref()
                            .filter(|p| base == Some(p.point))
                            .filter(|p| {
                                p.volumes
                                    .get(&volume)
                                    .is_some_and(|v| v.chunk_size == chunk_size)
                            })
                            .map(|p| p.point.gen)
                            .ok_or(Fail::Refuse(
                                Refusal::BaseMismatch { sent: base, have },
                                ErrorKind::Refused,
                            ))?,
                    };
                    let geometry = Geometry::new(size, chunk_size);
                    let replica = prot
                        .volume(&volume)
                        .map(|v| v.path.clone())
                        .expect("volume is in the group");
                    // No replica and no base: every chunk comes, so build the replica
                    // itself beside its path instead of a log to copy later.
                    let fresh = {
                        let (store, p, v, r) = (
                            site.store.clone(),
                            protection.to_string(),
                            volume.clone(),
                            replica.clone(),
                        );
                        blocking(ErrorKind::Store, move || {
                            let exists = std::fs::symlink_metadata(&r).is_ok();
                            Ok(!exists && store.index(&p, &v, base_gen).next().is_none())
                        })
                        .await?
                    };
                    let path = if fresh {
                        replica::fresh_path(&replica)
                    } else {
                        stage_dir.join(format!("{volume}.log"))
                    };
                    let target = StageTarget {
                        log: path.clone(),
                        replica,
                        fresh,
                        min_free: site.config.min_free_space,
                    };
                    let vrec = receive_volume(
                        site, protection, point.gen, &volume, geometry, base_gen, target, r, &token,
                    )
                    .await?;
                    let mut b = Batch::default();
                    b.put_staged(
                        protection,
                        point.gen,
                        &volume,
                        &StagedVolume {
                            v: RECORD_VERSION,
                            cycle: point.cycle.0,
                            log: path.display().to_string(),
                            record: vrec.clone(),
                            fresh,
                        },
                    );
                    site.store.write(b, false).kind(ErrorKind::Store)?;
                    if fresh {
                        fresh_volumes.insert(volume.clone());
                    }
                    staged.insert(volume, (path, vrec));
                }
                Msg::Manifests { bundle } if prot.kubernetes.is_some() => {
                    crate::k8s::bundle::Bundle::decode(&bundle)
                        .map_err(|e| invalid(format!("manifest bundle of gen {}: {e:#}", point.gen)))?;
                    manifests = Some(bundle.into_vec());
                }
                Msg::Commit { gen } if gen == point.gen => break,
                other => {
                    return Err(invalid(format!(
                        "unexpected {} during the cycle of gen {}",
                        other.kind(),
                        point.gen
                    )))
                }
            }
        }
        if staged.len() != group.len() {
            return Err(invalid(format!(
                "Commit after {} of {} volumes",
                staged.len(),
                group.len()
            )));
        }
        if prot.kubernetes.is_some() && manifests.is_none() {
            return Err(invalid(format!(
                "Commit of gen {} without its manifest bundle (a Kubernetes protection's gen commits its data and manifests together)",
                point.gen
            )));
        }
        if guard.failing_over.load(Ordering::SeqCst) {
            return Err(failed_over(&rec));
        }
        if token.is_cancelled() {
            // A newer attempt took over; only a real failover may tell a primary it is fenced.
            return Err(invalid("this cycle was superseded by a newer attempt"));
        }
        let commit = CommitRecord {
            v: RECORD_VERSION,
            point: PointRecord {
                point,
                volumes: staged
                    .iter()
                    .map(|(k, (_, v))| (k.clone(), v.clone()))
                    .collect(),
            },
            logs: staged
                .iter()
                .map(|(k, (p, _))| (k.clone(), p.display().to_string()))
                .collect(),
            fresh: fresh_volumes,
        };
        let mut b = Batch::default();
        b.put_commit(protection, &commit);
        if let Some(m) = manifests {
            b.put_manifests(protection, point.gen, m);
        }
        for v in staged.keys() {
            b.delete_staged(protection, point.gen, v);
        }
        site.store.write(b, true).kind(ErrorKind::Store)?;
        failpoint::hit("dr-committed");
        {
            let (store, config, p) = (site.store.clone(), site.config.clone(), prot.clone());
            blocking(ErrorKind::Io, move || {
                recovery::redo_commit(&store, &config, &p, &commit)
            })
            .await?;
        }
        tracing::info!(protection, gen = %point.gen, "consistent point advanced");
        peer_err(w.send(&Msg::Committed { point }).await)?;
        w.finish();
        if prot.kubernetes.is_some() {
            tokio::spawn(crate::site::mirror::apply_standby(site.clone(), protection.to_string()));
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        // Free the failed gen's staging now (a full disk wants its space back), under the
        // same lock; a committed gen's logs are kept for its redo.
        let (store, config, p) = (site.store.clone(), site.config.clone(), prot.clone());
        if let Err(Fail::Error(e)) = blocking(ErrorKind::Io, move || {
            recovery::discard_staging(&store, &config, &p)
        })
        .await
        {
            tracing::warn!(protection, error = %e, "could not discard the failed gen's staging");
        }
    }
    result
}

fn check_chunk_size(cs: u32) -> R<()> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(invalid(format!(
            "chunk size {cs} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )));
    }
    Ok(())
}

/// Sends this site's hashes of a replica: the index of the consistent point when it has
/// one at this chunk size, else a fresh scan of the replica (lost state, first sync onto
/// existing data). Returns the index gen the received volume must be diffed against.
#[allow(clippy::too_many_arguments)]
async fn serve_hashes(
    site: &Arc<Site>,
    prot: &Protection,
    rec: &ProtectionRecord,
    replica: PathBuf,
    volume: &str,
    chunk_size: u32,
    w: &mut FrameWriter,
) -> R<Gen> {
    let name = prot.name.to_string();
    let known = rec
        .point
        .as_ref()
        .filter(|p| {
            p.volumes
                .get(volume)
                .is_some_and(|v| v.chunk_size == chunk_size)
        })
        .map(|p| p.point.gen);
    let store = site.store.clone();
    let vol = volume.to_string();
    let gen = blocking(ErrorKind::Io, move || -> anyhow::Result<Gen> {
        if let Some(g) = known {
            return Ok(g);
        }
        hash_replica(&store, &name, &vol, &replica, chunk_size)?;
        Ok(SCRATCH)
    })
    .await?;
    let (tx, mut rx) = mpsc::channel(8);
    let (store, name, vol) = (
        site.store.clone(),
        prot.name.to_string(),
        volume.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        for seg in store.index(&name, &vol, gen) {
            if tx.blocking_send(seg).is_err() {
                break;
            }
        }
    });
    let mut chunks = 0;
    while let Some(seg) = rx.recv().await {
        let (no, seg) = seg.kind(ErrorKind::Store)?;
        chunks += seg.hashes.len() as u64;
        peer_err(
            w.send(&Msg::HashSegment {
                segment: no,
                packed: ByteBuf::from(seg.encode()),
            })
            .await,
        )?;
    }
    peer_err(
        w.send(&Msg::HashEnd {
            volume: volume.to_string(),
            chunk_count: chunks,
        })
        .await,
    )?;
    Ok(gen)
}

/// Hashes the replica as it is on disk into the scratch index.
fn hash_replica(
    store: &Store,
    prot: &str,
    vol: &str,
    path: &std::path::Path,
    chunk_size: u32,
) -> anyhow::Result<()> {
    let mut b = Batch::default();
    b.delete_index(prot, vol, SCRATCH);
    store.write(b, false)?;
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(()); // no replica yet: nothing to compare, every chunk is sent
    };
    let size = volume_size(&f).with_context(|| format!("size of replica {}", path.display()))?;
    let geometry = Geometry::new(size, chunk_size);
    let mut builder = SegmentBuilder::default();
    let progress = Default::default();
    let put = |no, seg| -> anyhow::Result<()> { store.write_segment(prot, vol, SCRATCH, no, &seg) };
    scan_file(
        path,
        geometry,
        |_| Ok(None),
        |s| {
            if let Some((no, seg)) = builder.push(s.hash) {
                put(no, seg)?;
            }
            Ok(())
        },
        &progress,
        ScanOptions::default(),
    )
    .with_context(|| format!("hash replica {}", path.display()))?;
    if let Some((no, seg)) = builder.finish() {
        put(no, seg)?;
    }
    tracing::info!(
        protection = prot,
        volume = vol,
        chunks = geometry.chunk_count(),
        "hashed the replica for a resync"
    );
    Ok(())
}

enum Incoming {
    Chunk {
        index: u64,
        hash: ChunkHash,
        payload: Payload,
    },
    End {
        chunk_count: u64,
        root: ChunkHash,
    },
}

#[allow(clippy::too_many_arguments)]
async fn receive_volume(
    site: &Arc<Site>,
    prot: &str,
    gen: Gen,
    volume: &str,
    geometry: Geometry,
    base_gen: Gen,
    target: StageTarget,
    r: &mut FrameReader,
    token: &CancellationToken,
) -> R<VolumeRecord> {
    let (tx, rx) = mpsc::channel::<Incoming>(32);
    let (store, p, v) = (site.store.clone(), prot.to_string(), volume.to_string());
    let stager = tokio::task::spawn_blocking(move || {
        stage(&store, &p, &v, gen, base_gen, geometry, &target, rx)
    });
    let result: R<()> = async {
        loop {
            // The stager may stop on its own (a chunk failed verification): answer at once
            // rather than when the peer sends its next frame.
            let frame = tokio::select! {
                f = next_frame(r, token, "End") => f?,
                _ = tx.closed() => return Ok(()),
            };
            let incoming = match frame {
                Msg::Chunk {
                    index,
                    hash,
                    payload,
                } => Incoming::Chunk {
                    index,
                    hash,
                    payload,
                },
                Msg::End {
                    volume: v,
                    chunk_count,
                    root,
                } if v == volume => Incoming::End { chunk_count, root },
                other => {
                    return Err(invalid(format!(
                        "unexpected {} while receiving volume {volume}",
                        other.kind()
                    )))
                }
            };
            let end = matches!(incoming, Incoming::End { .. });
            if tx.send(incoming).await.is_err() || end {
                return Ok(()); // the stager stopped (its error says why) or the volume is complete
            }
        }
    }
    .await;
    drop(tx);
    let staged = stager.await.kind(ErrorKind::Io)?;
    result?;
    staged.map_err(|e| match e.kind {
        ErrorKind::Verify | ErrorKind::Protocol => {
            Fail::Refuse(Refusal::Invalid(format!("{:#}", e.error)), e.kind)
        }
        _ => Fail::Error(e),
    })
}

/// Where a volume's incoming chunks go.
struct StageTarget {
    /// The staging log, or with `fresh` the new replica file.
    log: PathBuf,
    replica: PathBuf,
    fresh: bool,
    min_free: u64,
}

/// Free bytes on the file system holding `path`.
fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// A verified chunk, as it is kept until the group commit.
enum Staged<'a> {
    Data(&'a [u8]),
    Zero,
    /// Block bitmap and blocks over the replica's chunk.
    Patch(&'a [u8], &'a [u8]),
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
        staged: Staged,
    ) -> anyhow::Result<()> {
        match (self, staged) {
            (Sink::Log(w), Staged::Data(b)) => w.append(index, hash, len, Some(b)),
            (Sink::Log(w), Staged::Zero) => w.append(index, hash, len, None),
            (Sink::Log(w), Staged::Patch(mask, data)) => {
                w.append_patch(index, hash, len, mask, data)
            }
            (Sink::Fresh(f), Staged::Data(b)) => f.write(geometry.offset(index), Some(b)),
            (Sink::Fresh(f), Staged::Zero) => f.write(geometry.offset(index), None),
            (Sink::Fresh(_), Staged::Patch(..)) => {
                Err(anyhow!("chunk {index}: a patch cannot start a new replica"))
            }
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

/// Blocking: verifies each chunk, appends it to the staging log, and builds the new index
/// and root from the base index plus the received chunks.
#[allow(clippy::too_many_arguments)]
fn stage(
    store: &Store,
    prot: &str,
    vol: &str,
    gen: Gen,
    base_gen: Gen,
    geometry: Geometry,
    target: &StageTarget,
    mut rx: mpsc::Receiver<Incoming>,
) -> Result<VolumeRecord, KindError> {
    let mut cursor = BaseCursor::new(store.index(prot, vol, base_gen));
    let mut builder = SegmentBuilder::default();
    let mut root = RootHasher::new(geometry);
    // A fresh replica's blocks are written, not promised (no reservation), and it has no
    // old chunks for patches; a staged volume patches the replica as it is (the
    // consistent point) and reserves the blocks it will write.
    let (mut writer, base_file, mut reserver) = if target.fresh {
        let fresh = FreshReplica::create(&target.replica, geometry.size).kind(ErrorKind::Io)?;
        (Sink::Fresh(fresh), None, Reserver::none())
    } else {
        let log = StagingWriter::create(&target.log, geometry).kind(ErrorKind::Io)?;
        let reserver = Reserver::open(&target.replica).kind(ErrorKind::Io)?;
        let base = std::fs::File::open(&target.replica).ok();
        (Sink::Log(log), base, reserver)
    };
    let staging_fs = target.log.parent().unwrap_or(&target.log).to_path_buf();
    let mut checked_at = 0u64;
    let count = geometry.chunk_count();
    let failpoint_name = format!("dr-staging:{vol}");
    let mut next = 0u64;
    let push = |h: ChunkHash,
                builder: &mut SegmentBuilder,
                root: &mut RootHasher|
     -> Result<(), KindError> {
        root.push(&h);
        if let Some((no, seg)) = builder.push(h) {
            store
                .write_segment(prot, vol, gen, no, &seg)
                .kind(ErrorKind::Store)?;
        }
        Ok(())
    };
    let proto = |m: String| KindError {
        kind: ErrorKind::Protocol,
        error: anyhow!(m),
    };
    let verify = |m: String| KindError {
        kind: ErrorKind::Verify,
        error: anyhow!(m),
    };
    while let Some(inc) = rx.blocking_recv() {
        let upto = match &inc {
            Incoming::Chunk { index, .. } => *index,
            Incoming::End { chunk_count, .. } => *chunk_count,
        };
        if upto < next || upto > count {
            return Err(proto(format!(
                "volume {vol}: chunk {upto} is out of order or beyond its {count} chunks"
            )));
        }
        for j in next..upto {
            let h = cursor.hash_at(j).kind(ErrorKind::Store)?.ok_or_else(|| {
                proto(format!(
                    "volume {vol}: chunk {j} was neither sent nor in the base index"
                ))
            })?;
            push(h, &mut builder, &mut root)?;
        }
        match inc {
            Incoming::Chunk {
                index,
                hash,
                payload,
            } => {
                if index == count {
                    return Err(proto(format!(
                        "volume {vol}: chunk {index} is beyond its {count} chunks"
                    )));
                }
                let len = geometry.len(index);
                let mismatch = || {
                    verify(format!("volume {vol}: chunk {index} does not match its hash; nothing of this gen was applied"))
                };
                let inflated;
                let staged = match &payload {
                    Payload::Data(b) => {
                        if b.len() != len as usize || ChunkHash::of(b) != hash {
                            return Err(mismatch());
                        }
                        Staged::Data(&b[..])
                    }
                    Payload::Zstd(z) => {
                        // Bounded by the chunk's length: a hostile stream cannot inflate memory.
                        inflated = crate::engine::compress::decompress(z, len).map_err(|e| {
                            verify(format!("volume {vol}: compressed chunk {index}: {e}"))
                        })?;
                        if ChunkHash::of(&inflated) != hash {
                            return Err(mismatch());
                        }
                        Staged::Data(&inflated[..])
                    }
                    Payload::Zero => {
                        if zero_hash(len) != hash {
                            return Err(verify(format!(
                                "volume {vol}: zero marker {index} carries a non-zero hash"
                            )));
                        }
                        Staged::Zero
                    }
                    Payload::Patch { mask, data } | Payload::PatchZstd { mask, data } => {
                        let bad = |e: String| verify(format!("volume {vol}: patch {index}: {e}"));
                        let need = refine::patch_data_len(len as usize, mask).map_err(bad)?;
                        let data = if matches!(payload, Payload::PatchZstd { .. }) {
                            inflated = crate::engine::compress::decompress(data, need as u32)
                                .map_err(bad)?;
                            &inflated[..]
                        } else {
                            &data[..]
                        };
                        let Some(f) = &base_file else {
                            return Err(bad("this site has no replica to patch".into()));
                        };
                        let mut chunk = replica::read_chunk(f, geometry.offset(index), len)
                            .with_context(|| format!("volume {vol}: read replica chunk {index}"))
                            .kind(ErrorKind::Io)?;
                        refine::apply(&mut chunk, mask, data).map_err(bad)?;
                        if ChunkHash::of(&chunk) != hash {
                            return Err(mismatch());
                        }
                        Staged::Patch(mask, data)
                    }
                };
                // Reserve replica blocks now, so a full replica disk fails before the group commit.
                if !matches!(staged, Staged::Zero) {
                    reserver
                        .reserve(geometry.offset(index), len)
                        .with_context(|| {
                            format!("volume {vol}: replica {}", target.replica.display())
                        })
                        .kind(ErrorKind::Io)?;
                }
                // Check the reserve every 8 MiB staged, before the disk is actually full.
                if target.min_free > 0 && writer.bytes() >= checked_at + (8 << 20) {
                    checked_at = writer.bytes();
                    let free = free_space(&staging_fs).kind(ErrorKind::Io)?;
                    if free < target.min_free {
                        return Err(KindError {
                            kind: ErrorKind::Io,
                            error: anyhow!(
                                "staging stopped: {} has {free} bytes free, below min_free_space ({} bytes); nothing of this gen was applied",
                                staging_fs.display(),
                                target.min_free
                            ),
                        });
                    }
                }
                writer
                    .append(geometry, index, &hash, len, staged)
                    .kind(ErrorKind::Io)?;
                push(hash, &mut builder, &mut root)?;
                next = index + 1;
                if writer.records() == 1 {
                    failpoint::hit(&failpoint_name);
                }
            }
            Incoming::End { root: expected, .. } => {
                if let Some((no, seg)) = builder.finish() {
                    store
                        .write_segment(prot, vol, gen, no, &seg)
                        .kind(ErrorKind::Store)?;
                }
                let got = root.finish();
                if got != expected {
                    return Err(verify(format!("volume {vol}: root {} differs from the primary's {}; the replica would not equal the snapshot, so nothing was applied", got.short(), expected.short())));
                }
                writer.finish().kind(ErrorKind::Io)?;
                return Ok(VolumeRecord {
                    size: geometry.size,
                    chunk_size: geometry.chunk_size,
                    root: got,
                });
            }
        }
    }
    Err(KindError {
        kind: ErrorKind::Peer,
        error: anyhow!("volume {vol}: the stream ended before End"),
    })
}
