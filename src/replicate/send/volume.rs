//! One volume of a cycle at the primary: fetch the DR site's hashes when it resyncs, then
//! scan the snapshot against the base index on a blocking thread (writing the new index as
//! it goes) while the async side streams the changed chunks. With refinement a second
//! stream asks the DR site for the block hashes of each changed chunk it has, ahead of the
//! chunk writer, which sends only the blocks that differ.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::Context;
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use super::plan;
use crate::api::{CycleReport, VolumeReport};
use crate::config::Protection;
use crate::engine::chunk::{Geometry, RootHasher};
use crate::engine::compress;
use crate::engine::diff::BaseCursor;
use crate::engine::index::{Segment, SegmentBuilder};
use crate::engine::refine;
use crate::engine::scan::{scan_file, Content, ScanOptions, Scanned};
use crate::failpoint;
use crate::ids::{ProtectionName, VolumeName};
use crate::net::limit::RateLimit;
use crate::net::wire::{FrameReader, FrameWriter, Msg, Payload, WireError};
use crate::replicate::error::CycleError;
use crate::replicate::messages::{BlockAnswer, HashAnswer};
use crate::site::primary::Primary;
use crate::store::schema::SCRATCH;
use crate::store::{PointRecord, StateStore, VolumeRecord};
use crate::volume::snapshot::{self, GroupSnapshot, Method};

/// Changed chunks in flight between the block-hash request and the chunk writer: 256 x
/// 64 KiB bounds the memory at 16 MiB; 256 outstanding requests per round trip keep a
/// 50 ms link busy up to 320 MiB/s of changed chunks.
const REFINE_WINDOW: usize = 256;

/// What the chunk writer needs beyond the cycle's own stream.
pub struct Side<'a> {
    pub conn: &'a quinn::Connection,
    pub limit: Option<Arc<RateLimit>>,
    pub refine: bool,
    /// A mover's base device (the base gen's snapshot, restored): refinement reads the
    /// replica's old chunks from it instead of asking the DR site, which may hold its
    /// replicas where it cannot read them (CSI replica PVCs).
    pub base: Option<Arc<std::fs::File>>,
}

fn method_name(m: Method) -> String {
    match m {
        Method::Reflink => "reflink".into(),
        Method::Copy => "copy".into(),
        Method::Csi => "csi".into(),
    }
}

/// Fetches the DR site's hashes of a replica into the scratch index (resync); returns the
/// bytes received.
async fn fetch_peer_hashes(
    store: &StateStore,
    prot: &ProtectionName,
    volume: &VolumeName,
    chunk_size: u32,
    w: &mut FrameWriter,
    r: &mut FrameReader,
) -> Result<u64, CycleError> {
    let v = volume.clone();
    store
        .step(prot, move |s, p| s.clear_scratch(p, &v))
        .await
        .map_err(CycleError::store)?;
    w.send(&Msg::HashRequest {
        volume: volume.to_string(),
        chunk_size,
    })
    .await?;
    let before = r.bytes;
    // Segments go to the store in batches on a blocking thread, as they arrive.
    let (tx, mut rx) = mpsc::channel::<(u64, Segment)>(64);
    let (s, p, v) = (store.blocking().clone(), prot.clone(), volume.clone());
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        while let Some((no, seg)) = rx.blocking_recv() {
            s.write_segment(&p, &v, SCRATCH, no, &seg)?;
        }
        Ok(())
    });
    let reading = async {
        loop {
            let answer = HashAnswer::try_from(r.expect("HashEnd").await?)
                .map_err(|got| CycleError::unexpected(got, "HashSegment"))?;
            match answer {
                HashAnswer::Segment { segment, packed } => {
                    let seg = Segment::decode(&packed).map_err(|e| {
                        CycleError::Protocol(format!("hash segment {segment}: {e}"))
                    })?;
                    if tx.send((segment, seg)).await.is_err() {
                        break; // the writer failed; its error says why
                    }
                }
                HashAnswer::End { volume: v } if v == volume.as_str() => break,
                HashAnswer::End { .. } => {
                    return Err(CycleError::unexpected("HashEnd", "HashSegment"))
                }
                HashAnswer::Refused(reason) => return Err(plan::refused("the cycle", reason)),
            }
        }
        Ok(())
    };
    let read = reading.await;
    drop(tx);
    writer
        .await
        .map_err(CycleError::store)?
        .map_err(CycleError::Store)?;
    read?;
    Ok(r.bytes - before)
}

#[allow(clippy::too_many_arguments)]
pub async fn send_volume(
    primary: &Primary,
    prot: &Protection,
    snap: &GroupSnapshot,
    i: usize,
    base: Option<&PointRecord>,
    repair: &[String],
    side: &Side<'_>,
    w: &mut FrameWriter,
    r: &mut FrameReader,
    report: &mut CycleReport,
) -> Result<(VolumeRecord, VolumeReport), CycleError> {
    let v = &snap.volumes[i];
    let gen = snap.gen;
    let geometry = Geometry::new(v.size, prot.chunk_size);
    let local_base = plan::volume_base(base, v.name.as_str(), prot.chunk_size, repair);
    let resync = local_base.is_none();
    let base_gen = match local_base {
        Some(g) => g,
        None => {
            report.hash_bytes_received +=
                fetch_peer_hashes(&primary.store, &prot.name, &v.name, prot.chunk_size, w, r)
                    .await?;
            SCRATCH
        }
    };
    w.send(&Msg::Begin {
        volume: v.name.to_string(),
        size: v.size,
        chunk_size: prot.chunk_size,
    })
    .await?;

    let (tx, rx) = mpsc::channel::<Scanned>(16);
    let store = primary.store.blocking().clone();
    let (path, name, vol, fp) = (
        v.path.clone(),
        prot.name.clone(),
        v.name.clone(),
        format!("primary-sending:{}", v.name),
    );
    let progress = Arc::new(AtomicU64::new(0));
    let compression = prot.compression;
    let raw_if_based = side.refine;
    // The base gen's snapshot, kept until this gen is acknowledged: where it shares extents
    // with the new one (reflink snapshots), nothing changed.
    let base_snapshot = local_base
        .map(|g| snapshot::gen_dir(prot, g).join(v.name.as_str()))
        .filter(|p| p.exists());
    let shown = (progress.clone(), v.size);
    primary
        .live
        .update(prot.name.as_str(), |l| l.progress = Some(shown));
    let span = tracing::Span::current();
    let scan = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let _enter = span.enter();
        let mut cursor = BaseCursor::new(store.index(&name, &vol, base_gen));
        let mut builder = SegmentBuilder::default();
        let mut root = RootHasher::new(geometry);
        let mut first_sent = false;
        let mut hand_on = |s: Scanned| -> anyhow::Result<()> {
            tx.blocking_send(s)
                .map_err(|_| anyhow::anyhow!("the network side stopped"))?;
            if !first_sent {
                first_sent = true;
                failpoint::hit(&fp);
            }
            Ok(())
        };
        // Consecutive zero chunks go on as one item: a sparse volume's holes cost the
        // channel a run each, not a chunk each.
        let mut zeros: Option<Scanned> = None;
        let stats = scan_file(
            &path,
            geometry,
            |idx| cursor.hash_at(idx),
            |s| {
                root.push(&s.hash);
                if let Some((no, seg)) = builder.push(s.hash) {
                    store.write_segment(&name, &vol, gen, no, &seg)?;
                }
                match s.content {
                    Content::Unchanged => {}
                    Content::Zero => match &mut zeros {
                        Some(run) if run.index + run.zeros == s.index => run.zeros += s.zeros,
                        _ => {
                            if let Some(run) = zeros.replace(s) {
                                hand_on(run)?;
                            }
                        }
                    },
                    _ => {
                        if let Some(run) = zeros.take() {
                            hand_on(run)?;
                        }
                        hand_on(s)?;
                    }
                }
                Ok(())
            },
            &progress,
            ScanOptions {
                base_snapshot: base_snapshot.as_deref(),
                compress: compression,
                raw_if_based,
                narrow: None,
            },
        )?;
        if let Some(run) = zeros.take() {
            hand_on(run)?;
        }
        if let Some((no, seg)) = builder.finish() {
            store.write_segment(&name, &vol, gen, no, &seg)?;
        }
        Ok((stats, root.finish()))
    });

    let sent = stream_chunks(
        rx,
        side,
        &Target {
            protection: prot.name.as_str(),
            volume: v.name.as_str(),
            size: v.size,
            chunk_size: prot.chunk_size,
            compression,
        },
        w,
        r,
        report,
    )
    .await?;
    let (stats, root) = scan
        .await
        .map_err(|e| CycleError::Io(e.into()))?
        .with_context(|| format!("scan volume {}", v.name))
        .map_err(CycleError::Io)?;
    if let Err(e) = w
        .send(&Msg::End {
            volume: v.name.to_string(),
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
    let m = &primary.metrics;
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
    tracing::info!(
        resync,
        changed = stats.chunks_changed,
        chunks = stats.chunks,
        sent,
        "volume sent"
    );
    Ok((
        VolumeRecord {
            size: v.size,
            chunk_size: prot.chunk_size,
            root,
        },
        VolumeReport {
            name: v.name.to_string(),
            size: v.size,
            snapshot_method: method_name(v.method),
            resync,
            chunks_changed: stats.chunks_changed,
            bytes_changed: stats.bytes_changed,
            chunk_bytes_sent: sent,
            bytes_read: stats.bytes_read,
            ..Default::default()
        },
    ))
}

/// The volume a chunk stream belongs to.
pub struct Target<'a> {
    pub protection: &'a str,
    pub volume: &'a str,
    pub size: u64,
    pub chunk_size: u32,
    pub compression: bool,
}

/// Streams the scan's changed chunks on `w` until the scan ends. With refinement a second
/// stream asks the DR site for the block hashes of each changed chunk its replica has,
/// ahead of the chunk writer, which sends only the blocks that differ. Returns the chunk
/// bytes sent; counts go to `report`. Shared by the daemon's volumes and movers.
pub async fn stream_chunks(
    mut rx: mpsc::Receiver<Scanned>,
    side: &Side<'_>,
    t: &Target<'_>,
    w: &mut FrameWriter,
    r: &mut FrameReader,
    report: &mut CycleReport,
) -> Result<u64, CycleError> {
    // Refinement: a second stream asks the DR site for block hashes of each changed chunk
    // the replica has, ahead of the chunk writer, which turns the answers into patches.
    let local = side.refine && side.base.is_some();
    let (mut ask, mut answers) = if side.refine && !local {
        let (send, recv) = side.conn.open_bi().await.map_err(CycleError::link)?;
        let mut rw = FrameWriter::new(send).with_limit(side.limit.clone());
        rw.send(&Msg::RefineOpen {
            protection: t.protection.to_string(),
            volume: t.volume.to_string(),
            size: t.size,
            chunk_size: t.chunk_size,
        })
        .await?;
        (Some(rw), Some(FrameReader::new(recv)))
    } else {
        (None, None)
    };
    let (qtx, mut qrx) = mpsc::channel::<(Scanned, bool)>(REFINE_WINDOW);
    let requester = async move {
        while let Some(s) = rx.recv().await {
            let asked =
                (local || ask.is_some()) && s.based && matches!(s.content, Content::Data(_));
            if let Some(rw) = ask.as_mut() {
                if asked {
                    rw.queue(&Msg::BlockHashRequest { index: s.index }).await?;
                }
                // The chunk writer waits for answers: never block with requests unsent.
                if rx.is_empty() || qtx.capacity() == 0 {
                    rw.flush().await?;
                }
            }
            if qtx.send((s, asked)).await.is_err() {
                break; // the chunk writer stopped; its error says why
            }
        }
        if let Some(rw) = ask.as_mut() {
            rw.finish();
        }
        Ok::<(), CycleError>(())
    };
    let mut sent = 0u64;
    let writer = async {
        // Consecutive zero chunks travel as one run: (first, count).
        let mut run: Option<(u64, u64)> = None;
        while let Some((s, asked)) = qrx.recv().await {
            if let Content::Zero = s.content {
                report.zero_chunks_sent += s.zeros;
                report.chunks_sent += s.zeros;
                match &mut run {
                    Some((first, count)) if *first + *count == s.index => *count += s.zeros,
                    _ => {
                        if let Some((first, count)) = run.replace((s.index, s.zeros)) {
                            sent += send_run(w, r, first, count).await?;
                        }
                    }
                }
                continue;
            }
            if let Some((first, count)) = run.take() {
                sent += send_run(w, r, first, count).await?;
            }
            let payload = match s.content {
                Content::Data(b) if asked && local => {
                    let base = side.base.clone().expect("a local base");
                    let geometry = Geometry::new(t.size, t.chunk_size);
                    let (off, len) = (geometry.offset(s.index), geometry.len(s.index));
                    // A base shorter than the chunk (the volume grew) gives no hashes: the
                    // chunk goes whole.
                    let theirs = tokio::task::spawn_blocking(move || {
                        crate::volume::replica::read_chunk(&base, off, len)
                            .map(|c| refine::block_hashes(&c))
                            .unwrap_or_default()
                    })
                    .await
                    .map_err(|e| CycleError::Io(anyhow::anyhow!("read the base chunk: {e}")))?;
                    encode_refined(b, &theirs, t.compression, report)
                }
                Content::Data(b) if asked => {
                    let rr = answers.as_mut().expect("asked on the refine stream");
                    let answer = BlockAnswer::try_from(rr.expect("BlockHashes").await?)
                        .map_err(|got| CycleError::unexpected(got, "BlockHashes"))?;
                    let theirs = match answer {
                        BlockAnswer::Hashes { index, packed } if index == s.index => packed,
                        BlockAnswer::Hashes { .. } => {
                            return Err(CycleError::unexpected("BlockHashes", "BlockHashes"))
                        }
                        BlockAnswer::Refused(reason) => {
                            return Err(plan::refused("refinement", reason))
                        }
                    };
                    encode_refined(b, &theirs, t.compression, report)
                }
                Content::Data(b) => Payload::Data(ByteBuf::from(b)),
                Content::Compressed(z) => Payload::Zstd(ByteBuf::from(z)),
                // Zero chunks went into the run above.
                Content::Unchanged | Content::Zero => continue,
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
        if let Some((first, count)) = run.take() {
            sent += send_run(w, r, first, count).await?;
        }
        Ok(())
    };
    tokio::try_join!(requester, writer)?;
    Ok(sent)
}

/// Queues a run of `count` zero chunks from `first`; returns its frame's bytes.
async fn send_run(
    w: &mut FrameWriter,
    r: &mut FrameReader,
    first: u64,
    count: u64,
) -> Result<u64, CycleError> {
    match w.queue(&Msg::ZeroRun { first, count }).await {
        Ok(n) => Ok(n),
        Err(e) => Err(stream_failure(e, r).await),
    }
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
pub async fn stream_failure(e: WireError, r: &mut FrameReader) -> CycleError {
    // The DR site answers after it has freed the failed gen's staging (fsyncs included),
    // which on a loaded disk takes a while; a dead peer is cut off by the idle timeout.
    let reason = tokio::time::timeout(std::time::Duration::from_secs(10), r.next()).await;
    match reason {
        Ok(Ok(Some(Msg::Refused(reason)))) => plan::refused("the cycle", reason),
        other => {
            let got = match other {
                Ok(Ok(Some(m))) => m.kind().to_string(),
                Ok(Ok(None)) => "the end of the stream".into(),
                Ok(Err(e)) => format!("{e}"),
                Err(_) => "nothing within 10 s".into(),
            };
            tracing::debug!(%got, "no reason from the DR site after a failed write");
            CycleError::from(e)
        }
    }
}
