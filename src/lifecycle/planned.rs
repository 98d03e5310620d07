//! Planned failover, the primary's half: stop the application's writers by scaling its
//! workloads to zero (and suspending its CronJobs) so that a final cycle carries everything
//! written. Each object keeps its running count in `lifeboat.dev/replicas` (and its
//! schedule state in `lifeboat.dev/suspend`), which the collector reads back, so the
//! final gen's manifests carry the counts the DR site must start.

use anyhow::Result;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{json, Value};

use crate::k8s::kinds::Kind;
use crate::k8s::labels::Selector;
use crate::k8s::{api_error, REPLICAS_ANNOTATION, SUSPEND_ANNOTATION};
use crate::site::Shared;

fn workload_kinds() -> Vec<Kind> {
    crate::k8s::kinds::quiesced()
}

fn selected(v: &Value, sel: Option<&Selector>) -> bool {
    let owned = v["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|o| o.iter().any(|r| r["controller"] == true));
    let labels = v
        .pointer("/spec/template/metadata/labels")
        .or_else(|| v.pointer("/spec/jobTemplate/spec/template/metadata/labels"));
    !owned && sel.is_none_or(|s| s.matches_json(labels))
}

/// Scales the protection's workloads to zero and suspends its CronJobs; returns what it did.
pub async fn quiesce(site: &Shared, name: &str) -> Result<Vec<String>> {
    if site.protection(name)?.kubernetes.is_none() {
        // Local mode has no workloads to scale: the operator stops the writers.
        return Ok(vec![format!(
            "local protection {name}: nothing to scale down (stop the application's writers before the final cycle)"
        )]);
    }
    let kp = site.kube_protection(name)?;
    let client = site.kube(name)?;
    let pp = PatchParams::default();
    let mut done = Vec::new();
    for ns in &kp.namespaces {
        for kind in workload_kinds() {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), ns, &kind.resource());
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(|e| api_error(e, format!("list {} in {ns}", kind.group_resource())))?;
            for o in list.items {
                let v = serde_json::to_value(&o)?;
                if !selected(&v, kp.selector.as_ref()) {
                    continue;
                }
                let obj = o.metadata.name.clone().unwrap_or_default();
                let patch = if kind.kind == "CronJob" {
                    if v["spec"]["suspend"] == true {
                        continue;
                    }
                    json!({"metadata": {"annotations": {SUSPEND_ANNOTATION: "false"}}, "spec": {"suspend": true}})
                } else {
                    let n = v["spec"]["replicas"].as_i64().unwrap_or(1);
                    if n == 0 {
                        continue;
                    }
                    json!({"metadata": {"annotations": {REPLICAS_ANNOTATION: n.to_string()}}, "spec": {"replicas": 0}})
                };
                api.patch(&obj, &pp, &Patch::Merge(&patch))
                    .await
                    .map_err(|e| api_error(e, format!("quiesce {} {ns}/{obj}", kind.kind)))?;
                done.push(format!("{} {ns}/{obj}", kind.kind));
            }
        }
    }
    tracing::warn!(
        protection = name,
        objects = done.len(),
        "quiesced for a planned failover"
    );
    Ok(done)
}
