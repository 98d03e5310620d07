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
/// objects labelled with the protection that the gen no longer has. A change is a patch:
/// nothing is deleted and recreated to apply it.
pub async fn apply(
    client: &kube::Client,
    protection: &str,
    bundle: &Bundle,
    objects: &[Value],
) -> Result<ApplyReport> {
    // What lifeboat applied before: one labelled list per kind and namespace gives both the
    // resourceVersions to tell changed objects from unchanged ones and the prune candidates.
    // Scope: the bundle's kinds in its namespaces, the PVs lifeboat made, and the bundle's
    // namespaces (a get of each, for its version only: never pruned, and authorized in that
    // namespace, so the DR role needs no cluster-wide namespace list).
    let lp = ListParams::default().labels(&format!("{PROTECTION_LABEL}={protection}"));
    let mut scope: Vec<(Kind, Option<String>, bool)> = Vec::new();
    for k in bundle.kinds.iter().map(Kind::from) {
        for ns in &bundle.namespaces {
            scope.push((k.clone(), Some(ns.clone()), true));
        }
    }
    scope.push((kinds::persistent_volumes(), None, true));
    // (apiVersion, kind, namespace, name) -> (resourceVersion, its kind if prunable)
    type Key = (String, String, String, String);
    let mut before: BTreeMap<Key, (Option<String>, Option<Kind>)> = BTreeMap::new();
    let ns_kind = kinds::namespaces();
    for ns in &bundle.namespaces {
        let got = api_for(client, &ns_kind, None).get_opt(ns).await;
        let o = got.map_err(|e| api_error(e, format!("get namespace {ns}")))?;
        if let Some(o) = o {
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
            Err(e) => return Err(api_error(e, format!("list {}", kind.group_resource()))),
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

    let mut report = ApplyReport::default();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for v in objects {
        let kind = kind_of(bundle, v)?;
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let ns = v["metadata"]["namespace"].as_str();
        let after = api_for(client, &kind, ns)
            .patch(name, &pp, &Patch::Apply(v))
            .await
            .map_err(|e| api_error(e, format!("apply {}", describe(v))))?
            .metadata
            .resource_version;
        let key = (
            kind.api_version(),
            kind.kind.clone(),
            ns.unwrap_or("").to_string(),
            name.to_string(),
        );
        let what = describe(v);
        if before.remove(&key).and_then(|(rv, _)| rv) != after {
            report.changed.push(what.clone());
        }
        report.applied.push(what);
    }
    // Prune: what lifeboat applied before that this gen no longer has.
    for ((_, kind_name, ns, name), (_, prune_as)) in before {
        let Some(kind) = prune_as else { continue };
        let api = api_for(client, &kind, Some(ns.as_str()).filter(|n| !n.is_empty()));
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Err(api_error(e, format!("prune {kind_name} {ns}/{name}"))),
        }
        report.pruned.push(if ns.is_empty() {
            format!("{kind_name} {name}")
        } else {
            format!("{kind_name} {ns}/{name}")
        });
    }
    Ok(report)
}

/// Whether a workload reports all its replicas ready.
pub fn is_ready(v: &Value) -> bool {
    let status = &v["status"];
    match v["kind"].as_str() {
        Some("DaemonSet") => {
            let want = status["desiredNumberScheduled"].as_i64().unwrap_or(0);
            status["numberReady"].as_i64().unwrap_or(0) >= want
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

/// Waits (by watch) until every workload in `objects` is ready, at most `timeout` in all.
pub async fn wait_ready(
    client: &kube::Client,
    bundle: &Bundle,
    objects: &[Value],
    timeout: Duration,
) -> Result<Vec<Readiness>> {
    let started = Instant::now();
    let mut out = Vec::new();
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
        let cond = move |o: Option<&DynamicObject>| {
            o.is_some_and(|o| {
                let mut j = serde_json::to_value(o).unwrap_or_default();
                j["kind"] = Value::String(kind_name.clone());
                is_ready(&j)
            })
        };
        let left = timeout.saturating_sub(started.elapsed());
        let waited = tokio::time::timeout(
            left,
            kube::runtime::wait::await_condition(api.clone(), &name, cond),
        )
        .await;
        match waited {
            Ok(Ok(_)) => out.push(Readiness {
                workload: describe(v),
                replicas: v["spec"]["replicas"].as_i64().unwrap_or(1),
                seconds: started.elapsed().as_secs_f64(),
            }),
            Ok(Err(e)) => return Err(anyhow!("watch {}: {e}", describe(v))),
            Err(_) => {
                let now = api.get_opt(&name).await.ok().flatten();
                let status = now
                    .map(|o| serde_json::to_value(o).unwrap_or_default())
                    .map(|j| {
                        format!(
                            "{} of {} ready",
                            j["status"]["readyReplicas"].as_i64().unwrap_or(0),
                            j["spec"]["replicas"].as_i64().unwrap_or(1)
                        )
                    })
                    .unwrap_or_else(|| "not found".into());
                return Err(anyhow!(
                    "{} is not ready after {:?} ({status}); the manifests are applied, check the workload's events",
                    describe(v),
                    timeout
                ));
            }
        }
    }
    Ok(out)
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
    }
}
