//! A writer or reader Job's stream (DR site, CSI replicas). A writer asks for the staging
//! log of one volume of a committed gen, and gets the log's bytes; only committed gens are
//! served, so a writer never sees data the group commit has not made the truth. A reader
//! sends the hashes of one replica for a `lifeboat verify` that waits for them; they are
//! compared with the DR index of that gen as they arrive (memory: one segment, and the
//! divergent chunks' numbers).

use anyhow::{anyhow, bail, Result};
use serde_bytes::ByteBuf;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::ids::{Gen, ProtectionName};
use crate::net::wire::{FrameReader, FrameWriter, Msg, Refusal};
use crate::replicate::messages::Opening;
use crate::site::dr::{Dr, ReaderCompared};

/// Bytes per `LogPart` frame.
const PART: usize = 256 * 1024;

pub(super) async fn serve(
    dr: &Dr,
    mut w: FrameWriter,
    mut r: FrameReader,
    stop: &CancellationToken,
) {
    let first = tokio::select! {
        m = r.next() => m,
        _ = stop.cancelled() => return,
    };
    let result = async {
        match first?.map(Opening::try_from) {
            Some(Ok(Opening::Fetch {
                protection,
                gen,
                volume,
            })) => {
                tokio::select! {
                    r = send_log(dr, &protection, gen, &volume, &mut w) => r,
                    _ = stop.cancelled() => bail!("shutting down"),
                }
            }
            Some(Ok(Opening::Verify {
                protection,
                gen,
                volume,
            })) => {
                tokio::select! {
                    r = compare(dr, &protection, gen, &volume, &mut w, &mut r) => r,
                    _ = stop.cancelled() => bail!("shutting down"),
                }
            }
            Some(Ok(_)) | Some(Err(_)) => {
                bail!("a writer may only send Fetch, a reader VerifyOpen")
            }
            None => Ok(()),
        }
    }
    .await;
    if let Err(e) = result {
        let why = format!("{e:#}");
        tracing::warn!(error = %why, "a writer's fetch failed");
        let _ = w.send(&Msg::Refused(Refusal::Invalid(why))).await;
    }
    w.finish();
}

/// Compares a reader's hashes of `volume` with the DR index of `gen`, for the verify
/// that waits for them.
async fn compare(
    dr: &Dr,
    protection: &str,
    gen: Gen,
    volume: &str,
    w: &mut FrameWriter,
    r: &mut FrameReader,
) -> Result<()> {
    use crate::engine::index::{Segment, SEGMENT_CHUNKS};
    let prot = ProtectionName::new(protection).map_err(|e| anyhow!(e))?;
    let vol = crate::ids::VolumeName::new(volume).map_err(|e| anyhow!(e))?;
    let lock = dr
        .lock_of(protection)
        .ok_or_else(|| anyhow!("no protection {protection} at this site"))?;
    let reply = lock.reader_arrived(volume, gen).ok_or_else(|| {
        anyhow!("no verify of {volume} at gen {gen} of protection {protection} waits for a reader")
    })?;
    // Bounded: the reader waits while the index is read.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Segment)>(4);
    let store = dr.store.blocking().clone();
    let compared = tokio::task::spawn_blocking(move || -> Result<ReaderCompared> {
        let mut cursor = crate::engine::diff::BaseCursor::new(store.index(&prot, &vol, gen));
        let mut out = ReaderCompared::default();
        for (no, seg) in rx {
            for (k, h) in seg.hashes.iter().enumerate() {
                let i = no * SEGMENT_CHUNKS + k as u64;
                if cursor.hash_at(i)?.as_ref() != Some(h) {
                    out.divergent.push(i);
                }
                out.chunks += 1;
            }
        }
        Ok(out)
    });
    let fed = async {
        let mut expect = 0u64;
        loop {
            match r.expect("HashEnd").await? {
                Msg::HashSegment { segment, packed } => {
                    anyhow::ensure!(
                        segment == expect,
                        "the reader sent segment {segment}, expected {expect}"
                    );
                    expect += 1;
                    let seg = Segment::decode(&packed)?;
                    if tx.send((segment, seg)).is_err() {
                        return Ok(None);
                    }
                }
                Msg::HashEnd { chunk_count, .. } => return Ok(Some(chunk_count)),
                other => bail!("expected HashSegment, got {}", other.kind()),
            }
        }
    }
    .await;
    drop(tx);
    let out = compared
        .await
        .map_err(|e| anyhow!("the comparison panicked: {e}"))??;
    let told: Option<u64> = fed?;
    if let Some(n) = told {
        anyhow::ensure!(
            n == out.chunks,
            "the reader said it sent {n} chunks; {} arrived",
            out.chunks
        );
    }
    w.send(&Msg::Verified {
        chunks: out.chunks,
        divergent: out.divergent.len() as u64,
    })
    .await?;
    tracing::debug!(volume, %gen, chunks = out.chunks, divergent = out.divergent.len(), "compared a reader's hashes");
    let _ = reply.send(out);
    Ok(())
}

async fn send_log(
    dr: &Dr,
    protection: &str,
    gen: Gen,
    volume: &str,
    w: &mut FrameWriter,
) -> Result<()> {
    let prot = ProtectionName::new(protection).map_err(|e| anyhow!(e))?;
    let p2 = prot.clone();
    let commits = dr.store.run(move |s| s.commits(&p2)).await?;
    let commit = commits
        .iter()
        .find(|c| c.point.point.gen == gen)
        .ok_or_else(|| {
            anyhow!("protection {protection} has no committed gen {gen} waiting to be applied")
        })?;
    let log = commit
        .logs
        .iter()
        .find(|(v, _)| v.as_str() == volume)
        .map(|(_, l)| l.clone())
        .ok_or_else(|| anyhow!("gen {gen} of protection {protection} has no volume {volume}"))?;
    let mut f = tokio::fs::File::open(&log)
        .await
        .map_err(|e| anyhow!("open staging log {}: {e}", log.display()))?;
    let mut sent = 0u64;
    let mut buf = vec![0u8; PART];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.send(&Msg::LogPart {
            bytes: ByteBuf::from(buf[..n].to_vec()),
        })
        .await?;
        sent += n as u64;
    }
    w.send(&Msg::LogEnd { bytes: sent }).await?;
    tracing::debug!(volume, %gen, bytes = sent, "served a staging log to its writer");
    Ok(())
}
