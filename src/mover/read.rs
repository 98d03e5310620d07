//! `lifeboat mover --verify`: the DR site's reader. `lifeboat verify` of a protection with
//! CSI replicas runs it as a Job that attaches one replica PVC read-only: it hashes the
//! replica chunk by chunk and sends the hashes to its own daemon (the DR site's
//! certificate), which compares them with the DR index as they arrive. Memory: one chunk
//! and one segment of hashes; the device is never written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde_bytes::ByteBuf;

use crate::engine::chunk::Geometry;
use crate::engine::index::{Segment, SegmentBuilder};
use crate::ids::{ChunkHash, Gen};
pub use crate::k8s::writer_job::Read;
use crate::net::wire::{FrameReader, FrameWriter, Msg, SiteRole};

/// What the DR daemon tells a reader (its Job's arguments).
#[derive(Debug, Clone)]
pub struct ReadJob {
    pub device: PathBuf,
    pub link: super::DrLink,
    pub protection: String,
    pub gen: Gen,
    pub volume: String,
    /// The volume's bytes at the gen (the replica PVC may be larger).
    pub size: u64,
    pub chunk_size: u32,
}

/// Hashes `geometry`'s chunks of `device` in order, handing each finished segment to
/// `out` (false: stop). Blocking.
fn hash_device(
    device: &File,
    geometry: Geometry,
    mut out: impl FnMut(u64, Segment) -> bool,
) -> Result<u64> {
    let mut b = SegmentBuilder::default();
    let mut buf = Vec::new();
    let mut read = 0u64;
    for i in 0..geometry.chunk_count() {
        let (offset, len) = (geometry.offset(i), geometry.len(i));
        buf.resize(len as usize, 0);
        device
            .read_exact_at(&mut buf, offset)
            .with_context(|| format!("read chunk {i} ({len} bytes at {offset})"))?;
        read += len as u64;
        if let Some((no, seg)) = b.push(ChunkHash::of(&buf)) {
            if !out(no, seg) {
                return Ok(read);
            }
        }
    }
    if let Some((no, seg)) = b.finish() {
        out(no, seg);
    }
    Ok(read)
}

/// Hashes the replica and has the daemon compare it.
pub async fn read(job: &ReadJob) -> Result<Read> {
    let geometry = Geometry::new(job.size, job.chunk_size);
    let device = File::open(&job.device)
        .with_context(|| format!("open the replica {}", job.device.display()))?;
    let conn = super::connect_as(&job.link, SiteRole::Dr).await?;
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&Msg::VerifyOpen {
        protection: job.protection.clone(),
        gen: job.gen,
        volume: job.volume.clone(),
    })
    .await?;
    // Bounded: the device waits while the link is slower.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Segment)>(4);
    let hashing = tokio::task::spawn_blocking(move || {
        hash_device(&device, geometry, |no, seg| {
            tx.blocking_send((no, seg)).is_ok()
        })
    });
    while let Some((no, seg)) = rx.recv().await {
        w.send(&Msg::HashSegment {
            segment: no,
            packed: ByteBuf::from(seg.encode()),
        })
        .await?;
    }
    let bytes_read = hashing
        .await
        .map_err(|e| anyhow!("the read panicked: {e}"))??;
    w.send(&Msg::HashEnd {
        volume: job.volume.clone(),
        chunk_count: geometry.chunk_count(),
    })
    .await?;
    let (chunks, divergent) = match r.expect("Verified").await? {
        Msg::Verified { chunks, divergent } => (chunks, divergent),
        Msg::Refused(why) => bail!("the DR daemon refused the hashes: {why}"),
        other => bail!("expected Verified, got {}", other.kind()),
    };
    w.finish();
    conn.close(0u32.into(), b"reader done");
    Ok(Read {
        volume: job.volume.clone(),
        gen: job.gen.0,
        chunks,
        divergent,
        bytes_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_hashed_in_chunk_order_into_segments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        let bytes: Vec<u8> = (0..(3 * 4096 + 100)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let g = Geometry::new(bytes.len() as u64, 4096);
        let mut got = Vec::new();
        let n = hash_device(&File::open(&p).unwrap(), g, |no, seg| {
            got.push((no, seg));
            true
        })
        .unwrap();
        assert_eq!(n, bytes.len() as u64);
        assert_eq!(got.len(), 1);
        let want: Vec<ChunkHash> = bytes.chunks(4096).map(ChunkHash::of).collect();
        assert_eq!(got[0].1.hashes, want);
        // A device shorter than the volume is an error naming the chunk.
        let short = Geometry::new(bytes.len() as u64 + 8192, 4096);
        let e = hash_device(&File::open(&p).unwrap(), short, |_, _| true).unwrap_err();
        assert!(format!("{e:#}").contains("read chunk 3"), "{e:#}");
    }
}
