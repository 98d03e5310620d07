//! `lifeboat mover`: one volume of a Kubernetes cycle, moved where its snapshot is
//! attached. The primary's daemon runs it as a Job on whichever node CSI attaches the
//! snapshot's restored PVC to (a raw block device), so no data passes through the daemon.
//!
//! Topology: mover → DR daemon. The mover joins the running cycle at the DR site's peer
//! port with the pair's mutual TLS (the primary's certificate, from a Secret), gets the DR
//! site's hashes of the replica (a mover keeps no index: the DR site's index of its
//! consistent point is the base), scans the device against them and streams the changed
//! chunks; the DR site verifies and stages them as it does a cycle stream's, and says
//! `Staged` once they are durable. Only then does the mover write its result (the volume's
//! root and counts) to the termination message, where the daemon reads it from the Pod.
//! One port to open between the sites, one place that checks epochs and hashes.
//!
//! Failure modes: a mover killed or cut mid-volume leaves nothing committed (the DR site
//! drops the volume's staging with the cycle or when the Job's retry joins again); a DR
//! daemon restart ends the cycle and the primary retries it; the hash download costs 32
//! bytes per chunk of the volume (1/2048 at 64 KiB chunks) on every cycle.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::mpsc;

use crate::engine::chunk::{Geometry, RootHasher};
use crate::engine::diff::BaseCursor;
use crate::engine::index::Segment;
use crate::engine::scan::{scan_file, volume_size, Content, ScanOptions, Scanned};
use crate::ids::CycleId;
pub use crate::k8s::mover_job::Outcome;
use crate::net::tls::TlsFiles;
use crate::net::wire::{FrameReader, FrameWriter, Msg, SiteRole, PROTOCOL_VERSION};
use crate::replicate::send::volume::{stream_chunks, Side, Target};

/// How a mover or writer reaches the DR daemon: its peer address and certificate name,
/// this site's name said in the hello, and the pair's TLS files.
#[derive(Debug, Clone)]
pub struct DrLink {
    pub peer: SocketAddr,
    pub server_name: String,
    pub site: String,
    pub tls: TlsFiles,
}

/// What the daemon tells a mover (its Job's arguments).
#[derive(Debug, Clone)]
pub struct Job {
    pub device: PathBuf,
    pub link: DrLink,
    pub protection: String,
    pub cycle: CycleId,
    pub volume: String,
    pub chunk_size: u32,
    pub compress: bool,
    /// Where the hashes from the DR site are kept while scanning (an emptyDir).
    pub scratch: PathBuf,
    /// The bytes to move: the snapshot's size (a restored PVC may be rounded up).
    pub size: Option<u64>,
    /// Send changed chunks the replica has as their changed 4 KiB blocks.
    pub refine: bool,
    /// The base gen's snapshot as a device: what the replica holds, read for refinement.
    pub base_device: Option<PathBuf>,
    /// Fail, naming where it stood, when nothing moves for this long (no hash bytes
    /// received, no bytes scanned): a hung device or a DR site that stopped answering.
    pub stall_after: Option<std::time::Duration>,
    /// The driver's SnapshotMetadata service: read only the ranges it reports.
    pub cbt: Option<cbt::CbtJob>,
}

pub mod cbt;
pub mod read;
pub mod write;

/// Connects to the DR daemon over `link` (the pair's mutual TLS), saying this site and
/// `role` in the hello.
async fn connect_as(link: &DrLink, role: SiteRole) -> Result<quinn::Connection> {
    let (peer, server_name, site) = (link.peer, link.server_name.as_str(), link.site.as_str());
    let tls = crate::net::tls::mover_client_config(&link.tls)?;
    let ep = crate::net::quic::client_endpoint(peer, tls)?;
    let conn = ep
        .connect(peer, server_name)
        .with_context(|| format!("connect to the DR site {peer} ({server_name})"))?
        .await
        .with_context(|| format!("connect to the DR site {peer} ({server_name})"))?;
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&Msg::Hello {
        version: PROTOCOL_VERSION,
        site: site.to_string(),
        role,
    })
    .await?;
    match r.expect("HelloAck").await? {
        Msg::HelloAck { version, .. } if version == PROTOCOL_VERSION => Ok(conn),
        Msg::HelloAck { version, .. } => {
            bail!("the DR site speaks protocol version {version}, this mover {PROTOCOL_VERSION}")
        }
        Msg::Refused(r) => bail!("the DR site refused this mover: {r}"),
        other => bail!("expected HelloAck, got {}", other.kind()),
    }
}

/// Moves the volume (see [`move_volume`]), failing if it stops progressing for
/// `job.stall_after`.
pub async fn send(job: &Job) -> Result<Outcome> {
    let activity = Arc::new(AtomicU64::new(0));
    let Some(after) = job.stall_after else {
        return move_volume(job, &activity).await;
    };
    tokio::select! {
        r = move_volume(job, &activity) => r,
        e = stalled(&activity, after) => Err(e),
    }
}

/// Returns once `activity` has not changed for `after`.
async fn stalled(activity: &AtomicU64, after: std::time::Duration) -> anyhow::Error {
    let tick = (after / 4).max(std::time::Duration::from_millis(100));
    let (mut last, mut since) = (
        activity.load(Ordering::Relaxed),
        tokio::time::Instant::now(),
    );
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.load(Ordering::Relaxed);
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= after {
            return anyhow!(
                "no progress for {} ({now} bytes of hashes and volume handled): the device or the DR site stopped answering",
                humantime::format_duration(after)
            );
        }
    }
}

/// Moves the volume: join, take the DR site's hashes, scan and send, wait for `Staged`.
/// Every hash byte received and volume byte scanned is counted in `activity`.
async fn move_volume(job: &Job, activity: &Arc<AtomicU64>) -> Result<Outcome> {
    let conn = connect_as(&job.link, SiteRole::Primary).await?;
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&Msg::Join {
        protection: job.protection.clone(),
        cycle: job.cycle,
        volume: job.volume.clone(),
        chunk_size: job.chunk_size,
    })
    .await?;
    let mut out = Outcome {
        volume: job.volume.clone(),
        chunk_size: job.chunk_size,
        ..Default::default()
    };
    // The DR site's hashes, to a scratch file: memory stays bounded whatever the size.
    let before = r.bytes;
    let hashes = job.scratch.join("base-hashes");
    {
        let mut f = BufWriter::new(
            File::create(&hashes).with_context(|| format!("create {}", hashes.display()))?,
        );
        loop {
            match r.expect("HashEnd").await? {
                Msg::HashSegment { segment, packed } => {
                    activity.fetch_add(packed.len() as u64 + 1, Ordering::Relaxed);
                    f.write_all(&segment.to_le_bytes())?;
                    f.write_all(&(packed.len() as u32).to_le_bytes())?;
                    f.write_all(&packed)?;
                }
                Msg::HashEnd { .. } => break,
                Msg::Refused(reason) => bail!("the DR site refused the volume: {reason}"),
                other => bail!("expected HashSegment, got {}", other.kind()),
            }
        }
        f.flush()?;
    }
    out.hash_bytes_received = r.bytes - before;
    let device_size = volume_size(
        &File::open(&job.device).with_context(|| format!("open {}", job.device.display()))?,
    )?;
    let size = match job.size {
        Some(s) if s > device_size => bail!(
            "{} holds {device_size} bytes, less than the snapshot's {s}",
            job.device.display()
        ),
        Some(s) => s,
        None => device_size,
    };
    out.size = size;
    let geometry = Geometry::new(size, job.chunk_size);
    w.send(&Msg::Begin {
        volume: job.volume.clone(),
        size,
        chunk_size: job.chunk_size,
    })
    .await?;
    let narrow = match &job.cbt {
        Some(c) => narrowed(job, c, geometry, &hashes, &mut out).await?,
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Scanned>(16);
    let (device, compress, refine) = (job.device.clone(), job.compress, job.refine);
    let p2 = activity.clone();
    let scan = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut cursor = BaseCursor::new(SegmentFile::open(&hashes)?);
        let mut root = RootHasher::new(geometry);
        let stats = scan_file(
            &device,
            geometry,
            |i| cursor.hash_at(i),
            |s| {
                root.push(&s.hash);
                if !matches!(s.content, Content::Unchanged) {
                    tx.blocking_send(s)
                        .map_err(|_| anyhow!("the network side stopped"))?;
                }
                Ok(())
            },
            &p2,
            ScanOptions {
                compress,
                // Refined chunks are compressed as patches instead.
                raw_if_based: refine,
                narrow: narrow.as_ref(),
                ..Default::default()
            },
        )?;
        Ok((stats, root.finish()))
    });
    // The daemon's own chunk writer, refinement included: a changed chunk the replica
    // has travels as its changed 4 KiB blocks.
    let mut counts = crate::api::CycleReport::default();
    let base = match &job.base_device {
        Some(p) => {
            Some(Arc::new(File::open(p).with_context(|| {
                format!("open the base device {}", p.display())
            })?))
        }
        None => None,
    };
    let sent = stream_chunks(
        rx,
        &Side {
            conn: &conn,
            limit: None,
            refine: job.refine,
            base,
        },
        &Target {
            protection: &job.protection,
            volume: &job.volume,
            size,
            chunk_size: job.chunk_size,
            compression: job.compress,
        },
        &mut w,
        &mut r,
        &mut counts,
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    out.zero_chunks_sent = counts.zero_chunks_sent;
    out.refined_chunks = counts.refined_chunks;
    out.refine_saved_bytes = counts.refine_saved_bytes;
    let (stats, root) = scan.await??;
    w.send(&Msg::End {
        volume: job.volume.clone(),
        chunk_count: geometry.chunk_count(),
        root,
    })
    .await?;
    match r.expect("Staged").await? {
        Msg::Staged {
            volume,
            root: theirs,
        } if volume == job.volume && theirs == root => {}
        Msg::Staged { root: theirs, .. } => bail!(
            "the DR site staged root {theirs} for {}, the mover sent {root}",
            job.volume
        ),
        Msg::Refused(reason) => bail!("the DR site refused the volume: {reason}"),
        other => bail!("expected Staged, got {}", other.kind()),
    }
    w.finish();
    conn.close(0u32.into(), b"mover done");
    out.root = root.to_string();
    out.chunks = stats.chunks;
    out.chunks_changed = stats.chunks_changed;
    out.bytes_scanned = stats.bytes_scanned;
    out.bytes_read += stats.bytes_read;
    out.bytes_changed = stats.bytes_changed;
    out.chunk_bytes_sent = sent;
    Ok(out)
}

/// Asks the SnapshotMetadata service which chunks to read and checks a sample of the
/// others against the DR site's hashes (`hashes`); `None` (scan everything) when the
/// service fails or the answer does not hold, with why in `out`. Only an unreadable
/// device is an error.
async fn narrowed(
    job: &Job,
    c: &cbt::CbtJob,
    geometry: Geometry,
    hashes: &std::path::Path,
    out: &mut Outcome,
) -> Result<Option<crate::engine::narrow::Narrow>> {
    let call = if c.base_id.is_some() {
        "GetMetadataDelta"
    } else {
        "GetMetadataAllocated"
    };
    let fallback = |out: &mut Outcome, why: String| {
        tracing::warn!(volume = %job.volume, "changed block tracking not used: {why}");
        out.cbt = "full".into();
        out.cbt_fallback = Some(why.chars().take(600).collect());
    };
    let answer = match cbt::ask(c, geometry).await {
        Ok(a) => a,
        Err(e) => {
            fallback(out, format!("{e:#}; scanned the whole volume"));
            return Ok(None);
        }
    };
    out.cbt_ranges = answer.ranges;
    let (device, hashes, share) = (job.device.clone(), hashes.to_path_buf(), c.sample);
    // A different sample every cycle, so no chunk stays unchecked for long.
    let seed = job.cycle.0
        ^ u64::from_le_bytes(
            blake3::hash(job.volume.as_bytes()).as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
    let (narrow, checked) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut cursor = BaseCursor::new(SegmentFile::open(&hashes)?);
        let checked = cbt::check(&device, geometry, &answer.narrow, share, seed, |i| {
            cursor.hash_at(i)
        })?;
        Ok((answer.narrow, checked))
    })
    .await??;
    let (read, mismatch) = checked;
    out.bytes_read += read;
    if let Some(m) = mismatch {
        let what = match narrow.unlisted {
            crate::engine::narrow::Unlisted::Base => "differs from the replica",
            crate::engine::narrow::Unlisted::Zero => "is not zeros",
        };
        out.cbt_mismatch = true;
        fallback(
            out,
            format!(
                "{call} left chunk {} out, but it {what} (found by reading {} sampled chunks); scanned the whole volume",
                m.chunk, m.sampled
            ),
        );
        return Ok(None);
    }
    out.cbt = if c.base_id.is_some() {
        "delta"
    } else {
        "allocated"
    }
    .into();
    Ok(Some(narrow))
}

/// The scratch file's segments in order, as the base cursor pulls them.
struct SegmentFile(BufReader<File>);

impl SegmentFile {
    fn open(path: &std::path::Path) -> Result<Self> {
        Ok(SegmentFile(BufReader::new(
            File::open(path).with_context(|| format!("open {}", path.display()))?,
        )))
    }
}

impl Iterator for SegmentFile {
    type Item = Result<(u64, Segment)>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut head = [0u8; 12];
        match self.0.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(e.into())),
        }
        let no = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        let mut packed = vec![0u8; len];
        if let Err(e) = self.0.read_exact(&mut packed) {
            return Some(Err(e.into()));
        }
        Some(
            Segment::decode(&packed)
                .map(|s| (no, s))
                .map_err(|e| anyhow!("hash segment {no} from the DR site: {e}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ChunkHash;

    #[test]
    fn an_outcome_root_round_trips_through_hex() {
        let h = ChunkHash::of(b"x");
        let o = Outcome {
            root: h.to_string(),
            ..Default::default()
        };
        assert_eq!(o.root_hash().unwrap(), h);
        let bad = Outcome {
            root: "zz".into(),
            ..Default::default()
        };
        assert!(bad.root_hash().is_err());
        // Fits a termination message with room to spare.
        assert!(serde_json::to_string(&o).unwrap().len() < 1024);
    }
}
