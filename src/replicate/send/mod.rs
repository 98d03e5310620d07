//! The primary's half of the protocol. [`plan`] decides (pure); this module carries one
//! cycle out: agree on the base with the DR site, take the group snapshot inside the
//! rules, send each volume ([`volume`]), commit, and on the acknowledgement make the new
//! index the base. [`select`] resolves what the cycle covers (Kubernetes: the
//! selection's PVCs, manifests and rules).

pub mod csi;
pub mod plan;
pub mod select;
pub mod volume;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_bytes::ByteBuf;
use tracing::Instrument;

use crate::api::CycleReport;
use crate::config::Protection;
use crate::ids::{now_ms, CycleId, Point, ProtectionName};
use crate::net::wire::{FrameReader, FrameWriter, Msg, Refusal, VolumeMeta};
use crate::replicate::error::CycleError;
use crate::replicate::messages::{CommitAnswer, PrepareAnswer};
use crate::rules::run::Barrier;
use crate::site::primary::Primary;
use crate::volume::snapshot;
use plan::Prepared;

/// Persists the fence after the DR site refused us for a newer epoch, and ends the cycle.
async fn fence(primary: &Primary, prot: &ProtectionName, refusal: &Refusal) -> CycleError {
    let message = plan::fence_message(refusal);
    let m = message.clone();
    // The scheduler logs the fence once, as the cycle's error; a fence that could not be
    // persisted is found again by the next cycle's `Prepare`.
    if let Err(e) = primary
        .store
        .step(prot, move |s, p| s.fence(p, m, now_ms()))
        .await
    {
        tracing::error!(error = %format!("{e:#}"), "could not persist the fence");
    }
    CycleError::Fenced(message)
}

/// A refusal of `what` from the DR site: fencing ones are persisted.
async fn refused(
    primary: &Primary,
    prot: &ProtectionName,
    what: &'static str,
    r: Refusal,
) -> CycleError {
    if plan::fences(&r) {
        fence(primary, prot, &r).await
    } else {
        plan::refused(what, r)
    }
}

/// Runs one cycle of `prot` and returns its report.
pub async fn run_cycle(primary: &Primary, prot: &Protection) -> Result<CycleReport, CycleError> {
    let span = tracing::info_span!("cycle", protection = %prot.name, gen = tracing::field::Empty);
    cycle(primary, prot).instrument(span).await
}

async fn cycle(primary: &Primary, prot: &Protection) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let name = &prot.name;
    let rec = primary
        .store
        .record(name)
        .await
        .map_err(CycleError::store)?;
    if let Some(f) = &rec.fenced {
        return Err(CycleError::Fenced(f.message.clone()));
    }
    primary
        .live
        .activity(name.as_str(), "connecting to the DR site");
    let conn = primary
        .peer
        .connection(primary)
        .await
        .map_err(CycleError::link)?;
    let wire_start = conn.stats().udp_tx.bytes;
    let lost_start = conn.stats().path.lost_bytes;
    let mut rec = rec;
    let (mut w, mut r, dr_point, repair) = loop {
        let (send, recv) = conn.open_bi().await.map_err(CycleError::link)?;
        let mut w = FrameWriter::new(send).with_limit(primary.peer.limit.clone());
        let mut r = FrameReader::new(recv);
        w.send(&Msg::Prepare {
            protection: name.to_string(),
            epoch: rec.epoch,
        })
        .await?;
        let answer = PrepareAnswer::try_from(r.expect("Prepared").await?)
            .map_err(|got| CycleError::unexpected(got, "Prepared"))?;
        match plan::prepared(&rec, answer) {
            Prepared::Go { point, repair } => break (w, r, point, repair),
            // Re-protected: take the DR site's epoch once, and prepare again with it.
            Prepared::Adopt(epoch) => {
                rec = primary
                    .store
                    .step(name, move |s, p| s.adopt_epoch(p, epoch))
                    .await
                    .map_err(CycleError::store)?;
                tracing::warn!(%epoch, "re-protected: replicating again at the DR site's epoch");
            }
            Prepared::Fence(r) => return Err(fence(primary, name, &r).await),
            Prepared::Refused(r) => return Err(plan::refused("the cycle", r)),
        }
    };
    let (rec, reconciled) = primary
        .store
        .step(name, move |s, p| s.reconcile(p, dr_point))
        .await
        .map_err(CycleError::store)?;
    if let crate::store::Reconciled::Adopted(g) = reconciled {
        tracing::info!(gen = %g, "DR site committed a gen whose acknowledgement was lost; using it as the base");
    }
    let plan = plan::plan(&rec, dr_point);
    let gen = plan.gen;
    tracing::Span::current().record("gen", gen.0);

    // Kubernetes mode: the selection decides the group and its manifests, read just
    // before the snapshot; an API error fails the cycle before anything is sent.
    let selected = select::select(primary, prot, gen).await?;
    let prot = &selected.group;
    // The CSI data path: the PVCs and classes are read, and earlier gens' leftovers
    // removed, before the barrier.
    let csi = match prot.csi() {
        Some(c) => {
            let keep = rec.point.as_ref().map(|p| p.point.gen);
            Some((
                c,
                csi::prepare(primary, prot, c, &selected.pvcs, keep).await?,
            ))
        }
        None => None,
    };

    primary
        .live
        .activity(name.as_str(), format!("snapshot of gen {gen}"));
    let snap_started = Instant::now();
    let mut freeze = crate::rules::run::FreezeReport::default();
    let snap = match &csi {
        Some((_, p)) => csi::take(p, gen, &selected.rules, &mut freeze)
            .await
            .map(|(s, c)| (s, Some(c))),
        None => snapshot::take(prot, gen, &selected.rules, &mut freeze)
            .await
            .map(|s| (s, None)),
    };
    if !selected.rules.is_empty() {
        primary
            .metrics
            .freeze_seconds
            .with_label_values(&[name.as_str()])
            .set(freeze.freeze.as_secs_f64());
    }
    if !freeze.failures.is_empty() {
        primary
            .metrics
            .hook_failures
            .with_label_values(&[name.as_str()])
            .inc_by(freeze.failures.len() as u64);
        for f in &freeze.failures {
            tracing::warn!(protection = %name, gen = %gen, "rule failed: {}", f.describe());
        }
    }
    let rule_failures: Vec<String> = freeze.failures.iter().map(|f| f.describe()).collect();
    let (snap, cut) = snap.map_err(|e| match e {
        Barrier::Hook(m) => CycleError::Hook(anyhow::anyhow!(m)),
        Barrier::Body(e) => CycleError::Snapshot(e),
    })?;
    let snapshot_seconds = snap_started.elapsed().as_secs_f64();
    if let Some(msg) = plan::emptied(prot, &snap, plan.base.as_ref().or(rec.point.as_ref())) {
        return Err(CycleError::Snapshot(anyhow::anyhow!(msg)));
    }
    let point = Point {
        gen,
        cycle: CycleId::random(),
        taken_at_ms: snap.taken_at_ms,
    };
    primary
        .store
        .step(name, move |s, p| s.begin_tentative(p, point))
        .await
        .map_err(CycleError::store)?;

    let metas = snap
        .volumes
        .iter()
        .map(|v| VolumeMeta {
            name: v.name.to_string(),
            size: v.size,
            chunk_size: prot.chunk_size,
        })
        .collect();
    w.send(&Msg::Cycle {
        point,
        base: plan.base.as_ref().map(|b| b.point),
        volumes: metas,
    })
    .await?;

    let transfer_started = Instant::now();
    let refine = plan::refine(prot.refine, primary.peer.auto_refine());
    let mut report = CycleReport {
        gen: gen.0,
        started_at_ms: now_ms(),
        refine,
        rule_failures,
        ..Default::default()
    };
    let side = volume::Side {
        conn: &conn,
        limit: primary.peer.limit.clone(),
        refine,
        base: None,
    };
    let mut volumes = BTreeMap::new();
    let total = snap.volumes.iter().map(|v| v.size).sum();
    primary.live.update(name.as_str(), |l| {
        l.transfer = Some(crate::site::status::Transfer {
            started: Instant::now(),
            total,
            done: 0,
        })
    });
    if let (Some((c, p)), Some(set)) = (&csi, &cut) {
        // The base gen's cuts, if this daemon cut and acknowledged that very gen (after a
        // restart it did not: the first cycle then sends changed chunks whole).
        let base_gen = plan.base.as_ref().map(|b| b.point.gen);
        let bases = primary
            .csi_bases
            .lock()
            .expect("csi bases")
            .get(name.as_str())
            .filter(|b| Some(b.gen) == base_gen)
            .map(|b| b.cuts.clone())
            .unwrap_or_default();
        match csi::send(
            primary,
            prot,
            c,
            set,
            &bases,
            point.cycle,
            &conn,
            &mut report,
        )
        .await
        {
            Ok(v) => volumes = v,
            Err(e) => {
                csi::discard(p, gen).await;
                return Err(e);
            }
        }
    } else {
        for (i, v) in snap.volumes.iter().enumerate() {
            primary.live.activity(
                name.as_str(),
                format!(
                    "gen {gen}: volume {} ({}/{})",
                    v.name,
                    i + 1,
                    snap.volumes.len()
                ),
            );
            let span = tracing::info_span!("volume", volume = %v.name);
            let (vrec, vrep) = volume::send_volume(
                primary,
                prot,
                &snap,
                i,
                plan.base.as_ref(),
                &repair,
                &side,
                &mut w,
                &mut r,
                &mut report,
            )
            .instrument(span)
            .await?;
            volumes.insert(v.name.clone(), vrec);
            report.volumes.push(vrep);
            primary.live.update(name.as_str(), |l| {
                if let Some(t) = l.transfer.as_mut() {
                    t.done += v.size;
                }
            });
        }
    }
    let transfer_seconds = transfer_started.elapsed().as_secs_f64();
    primary
        .store
        .step(name, move |s, p| s.record_volumes(p, point, volumes))
        .await
        .map_err(CycleError::store)?;

    primary.live.activity(
        name.as_str(),
        format!("gen {gen}: waiting for the DR site to commit"),
    );
    let commit_started = Instant::now();
    if let Some(bundle) = selected.bundle {
        if let Err(e) = w
            .send(&Msg::Manifests {
                bundle: ByteBuf::from(bundle),
            })
            .await
        {
            return Err(volume::stream_failure(e, &mut r).await);
        }
    }
    // A small volume can be wholly sent before the DR site fails it; its reason follows.
    if let Err(e) = w.send(&Msg::Commit { gen }).await {
        return Err(volume::stream_failure(e, &mut r).await);
    }
    let answer = CommitAnswer::try_from(r.expect("Committed").await?)
        .map_err(|got| CycleError::unexpected(got, "Committed"))?;
    match answer {
        CommitAnswer::Committed(p) if p == point => {}
        CommitAnswer::Committed(p) => {
            return Err(CycleError::Protocol(format!(
                "DR site acknowledged {p:?}, expected {point:?}"
            )))
        }
        CommitAnswer::Refused(reason) => {
            return Err(refused(primary, name, "the cycle", reason).await)
        }
    }
    w.finish();
    primary
        .store
        .step(name, |s, p| s.acknowledge(p))
        .await
        .map_err(CycleError::store)?;
    if let Some(set) = &cut {
        // The next cycle's movers read this gen's snapshots as the replicas' old chunks.
        primary
            .csi_bases
            .lock()
            .expect("csi bases")
            .insert(name.to_string(), set.clone());
    }
    if let Some((_, p)) = &csi {
        // The acknowledged gen's snapshots stay (the next gen's base); older ones go.
        if let Err(e) = p.snapshotter.sweep(&p.namespaces, &[gen]).await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove old snapshots");
        }
    }
    // Only the gens older than this one, listed now: the next cycle's snapshot is safe.
    let old = snapshot::stale(prot, &[gen]);
    primary.background.spawn_blocking(move || {
        if let Err(e) = snapshot::remove(old) {
            tracing::warn!(error = %format!("{e:#}"), "could not remove old snapshots");
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
