//! A Kubernetes cycle's data over the CSI path: the group's PVCs cut as CSI snapshots
//! inside the rules ([`crate::k8s::cut`]), then each moved by a mover Job
//! ([`crate::k8s::movers`]) that joins this cycle at the DR site. The daemon itself reads
//! no volume data.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::api::{CycleReport, VolumeReport};
use crate::config::Protection;
use crate::ids::{now_ms, CycleId, Gen, VolumeName};
use crate::k8s::cut::{CutSet, Snapshotter};
use crate::k8s::movers::{self, Movers, Spec};
use crate::k8s::snapshot::{Plan, Pvc};
use crate::k8s::CsiSettings;
use crate::replicate::error::CycleError;
use crate::rules::run::{Barrier, FreezeReport, Rules};
use crate::site::primary::Primary;
use crate::store::VolumeRecord;
use crate::volume::snapshot::{GroupSnapshot, Method, VolumeSnapshot};

/// The group's PVCs and how each is cut, read before the barrier.
pub struct Planned {
    pub snapshotter: Snapshotter,
    pub pvcs: Vec<Pvc>,
    pub plan: Plan,
    pub version: Option<String>,
    pub namespaces: Vec<String>,
}

fn k8s(e: anyhow::Error) -> CycleError {
    CycleError::Kubernetes(e)
}

/// Reads the PVCs and classes, and removes what earlier gens left (the base gen's
/// snapshots are kept).
pub async fn prepare(
    primary: &Primary,
    prot: &Protection,
    csi: &CsiSettings,
    pvcs: &[(String, String, String)],
    keep: Option<Gen>,
) -> Result<Planned, CycleError> {
    let client = primary.kube(prot.name.as_str()).map_err(k8s)?.clone();
    let snapshotter = Snapshotter {
        client: client.clone(),
        protection: prot.name.to_string(),
        wanted: csi.wanted.clone(),
        timeout: csi.snapshot_timeout,
    };
    let mut namespaces: Vec<String> = pvcs.iter().map(|p| p.0.clone()).collect();
    namespaces.sort();
    namespaces.dedup();
    let keep: Vec<Gen> = keep.into_iter().collect();
    snapshotter.sweep(&namespaces, &keep).await.map_err(k8s)?;
    movers::sweep(&client, &csi.mover.namespace, prot.name.as_str(), &[])
        .await
        .map_err(k8s)?;
    let pvcs = snapshotter.read_pvcs(pvcs).await.map_err(k8s)?;
    let (plan, version) = snapshotter.plan(&pvcs).await.map_err(k8s)?;
    Ok(Planned {
        snapshotter,
        pvcs,
        plan,
        version,
        namespaces,
    })
}

/// Cuts the gen inside `rules` (the post rules run once every snapshot is cut), then
/// waits until each is ready.
pub async fn take(
    p: &Planned,
    gen: Gen,
    rules: &Rules,
    freeze: &mut FreezeReport,
) -> Result<(GroupSnapshot, CutSet), Barrier> {
    let body = async {
        let taken_at_ms = now_ms();
        let set = p
            .snapshotter
            .cut(gen, &p.pvcs, &p.plan, p.version.as_deref())
            .await?;
        Ok((taken_at_ms, set))
    };
    let (taken_at_ms, mut set) = rules.around(body, freeze).await?;
    if let Err(e) = p.snapshotter.ready(&mut set).await {
        discard(p, gen).await;
        return Err(Barrier::Body(e));
    }
    let volumes = set
        .cuts
        .iter()
        .map(|c| {
            Ok(VolumeSnapshot {
                name: VolumeName::new(&c.pvc.volume).map_err(|e| anyhow::anyhow!(e))?,
                path: Default::default(),
                size: c.restore_size.unwrap_or_default(),
                method: Method::Csi,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(Barrier::Body)?;
    Ok((
        GroupSnapshot {
            gen,
            taken_at_ms,
            volumes,
            freeze: freeze.freeze,
        },
        set,
    ))
}

/// Removes a failed gen's snapshots at once (the next cycle's sweep would too).
pub async fn discard(p: &Planned, gen: Gen) {
    if let Err(e) = p.snapshotter.delete_gen(&p.namespaces, gen).await {
        tracing::warn!(error = %format!("{e:#}"), "could not remove the failed gen's snapshots");
    }
}

/// Moves every volume of the set through mover Jobs joining cycle `cycle`; `bases` are the
/// base gen's cuts, read by the movers for refinement.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    primary: &Primary,
    prot: &Protection,
    csi: &CsiSettings,
    set: &CutSet,
    bases: &[crate::k8s::cut::Cut],
    cycle: CycleId,
    conn: &quinn::Connection,
    report: &mut CycleReport,
) -> Result<BTreeMap<VolumeName, VolumeRecord>, CycleError> {
    let name = prot.name.as_str();
    let peer = primary
        .config
        .peer
        .as_ref()
        .ok_or_else(|| k8s(anyhow::anyhow!("a primary without [peer]")))?;
    let client = primary.kube(name).map_err(k8s)?.clone();
    let cbt = if csi.mover.cbt {
        let drivers: Vec<String> = set
            .cuts
            .iter()
            .filter_map(|c| c.pvc.driver.clone())
            .collect();
        crate::k8s::cbt::discover(&client, &drivers).await
    } else {
        Default::default()
    };
    let m = Movers {
        client,
        bases,
        spec: Spec {
            protection: name.to_string(),
            gen: set.gen,
            cycle,
            settings: &csi.mover,
            peer: peer.address.to_string(),
            server_name: peer.server_name.clone(),
            site: primary.config.site_name.clone(),
            chunk_size: prot.chunk_size,
            compress: prot.compression,
            refine: report.refine,
            cbt,
        },
        site: &primary.movers,
    };
    let total = set.cuts.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let gen = set.gen;
    primary
        .live
        .activity(name, format!("gen {gen}: {total} mover(s) to run"));
    let metrics = &primary.metrics;
    primary.live.update(name, |l| {
        let k = l.kubernetes.get_or_insert_with(Default::default);
        k.movers = set
            .cuts
            .iter()
            .map(|c| crate::api::MoverStatus {
                volume: c.pvc.volume.clone(),
                pvc: c.pvc.id(),
                phase: "queued".into(),
                ..Default::default()
            })
            .collect();
    });
    let starts = std::sync::Mutex::new(std::collections::HashMap::new());
    let show = |volume: &str, f: &dyn Fn(&mut crate::api::MoverStatus)| {
        primary.live.update(name, |l| {
            if let Some(m) = l
                .kubernetes
                .as_mut()
                .and_then(|k| k.movers.iter_mut().find(|m| m.volume == volume))
            {
                f(m);
            }
        });
    };
    let events = |e: movers::Event<'_>| match e {
        movers::Event::Started(c) => {
            metrics.movers_running.with_label_values(&[name]).inc();
            starts
                .lock()
                .expect("mover starts")
                .insert(c.pvc.volume.clone(), Instant::now());
            show(&c.pvc.volume, &|m| m.phase = "starting".into());
            tracing::info!(pvc = %c.pvc.id(), "mover started");
        }
        movers::Event::Running { cut, node } => {
            show(&cut.pvc.volume, &|m| {
                m.phase = "running".into();
                m.node = Some(node.clone());
                m.reason = None;
            });
        }
        movers::Event::Waiting { cut, why } => {
            tracing::info!(pvc = %cut.pvc.id(), "mover waiting: {why}");
            show(&cut.pvc.volume, &|m| {
                m.phase = "waiting".into();
                m.reason = Some(why.clone());
            });
        }
        movers::Event::Done(mv) => {
            primary.live.update(name, |l| {
                if let Some(t) = l.transfer.as_mut() {
                    t.done += mv.outcome.size;
                }
            });
            metrics.movers_running.with_label_values(&[name]).dec();
            metrics.movers.with_label_values(&[name, "ok"]).inc();
            metrics
                .mover_sent_bytes
                .with_label_values(&[name])
                .inc_by(mv.outcome.chunk_bytes_sent);
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let node = mv.node.as_deref().unwrap_or("?");
            let seconds = starts
                .lock()
                .expect("mover starts")
                .get(&mv.volume)
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
            show(&mv.volume, &|m| {
                m.phase = "done".into();
                m.node = mv.node.clone();
                m.bytes_scanned = mv.outcome.bytes_scanned;
                m.bytes_sent = mv.outcome.chunk_bytes_sent;
                m.seconds = seconds;
                m.bytes_read = mv.outcome.bytes_read;
                m.cbt = mv.outcome.cbt.clone();
            });
            if !mv.outcome.cbt.is_empty() {
                let result = match (mv.outcome.cbt.as_str(), mv.outcome.cbt_mismatch) {
                    ("full", true) => "mismatch",
                    ("full", false) => "failed",
                    (used, _) => used,
                };
                metrics.mover_cbt.with_label_values(&[name, result]).inc();
            }
            if let Some(why) = &mv.outcome.cbt_fallback {
                tracing::warn!(volume = %mv.volume, "changed block tracking not used: {why}");
            }
            tracing::info!(volume = %mv.volume, node, sent = mv.outcome.chunk_bytes_sent, "mover done");
            primary.live.activity(
                name,
                format!(
                    "gen {gen}: {n}/{total} movers done (last: {} on {node})",
                    mv.volume
                ),
            );
        }
        movers::Event::Failed { cut, result, why } => {
            metrics.movers_running.with_label_values(&[name]).dec();
            metrics.movers.with_label_values(&[name, result]).inc();
            show(&cut.pvc.volume, &|m| {
                m.phase = "failed".into();
                m.reason = Some(why.clone());
            });
            tracing::warn!(pvc = %cut.pvc.id(), result, "{why}");
        }
    };
    let moved = tokio::select! {
        r = movers::move_all(&m, &set.cuts, &events) => r.map_err(k8s)?,
        // The DR site went away (its cycle with it): stop the movers now rather than
        // let each retry against it until its Job gives up.
        e = conn.closed() => {
            if let Err(d) = movers::sweep(&m.client, &csi.mover.namespace, name, &[]).await {
                tracing::warn!(error = %format!("{d:#}"), "could not remove the movers; the next cycle's sweep retries");
            }
            metrics.movers_running.with_label_values(&[name]).set(0);
            return Err(CycleError::link(e));
        }
    };
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "movers done");
    let mut records = BTreeMap::new();
    for mv in moved {
        let o = &mv.outcome;
        let root = o.root_hash().map_err(k8s)?;
        let volume = VolumeName::new(&mv.volume).map_err(|e| k8s(anyhow::anyhow!(e)))?;
        report.bytes_scanned += o.bytes_scanned;
        report.bytes_changed += o.bytes_changed;
        report.chunk_bytes_sent += o.chunk_bytes_sent;
        report.chunks_sent += o.chunks_changed;
        report.zero_chunks_sent += o.zero_chunks_sent;
        report.hash_bytes_received += o.hash_bytes_received;
        report.refined_chunks += o.refined_chunks;
        report.refine_saved_bytes += o.refine_saved_bytes;
        let p = name;
        metrics
            .scanned_bytes
            .with_label_values(&[p])
            .inc_by(o.bytes_scanned);
        primary
            .metrics
            .changed_bytes
            .with_label_values(&[p])
            .inc_by(o.bytes_changed);
        primary
            .metrics
            .sent_bytes
            .with_label_values(&[p])
            .inc_by(o.chunk_bytes_sent);
        report.volumes.push(VolumeReport {
            name: mv.volume.clone(),
            size: o.size,
            snapshot_method: "csi".into(),
            resync: true,
            chunks_changed: o.chunks_changed,
            bytes_changed: o.bytes_changed,
            chunk_bytes_sent: o.chunk_bytes_sent,
            bytes_read: o.bytes_read,
            cbt: o.cbt.clone(),
            cbt_fallback: o.cbt_fallback.clone(),
        });
        records.insert(
            volume,
            VolumeRecord {
                size: o.size,
                chunk_size: o.chunk_size,
                root,
            },
        );
    }
    report.volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(records)
}
