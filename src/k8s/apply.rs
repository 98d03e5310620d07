//! The DR site's side: server-side apply of a gen's objects (field manager `lifeboat`),
//! pruning of what the primary deleted, and, at failover, waiting until the workloads
//! report ready replicas.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bundle::{describe, Bundle};
use super::kinds::{self, Kind};
use super::{api_error, FIELD_MANAGER, PROTECTION_LABEL};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyReport {
    /// Objects applied, as `Kind namespace/name`.
    pub applied: Vec<String>,
    /// Objects the server changed (their resourceVersion moved).
    pub changed: Vec<String>,
    /// Objects deleted because the gen no longer has them.
    pub pruned: Vec<String>,
    /// Objects deleted and created again because the change touched a field the server
    /// does not let change (a claim template, a selector, a roleRef, immutable data).
    #[serde(default)]
    pub recreated: Vec<String>,
    /// What the server refused, each with its reason. Every other object was applied.
    #[serde(default)]
    pub failed: Vec<Failed>,
}

/// One object (or list, or prune) the server refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failed {
    pub object: String,
    pub error: String,
}

impl ApplyReport {
    /// One line naming every failure, for a status field or a log.
    pub fn failures(&self) -> Option<String> {
        (!self.failed.is_empty()).then(|| {
            let each: Vec<String> = self
                .failed
                .iter()
                .map(|f| format!("{}: {}", f.object, f.error))
                .collect();
            format!(
                "{} of the objects failed: {}",
                self.failed.len(),
                each.join("; ")
            )
        })
    }
}

fn kind_of(bundle: &Bundle, v: &Value) -> Result<Kind> {
    let api = v["apiVersion"].as_str().unwrap_or("");
    let kind = v["kind"].as_str().unwrap_or("");
    kinds::of(api, kind)
        .or_else(|| {
            bundle
                .kinds
                .iter()
                .map(Kind::from)
                .find(|k| k.api_version() == api && k.kind == kind)
        })
        .ok_or_else(|| {
            anyhow!(
                "{}: kind {api}/{kind} is not in the bundle's kinds",
                describe(v)
            )
        })
}

fn api_for(client: &kube::Client, kind: &Kind, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) if kind.namespaced => Api::namespaced_with(client.clone(), ns, &kind.resource()),
        _ => Api::all_with(client.clone(), &kind.resource()),
    }
}

/// Applies `objects` in order (they come from [`super::bundle::dr_objects`]), then deletes
/// objects labelled with the protection that the gen no longer has. A change is a patch;
/// a change the server refuses as immutable recreates that one object (see [`recreate`]).
/// One object the server refuses never stops the others: it is reported in
/// [`ApplyReport::failed`] and the rest are applied.
pub async fn apply(
    client: &kube::Client,
    protection: &str,
    bundle: &Bundle,
    objects: &[Value],
    host_path: bool,
) -> Result<ApplyReport> {
    // What lifeboat applied before: one labelled list per kind and namespace gives both the
    // resourceVersions to tell changed objects from unchanged ones and the prune candidates.
    // Scope: the bundle's kinds in its namespaces, the PVs lifeboat made (`host_path`), and the bundle's
    // namespaces (a get of each, for its version only: never pruned, and authorized in that
    // namespace, so the DR role needs no cluster-wide namespace list).
    let lp = ListParams::default().labels(&format!("{PROTECTION_LABEL}={protection}"));
    let mut scope: Vec<(Kind, Option<String>, bool)> = Vec::new();
    for k in bundle.kinds.iter().map(Kind::from) {
        for ns in &bundle.namespaces {
            scope.push((k.clone(), Some(ns.clone()), true));
        }
    }
    // Host-path replicas bind PVCs to PVs lifeboat makes; CSI replicas have none (and
    // their DR role has no cluster-wide PV list).
    if host_path {
        scope.push((kinds::persistent_volumes(), None, true));
    }
    let mut report = ApplyReport::default();
    // (apiVersion, kind, namespace, name) -> (resourceVersion, its kind if prunable)
    type Key = (String, String, String, String);
    let mut before: BTreeMap<Key, (Option<String>, Option<Kind>)> = BTreeMap::new();
    let ns_kind = kinds::namespaces();
    for ns in &bundle.namespaces {
        let got = match api_for(client, &ns_kind, None).get_opt(ns).await {
            Ok(o) => o,
            Err(e) => {
                report.failed.push(Failed {
                    object: format!("Namespace {ns}"),
                    error: format!("{:#}", api_error(e, format!("get namespace {ns}"))),
                });
                continue;
            }
        };
        if let Some(o) = got {
            let key = (
                ns_kind.api_version(),
                ns_kind.kind.clone(),
                String::new(),
                ns.clone(),
            );
            before.insert(key, (o.metadata.resource_version, None));
        }
    }
    for (kind, ns, prunable) in &scope {
        let api = api_for(client, kind, ns.as_deref());
        let list = match api.list(&lp).await {
            Ok(l) => l,
            // A namespace not created yet holds nothing of ours.
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            // Without the list nothing of this kind is pruned; the objects still apply.
            Err(e) => {
                let what = format!("list {}", kind.group_resource());
                report.failed.push(Failed {
                    error: format!("{:#}", api_error(e, what.clone())),
                    object: match ns {
                        Some(ns) => format!("{what} in {ns}"),
                        None => what,
                    },
                });
                continue;
            }
        };
        for o in list.items {
            let key = (
                kind.api_version(),
                kind.kind.clone(),
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            );
            let prune_as = prunable.then(|| kind.clone());
            before.insert(key, (o.metadata.resource_version, prune_as));
        }
    }

    for v in objects {
        let what = describe(v);
        let kind = match kind_of(bundle, v) {
            Ok(k) => k,
            Err(e) => {
                report.failed.push(Failed {
                    object: what,
                    error: format!("{e:#}"),
                });
                continue;
            }
        };
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let ns = v["metadata"]["namespace"].as_str();
        let key = (
            kind.api_version(),
            kind.kind.clone(),
            ns.unwrap_or("").to_string(),
            name.to_string(),
        );
        let was = before.remove(&key).and_then(|(rv, _)| rv);
        match apply_one(client, &kind, v).await {
            Ok((after, recreated)) => {
                if recreated {
                    tracing::info!(object = %what, "recreated: the change touched an immutable field");
                    report.recreated.push(what.clone());
                }
                if was != after {
                    report.changed.push(what.clone());
                }
                report.applied.push(what);
            }
            Err(error) => {
                tracing::warn!(object = %what, %error, "not applied");
                report.failed.push(Failed {
                    object: what,
                    error,
                });
            }
        }
    }
    // Prune: what lifeboat applied before that this gen no longer has.
    for ((_, kind_name, ns, name), (_, prune_as)) in before {
        let Some(kind) = prune_as else { continue };
        let api = api_for(client, &kind, Some(ns.as_str()).filter(|n| !n.is_empty()));
        let what = if ns.is_empty() {
            format!("{kind_name} {name}")
        } else {
            format!("{kind_name} {ns}/{name}")
        };
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => report.pruned.push(what),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => report.failed.push(Failed {
                error: format!("{:#}", api_error(e, format!("prune {what}"))),
                object: what,
            }),
        }
    }
    Ok(report)
}

/// Server-side apply of one object: its new resourceVersion, and whether it had to be
/// recreated.
async fn apply_one(
    client: &kube::Client,
    kind: &Kind,
    v: &Value,
) -> std::result::Result<(Option<String>, bool), String> {
    let name = v["metadata"]["name"].as_str().unwrap_or_default();
    let api = api_for(client, kind, v["metadata"]["namespace"].as_str());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(name, &pp, &Patch::Apply(v)).await {
        Ok(o) => Ok((o.metadata.resource_version, false)),
        Err(kube::Error::Api(s)) if is_immutable(&s) => {
            if !recreatable(kind) {
                return Err(format!(
                    "{}; a {} holds data or other objects, so lifeboat does not recreate it: change it by hand at this site, or revert the change at the primary",
                    s.message, kind.kind
                ));
            }
            recreate(&api, kind, name, v, &pp)
                .await
                .map(|rv| (rv, true))
        }
        Err(e) => Err(format!(
            "{:#}",
            api_error(e, format!("apply {}", describe(v)))
        )),
    }
}

/// The server's answer to a change of a field it does not let change once set.
pub fn is_immutable(s: &kube::core::Status) -> bool {
    s.code == 422
        && [
            "field is immutable",
            "Forbidden: updates to statefulset spec",
            "cannot change roleRef",
            "is immutable after creation",
        ]
        .iter()
        .any(|m| s.message.contains(m))
}

/// Built-in kinds whose recreation loses nothing. Not the claims and volumes that hold
/// the data, not a namespace (its deletion takes everything in it), and not custom
/// resources: deleting an operator's resource lets the garbage collector delete what the
/// operator made from it (StatefulSets, claims, Secrets).
fn recreatable(kind: &Kind) -> bool {
    matches!(
        (kind.group.as_str(), kind.kind.as_str()),
        ("", "ConfigMap" | "Secret" | "Service" | "ServiceAccount")
            | (
                "apps",
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
            )
            | ("batch", "Job" | "CronJob")
            | ("rbac.authorization.k8s.io", "Role" | "RoleBinding")
            | ("networking.k8s.io", "Ingress" | "NetworkPolicy")
            | ("autoscaling", "HorizontalPodAutoscaler")
            | ("policy", "PodDisruptionBudget")
    )
}

/// The documented safe path for an immutable change: delete the one object and apply it
/// again. Workloads whose selector is unchanged are deleted with `propagationPolicy:
/// Orphan`, so pods running (after a failover) stay and the new controller adopts them;
/// others in the background (their pods are replaced); claims are never deleted. If the new
/// object cannot be created, the old one is put back as it was.
async fn recreate(
    api: &Api<DynamicObject>,
    kind: &Kind,
    name: &str,
    v: &Value,
    pp: &PatchParams,
) -> std::result::Result<Option<String>, String> {
    let old = find(api, name)
        .await
        .map_err(|e| format!("read it before recreating: {e}"))?;
    // Orphaned pods are adopted only by a controller whose selector still matches them; a
    // changed selector would leave them running beside the new ones.
    let same_selector = old
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .is_some_and(|o| o["spec"]["selector"] == v["spec"]["selector"]);
    let workload = kind.group == "apps" || (kind.group == "batch" && kind.kind == "CronJob");
    let dp = if workload && same_selector {
        DeleteParams::orphan()
    } else {
        DeleteParams::background()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(format!("delete it to recreate it: {e}")),
    }
    // Deletion with orphaning finishes after the garbage collector's pass.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(find(api, name).await, Ok(None)) {
        if Instant::now() > deadline {
            return Err("recreate: the old object was not gone after 30s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match api.patch(name, pp, &Patch::Apply(v)).await {
        Ok(o) => Ok(o.metadata.resource_version),
        Err(e) => {
            let restored = match old {
                Some(o) => {
                    let back = restorable(o);
                    match api.patch(name, pp, &Patch::Apply(&back)).await {
                        Ok(_) => "the previous object was put back".to_string(),
                        Err(e2) => format!("putting the previous object back failed too: {e2}"),
                    }
                }
                None => "there was no previous object".into(),
            };
            Err(format!("recreate with the new spec: {e}; {restored}"))
        }
    }
}

/// One object by name, read with the `list` the role already has for pruning (a list with
/// a `metadata.name` field selector) rather than a `get` it would need only for this.
async fn find(api: &Api<DynamicObject>, name: &str) -> kube::Result<Option<DynamicObject>> {
    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
    Ok(api.list(&lp).await?.items.into_iter().next())
}

/// An object as read, made fit to apply again: without what the server owns.
fn restorable(o: DynamicObject) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or_default();
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "managedFields",
            "generation",
            "deletionTimestamp",
        ] {
            m.remove(k);
        }
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    v
}

/// Whether a workload reports all its replicas ready.
pub fn is_ready(v: &Value) -> bool {
    let status = &v["status"];
    match v["kind"].as_str() {
        Some("DaemonSet") => {
            // Just after the active apply a standby DaemonSet still reports 0 of 0.
            let observed = status["observedGeneration"].as_i64().unwrap_or(0)
                >= v["metadata"]["generation"].as_i64().unwrap_or(0);
            let want = status["desiredNumberScheduled"].as_i64().unwrap_or(0);
            observed && status["numberReady"].as_i64().unwrap_or(0) >= want
        }
        _ => {
            let want = v["spec"]["replicas"].as_i64().unwrap_or(1);
            let observed = status["observedGeneration"].as_i64().unwrap_or(0)
                >= v["metadata"]["generation"].as_i64().unwrap_or(0);
            observed && status["readyReplicas"].as_i64().unwrap_or(0) >= want
        }
    }
}

/// One workload's wait.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Readiness {
    pub workload: String,
    pub replicas: i64,
    pub seconds: f64,
}

/// Waits (by watch) until every workload in `objects` is ready, at most `timeout` in all:
/// the workloads that became ready, and a line for each one that did not.
pub async fn wait_ready(
    client: &kube::Client,
    bundle: &Bundle,
    objects: &[Value],
    timeout: Duration,
) -> Result<(Vec<Readiness>, Vec<String>)> {
    let started = Instant::now();
    let (mut ready, mut not_ready) = (Vec::new(), Vec::new());
    let workloads: Vec<&Value> = objects
        .iter()
        .filter(|v| {
            v["apiVersion"] == "apps/v1"
                && matches!(
                    v["kind"].as_str(),
                    Some("Deployment" | "StatefulSet" | "DaemonSet")
                )
        })
        .collect();
    for v in workloads {
        let kind = kind_of(bundle, v)?;
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api = api_for(client, &kind, v["metadata"]["namespace"].as_str());
        let kind_name = kind.kind.clone();
        let as_json = move |o: &DynamicObject| {
            let mut j = serde_json::to_value(o).unwrap_or_default();
            j["kind"] = Value::String(kind_name.clone());
            j
        };
        let check = as_json.clone();
        let cond = move |o: Option<&DynamicObject>| o.is_some_and(|o| is_ready(&check(o)));
        let left = timeout.saturating_sub(started.elapsed());
        let waited = tokio::time::timeout(
            left,
            kube::runtime::wait::await_condition(api.clone(), &name, cond),
        )
        .await;
        let done = Readiness {
            workload: describe(v),
            replicas: v["spec"]["replicas"].as_i64().unwrap_or(1),
            seconds: started.elapsed().as_secs_f64(),
        };
        match waited {
            Ok(Ok(_)) => ready.push(done),
            Ok(Err(e)) => not_ready.push(format!("watch {}: {e}", describe(v))),
            Err(_) => {
                // Out of time: one last look, so a workload that is ready by now counts.
                let now = api.get_opt(&name).await.ok().flatten().map(|o| as_json(&o));
                match now {
                    Some(j) if is_ready(&j) => ready.push(done),
                    Some(j) => not_ready.push(format!(
                        "{} is not ready after {:?} ({} of {} ready); check the workload's events",
                        describe(v),
                        timeout,
                        j["status"]["readyReplicas"].as_i64().unwrap_or(0),
                        j["spec"]["replicas"].as_i64().unwrap_or(1)
                    )),
                    None => not_ready.push(format!("{} is not found", describe(v))),
                }
            }
        }
    }
    Ok((ready, not_ready))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn readiness_needs_every_replica_and_the_current_generation() {
        let d = |ready: i64, observed: i64| {
            json!({"kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 3},
                "status": {"readyReplicas": ready, "observedGeneration": observed}})
        };
        assert!(is_ready(&d(3, 2)));
        assert!(!is_ready(&d(2, 2)));
        assert!(!is_ready(&d(3, 1)));
        assert!(is_ready(
            &json!({"kind": "DaemonSet", "status": {"desiredNumberScheduled": 2, "numberReady": 2}})
        ));
        assert!(!is_ready(
            &json!({"kind": "DaemonSet", "metadata": {"generation": 3},
            "status": {"desiredNumberScheduled": 0, "numberReady": 0, "observedGeneration": 2}})
        ));
    }
}
