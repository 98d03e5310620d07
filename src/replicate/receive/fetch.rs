//! A writer Job's stream (DR site, CSI replicas): it asks for the staging log of one
//! volume of a committed gen, and gets the log's bytes. Only committed gens are served:
//! a writer never sees data the group commit has not made the truth.

use anyhow::{anyhow, bail, Result};
use serde_bytes::ByteBuf;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::ids::{Gen, ProtectionName};
use crate::net::wire::{FrameReader, FrameWriter, Msg, Refusal};
use crate::replicate::messages::Opening;
use crate::site::dr::Dr;

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
            Some(Ok(_)) | Some(Err(_)) => bail!("a writer may only send Fetch"),
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
