//! Drills of CSI recovery points (Kubernetes mode) at the DR site, while replication goes
//! on: the point (the newest by default) is pinned against pruning, its gen's manifests
//! are applied into the drill namespaces ([`crate::k8s::drill`]) with every PVC restored
//! from the point's snapshots, and the workloads are waited for; the caller then runs its
//! check (`lifeboat drill --check`, with the caller's rights: `kubectl exec` into the drill
//! namespace) and ends the drill, which deletes everything the drill made (unless kept)
//! and unpins the point. The protection's lock is held only to choose and pin the point:
//! cycles commit during the drill. Nothing a drill writes reaches a replica or a point:
//! its PVCs are new volumes restored from the point's snapshots, whose contents are Retain.
//! A daemon that dies mid-drill removes its objects at the next start (all but kept ones).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::drill::DrillError;
use crate::api::{DrillStarted, Step};
use crate::config::Protection;
use crate::ids::{now_ms, Gen};
use crate::k8s::bundle::Bundle;
use crate::k8s::drill::{DrillPlan, DRILL_LABEL, DRILL_OF_LABEL, KEPT_ANNOTATION};
use crate::k8s::kinds::{self, Kind};
use crate::k8s::objects::{
    api, delete, delete_labelled, pvcs_kind, to_value, volume_snapshot_contents, volume_snapshots,
};
use crate::k8s::{api_error, KubeProtection};
use crate::site::dr::Dr;

/// The bundle and drill namespaces of gen `gen`.
async fn bundle_of(dr: &Dr, prot: &Protection, gen: Gen) -> Result<(Bundle, KubeProtection)> {
    let (s, p) = (dr.shared().clone(), prot.name.clone());
    let kp = s.kube_protection(p.as_str())?.clone();
    let b = tokio::task::spawn_blocking(move || s.bundle(&p, gen))
        .await
        .context("read the manifest bundle")??;
    Ok((b, kp))
}

/// Who holds drill namespace `ns`: a kept drill, or a drill's objects.
async fn occupied(client: &kube::Client, prot: &str, ns: &str) -> Result<Option<String>> {
    let got = api(client, &kinds::namespaces(), None)
        .get_opt(ns)
        .await
        .map_err(|e| api_error(e, format!("get namespace {ns}")))?;
    let Some(n) = got else {
        return Err(anyhow!(
            "the drill namespace {ns} does not exist: apply the DR site's RBAC from `lifeboat rbac`, which creates it and binds lifeboat's role there (or set drill_namespace in [protection.kubernetes])"
        ));
    };
    if let Some(id) = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEPT_ANNOTATION))
    {
        return Ok(Some(format!("kept drill {id}")));
    }
    let sel = format!("{DRILL_OF_LABEL}={prot}");
    let pvcs = api(client, &pvcs_kind(), Some(ns))
        .list(&kube::api::ListParams::default().labels(&sel))
        .await
        .map_err(|e| api_error(e, format!("list PVCs in {ns}")))?;
    Ok(pvcs.items.first().map(|p| {
        let id = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(DRILL_LABEL))
            .cloned()
            .unwrap_or_default();
        format!("drill {id}")
    }))
}

/// Deletes what drill `id` (None: any drill of `prot`) made in `namespaces`: the objects
/// of the bundle's kinds, then the restore snapshots and their contents (Retain: the
/// point's driver snapshots stay).
async fn teardown(
    client: &kube::Client,
    prot: &str,
    id: Option<&str>,
    bundle: &Bundle,
    namespaces: &[String],
) -> Result<()> {
    let mut sel = format!("{DRILL_OF_LABEL}={prot}");
    if let Some(id) = id {
        sel += &format!(",{DRILL_LABEL}={id}");
    }
    let mut kinds: Vec<Kind> = bundle
        .kinds
        .iter()
        .map(Kind::from)
        .filter(|k| k.namespaced)
        .collect();
    // Workloads before the claims they mount.
    kinds.sort_by_key(|k| k.kind == "PersistentVolumeClaim");
    for ns in namespaces {
        for k in &kinds {
            delete_labelled(client, k, Some(ns), &sel, &[]).await?;
        }
    }
    let contents = api(client, &volume_snapshot_contents(), None)
        .list(&kube::api::ListParams::default().labels(&sel))
        .await
        .map_err(|e| api_error(e, "list the drill's VolumeSnapshotContents"))?;
    for c in contents.items {
        let v = to_value(c);
        let r = &v["spec"]["volumeSnapshotRef"];
        if let (Some(ns), Some(name)) = (r["namespace"].as_str(), r["name"].as_str()) {
            delete(client, &volume_snapshots(), Some(ns), name).await?;
        }
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        delete(client, &volume_snapshot_contents(), None, name).await?;
    }
    Ok(())
}

async fn unpin(dr: &Dr, prot: &Protection, gen: Gen) -> Result<()> {
    // Under the lock: a cycle's record write must not race this one.
    let lock = dr
        .lock_of(prot.name.as_str())
        .expect("a lock per protection");
    let _locked = lock.lock().await;
    dr.store
        .step(&prot.name, move |s, p| {
            s.drill_hold(p, gen, None).map(|_| ())
        })
        .await
}

/// Starts a drill of CSI point `gen` (default the newest) of `prot`; returns once its
/// workloads are ready (or `ready_timeout` passed), with each step's time.
pub async fn start(
    dr: &Dr,
    prot: &Protection,
    gen: Option<u64>,
    ready_timeout: Duration,
) -> Result<DrillStarted, DrillError> {
    let started = Instant::now();
    let name = prot.name.as_str();
    let client = dr.kube(name).map_err(DrillError::Failed)?.clone();
    let lock = dr.lock_of(name).expect("a lock per protection");
    let locked = lock.lock().await;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(DrillError::Failed)?;
    if let Some(p) = rec.points.iter().find(|p| p.drill.is_some()) {
        return Err(DrillError::Busy(format!(
            "drill {} of protection {name} is running (on gen {}); one drill at a time uses the drill namespaces",
            p.drill.as_deref().unwrap_or(""),
            p.point.point.gen
        )));
    }
    let point = match gen {
        Some(g) => rec.recovery_point(Gen(g)),
        None => rec.points.last(),
    };
    let Some(point) = point.filter(|p| !p.snapshots.is_empty()).cloned() else {
        return Err(DrillError::NotKept(match gen {
            Some(g) => format!(
                "gen {g} of protection {name} is not a kept recovery point with snapshots (kept: {})",
                rec.kept_points_text()
            ),
            None => format!("protection {name} has no recovery point yet"),
        }));
    };
    let gen = point.point.point.gen;
    let id = format!("{}-{}", gen.0, now_ms());
    let i = id.clone();
    dr.store
        .step(&prot.name, move |s, p| s.drill_hold(p, gen, Some(&i)))
        .await
        .map_err(DrillError::Failed)?;
    drop(locked);
    let mut steps = Vec::new();
    let run = run(
        dr,
        prot,
        &client,
        &id,
        gen,
        &point.snapshots,
        ready_timeout,
        &mut steps,
    )
    .await;
    let (plan, problems, not_ready) = match run {
        Ok(x) => x,
        Err((plan, e)) => {
            // Nothing of a drill that did not start stays, nor its pin.
            if let Some(plan) = plan {
                let ns: Vec<String> = plan.namespaces.values().cloned().collect();
                if let Err(t) = teardown(&client, name, Some(&id), &plan.bundle, &ns).await {
                    tracing::error!(protection = name, id, error = %format!("{t:#}"), "drill teardown after a failed start");
                }
            }
            let _ = unpin(dr, prot, gen).await;
            return Err(e);
        }
    };
    tracing::info!(protection = name, %gen, id, "drill started");
    Ok(DrillStarted {
        protection: name.to_string(),
        id,
        gen: gen.0,
        files: Default::default(),
        method: "csi".into(),
        clone_seconds: started.elapsed().as_secs_f64(),
        namespaces: plan.namespaces,
        steps,
        problems,
        not_ready,
    })
}

/// The plan, the problems and the workloads not ready.
type Started = (DrillPlan, Vec<String>, Vec<String>);

/// Restores, applies and waits; on failure, the plan (if made) for the teardown.
#[allow(clippy::too_many_arguments)]
async fn run(
    dr: &Dr,
    prot: &Protection,
    client: &kube::Client,
    id: &str,
    gen: Gen,
    snapshots: &std::collections::BTreeMap<
        crate::ids::VolumeName,
        crate::k8s::restore::PointSnapshot,
    >,
    ready_timeout: Duration,
    steps: &mut Vec<Step>,
) -> Result<Started, (Option<DrillPlan>, DrillError)> {
    let name = prot.name.as_str();
    let failed = |e: anyhow::Error| (None, DrillError::Failed(e));
    let (bundle, kp) = bundle_of(dr, prot, gen).await.map_err(failed)?;
    let plan = crate::k8s::drill::plan(name, id, &bundle, gen, snapshots, &|ns| {
        kp.drill_namespace_of(ns)
    });
    for ns in plan.namespaces.values() {
        match occupied(client, name, ns).await {
            Ok(None) => {}
            Ok(Some(who)) => {
                return Err((None, DrillError::Busy(format!(
                    "the drill namespace {ns} still holds {who} of protection {name}: end it with `lifeboat drill --protection {name} --end ID`"
                ))));
            }
            Err(e) => return Err(failed(e)),
        }
    }
    let mut problems = plan.notes.clone();
    let at = Instant::now();
    let into: Vec<&str> = plan.namespaces.values().map(String::as_str).collect();
    if let Err(e) = crate::k8s::replicas::create_restores(client, &plan.restores).await {
        return Err((Some(plan), DrillError::Failed(e)));
    }
    let r = crate::k8s::apply::apply(client, name, &plan.bundle, &plan.objects, false).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => return Err((Some(plan), DrillError::Failed(e))),
    };
    steps.push(Step {
        what: format!(
            "restore point {gen} into {}: {} PVC(s) from its snapshots, {} object(s)",
            into.join(", "),
            plan.restores.len(),
            r.applied.len()
        ),
        seconds: at.elapsed().as_secs_f64(),
    });
    let refused: std::collections::BTreeSet<String> =
        r.failed.iter().map(|f| f.object.clone()).collect();
    problems.extend(
        r.failed
            .iter()
            .map(|f| format!("not applied: {}: {}", f.object, f.error)),
    );
    let at = Instant::now();
    let applied: Vec<_> = plan
        .objects
        .iter()
        .filter(|o| !refused.contains(&crate::k8s::bundle::describe(o)))
        .cloned()
        .collect();
    let waited = crate::k8s::apply::wait_ready(client, &plan.bundle, &applied, ready_timeout).await;
    let (ready, not_ready) = match waited {
        Ok(x) => x,
        Err(e) => return Err((Some(plan), DrillError::Failed(e))),
    };
    steps.push(Step {
        what: format!(
            "wait for the workloads: {} ready{}",
            ready.len(),
            if not_ready.is_empty() {
                String::new()
            } else {
                format!(", {} not ready", not_ready.len())
            }
        ),
        seconds: at.elapsed().as_secs_f64(),
    });
    // Bound PVCs no longer need their restore snapshots; the point keeps its own.
    let left = ready_timeout.saturating_sub(at.elapsed());
    match crate::k8s::replicas::delete_restores(client, &plan.restores, left).await {
        Ok(kept) => problems.extend(kept),
        Err(e) => problems.push(format!("restore snapshots not removed yet: {e:#}")),
    }
    Ok((plan, problems, not_ready))
}

/// Ends drill `id`: deletes its objects, or (`keep`) marks its namespaces kept, and unpins
/// its point. The drill namespaces it ended in.
pub async fn end(
    dr: &Dr,
    prot: &Protection,
    id: &str,
    keep: bool,
) -> Result<Vec<String>, DrillError> {
    let name = prot.name.as_str();
    let client = dr.kube(name).map_err(DrillError::Failed)?.clone();
    let gen = id
        .split('-')
        .next()
        .and_then(|g| g.parse::<u64>().ok())
        .map(Gen)
        .ok_or_else(|| {
            DrillError::NotKept(format!("{id:?} is not a drill id (GEN-MILLISECONDS)"))
        })?;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(DrillError::Failed)?;
    // A kept drill's point may be pruned since: the newest bundle names the namespaces.
    let bundle_gen = rec
        .recovery_point(gen)
        .map(|p| p.point.point.gen)
        .or(rec.points.last().map(|p| p.point.point.gen))
        .ok_or_else(|| DrillError::NotKept(format!("protection {name} has no recovery point")))?;
    let (bundle, kp) = bundle_of(dr, prot, bundle_gen)
        .await
        .map_err(DrillError::Failed)?;
    let namespaces: Vec<String> = bundle
        .namespaces
        .iter()
        .map(|ns| kp.drill_namespace_of(ns))
        .collect();
    let mut found = Vec::new();
    for ns in &namespaces {
        let who = occupied(&client, name, ns)
            .await
            .map_err(DrillError::Failed)?;
        if who.is_some_and(|w| w.ends_with(&format!("drill {id}"))) {
            found.push(ns.clone());
        }
    }
    if found.is_empty() {
        return Err(DrillError::NotKept(format!(
            "no drill {id} of protection {name} is running or kept"
        )));
    }
    let annotate =
        |value: Option<&str>| json!({"metadata": {"annotations": {KEPT_ANNOTATION: value}}});
    for ns in &found {
        let patch = annotate(keep.then_some(id));
        api(&client, &kinds::namespaces(), None)
            .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| DrillError::Failed(api_error(e, format!("annotate namespace {ns}"))))?;
    }
    if !keep {
        teardown(&client, name, Some(id), &bundle, &found)
            .await
            .map_err(DrillError::Failed)?;
    }
    if rec
        .recovery_point(gen)
        .is_some_and(|p| p.drill.as_deref() == Some(id))
    {
        unpin(dr, prot, gen).await.map_err(DrillError::Failed)?;
    }
    Ok(found)
}

/// Start-up: removes what drills a killed daemon (or caller) left, but kept ones, and
/// every drill pin.
pub async fn sweep(dr: &Dr, prot: &Protection) -> Result<()> {
    let rec = dr
        .store
        .step(&prot.name, |s, p| s.drill_unhold_all(p))
        .await?;
    let Some(newest) = rec.points.last().map(|p| p.point.point.gen) else {
        return Ok(());
    };
    let client = dr.kube(prot.name.as_str())?.clone();
    let (bundle, kp) = bundle_of(dr, prot, newest).await?;
    let mut left = Vec::new();
    for ns in bundle.namespaces.iter().map(|ns| kp.drill_namespace_of(ns)) {
        match occupied(&client, prot.name.as_str(), &ns).await {
            Ok(Some(who)) if who.starts_with("kept") => {}
            // A missing namespace holds nothing.
            Ok(_) | Err(_) => left.push(ns),
        }
    }
    teardown(&client, prot.name.as_str(), None, &bundle, &left).await
}
