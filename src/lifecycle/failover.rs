//! Failover at the DR site: stop taking replication for the protection, then carry out
//! the [`super::plan`]: make sure the replicas sit at the consistent point, raise the
//! epoch so the old primary is refused, and in Kubernetes mode apply that gen's manifests
//! in the active form (the primary's replica counts, CronJobs resumed) and wait until the
//! workloads are ready. Each step is timed: together they are the recovery time. A dry
//! run reads and returns the same plan, and changes nothing.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::plan::{self, FailoverPlan, NothingToRecover, Planned};
use crate::api::{FailoverOptions, FailoverReport, Step};
use crate::config::Protection;
use crate::ids::{now_ms, Gen};
use crate::k8s::bundle::{Bundle, Form};
use crate::metrics::ErrorKind;
use crate::replicate::receive::check;
use crate::replicate::recovery;
use crate::site::dr::Dr;
use crate::site::status::{age_seconds, volume_statuses};
use crate::site::UnknownProtection;
use crate::store::retention;
use crate::store::ProtectionRecord;
use crate::volume::fence::{self, Fence};

/// Why a failover did not happen or did not finish. Each has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(transparent)]
    Unknown(#[from] UnknownProtection),
    #[error("failover runs at the site that receives the protection; site {0} sends it")]
    WrongSite(String),
    #[error(transparent)]
    NothingToRecover(#[from] NothingToRecover),
    /// `--gen` names a point this site does not keep.
    #[error("{0}")]
    NotRetained(String),
    /// The DR cluster refused or did not reach the active form.
    #[error("{0:#}")]
    Kubernetes(anyhow::Error),
    /// This site's state store, replicas or kept manifests.
    #[error("{0:#}")]
    Local(anyhow::Error),
}

impl FailoverError {
    pub fn http_status(&self) -> u16 {
        match self {
            FailoverError::Unknown(_) => 404,
            FailoverError::WrongSite(_) | FailoverError::NothingToRecover(_) => 409,
            FailoverError::NotRetained(_) => 404,
            FailoverError::Kubernetes(_) => 502,
            FailoverError::Local(_) => 500,
        }
    }

    pub fn metric_label(&self) -> Option<ErrorKind> {
        match self {
            FailoverError::Kubernetes(_) => Some(ErrorKind::Kubernetes),
            FailoverError::Local(_) => Some(ErrorKind::Io),
            _ => None,
        }
    }
}

/// The plan and, in Kubernetes mode, the recovered gen's bundle and objects and the client
/// to apply them with.
struct Read<'a> {
    plan: FailoverPlan,
    manifests: Option<(Bundle, Vec<Value>, &'a kube::Client)>,
    /// The gen recovered (Kubernetes mode).
    gen: Option<Gen>,
}

/// Reads everything the plan depends on and checks what it needs, so a failover that
/// cannot finish fails before it changes anything.
async fn read<'a>(
    dr: &'a Dr,
    prot: &Protection,
    opts: &FailoverOptions,
) -> Result<Read<'a>, FailoverError> {
    let (rec, pending) = dr
        .store
        .step(&prot.name, |s, p| Ok((s.record(p)?, s.commits(p)?)))
        .await
        .map_err(FailoverError::Local)?;
    let now = now_ms();
    let newest = pending
        .last()
        .map(|c| c.point.point.gen)
        .or(rec.point_gen());
    let chosen = match opts.gen.map(Gen) {
        None if opts.latest => None,
        // With apply_delay, an older point is the default (the newest one that old).
        None => prot.apply_delay.and_then(|_| {
            retention::failover_default(&rec.points, prot.apply_delay, now).map(|p| p.point.point)
        }),
        Some(g) => match rec.recovery_point(g) {
            Some(p) => Some(p.point.point),
            None => {
                return Err(FailoverError::NotRetained(format!(
                    "gen {g} of protection {} is not a retained recovery point (kept: {})",
                    prot.name,
                    rec.kept_points_text()
                )));
            }
        },
    };
    let gen = chosen.map(|p| p.gen).or(newest);
    let manifests = match (&prot.kubernetes, gen) {
        (Some(_), Some(gen)) => {
            let client = dr
                .kube(prot.name.as_str())
                .map_err(FailoverError::Kubernetes)?;
            let (b, objs, _) =
                crate::lifecycle::standby::objects(dr.shared(), &prot.name, gen, Form::Active)
                    .await
                    .map_err(FailoverError::Local)?;
            Some((b, objs, client))
        }
        _ => None,
    };
    let objects = prot
        .kubernetes
        .as_ref()
        .map(|_| manifests.as_ref().map_or(&[][..], |(_, o, _)| &o[..]));
    let plan = plan::plan(prot.name.as_str(), &rec, &pending, objects, chosen)?;
    Ok(Read {
        plan,
        manifests,
        gen: prot.kubernetes.as_ref().and(gen),
    })
}

pub async fn failover(
    dr: &Dr,
    name: &str,
    opts: &FailoverOptions,
) -> Result<FailoverReport, FailoverError> {
    let started = Instant::now();
    let prot = dr.protection(name)?.clone();
    // A primary fails over only a protection it receives (after a failback).
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(FailoverError::Local)?;
    if dr.sends(&rec) && rec.failed_over.is_none() {
        return Err(FailoverError::WrongSite(dr.config.site_name.clone()));
    }
    let result = if opts.dry_run {
        dry_run(dr, &prot, opts, started).await
    } else {
        run(dr, &prot, opts, started).await
    };
    if let Err(e) = &result {
        if let Some(kind) = e.metric_label() {
            dr.metrics.error(name, kind);
        }
    }
    result
}

async fn dry_run(
    dr: &Dr,
    prot: &Protection,
    opts: &FailoverOptions,
    started: Instant,
) -> Result<FailoverReport, FailoverError> {
    let read = read(dr, prot, opts).await?;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(FailoverError::Local)?;
    let steps = read
        .plan
        .steps
        .iter()
        .map(|s| Step {
            what: s.describe(),
            seconds: 0.0,
        })
        .collect();
    Ok(report(prot, read.plan, &rec, steps, started, true))
}

async fn run(
    dr: &Dr,
    prot: &Protection,
    opts: &FailoverOptions,
    started: Instant,
) -> Result<FailoverReport, FailoverError> {
    let lock = dr
        .lock_of(prot.name.as_str())
        .expect("a lock per protection");
    let mut failing = lock.begin_failover();
    // The first step's time includes waiting for a cycle in flight to let go.
    let mut at = Instant::now();
    let locked = lock.lock().await;
    // Read under the lock: no cycle can commit past the plan's point any more.
    let Read {
        mut plan,
        mut manifests,
        gen,
    } = read(dr, prot, opts).await?;
    let mut restores = Vec::new();
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    // Objects the server refused: their workloads are not waited for.
    let mut refused = std::collections::BTreeSet::new();
    for step in plan.steps.clone() {
        let mut what = step.describe();
        match &step {
            Planned::Confirm { .. } => {
                recovery::finish_pending(dr, &locked, prot)
                    .await
                    .map_err(FailoverError::Local)?;
                recovery::discard_staging(dr, &locked, prot)
                    .await
                    .map_err(FailoverError::Local)?;
            }
            Planned::Fence { .. } => {
                let (rec, _) = locked
                    .fail_over(dr, now_ms(), plan.point)
                    .await
                    .map_err(FailoverError::Local)?;
                failing.kept();
                write_fences(prot, &rec)
                    .await
                    .map_err(FailoverError::Local)?;
            }
            Planned::Restore { gen, .. } => {
                restore_files(dr, prot, *gen)
                    .await
                    .map_err(FailoverError::Local)?;
            }
            Planned::Apply { .. } => {
                if prot.csi().is_some() {
                    // After the redo of the Confirm step: the newest gen is a point now.
                    let gen = gen.expect("planned with a gen");
                    let (b, objs, r) = crate::lifecycle::standby::objects(
                        dr.shared(),
                        &prot.name,
                        gen,
                        Form::Active,
                    )
                    .await
                    .map_err(FailoverError::Local)?;
                    if r.is_empty() && !b.volumes.is_empty() {
                        return Err(FailoverError::Local(anyhow::anyhow!(
                            "gen {gen} of protection {} has no recovery point to restore its PVCs from",
                            prot.name
                        )));
                    }
                    let client = manifests.as_ref().expect("planned with manifests").2;
                    crate::k8s::replicas::create_restores(client, &r)
                        .await
                        .map_err(FailoverError::Kubernetes)?;
                    restores = r;
                    manifests = Some((b, objs, client));
                }
                let (b, objs, client) = manifests.as_ref().expect("planned with manifests");
                // Standby applies must not race the active form.
                let _apply = dr.manifests_lock.lock().await;
                let host_path = prot.csi().is_none();
                let r = crate::k8s::apply::apply(client, prot.name.as_str(), b, objs, host_path)
                    .await
                    .map_err(FailoverError::Kubernetes)?;
                if !r.failed.is_empty() || !r.recreated.is_empty() {
                    what = format!(
                        "{what} ({} failed, {} recreated)",
                        r.failed.len(),
                        r.recreated.len()
                    );
                }
                for f in r.failed {
                    problems.push(format!("not applied: {}: {}", f.object, f.error));
                    refused.insert(f.object);
                }
                if let Some(k) = plan.kubernetes.as_mut() {
                    k.recreated = r.recreated;
                }
            }
            Planned::WaitReady => {
                let (b, objs, client) = manifests.as_ref().expect("planned with manifests");
                let applied: Vec<_> = objs
                    .iter()
                    .filter(|o| !refused.contains(&crate::k8s::bundle::describe(o)))
                    .cloned()
                    .collect();
                let (ready, not_ready) = crate::k8s::apply::wait_ready(
                    client,
                    b,
                    &applied,
                    Duration::from_secs(opts.ready_timeout_secs),
                )
                .await
                .map_err(FailoverError::Kubernetes)?;
                what = format!("{what}: {} workloads ready", ready.len());
                if !not_ready.is_empty() {
                    what = format!("{what}, {} not ready", not_ready.len());
                }
                problems.extend(not_ready);
                if let Some(k) = plan.kubernetes.as_mut() {
                    k.ready = ready;
                }
            }
        }
        steps.push(Step {
            what,
            seconds: at.elapsed().as_secs_f64(),
        });
        at = Instant::now();
    }
    if let Some((_, _, client)) = manifests.as_ref() {
        // The PVCs are bound (or still restoring): the restore objects of the bound ones
        // go; the point keeps its snapshots (their contents are Retain).
        let wait = Duration::from_secs(opts.ready_timeout_secs);
        match crate::k8s::replicas::delete_restores(client, &restores, wait).await {
            Ok(kept) => problems.extend(kept),
            Err(e) => problems.push(format!("restore snapshots not removed: {e:#}")),
        }
    }
    drop(locked);
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(FailoverError::Local)?;
    let mut r = report(prot, plan, &rec, steps, started, false);
    for p in &problems {
        tracing::error!(protection = %prot.name, "failover: {p}");
    }
    r.problems = problems;
    dr.metrics
        .failover_seconds
        .with_label_values(&[prot.name.as_str()])
        .set(r.seconds);
    tracing::warn!(protection = %prot.name, epoch = r.epoch, gen = ?r.recovered_gen, "failed over: this site no longer accepts replication for the protection");
    Ok(r)
}

/// The fence beside every replica, where losing the state store does not lose it.
async fn write_fences(prot: &Protection, rec: &ProtectionRecord) -> anyhow::Result<()> {
    if prot.csi().is_some() {
        // Replica PVCs have no directory beside them: the state store holds the fence.
        return Ok(());
    }
    let group = check::group(prot, rec);
    let f = Fence {
        protection: prot.name.to_string(),
        epoch: rec.epoch,
        gen: rec.point_gen(),
        at_ms: rec.failed_over.as_ref().map_or_else(now_ms, |f| f.at_ms),
    };
    tokio::task::spawn_blocking(move || {
        for v in &group.volumes {
            fence::write(&v.path, &f)?;
        }
        Ok(())
    })
    .await?
}

fn report(
    prot: &Protection,
    plan: FailoverPlan,
    rec: &ProtectionRecord,
    steps: Vec<Step>,
    started: Instant,
    dry_run: bool,
) -> FailoverReport {
    let point = plan.point;
    FailoverReport {
        protection: prot.name.to_string(),
        epoch: plan.epoch.0,
        recovered_gen: point.map(|p| p.gen.0),
        snapshot_taken_at_ms: point.map(|p| p.taken_at_ms),
        age_seconds: point.map(|p| age_seconds(p.taken_at_ms)),
        replicas: volume_statuses(prot, rec, crate::config::Role::Dr),
        already_failed_over: plan.already_failed_over,
        seconds: started.elapsed().as_secs_f64(),
        steps,
        kubernetes: plan.kubernetes,
        dry_run,
        problems: Vec::new(),
    }
}

/// Puts each file replica back to point `gen`'s clone (the newest point's files are the
/// replicas themselves).
async fn restore_files(dr: &Dr, prot: &Protection, gen: Gen) -> anyhow::Result<()> {
    let rec = dr.store.record(&prot.name).await?;
    let point = rec
        .recovery_point(gen)
        .ok_or_else(|| anyhow::anyhow!("recovery point {gen} is no longer kept"))?
        .clone();
    let group = prot.with_volumes(point.files.keys().map(|v| v.as_str()));
    tokio::task::spawn_blocking(move || {
        for v in &group.volumes {
            let file = &point.files[&v.name];
            anyhow::Context::with_context(crate::volume::points::restore(file, &v.path), || {
                format!("put replica {} back to recovery point {gen}", v.name)
            })?;
        }
        Ok(())
    })
    .await?
}
