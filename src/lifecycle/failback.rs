//! `lifeboat failback` at the old primary, after the protection failed over to the peer:
//! the peer (where the application runs now) sends the protection from then on, and this
//! site receives it into its own volumes at a higher epoch. Nothing is copied whole: the
//! first cycle of the new direction resyncs each volume by hash exchange against what this
//! site still holds, so only the chunks that differ travel, those changed at the peer since
//! the failover and those written here after the last common gen (the fork).
//!
//! In order, each step safe to repeat:
//! 1. the peer is asked over the pair's QUIC link and turns to sending (at a new epoch; a
//!    repeated ask gets the same one). Until step 4 this site refuses its cycles, without
//!    fencing it, so a failure in between costs a retry, never data;
//! 2. the fork is counted: each volume's chunks that differ from this site's index of the
//!    common gen ("N chunks written at SITE after gen G are discarded");
//! 3. each volume is kept as it was (reflink, else a copy) before anything overwrites it;
//! 4. fences beside the volumes go (this site's data stops being the application's), then
//!    one record step turns this site to receiving: base and fence go, every volume is
//!    marked for repair, the fork is recorded (status shows it).
//!
//! Then `failover --planned` at this site returns the application with nothing lost.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};

use crate::api::FailbackReport;
use crate::engine::chunk::Geometry;
use crate::ids::{now_ms, Epoch, Gen, VolumeName};
use crate::lifecycle::verify::divergent_chunks;
use crate::net::wire::{FrameReader, FrameWriter, Msg};
use crate::site::dr::Dr;
use crate::site::primary::Primary;
use crate::store::turn::{Fork, ForkVolume};
use crate::volume::{fence, fork};

/// `dr` is this site's receiving half (it has `[listen]`).
pub async fn failback(primary: &Primary, dr: &Dr, name: &str) -> Result<FailbackReport> {
    let site = primary.config.site_name.clone();
    let prot = primary.protection(name)?.clone();
    if prot.kubernetes.is_some() {
        bail!("protection {name} is a Kubernetes protection; failback works for local-mode protections only in this release: re-protect it (`lifeboat reprotect` at both sites) instead");
    }
    let peer = primary
        .config
        .peer
        .as_ref()
        .map(|p| p.server_name.clone())
        .context("this site has no [peer]")?;
    // One failback at a time, and none beside a cycle this site receives: a second one
    // must not keep a fork of volumes the first one's cycle is writing.
    let lock = dr.lock_of(name).expect("a lock per protection");
    let locked = lock.lock().await;
    let rec = primary.store.record(&prot.name).await?;
    if !primary.sends(&rec) {
        let since = rec.turn.as_ref().filter(|t| !t.sends);
        return match since {
            Some(_) if rec.failed_over.is_some() => bail!(
                "site {site} failed over {name} after its failback and runs the application: failback runs at {peer} now"
            ),
            Some(t) => Ok(already(name, &rec, t)),
            None => bail!(
                "site {site} receives protection {name}: failback runs at the site the protection failed over from (its old primary)"
            ),
        };
    }
    if primary.config.listen.is_none() {
        bail!(
            "site {site} has no [listen], so {peer} cannot send {name} to it: add [listen] with an address {peer}'s [peer] names, restart, and run failback again"
        );
    }
    primary
        .live
        .activity(name, format!("failback: asking {peer} to send"));
    let (epoch, common) = ask(primary, name).await?;
    let at = now_ms();
    primary.live.activity(name, "failback: keeping the fork");
    let base = rec.fork_base(common).cloned();
    let (store, state_dir, p) = (
        primary.store.blocking().clone(),
        primary.config.state_dir.clone(),
        prot.clone(),
    );
    let fork = tokio::task::spawn_blocking(move || -> Result<Fork> {
        let mut volumes = BTreeMap::new();
        let mut dirs = Vec::new();
        let result = (|| {
            for v in &p.volumes {
                let vol = v.name.clone();
                // Named by the epoch, which a repeated failback gets again: a retry after
                // a crash reuses (and completes) the directory instead of adding one.
                let dir = fork::dir(&v.path, &state_dir, p.name.as_str(), epoch);
                if !dirs.contains(&dir) {
                    dirs.push(dir.clone());
                }
                let (chunks, bytes) = match std::fs::metadata(&v.path) {
                    Ok(_) => count(&store, &p.name, &vol, base.as_ref(), &v.path, p.chunk_size)?,
                    // A volume that is gone has nothing to keep; the first cycle writes it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(anyhow!(e).context(format!("stat {}", v.path.display()))),
                };
                let (kept, _) = fork::keep(&v.path, &dir, vol.as_str())?;
                volumes.insert(vol, ForkVolume { chunks, bytes, kept });
            }
            Ok(())
        })();
        if let Err(e) = result {
            dirs.iter().for_each(|d| fork::discard(d));
            return Err(e);
        }
        Ok(Fork {
            gen: base.as_ref().map(|b| b.point.gen),
            volumes,
        })
    })
    .await
    .context("keep the fork")?
    .with_context(|| {
        format!("failback of {name}: {peer} sends it already, but this site could not keep its volumes as they are; nothing here changed, fix the cause and run failback again")
    })?;
    // A fence beside a volume says its data is the application's; once this site
    // receives, a fence found there would fail the protection over again. Removed before
    // the turn is recorded: a crash in between leaves a sender without its spare fence.
    let paths: Vec<_> = prot.volumes.iter().map(|v| v.path.clone()).collect();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for p in &paths {
            fence::remove(p)?;
        }
        Ok(())
    })
    .await??;
    let vols: Vec<VolumeName> = prot.volumes.iter().map(|v| v.name.clone()).collect();
    let (f, pr) = (fork.clone(), peer.clone());
    let rec = primary
        .store
        .step(&prot.name, move |s, n| {
            s.turn_to_receiver(n, &pr, epoch, at, &vols, f)
        })
        .await?;
    // A failover this site made (a relocate's) no longer holds replication off.
    lock.end_failover(&locked);
    drop(locked);
    // The snapshots of this site's sending days (possibly full copies) are not a base any
    // more: a receiving site keeps none.
    let p = prot.clone();
    tokio::task::spawn_blocking(move || crate::volume::snapshot::prune(&p, &[])).await??;
    primary.turned();
    primary.live.activity(name, "idle");
    let discarded = fork.describe(&site);
    tracing::warn!(protection = name, peer = %peer, %epoch, "failback: {discarded}");
    Ok(FailbackReport {
        protection: name.to_string(),
        sender: peer.clone(),
        epoch: rec.epoch.0,
        common_gen: common.map(|g| g.0),
        fork_gen: fork.gen.map(|g| g.0),
        discarded_chunks: fork.chunks(),
        discarded_bytes: fork.bytes(),
        kept: kept(&fork),
        done: vec![
            format!("{peer} sends {name} from now on, at epoch {epoch}"),
            discarded,
            format!("this site receives {name}; its first cycle resyncs each volume by hash exchange and sends only the chunks that differ"),
        ],
    })
}

/// Step 1: the peer turns to sending; its epoch and the gen it failed over at.
async fn ask(primary: &Primary, name: &str) -> Result<(Epoch, Option<Gen>)> {
    let conn = primary
        .peer
        .connection(primary)
        .await
        .context("failback needs the peer: connect to it")?;
    let (send, recv) = conn.open_bi().await.context("open a stream to the peer")?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&Msg::Failback {
        protection: name.to_string(),
    })
    .await?;
    w.finish();
    match r.expect("TurnedAround").await? {
        Msg::TurnedAround { epoch, gen } => Ok((epoch, gen)),
        Msg::Refused(why) => bail!("the peer refused the failback: {why}"),
        other => bail!("the peer answered the failback with {}", other.kind()),
    }
}

/// Step 2 for one volume: its chunks that differ from `base`'s index, and their bytes.
fn count(
    store: &crate::store::Store,
    prot: &crate::ids::ProtectionName,
    vol: &VolumeName,
    base: Option<&crate::store::PointRecord>,
    path: &std::path::Path,
    configured_chunk: u32,
) -> Result<(u64, u64)> {
    let f = crate::volume::snapshot::open_volume(path)?;
    let size = crate::engine::scan::volume_size(&f)
        .with_context(|| format!("size of {}", path.display()))?;
    let at = base.and_then(|b| b.volumes.get(vol).map(|v| (b.point.gen, v.chunk_size)));
    // No index of the volume at the base: every chunk counts as written since.
    let (gen, chunk_size) = at.unwrap_or((Gen(0), configured_chunk));
    let d = divergent_chunks(store, prot, vol, gen, path, Geometry::new(size, chunk_size))?;
    Ok((d.indices.len() as u64, d.bytes))
}

fn kept(fork: &Fork) -> BTreeMap<String, String> {
    fork.volumes
        .iter()
        .map(|(v, f)| (v.to_string(), f.kept.display().to_string()))
        .collect()
}

/// Failback ran here before: the same report again.
fn already(
    name: &str,
    rec: &crate::store::ProtectionRecord,
    t: &crate::store::turn::Turn,
) -> FailbackReport {
    let fork = t.fork.clone().unwrap_or(Fork {
        gen: None,
        volumes: BTreeMap::new(),
    });
    FailbackReport {
        protection: name.to_string(),
        sender: t.peer.clone(),
        epoch: rec.epoch.0,
        common_gen: None,
        fork_gen: fork.gen.map(|g| g.0),
        discarded_chunks: fork.chunks(),
        discarded_bytes: fork.bytes(),
        kept: kept(&fork),
        done: vec![format!(
            "{name} failed back already: {} sends it, this site receives it",
            t.peer
        )],
    }
}
