//! The redo of a committed gen at a DR site whose replicas are PVCs (Kubernetes mode, CSI
//! replicas): each volume's staging log is applied to its replica PVC by a writer Job, and
//! once every writer succeeded the replicas are snapshotted together: that snapshot set
//! with the gen's manifest bundle is recovery point N, recorded with the gen in one synced
//! batch. The redo is idempotent (a log applied twice gives the same replica), so a
//! writer or daemon killed mid-way leaves the previous point untouched and is finished
//! by running it again; points `keep`/`keep_for` no longer keep are pruned after the
//! record is durable.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context, Result};

use crate::config::Protection;
use crate::failpoint;
use crate::ids::Gen;
use crate::k8s::replicas::{ReplicaVolume, Replicas};
use crate::k8s::CsiSettings;
use crate::replicate::recovery::{remove_dir, staging_dir};
use crate::site::dr::Dr;
use crate::store::{CommitRecord, RecoveryPoint};

/// Where the writers reach this daemon: `[protection.kubernetes.mover] connect`, else the
/// peer listen address when it names one host.
fn writer_address(dr: &Dr, csi: &CsiSettings) -> Result<String> {
    if let Some(a) = &csi.mover.connect {
        return Ok(a.clone());
    }
    match dr.config.listen {
        Some(a) if !a.ip().is_unspecified() => Ok(a.to_string()),
        other => Err(anyhow!(
            "the writer Jobs cannot reach this daemon at its listen address {}: set [protection.kubernetes.mover] connect to the address of the daemon's Service, e.g. \"lifeboat.lifeboat.svc:7420\"",
            other.map_or("(none)".to_string(), |a: SocketAddr| a.to_string())
        )),
    }
}

pub(crate) fn replicas<'a>(
    dr: &'a Dr,
    prot: &'a Protection,
    csi: &'a CsiSettings,
) -> Result<Replicas<'a>> {
    Ok(Replicas {
        client: dr.kube(prot.name.as_str())?.clone(),
        protection: prot.name.as_str(),
        csi,
        site_limit: &dr.writers,
        connect: writer_address(dr, csi)?,
        site: &dr.config.site_name,
    })
}

/// Each volume's replica: its size at the gen and the storage class of its PVC in the
/// gen's bundle, mapped by `storage_class_map`.
fn replica_volumes(dr: &Dr, prot: &Protection, commit: &CommitRecord) -> Vec<ReplicaVolume> {
    let gen = commit.point.point.gen;
    let kp = prot.kubernetes.as_ref().expect("a Kubernetes protection");
    let bundle = dr.bundle(&prot.name, gen).ok();
    let class_of = |volume: &str| -> Option<String> {
        let b = bundle.as_ref()?;
        let r = b.volumes.get(volume)?;
        let pvc = b.objects.iter().find(|o| {
            o["kind"] == "PersistentVolumeClaim"
                && o["metadata"]["namespace"] == r.namespace.as_str()
                && o["metadata"]["name"] == r.name.as_str()
        })?;
        let class = pvc["spec"]["storageClassName"].as_str()?;
        Some(
            kp.storage_class_map
                .get(class)
                .map_or(class, String::as_str)
                .to_string(),
        )
    };
    commit
        .point
        .volumes
        .iter()
        .map(|(v, r)| ReplicaVolume {
            volume: v.to_string(),
            size: r.size,
            class: class_of(v.as_str()),
        })
        .collect()
}

/// Applies a committed gen to the replica PVCs and records its recovery point.
pub async fn redo(dr: &Dr, prot: &Protection, commit: CommitRecord) -> Result<()> {
    let csi = prot.csi().expect("CSI replicas");
    let gen = commit.point.point.gen;
    let name = prot.name.clone();
    if let Some((v, log)) = commit.logs.iter().find(|(_, l)| !l.exists()) {
        // Nothing can tell whether the replica holds the gen: resync it.
        let why = format!(
            "gen {gen} could not be finished: the staging log of volume {v} ({}) is gone",
            log.display()
        );
        tracing::error!(volume = %v, "{why}; the gen's volumes are resynced by hash exchange on the next cycle");
        let dir = staging_dir(&dr.config, &name);
        return dr
            .store
            .run(move |s| {
                s.abandon_commit(&name, &commit, &why)?;
                remove_dir(&dir)
            })
            .await;
    }
    let reps = replicas(dr, prot, csi)?;
    let rec = dr.store.record(&name).await?;
    let kept: Vec<Gen> = rec.points.iter().map(|p| p.point.point.gen).collect();
    reps.sweep(&kept)
        .await
        .context("sweep what an earlier redo left")?;
    let volumes = replica_volumes(dr, prot, &commit);
    reps.ensure(&volumes).await?;
    let logs: Vec<String> = commit.logs.keys().map(|v| v.to_string()).collect();
    let written = reps.write(gen, &logs).await?;
    let diverged: Vec<String> = written
        .iter()
        .filter_map(|w| w.diverged.as_ref().map(|d| format!("{}: {d}", w.volume)))
        .collect();
    if !diverged.is_empty() {
        // The replica PVCs are not what the index says: the gen cannot be finished on
        // them. Its volumes are marked for repair (the next cycle sends them whole,
        // without base hashes) and the newest point stays the previous gen's.
        let why = format!(
            "gen {gen} could not be written: a replica PVC does not hold what the DR index says ({})",
            diverged.join("; ")
        );
        tracing::error!("{why}; the gen's volumes are resent on the next cycle");
        let (dir, reason) = (staging_dir(&dr.config, &name), why.clone());
        dr.store
            .run(move |s| {
                s.abandon_commit(&name, &commit, &reason)?;
                remove_dir(&dir)
            })
            .await?;
        bail!("{why}; its volumes are marked for repair and resent whole by the next cycle");
    }
    let bytes: u64 = written.iter().map(|w| w.bytes_written).sum();
    tracing::info!(%gen, volumes = written.len(), bytes, "replica PVCs written");
    failpoint::hit("dr-written");
    let snapshots = reps
        .snapshot(gen, &volumes)
        .await
        .with_context(|| format!("snapshot the replicas into recovery point {gen}"))?;
    failpoint::hit("dr-point-cut");
    let point = RecoveryPoint {
        point: commit.point.clone(),
        snapshots,
        held: false,
        drill: None,
        files: BTreeMap::new(),
    };
    let (keep, dir) = (
        crate::replicate::recovery::retention(prot),
        staging_dir(&dr.config, &name),
    );
    let pruned = dr
        .store
        .run(move |s| {
            let (_, pruned) =
                s.finish_redo_with_point(&name, &commit, BTreeMap::new(), Some((point, keep)))?;
            remove_dir(&dir)?;
            Ok(pruned)
        })
        .await?;
    for p in &pruned {
        tracing::info!(gen = %p.point.point.gen, "recovery point pruned");
        if let Err(e) = reps.delete_point(p.point.point.gen, &p.snapshots).await {
            tracing::warn!(gen = %p.point.point.gen, error = %format!("{e:#}"), "could not delete a pruned point's snapshots; the next redo's sweep retries");
        }
    }
    Ok(())
}
