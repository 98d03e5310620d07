//! Failover at the DR site: stop taking replication for the protection, make sure the
//! replicas sit at the consistent point, raise the epoch so the old primary is refused, and
//! in Kubernetes mode apply that gen's manifests in the active form (the primary's replica
//! counts, CronJobs resumed) and wait until the workloads are ready. Each step is timed:
//! together they are the recovery time. A dry run reads and reports the plan only.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::ids::{now_ms, Epoch, Gen};
use crate::k8s::bundle::{describe, Form};
use crate::k8s::{REPLICAS_ANNOTATION, SUSPEND_ANNOTATION};
use crate::site::status::{FailoverReport, KubeFailover, Step};
use crate::site::{age_seconds, mirror, recovery, volume_statuses, Site};
use crate::store::{Batch, FailoverRecord};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverOptions {
    pub dry_run: bool,
    /// How long to wait for the workloads to report ready replicas.
    pub ready_timeout_secs: u64,
}

impl Default for FailoverOptions {
    fn default() -> Self {
        FailoverOptions {
            dry_run: false,
            ready_timeout_secs: 300,
        }
    }
}

struct Steps {
    at: Instant,
    steps: Vec<Step>,
}

impl Steps {
    fn done(&mut self, what: impl Into<String>) {
        self.steps.push(Step {
            what: what.into(),
            seconds: self.at.elapsed().as_secs_f64(),
        });
        self.at = Instant::now();
    }
}

/// What the active form changes, for the report and the plan.
fn k8s_plan(objs: &[serde_json::Value], gen: Gen) -> KubeFailover {
    let mut k = KubeFailover {
        gen: gen.0,
        ..Default::default()
    };
    for o in objs {
        k.applied.push(describe(o));
        if let Some(n) = o["metadata"]["annotations"][REPLICAS_ANNOTATION].as_str() {
            k.scaled.push(format!("{} to {n}", describe(o)));
        }
        if o["metadata"]["annotations"][SUSPEND_ANNOTATION] == "false" {
            k.resumed.push(describe(o));
        }
    }
    k
}

pub async fn failover(
    site: &Arc<Site>,
    name: &str,
    opts: &FailoverOptions,
) -> Result<FailoverReport> {
    let started = Instant::now();
    if site.config.role != Role::Dr {
        bail!(
            "failover runs at the DR site; {} is the primary site",
            site.config.site_name
        );
    }
    let prot = site.protection(name)?.clone();
    if opts.dry_run {
        return plan(site, &prot, started);
    }
    let guard = site.guard(name).expect("guard per protection");
    let was_failing = guard.failing_over.swap(true, Ordering::SeqCst);
    guard.cancel_current();
    let mut steps = Steps {
        at: Instant::now(),
        steps: Vec::new(),
    };
    let result = async {
        let _lock = guard.lock.lock().await;
        let (store, config, p) = (site.store.clone(), site.config.clone(), prot.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            recovery::finish_pending(&store, &config, &p)?;
            recovery::discard_staging(&store, &config, &p)
        })
        .await??;
        steps.done("confirm the consistent point (finish a committed gen, drop staging)");
        let mut rec = site.record(name)?;
        let already = rec.failed_over.is_some();
        if !already {
            rec.epoch = Epoch(rec.epoch.0 + 1);
            rec.failed_over = Some(FailoverRecord {
                at_ms: now_ms(),
                gen: rec.point.as_ref().map(|p| p.point.gen),
                snapshot_taken_at_ms: rec.point.as_ref().map(|p| p.point.taken_at_ms),
            });
            let mut b = Batch::default();
            b.put_protection(name, &rec);
            site.store.write(b, true)?;
        }
        steps.done(format!("fence the old primary (epoch {})", rec.epoch));
        let point = rec.point.as_ref().map(|p| p.point);
        let kubernetes = match (&prot.kubernetes, point) {
            (Some(_), Some(pt)) => {
                // Standby applies must not race the active form.
                let _mirror = site.mirror_lock.lock().await;
                let (b, objs) = mirror::objects(site, name, pt.gen, Form::Active)?;
                let client = site.kube(name)?;
                let plan = k8s_plan(&objs, pt.gen);
                crate::k8s::apply::apply(client, name, &b, &objs).await?;
                steps.done(format!(
                    "apply the manifests of gen {} ({} objects, {} workloads scaled, {} resumed)",
                    pt.gen,
                    plan.applied.len(),
                    plan.scaled.len(),
                    plan.resumed.len()
                ));
                let ready = crate::k8s::apply::wait_ready(
                    client,
                    &b,
                    &objs,
                    Duration::from_secs(opts.ready_timeout_secs),
                )
                .await?;
                steps.done(format!("wait until {} workloads report ready replicas", ready.len()));
                Some(KubeFailover { ready, ..plan })
            }
            (Some(_), None) => bail!("protection {name} has no consistent point: nothing to fail over to"),
            (None, _) => None,
        };
        let replicas = volume_statuses(&prot, &rec);
        let seconds = started.elapsed().as_secs_f64();
        site.metrics.failover_seconds.with_label_values(&[name]).set(seconds);
        tracing::warn!(protection = name, epoch = %rec.epoch, gen = ?point.map(|p| p.gen), "failed over: this site no longer accepts replication for the protection");
        Ok(FailoverReport {
            protection: name.to_string(),
            epoch: rec.epoch.0,
            recovered_gen: point.map(|p| p.gen.0),
            snapshot_taken_at_ms: point.map(|p| p.taken_at_ms),
            age_seconds: point.map(|p| age_seconds(p.taken_at_ms)),
            replicas,
            already_failed_over: already,
            seconds,
            steps: std::mem::take(&mut steps.steps),
            kubernetes,
            dry_run: false,
        })
    }
    .await;
    if result.is_err() && !was_failing {
        guard.failing_over.store(false, Ordering::SeqCst);
    }
    result
}

/// The dry run: reads the store and the bundle, changes nothing.
fn plan(site: &Site, prot: &crate::config::Protection, started: Instant) -> Result<FailoverReport> {
    let name = prot.name.as_str();
    let rec = site.record(name)?;
    let pending = site.store.commits(name)?;
    let point = pending
        .last()
        .map(|c| c.point.point)
        .or(rec.point.as_ref().map(|p| p.point));
    let mut steps = Vec::new();
    let mut step = |what: String| steps.push(Step { what, seconds: 0.0 });
    if !pending.is_empty() {
        step(format!(
            "finish {} committed gen(s) not yet applied to the replicas",
            pending.len()
        ));
    }
    let epoch = if rec.failed_over.is_some() {
        rec.epoch.0
    } else {
        rec.epoch.0 + 1
    };
    step(format!(
        "fence the old primary (epoch {} -> {epoch})",
        rec.epoch
    ));
    let kubernetes = match (&prot.kubernetes, point) {
        (Some(_), Some(pt)) => {
            let (_, objs) = mirror::objects(site, name, pt.gen, Form::Active)?;
            let k = k8s_plan(&objs, pt.gen);
            step(format!(
                "apply the manifests of gen {} ({} objects)",
                pt.gen,
                k.applied.len()
            ));
            for s in &k.scaled {
                step(format!("scale {s}"));
            }
            for r in &k.resumed {
                step(format!("resume {r}"));
            }
            step("wait until the workloads report ready replicas".into());
            Some(k)
        }
        (Some(_), None) => {
            bail!("protection {name} has no consistent point: nothing to fail over to")
        }
        (None, _) => None,
    };
    Ok(FailoverReport {
        protection: name.to_string(),
        epoch,
        recovered_gen: point.map(|p| p.gen.0),
        snapshot_taken_at_ms: point.map(|p| p.taken_at_ms),
        age_seconds: point.map(|p| age_seconds(p.taken_at_ms)),
        replicas: volume_statuses(prot, &rec),
        already_failed_over: rec.failed_over.is_some(),
        seconds: started.elapsed().as_secs_f64(),
        steps,
        kubernetes,
        dry_run: true,
    })
}
