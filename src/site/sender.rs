//! One replication cycle at the primary: agree on the base with the DR site, take the group
//! snapshot, scan each volume against the base index, stream the changed chunks, commit,
//! and on the acknowledgement make the new index the base.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use crate::config::{Protection, Refine};
use crate::engine::chunk::{Geometry, RootHasher};
use crate::engine::compress;
use crate::engine::diff::BaseCursor;
use crate::engine::index::{Segment, SegmentBuilder};
use crate::engine::refine;
use crate::engine::scan::{scan_file, Content, ScanOptions, Scanned};
use crate::ids::{now_ms, CycleId, Gen, Point};
use crate::metrics::ErrorKind;
use crate::net::limit::RateLimit;
use crate::net::wire::{FrameReader, FrameWriter, Msg, Payload, Refusal, VolumeMeta, WireError};
use crate::site::peer::PeerLink;
use crate::site::status::{method_name, CycleReport, VolumeReport};
use crate::site::{KindError, Site, WithKind};
use crate::store::schema::SCRATCH;
use crate::store::{Batch, FenceRecord, PointRecord, ProtectionRecord, VolumeRecord};
use crate::volume::hooks::HookFailed;
use crate::volume::snapshot::{self, GroupSnapshot};
use crate::{failpoint, store::Store};

type CycleResult<T> = Result<T, KindError>;

fn wire<T>(r: Result<T, WireError>) -> CycleResult<T> {
    r.kind(ErrorKind::Peer)
}

/// Persists a fence after the DR site refused us for a newer epoch.
fn fence(site: &Site, prot: &str, rec: &mut ProtectionRecord, refusal: &Refusal) -> KindError {
    let message = format!("fenced: {refusal}");
    rec.fenced = Some(FenceRecord {
        at_ms: now_ms(),
        message: message.clone(),
    });
    let mut b = Batch::default();
    b.put_protection(prot, rec);
    if let Err(e) = site.store.write(b, true) {
        tracing::error!(protection = prot, error = %format!("{e:#}"), "could not persist the fence");
    }
    tracing::error!(protection = prot, %refusal, "DR site refused this primary; replication of this protection stops");
    KindError {
        kind: ErrorKind::Fenced,
        error: anyhow!(message),
    }
}

fn refused(site: &Site, prot: &str, rec: &mut ProtectionRecord, r: Refusal) -> KindError {
    match r {
        Refusal::StaleEpoch { .. } | Refusal::FailedOver { .. } => fence(site, prot, rec, &r),
        other => refusal_error("the cycle", other),
    }
}

/// A refusal that does not fence: the cycle fails with the DR site's reason.
fn refusal_error(what: &str, reason: Refusal) -> KindError {
    KindError {
        kind: ErrorKind::Refused,
        error: anyhow!("DR site refused {what}: {reason}"),
    }
}

/// Runs one cycle of `prot` and returns its report.
pub async fn run_cycle(
    site: &Arc<Site>,
    peer: &PeerLink,
    prot: &Protection,
) -> CycleResult<CycleReport> {
    let started = Instant::now();
    let name = prot.name.as_str();
    let mut rec = site.record(name).kind(ErrorKind::Store)?;
    if let Some(f) = &rec.fenced {
        return Err(KindError {
            kind: ErrorKind::Fenced,
            error: anyhow!("{}", f.message),
        });
    }
    site.live.activity(name, "connecting to the DR site");
    let conn = peer.connection(site).await.kind(ErrorKind::Peer)?;
    let wire_start = conn.stats().udp_tx.bytes;
    let lost_start = conn.stats().path.lost_bytes;
    let (send, recv) = conn.open_bi().await.kind(ErrorKind::Peer)?;
    let mut w = FrameWriter::new(send).with_limit(peer.limit.clone());
    let mut r = FrameReader::new(recv);
    wire(
        w.send(&Msg::Prepare {
            protection: name.to_string(),
            epoch: rec.epoch,
        })
        .await,
    )?;
    let dr_point = match wire(r.expect("Prepared").await)? {
        Msg::Prepared { epoch, point } => {
            if epoch > rec.epoch {
                let refusal = Refusal::StaleEpoch {
                    ours: rec.epoch,
                    theirs: epoch,
                };
                return Err(fence(site, name, &mut rec, &refusal));
            }
            point
        }
        Msg::Refused(reason) => return Err(refused(site, name, &mut rec, reason)),
        other => return Err(protocol(other.kind(), "Prepared")),
    };

    reconcile(&site.store, name, &mut rec, dr_point).kind(ErrorKind::Store)?;
    let base = rec.point.clone().filter(|p| Some(p.point) == dr_point);
    let gen = Gen(rec
        .point
        .as_ref()
        .map_or(0, |p| p.point.gen.0)
        .max(dr_point.map_or(0, |p| p.gen.0))
        + 1);

    // Kubernetes mode: the selection decides the group and its manifests, read just
    // before the snapshot; an API error fails the cycle before anything is sent.
    let mut rules = crate::rules::run::Rules {
        executor: crate::rules::exec::Executor::Local,
        pods: Vec::new(),
        pre: prot.pre_rules.clone(),
        post: prot.post_rules.clone(),
    };
    let (group, bundle) = match &prot.kubernetes {
        Some(kp) => {
            site.live
                .activity(name, format!("gen {gen}: collecting manifests"));
            let client = site.kube(name).kind(ErrorKind::Kubernetes)?;
            let collected = crate::k8s::collect::collect(client, kp)
                .await
                .kind(ErrorKind::Kubernetes)?;
            let mut group = prot.clone();
            for v in &collected.volumes {
                let vname = crate::ids::VolumeName::new(&v.name)
                    .map_err(anyhow::Error::msg)
                    .kind(ErrorKind::Kubernetes)?;
                if group.volume(&v.name).is_none() {
                    group.volumes.push(crate::config::Volume {
                        name: vname,
                        path: v.path.clone(),
                    });
                }
            }
            rules = kube_rules(client, prot, kp, collected.pods.clone())
                .await
                .kind(ErrorKind::Kubernetes)?;
            let b = &collected.bundle;
            site.live.update(name, |l| {
                l.kubernetes = Some(crate::site::status::KubeStatus {
                    gen: Some(gen.0),
                    covers: b.coverage.clone(),
                    warnings: b.warnings.clone(),
                    ..Default::default()
                })
            });
            (group, Some(b.encode()))
        }
        None => (prot.clone(), None),
    };
    let prot = &group;

    site.live.activity(name, format!("snapshot of gen {gen}"));
    let snap_started = Instant::now();
    let mut freeze = crate::rules::run::FreezeReport::default();
    let snap = snapshot::take(prot, gen, &rules, &mut freeze).await;
    if !rules.is_empty() {
        site.metrics
            .freeze_seconds
            .with_label_values(&[name])
            .set(freeze.freeze.as_secs_f64());
    }
    if !freeze.failures.is_empty() {
        site.metrics
            .hook_failures
            .with_label_values(&[name])
            .inc_by(freeze.failures.len() as u64);
    }
    let snap = snap.map_err(|e| {
        let kind = if e.downcast_ref::<HookFailed>().is_some() {
            ErrorKind::Hook
        } else {
            ErrorKind::Snapshot
        };
        KindError { kind, error: e }
    })?;
    let snapshot_seconds = snap_started.elapsed().as_secs_f64();
    let point = Point {
        gen,
        cycle: CycleId::random(),
        taken_at_ms: snap.taken_at_ms,
    };
    rec.tentative = Some(PointRecord {
        point,
        volumes: BTreeMap::new(),
    });
    let mut b = Batch::default();
    b.put_protection(name, &rec);
    site.store.write(b, true).kind(ErrorKind::Store)?;

    let metas = snap
        .volumes
        .iter()
        .map(|v| VolumeMeta {
            name: v.name.clone(),
            size: v.size,
            chunk_size: prot.chunk_size,
        })
        .collect();
    wire(
        w.send(&Msg::Cycle {
            point,
            base: base.as_ref().map(|b| b.point),
            volumes: metas,
        })
        .await,
    )?;

    let transfer_started = Instant::now();
    let refine = match prot.refine {
        Refine::On => true,
        Refine::Off => false,
        Refine::Auto => peer.auto_refine(),
    };
    let mut report = CycleReport {
        gen: gen.0,
        started_at_ms: now_ms(),
        refine,
        ..Default::default()
    };
    let side = Side {
        conn: &conn,
        limit: peer.limit.clone(),
        refine,
    };
    let mut volumes = BTreeMap::new();
    for (i, v) in snap.volumes.iter().enumerate() {
        site.live.activity(
            name,
            format!(
                "gen {gen}: volume {} ({}/{})",
                v.name,
                i + 1,
                snap.volumes.len()
            ),
        );
        let (vrec, vrep) = send_volume(
            site,
            prot,
            &snap,
            i,
            base.as_ref(),
            &side,
            &mut w,
            &mut r,
            &mut report,
        )
        .await?;
        volumes.insert(v.name.clone(), vrec);
        report.volumes.push(vrep);
    }
    let transfer_seconds = transfer_started.elapsed().as_secs_f64();
    if let Some(t) = rec.tentative.as_mut() {
        t.volumes = volumes;
    }
    let mut b = Batch::default();
    b.put_protection(name, &rec);
    site.store.write(b, true).kind(ErrorKind::Store)?;

    site.live.activity(
        name,
        format!("gen {gen}: waiting for the DR site to commit"),
    );
    let commit_started = Instant::now();
    if let Some(bundle) = bundle {
        if let Err(e) = w
            .send(&Msg::Manifests {
                bundle: ByteBuf::from(bundle),
            })
            .await
        {
            return Err(stream_failure(e, &mut r).await);
        }
    }
    // A small volume can be wholly sent before the DR site fails it; its reason follows.
    if let Err(e) = w.send(&Msg::Commit { gen }).await {
        return Err(stream_failure(e, &mut r).await);
    }
    match wire(r.expect("Committed").await)? {
        Msg::Committed { point: p } if p == point => {}
        Msg::Committed { point: p } => {
            return Err(KindError {
                kind: ErrorKind::Protocol,
                error: anyhow!("DR site acknowledged {p:?}, expected {point:?}"),
            })
        }
        Msg::Refused(reason) => return Err(refused(site, name, &mut rec, reason)),
        other => return Err(protocol(other.kind(), "Committed")),
    }
    w.finish();
    acknowledge(&site.store, name, &mut rec).kind(ErrorKind::Store)?;
    // Only the gens older than this one, listed now: the next cycle's snapshot is safe.
    let old = snapshot::stale(prot, &[gen]);
    let p = name.to_string();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = snapshot::remove(old) {
            tracing::warn!(protection = p, error = %format!("{e:#}"), "could not remove old snapshots");
        }
    });
    report.phases.snapshot = snapshot_seconds;
    report.phases.freeze = snap.freeze.as_secs_f64();
    report.phases.transfer = transfer_seconds;
    report.phases.commit = commit_started.elapsed().as_secs_f64();
    report.seconds = started.elapsed().as_secs_f64();
    report.wire_bytes = conn.stats().udp_tx.bytes.saturating_sub(wire_start);
    report.lost_bytes = conn.stats().path.lost_bytes.saturating_sub(lost_start);
    Ok(report)
}

/// Kubernetes mode: the protection's rules run in its pods: Stork Rule files, the Stork
/// Rule objects named in `[protection.kubernetes]`, and the pods' Velero hook annotations.
async fn kube_rules(
    client: &kube::Client,
    prot: &Protection,
    kp: &crate::k8s::KubeProtection,
    pods: Vec<serde_json::Value>,
) -> anyhow::Result<crate::rules::run::Rules> {
    use crate::rules::format;
    let mut pre = prot.pre_rules.clone();
    let mut post = prot.post_rules.clone();
    let ns = kp
        .namespaces
        .first()
        .map(String::as_str)
        .unwrap_or("default");
    let kind = crate::k8s::kinds::Kind {
        group: "stork.libopenstorage.org".into(),
        version: "v1alpha1".into(),
        kind: "Rule".into(),
        plural: "rules".into(),
        namespaced: true,
    };
    for (name, list) in [(&kp.pre_rule, &mut pre), (&kp.post_rule, &mut post)] {
        let Some(name) = name else { continue };
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(client.clone(), ns, &kind.resource());
        let obj = api
            .get(name)
            .await
            .map_err(|e| crate::k8s::api_error(e, format!("get Stork Rule {ns}/{name}")))?;
        let mut v = serde_json::to_value(obj)?;
        v["apiVersion"] = kind.api_version().into();
        v["kind"] = "Rule".into();
        list.push(format::stork_rule_object(&v, prot.hook_timeout)?);
    }
    if kp.velero_hooks {
        for (phase, list) in [("pre", &mut pre), ("post", &mut post)] {
            let items = pods
                .iter()
                .map(|p| format::velero_hooks(p, phase))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let items: Vec<_> = items.into_iter().flatten().collect();
            if !items.is_empty() {
                list.push(crate::rules::Rule {
                    name: format!("velero {phase}-backup hooks"),
                    items,
                });
            }
        }
    }
    Ok(crate::rules::run::Rules {
        executor: crate::rules::exec::Executor::Kube(client.clone()),
        pods,
        pre,
        post,
    })
}

fn protocol(got: &'static str, expected: &'static str) -> KindError {
    KindError {
        kind: ErrorKind::Protocol,
        error: WireError::Unexpected { got, expected }.into(),
    }
}

/// Brings the primary's record in line with what the DR site has committed: a tentative
/// gen the DR site committed (its acknowledgement was lost) becomes the base; any other
/// tentative gen is dropped, and every index but the base's goes.
fn reconcile(
    store: &Store,
    prot: &str,
    rec: &mut ProtectionRecord,
    dr_point: Option<Point>,
) -> anyhow::Result<()> {
    if let Some(t) = rec.tentative.take() {
        if Some(t.point) == dr_point && !t.volumes.is_empty() {
            tracing::info!(protection = prot, gen = %t.point.gen, "DR site committed a gen whose acknowledgement was lost; using it as the base");
            rec.point = Some(t);
        }
    }
    let mut b = Batch::default();
    let keep: Vec<Gen> = rec.point.iter().map(|p| p.point.gen).collect();
    store.drop_index_except(prot, &keep, &mut b)?;
    b.put_protection(prot, rec);
    store.write(b, true)
}

/// The acknowledgement: the tentative gen becomes the base; older and scratch indexes go.
fn acknowledge(store: &Store, prot: &str, rec: &mut ProtectionRecord) -> anyhow::Result<()> {
    let t = rec
        .tentative
        .take()
        .context("acknowledged a cycle with no tentative gen")?;
    let mut b = Batch::default();
    store.drop_index_except(prot, &[t.point.gen], &mut b)?;
    rec.point = Some(t);
    b.put_protection(prot, rec);
    store.write(b, true)
}

/// Fetches the DR site's hashes of a replica into the scratch index (resync).
async fn fetch_peer_hashes(
    store: &Arc<Store>,
    prot: &str,
    volume: &str,
    chunk_size: u32,
    w: &mut FrameWriter,
    r: &mut FrameReader,
) -> CycleResult<u64> {
    let mut b = Batch::default();
    b.delete_index(prot, volume, SCRATCH);
    store.write(b, false).kind(ErrorKind::Store)?;
    wire(
        w.send(&Msg::HashRequest {
            volume: volume.to_string(),
            chunk_size,
        })
        .await,
    )?;
    let before = r.bytes;
    loop {
        match wire(r.expect("HashEnd").await)? {
            Msg::HashSegment { segment, packed } => {
                let seg = Segment::decode(&packed).kind(ErrorKind::Protocol)?;
                store
                    .write_segment(prot, volume, SCRATCH, segment, &seg)
                    .kind(ErrorKind::Store)?;
            }
            Msg::HashEnd { volume: v, .. } if v == volume => break,
            Msg::Refused(reason) => return Err(refusal_error("the cycle", reason)),
            other => return Err(protocol(other.kind(), "HashSegment")),
        }
    }
    Ok(r.bytes - before)
}

#[allow(clippy::too_many_arguments)]
async fn send_volume(
    site: &Arc<Site>,
    prot: &Protection,
    snap: &GroupSnapshot,
    i: usize,
    base: Option<&PointRecord>,
    side: &Side<'_>,
    w: &mut FrameWriter,
    r: &mut FrameReader,
    report: &mut CycleReport,
) -> CycleResult<(VolumeRecord, VolumeReport)> {
    let name = prot.name.to_string();
    let v = &snap.volumes[i];
    let gen = snap.gen;
    let geometry = Geometry::new(v.size, prot.chunk_size);
    let local_base = base
        .and_then(|b| b.volumes.get(&v.name).map(|vr| (b.point.gen, vr)))
        .filter(|(_, vr)| vr.chunk_size == prot.chunk_size);
    let resync = local_base.is_none();
    let base_gen = match local_base {
        Some((g, _)) => g,
        None => {
            report.hash_bytes_received +=
                fetch_peer_hashes(&site.store, &name, &v.name, prot.chunk_size, w, r).await?;
            SCRATCH
        }
    };
    wire(
        w.send(&Msg::Begin {
            volume: v.name.clone(),
            size: v.size,
            chunk_size: prot.chunk_size,
        })
        .await,
    )?;

    let (tx, mut rx) = mpsc::channel::<Scanned>(16);
    let store = site.store.clone();
    let (path, vol, fp) = (
        v.path.clone(),
        v.name.clone(),
        format!("primary-sending:{}", v.name),
    );
    let progress = Arc::new(AtomicU64::new(0));
    let compression = prot.compression;
    let raw_if_based = side.refine;
    // The base gen's snapshot, kept until this gen is acknowledged: where it shares extents
    // with the new one (reflink snapshots), nothing changed.
    let base_snapshot = local_base
        .map(|(g, _)| snapshot::gen_dir(prot, g).join(&v.name))
        .filter(|p| p.exists());
    let shown = (progress.clone(), v.size);
    site.live
        .update(prot.name.as_str(), |l| l.progress = Some(shown));
    let scan = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut cursor = BaseCursor::new(store.index(&name, &vol, base_gen));
        let mut builder = SegmentBuilder::default();
        let mut root = RootHasher::new(geometry);
        let mut first_sent = false;
        let stats = scan_file(
            &path,
            geometry,
            |idx| cursor.hash_at(idx),
            |s| {
                root.push(&s.hash);
                if let Some((no, seg)) = builder.push(s.hash) {
                    store.write_segment(&name, &vol, gen, no, &seg)?;
                }
                if !matches!(s.content, Content::Unchanged) {
                    tx.blocking_send(s)
                        .map_err(|_| anyhow!("the network side stopped"))?;
                    if !first_sent {
                        first_sent = true;
                        failpoint::hit(&fp);
                    }
                }
                Ok(())
            },
            &progress,
            ScanOptions {
                base_snapshot: base_snapshot.as_deref(),
                compress: compression,
                raw_if_based,
            },
        )?;
        if let Some((no, seg)) = builder.finish() {
            store.write_segment(&name, &vol, gen, no, &seg)?;
        }
        Ok((stats, root.finish()))
    });

    // Refinement: a second stream asks the DR site for block hashes of each changed chunk
    // the replica has, ahead of the chunk writer, which turns the answers into patches.
    let (mut ask, mut answers) = if side.refine {
        let (send, recv) = side.conn.open_bi().await.kind(ErrorKind::Peer)?;
        let mut rw = FrameWriter::new(send).with_limit(side.limit.clone());
        wire(
            rw.send(&Msg::RefineOpen {
                protection: prot.name.to_string(),
                volume: v.name.clone(),
                size: v.size,
                chunk_size: prot.chunk_size,
            })
            .await,
        )?;
        (Some(rw), Some(FrameReader::new(recv)))
    } else {
        (None, None)
    };
    let (qtx, mut qrx) = mpsc::channel::<(Scanned, bool)>(REFINE_WINDOW);
    let requester = async move {
        while let Some(s) = rx.recv().await {
            let asked = ask.is_some() && s.based && matches!(s.content, Content::Data(_));
            if let Some(rw) = ask.as_mut() {
                if asked {
                    wire(rw.queue(&Msg::BlockHashRequest { index: s.index }).await)?;
                }
                // The chunk writer waits for answers: never block with requests unsent.
                if rx.is_empty() || qtx.capacity() == 0 {
                    wire(rw.flush().await)?;
                }
            }
            if qtx.send((s, asked)).await.is_err() {
                break; // the chunk writer stopped; its error says why
            }
        }
        if let Some(rw) = ask.as_mut() {
            rw.finish();
        }
        Ok::<(), KindError>(())
    };
    let mut sent = 0u64;
    let writer = async {
        while let Some((s, asked)) = qrx.recv().await {
            let payload = match s.content {
                Content::Zero => {
                    report.zero_chunks_sent += 1;
                    Payload::Zero
                }
                Content::Data(b) if asked => {
                    let rr = answers.as_mut().expect("asked on the refine stream");
                    let theirs = match wire(rr.expect("BlockHashes").await)? {
                        Msg::BlockHashes { index, packed } if index == s.index => packed,
                        Msg::Refused(reason) => return Err(refusal_error("refinement", reason)),
                        other => return Err(protocol(other.kind(), "BlockHashes")),
                    };
                    encode_refined(b, &theirs, compression, report)
                }
                Content::Data(b) => Payload::Data(ByteBuf::from(b)),
                Content::Compressed(z) => Payload::Zstd(ByteBuf::from(z)),
                Content::Unchanged => continue,
            };
            let msg = Msg::Chunk {
                index: s.index,
                hash: s.hash,
                payload,
            };
            // Queued: chunk frames go out in large writes; End (a send) flushes the rest.
            match w.queue(&msg).await {
                Ok(n) => sent += n,
                Err(e) => return Err(stream_failure(e, r).await),
            }
            report.chunks_sent += 1;
        }
        Ok(())
    };
    tokio::try_join!(requester, writer)?;
    let (stats, root) = scan
        .await
        .kind(ErrorKind::Io)?
        .with_context(|| format!("scan volume {}", v.name))
        .kind(ErrorKind::Io)?;
    if let Err(e) = w
        .send(&Msg::End {
            volume: v.name.clone(),
            chunk_count: geometry.chunk_count(),
            root,
        })
        .await
    {
        return Err(stream_failure(e, r).await);
    }
    report.bytes_scanned += stats.bytes_scanned;
    report.bytes_shared += stats.shared_bytes;
    report.bytes_changed += stats.bytes_changed;
    report.chunk_bytes_sent += sent;
    report.compressed_chunks += stats.compressed_chunks;
    report.compression_saved_bytes += stats.compression_saved;
    let m = &site.metrics;
    let p = prot.name.as_str();
    m.scanned_bytes
        .with_label_values(&[p])
        .inc_by(stats.bytes_scanned);
    m.changed_bytes
        .with_label_values(&[p])
        .inc_by(stats.bytes_changed);
    m.sent_bytes.with_label_values(&[p]).inc_by(sent);
    m.chunks_sent
        .with_label_values(&[p])
        .inc_by(stats.chunks_changed);
    m.compression_saved_bytes
        .with_label_values(&[p])
        .inc_by(stats.compression_saved);
    tracing::info!(protection = p, volume = %v.name, %gen, resync, changed = stats.chunks_changed, chunks = stats.chunks, sent, "volume sent");
    Ok((
        VolumeRecord {
            size: v.size,
            chunk_size: prot.chunk_size,
            root,
        },
        VolumeReport {
            name: v.name.clone(),
            size: v.size,
            snapshot_method: method_name(v.method),
            resync,
            chunks_changed: stats.chunks_changed,
            bytes_changed: stats.bytes_changed,
            chunk_bytes_sent: sent,
        },
    ))
}

/// Changed chunks in flight between the block-hash request and the chunk writer: 256 x
/// 64 KiB bounds the memory at 16 MiB; 256 outstanding requests per round trip keep a
/// 50 ms link busy up to 320 MiB/s of changed chunks.
const REFINE_WINDOW: usize = 256;

/// What the chunk writer needs beyond the cycle's own stream.
struct Side<'a> {
    conn: &'a quinn::Connection,
    limit: Option<Arc<RateLimit>>,
    refine: bool,
}

/// A chunk the DR replica has an older version of: only the blocks that differ, compressed
/// where that pays; the whole chunk when every block changed.
fn encode_refined(
    raw: Vec<u8>,
    theirs: &[u8],
    compression: bool,
    report: &mut CycleReport,
) -> Payload {
    let compress = |b: &[u8]| compression.then(|| compress::compress(b)).flatten();
    match refine::diff(&raw, theirs) {
        Some(p) => {
            report.refined_chunks += 1;
            report.refine_saved_bytes += (raw.len() - p.data.len()) as u64;
            let mask = ByteBuf::from(p.mask);
            match compress(&p.data) {
                Some(z) => Payload::PatchZstd {
                    mask,
                    data: ByteBuf::from(z),
                },
                None => Payload::Patch {
                    mask,
                    data: ByteBuf::from(p.data),
                },
            }
        }
        None => match compress(&raw) {
            Some(z) => Payload::Zstd(ByteBuf::from(z)),
            None => Payload::Data(ByteBuf::from(raw)),
        },
    }
}

/// After a failed write, the DR site may have said why before closing the stream.
async fn stream_failure(e: WireError, r: &mut FrameReader) -> KindError {
    // The DR site answers after it has freed the failed gen's staging (fsyncs included),
    // which on a loaded disk takes a while; a dead peer is cut off by the idle timeout.
    let reason = tokio::time::timeout(std::time::Duration::from_secs(10), r.next()).await;
    match reason {
        Ok(Ok(Some(Msg::Refused(reason)))) => refusal_error("the cycle", reason),
        other => {
            let got = match other {
                Ok(Ok(Some(m))) => m.kind().to_string(),
                Ok(Ok(None)) => "the end of the stream".into(),
                Ok(Err(e)) => format!("{e}"),
                Err(_) => "nothing within 10 s".into(),
            };
            tracing::debug!(%got, "no reason from the DR site after a failed write");
            KindError {
                kind: ErrorKind::Peer,
                error: e.into(),
            }
        }
    }
}
