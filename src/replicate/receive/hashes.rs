//! The DR site's answers about its replicas: the chunk hashes of a replica for a resync
//! (from the consistent point's index, or a fresh scan of the replica when there is none
//! at that chunk size), and the 4 KiB block hashes of changed chunks on a refinement
//! stream. Read-only: whatever they answer, every chunk that follows is verified.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use super::machine::check_chunk_size;
use crate::engine::chunk::Geometry;
use crate::engine::index::SegmentBuilder;
use crate::engine::refine;
use crate::engine::scan::{scan_file, volume_size, ScanOptions};
use crate::ids::{Gen, ProtectionName, VolumeName};
use crate::net::wire::{FrameReader, FrameWriter, Msg, Refusal};
use crate::replicate::error::ReceiveError;
use crate::site::dr::Dr;
use crate::store::schema::SCRATCH;
use crate::store::Store;
use crate::volume::replica;

/// Sends this site's hashes of a replica: the index of gen `known`, else a fresh scan of
/// the replica into the scratch index. Returns the index gen the volume's chunks must be
/// diffed against.
pub async fn serve_hashes(
    dr: &Arc<Dr>,
    prot: &ProtectionName,
    volume: &VolumeName,
    replica: PathBuf,
    chunk_size: u32,
    known: Option<Gen>,
    w: &mut FrameWriter,
) -> Result<Gen, ReceiveError> {
    let gen = match known {
        Some(g) => g,
        None => {
            let (p, v) = (prot.clone(), volume.clone());
            dr.store
                .run(move |s| hash_replica(s, &p, &v, &replica, chunk_size))
                .await
                .map_err(ReceiveError::io)?;
            SCRATCH
        }
    };
    let (tx, mut rx) = mpsc::channel(8);
    let (store, p, v) = (dr.store.blocking().clone(), prot.clone(), volume.clone());
    tokio::task::spawn_blocking(move || {
        for seg in store.index(&p, &v, gen) {
            if tx.blocking_send(seg).is_err() {
                break;
            }
        }
    });
    let mut chunks = 0;
    while let Some(seg) = rx.recv().await {
        let (no, seg) = seg.map_err(ReceiveError::store)?;
        chunks += seg.hashes.len() as u64;
        w.send(&Msg::HashSegment {
            segment: no,
            packed: ByteBuf::from(seg.encode()),
        })
        .await?;
    }
    w.send(&Msg::HashEnd {
        volume: volume.to_string(),
        chunk_count: chunks,
    })
    .await?;
    Ok(gen)
}

/// Hashes the replica as it is on disk into the scratch index.
fn hash_replica(
    store: &Store,
    prot: &ProtectionName,
    vol: &VolumeName,
    path: &Path,
    chunk_size: u32,
) -> anyhow::Result<()> {
    store.clear_scratch(prot, vol)?;
    displace_non_replica(path)?;
    // No replica yet, but the new one an interrupted first sync was building beside it:
    // its chunks are what this site has, so the sync resumes and sends only the rest.
    // Nothing trusts the file beyond this scan, and it becomes the replica only at commit.
    let partial = replica::fresh_path(path);
    let path = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && partial.is_file() => {
            tracing::info!(partial = %partial.display(), "resuming an interrupted first sync from what it wrote");
            partial.as_path()
        }
        _ => path,
    };
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
        chunks = geometry.chunk_count(),
        "hashed the replica for a resync"
    );
    Ok(())
}

/// Moves whatever sits at a replica's path that cannot be a replica (a directory, a FIFO)
/// aside, renamed, never deleted, so the resync can rebuild the replica and nothing that
/// was there is lost.
fn displace_non_replica(path: &Path) -> anyhow::Result<()> {
    let Ok(crate::volume::stamp::Observed::Other(what)) = crate::volume::stamp::observe(path)
    else {
        return Ok(());
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".lifeboat-displaced-{}", crate::ids::now_ms()));
    std::fs::rename(path, &aside)
        .with_context(|| format!("move {what} at replica path {} aside", path.display()))?;
    tracing::warn!(
        path = %path.display(),
        moved_to = %std::path::Path::new(&aside).display(),
        "{what} was at the replica's path; moved aside, the replica is rebuilt"
    );
    Ok(())
}

/// Answers a refinement stream: for each requested chunk, the block hashes of this site's
/// replica, in request order.
pub async fn serve_block_hashes(
    dr: &Arc<Dr>,
    protection: &str,
    volume: &str,
    size: u64,
    chunk_size: u32,
    w: &mut FrameWriter,
    r: &mut FrameReader,
) -> Result<(), ReceiveError> {
    let prot = dr
        .config
        .protection(protection)
        .ok_or_else(|| ReceiveError::refuse(Refusal::UnknownProtection(protection.to_string())))?
        .with_volumes([volume]);
    let path = prot.volume(volume).map(|v| v.path.clone()).ok_or_else(|| {
        let names: Vec<&str> = prot.volumes.iter().map(|v| v.name.as_str()).collect();
        ReceiveError::refuse(Refusal::UnknownVolume(volume.to_string(), names.join(", ")))
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
        while let Some(m) = r.next().await? {
            match m {
                Msg::BlockHashRequest { index } => {
                    if req_tx.send(index).await.is_err() {
                        break;
                    }
                }
                other => {
                    return Err(ReceiveError::protocol(format!(
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
            w.queue(&m).await?;
            // The primary waits for these: send whenever no more are ready.
            if resp_rx.is_empty() {
                w.flush().await?;
            }
        }
        w.flush().await?;
        w.finish();
        Ok::<(), ReceiveError>(())
    };
    let result = tokio::try_join!(reading, writing).map(|_| ());
    worker.await.map_err(ReceiveError::io)?;
    result
}
