//! DR site, Kubernetes mode: keeps the DR cluster's copy of a protection's manifests at the
//! consistent point, in the standby form (workloads at zero, CronJobs suspended). A task
//! applies them after each commit (the receiver asks through [`crate::site::dr::Dr`]) and at
//! start-up. A failed apply leaves the gen committed (its data is safe) and is reported in
//! `status`; the next commit or restart applies again.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::api::{Exported, KubeStatus};
use crate::ids::{Gen, ProtectionName};
use crate::k8s::apply::{self, ApplyReport};
use crate::k8s::bundle::{dr_objects, Backing, Bundle, Form};
use crate::k8s::restore::Restore;
use crate::metrics::ErrorKind;
use crate::site::dr::Dr;
use crate::site::Shared;
use std::collections::BTreeMap;

/// The objects of `gen` in `form`, with PVCs bound to this site's replicas (host-path) or,
/// in the active form with CSI replicas, restored from recovery point `gen`'s snapshots
/// through the returned restore objects.
pub async fn objects(
    shared: &Arc<Shared>,
    prot: &ProtectionName,
    gen: Gen,
    form: Form,
) -> Result<(Bundle, Vec<serde_json::Value>, Vec<Restore>)> {
    let kp = shared.kube_protection(prot.as_str())?.clone();
    let (s, p) = (shared.clone(), prot.clone());
    let (b, rec) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((s.bundle(&p, gen)?, s.store.blocking().record(&p)?))
    })
    .await
    .context("read the manifest bundle")??;
    if kp.csi.is_none() {
        let path = |ns: &str, pvc: &str| kp.path_of(ns, pvc);
        let objs = dr_objects(
            &b,
            prot.as_str(),
            form,
            &kp.standby_patches,
            Backing::HostPath {
                path: &path,
                node: kp.volume_node.as_deref(),
            },
        );
        return Ok((b, objs, Vec::new()));
    }
    // Active form of a gen that is not a retained point (yet): PVCs without a source;
    // failover checks that the point exists before it applies.
    let restores = match (form, rec.recovery_point(gen)) {
        (Form::Active, Some(point)) => {
            crate::k8s::restore::restores(prot.as_str(), gen, &b.volumes, &point.snapshots)
        }
        _ => Vec::new(),
    };
    let point = rec.recovery_point(gen);
    let from: BTreeMap<(String, String), (String, u64)> = restores
        .iter()
        .map(|r| {
            let size = point
                .and_then(|p| {
                    b.volumes
                        .iter()
                        .find(|(_, v)| v.namespace == r.namespace && v.name == r.pvc)
                        .and_then(|(vol, _)| p.snapshots.get(vol.as_str()))
                })
                .map_or(0, |s| s.size);
            ((r.namespace.clone(), r.pvc.clone()), (r.name.clone(), size))
        })
        .collect();
    let objs = dr_objects(
        &b,
        prot.as_str(),
        form,
        &kp.standby_patches,
        Backing::Snapshots(&from),
    );
    Ok((b, objs, restores))
}

/// The manifests of `gen` (default: the consistent gen) in the active form, or in the
/// standby form, for `lifeboat export`.
pub async fn export(
    shared: &Arc<Shared>,
    prot: &str,
    gen: Option<u64>,
    standby: bool,
    secrets: bool,
) -> Result<Exported> {
    let name = shared.protection(prot)?.name.clone();
    let gen = match gen {
        Some(g) => Gen(g),
        None => shared
            .store
            .record(&name)
            .await?
            .point_gen()
            .with_context(|| format!("protection {prot} has no consistent point yet"))?,
    };
    let form = if standby { Form::Standby } else { Form::Active };
    let (b, mut objects, _) = objects(shared, &name, gen, form).await?;
    if !secrets {
        crate::k8s::bundle::redact_secrets(&mut objects);
    }
    let kept = shared.store.step(&name, |s, p| s.manifest_gens(p)).await?;
    Ok(Exported {
        protection: prot.to_string(),
        gen: gen.0,
        standby,
        objects,
        warnings: b.warnings,
        kept: kept.iter().map(|g| g.0).collect(),
    })
}

/// Applies the standby manifests of each protection asked for, one at a time, until
/// `stop`: an apply in progress then finishes (shutdown drains it within its budget),
/// and no new one starts.
pub async fn run(dr: Arc<Dr>, stop: CancellationToken) {
    loop {
        let prot = tokio::select! {
            _ = stop.cancelled() => break,
            p = dr.standby.next() => p,
        };
        apply_standby(&dr, &prot).await;
    }
}

/// Applies the consistent gen's manifests in the standby form.
pub async fn apply_standby(dr: &Dr, prot: &ProtectionName) {
    let _one = dr.manifests_lock.lock().await;
    let result: Result<Option<(Gen, ApplyReport, Bundle)>> = async {
        let rec = dr.store.record(prot).await?;
        // Nothing committed yet; after failover, failover itself applied the active form.
        let (Some(point), None) = (&rec.point, &rec.failed_over) else {
            return Ok(None);
        };
        let gen = point.point.gen;
        let (b, objs, _) = objects(dr.shared(), prot, gen, Form::Standby).await?;
        let client = dr.kube(prot.as_str())?;
        let host_path = dr
            .config
            .protection(prot.as_str())
            .is_some_and(|p| p.csi().is_none());
        let report = apply::apply(client, prot.as_str(), &b, &objs, host_path).await?;
        Ok(Some((gen, report, b)))
    }
    .await;
    match result {
        Ok(None) => {}
        Ok(Some((gen, report, b))) => {
            tracing::info!(protection = %prot, gen = %gen, applied = report.applied.len(), changed = report.changed.len(), recreated = report.recreated.len(), pruned = report.pruned.len(), failed = report.failed.len(), "standby manifests applied");
            let failures = report.failures();
            if let Some(f) = &failures {
                tracing::warn!(protection = %prot, gen = %gen, "standby manifests: {f}");
                dr.metrics.error(prot.as_str(), ErrorKind::Kubernetes);
            }
            dr.live.update(prot.as_str(), |l| {
                l.kubernetes = Some(KubeStatus {
                    gen: Some(gen.0),
                    covers: b.coverage,
                    warnings: b.warnings,
                    applied: Some(report),
                    apply_error: failures,
                    movers: Vec::new(),
                })
            });
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::warn!(protection = %prot, error = %msg, "standby manifests not applied");
            dr.metrics.error(prot.as_str(), ErrorKind::Kubernetes);
            dr.live.update(prot.as_str(), |l| {
                let k = l.kubernetes.get_or_insert_with(KubeStatus::default);
                k.apply_error = Some(msg);
            });
        }
    }
}
