//! DR site, Kubernetes mode: keeps the DR cluster's copy of a protection's manifests at the
//! consistent point, in the standby form (workloads at zero, CronJobs suspended). Runs after
//! each commit and at start-up. A failed apply leaves the gen committed (its data is safe)
//! and is reported in `status`; the next commit or restart applies again.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};

use crate::ids::Gen;
use crate::k8s::apply::{self, ApplyReport};
use crate::k8s::bundle::{dr_objects, Bundle, Form};
use crate::metrics::ErrorKind;
use crate::site::status::KubeStatus;
use crate::site::Site;

/// The bundle committed with `gen`.
pub fn bundle(site: &Site, prot: &str, gen: Gen) -> Result<Bundle> {
    let bytes = site.store.manifests(prot, gen)?.ok_or_else(|| {
        let kept = site
            .store
            .manifest_gens(prot)
            .unwrap_or_default()
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        anyhow!("no manifest bundle of gen {gen} for protection {prot} (kept: {kept})")
    })?;
    Bundle::decode(&bytes).with_context(|| format!("manifest bundle of gen {gen}"))
}

/// The objects of `gen` in `form`, with PVCs bound to this site's replicas.
pub fn objects(
    site: &Site,
    prot: &str,
    gen: Gen,
    form: Form,
) -> Result<(Bundle, Vec<serde_json::Value>)> {
    let kp = site.kube_protection(prot)?;
    let b = bundle(site, prot, gen)?;
    let objs = dr_objects(&b, prot, form, |ns, pvc| kp.path_of(ns, pvc));
    Ok((b, objs))
}

/// A gen's objects for `lifeboat export`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    pub protection: String,
    pub gen: u64,
    pub standby: bool,
    pub objects: Vec<serde_json::Value>,
    pub warnings: Vec<String>,
    /// The gens whose manifests this site keeps.
    pub kept: Vec<u64>,
}

/// The manifests of `gen` (default: the consistent gen) in the active form, or in the
/// standby form.
pub fn export(site: &Site, prot: &str, gen: Option<u64>, standby: bool) -> Result<Exported> {
    let gen = match gen {
        Some(g) => Gen(g),
        None => site
            .record(prot)?
            .point
            .map(|p| p.point.gen)
            .with_context(|| format!("protection {prot} has no consistent point yet"))?,
    };
    let form = if standby { Form::Standby } else { Form::Active };
    let (b, objects) = objects(site, prot, gen, form)?;
    Ok(Exported {
        protection: prot.to_string(),
        gen: gen.0,
        standby,
        objects,
        warnings: b.warnings,
        kept: site
            .store
            .manifest_gens(prot)?
            .iter()
            .map(|g| g.0)
            .collect(),
    })
}

/// Applies the consistent gen's manifests in the standby form.
pub async fn apply_standby(site: Arc<Site>, prot: String) {
    let _one = site.mirror_lock.lock().await;
    let result: Result<Option<(Gen, ApplyReport, Bundle)>> = async {
        let rec = site.record(&prot)?;
        // Nothing committed yet; after failover, failover itself applied the active form.
        let (Some(point), None) = (&rec.point, &rec.failed_over) else {
            return Ok(None);
        };
        let gen = point.point.gen;
        let (b, objs) = objects(&site, &prot, gen, Form::Standby)?;
        let client = site.kube(&prot)?;
        let report = apply::apply(client, &prot, &b, &objs).await?;
        Ok(Some((gen, report, b)))
    }
    .await;
    match result {
        Ok(None) => {}
        Ok(Some((gen, report, b))) => {
            tracing::info!(protection = prot, gen = %gen, applied = report.applied.len(), changed = report.changed.len(), pruned = report.pruned.len(), "standby manifests applied");
            site.live.update(&prot, |l| {
                l.kubernetes = Some(KubeStatus {
                    gen: Some(gen.0),
                    covers: b.coverage,
                    warnings: b.warnings,
                    applied: Some(report),
                    apply_error: None,
                })
            });
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::warn!(protection = prot, error = %msg, "standby manifests not applied");
            site.metrics
                .errors
                .with_label_values(&[prot.as_str(), ErrorKind::Kubernetes.as_str()])
                .inc();
            site.live.update(&prot, |l| {
                let k = l.kubernetes.get_or_insert_with(KubeStatus::default);
                k.apply_error = Some(msg);
            });
        }
    }
}
