//! Sanitising: what an object read from the primary's API server must lose before another
//! cluster can take it. Pure; every rule is in the table test below.

use serde_json::{Map, Value};

/// Metadata the API server owns or that names this cluster's instances.
const METADATA_DROP: &[&str] = &[
    "uid",
    "resourceVersion",
    "managedFields",
    "creationTimestamp",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    // Owners are referenced by uid, which differs in every cluster: at the DR site a
    // reference to the primary's uid would let the garbage collector delete the object.
    // Objects whose owner is a mirrored controller are not mirrored at all (see collect).
    "ownerReferences",
    "generateName",
];

/// Annotations written by controllers of the primary's cluster.
const ANNOTATIONS_DROP: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "volume.kubernetes.io/selected-node",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "control-plane.alpha.kubernetes.io/leader",
];

/// Job labels and selector terms that carry the Job's uid.
const JOB_UID_LABELS: &[&str] = &[
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "job-name",
    "batch.kubernetes.io/job-name",
];

fn remove_keys(m: &mut Map<String, Value>, keys: &[&str]) {
    for k in keys {
        m.remove(*k);
    }
}

fn drop_empty(m: &mut Map<String, Value>, key: &str) {
    let empty = match m.get(key) {
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Null) => true,
        _ => false,
    };
    if empty {
        m.remove(key);
    }
}

fn clean_metadata(meta: &mut Map<String, Value>) {
    remove_keys(meta, METADATA_DROP);
    if let Some(Value::Object(a)) = meta.get_mut("annotations") {
        remove_keys(a, ANNOTATIONS_DROP);
    }
    // The group-snapshot label lifeboat puts on the primary's PVCs is the primary's.
    if let Some(Value::Object(l)) = meta.get_mut("labels") {
        l.remove(super::snapshot::GROUP_LABEL);
    }
    drop_empty(meta, "annotations");
    drop_empty(meta, "labels");
}

fn obj<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Map<String, Value>> {
    let mut cur = v;
    for p in path {
        cur = cur.get_mut(*p)?;
    }
    cur.as_object_mut()
}

/// A workload lifeboat scaled down for a planned failover: its running count (and
/// schedule) come back from lifeboat's own annotations.
fn undo_quiesce(v: &mut Value) {
    let ann = &v["metadata"]["annotations"];
    let replicas = ann[super::REPLICAS_ANNOTATION]
        .as_str()
        .and_then(|n| n.parse::<i64>().ok());
    let suspend = ann[super::SUSPEND_ANNOTATION].as_str().map(|s| s == "true");
    if let Some(n) = replicas {
        v["spec"]["replicas"] = n.into();
    }
    if let Some(s) = suspend {
        v["spec"]["suspend"] = s.into();
    }
    if let Some(Value::Object(a)) = v.pointer_mut("/metadata/annotations") {
        a.remove(super::REPLICAS_ANNOTATION);
        a.remove(super::SUSPEND_ANNOTATION);
    }
}

/// The object as another cluster can create it.
pub fn sanitise(input: &Value) -> Value {
    let mut v = input.clone();
    undo_quiesce(&mut v);
    let kind = v["kind"].as_str().unwrap_or("").to_string();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = obj(&mut v, &["metadata"]) {
        clean_metadata(meta);
    }
    // Pod templates carry a null creationTimestamp when read back.
    if let Some(meta) = obj(&mut v, &["spec", "template", "metadata"]) {
        meta.remove("creationTimestamp");
    }
    if let Some(meta) = obj(
        &mut v,
        &["spec", "jobTemplate", "spec", "template", "metadata"],
    ) {
        meta.remove("creationTimestamp");
    }
    dedupe_container_lists(&mut v);
    match kind.as_str() {
        "Service" => {
            if let Some(spec) = obj(&mut v, &["spec"]) {
                // A headless Service keeps "None": it is a choice, not an allocation.
                let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
                if !headless {
                    spec.remove("clusterIP");
                    spec.remove("clusterIPs");
                }
                spec.remove("healthCheckNodePort");
                if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.remove("nodePort");
                    }
                }
            }
        }
        "PersistentVolumeClaim" => {
            if let Some(spec) = obj(&mut v, &["spec"]) {
                spec.remove("volumeName");
            }
        }
        "Pod" => {
            if let Some(spec) = obj(&mut v, &["spec"]) {
                spec.remove("nodeName");
            }
        }
        "Job" => {
            let manual = v["spec"]["manualSelector"].as_bool() == Some(true);
            if !manual {
                if let Some(spec) = obj(&mut v, &["spec"]) {
                    spec.remove("selector");
                }
                if let Some(Value::Object(l)) = v.pointer_mut("/spec/template/metadata/labels") {
                    remove_keys(l, JOB_UID_LABELS);
                }
            }
        }
        "ServiceAccount" => {
            // Token secrets are minted per cluster and are not mirrored.
            if let Some(m) = v.as_object_mut() {
                m.remove("secrets");
            }
        }
        _ => {}
    }
    v
}

/// A server accepts a container with one env name twice (or one port twice) on create, but
/// a server-side apply refuses such a body, so the object would never reach the DR site.
/// Env: the last entry stays (the one the container sees); ports: the first.
fn dedupe_container_lists(v: &mut Value) {
    for spec in [
        "/spec",
        "/spec/template/spec",
        "/spec/jobTemplate/spec/template/spec",
    ] {
        for list in ["containers", "initContainers"] {
            let Some(Value::Array(cs)) = v.pointer_mut(&format!("{spec}/{list}")) else {
                continue;
            };
            for c in cs.iter_mut() {
                if let Some(Value::Array(env)) = c.get_mut("env") {
                    let mut seen = std::collections::HashSet::new();
                    let mut kept: Vec<Value> = env
                        .iter()
                        .rev()
                        .filter(|e| seen.insert(e["name"].as_str().unwrap_or("").to_string()))
                        .cloned()
                        .collect();
                    kept.reverse();
                    *env = kept;
                }
                if let Some(Value::Array(ports)) = c.get_mut("ports") {
                    let mut seen = std::collections::HashSet::new();
                    ports.retain(|p| {
                        seen.insert((
                            p["containerPort"].as_i64(),
                            p["protocol"].as_str().unwrap_or("TCP").to_string(),
                        ))
                    });
                }
            }
        }
    }
}

/// Objects that are per-cluster by nature and never mirrored.
pub fn is_cluster_specific(v: &Value) -> bool {
    let kind = v["kind"].as_str().unwrap_or("");
    let name = v["metadata"]["name"].as_str().unwrap_or("");
    match kind {
        "Secret" => v["type"].as_str() == Some("kubernetes.io/service-account-token"),
        "ConfigMap" => name == "kube-root-ca.crt",
        "ServiceAccount" => name == "default",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// (what, input, pointer, expected value at pointer after sanitising: None = absent)
    #[test]
    fn sanitising_table() {
        let meta = json!({"name": "x", "namespace": "prod", "uid": "u-1", "resourceVersion": "7",
            "generation": 3, "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl"}], "selfLink": "/api/x",
            "ownerReferences": [{"kind": "Deployment", "name": "web", "uid": "u-0"}],
            "labels": {"app": "web"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                            "deployment.kubernetes.io/revision": "4", "team": "db"}});
        let cases: Vec<(&str, Value, &str, Option<Value>)> = vec![
            (
                "uid",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/uid",
                None,
            ),
            (
                "resourceVersion",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/resourceVersion",
                None,
            ),
            (
                "generation",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/generation",
                None,
            ),
            (
                "creationTimestamp",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/creationTimestamp",
                None,
            ),
            (
                "managedFields",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/managedFields",
                None,
            ),
            (
                "ownerReferences",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/ownerReferences",
                None,
            ),
            (
                "last-applied dropped",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration",
                None,
            ),
            (
                "user annotation kept",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/annotations/team",
                Some(json!("db")),
            ),
            (
                "labels kept",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/labels/app",
                Some(json!("web")),
            ),
            (
                "name kept",
                json!({"kind": "ConfigMap", "metadata": meta}),
                "/metadata/name",
                Some(json!("x")),
            ),
            (
                "status",
                json!({"kind": "Deployment", "metadata": meta, "status": {"readyReplicas": 3}}),
                "/status",
                None,
            ),
            (
                "replicas kept",
                json!({"kind": "Deployment", "spec": {"replicas": 3}}),
                "/spec/replicas",
                Some(json!(3)),
            ),
            (
                "template timestamp",
                json!({"kind": "Deployment", "spec": {"template": {"metadata": {"creationTimestamp": null}}}}),
                "/spec/template/metadata/creationTimestamp",
                None,
            ),
            (
                "clusterIP",
                json!({"kind": "Service", "spec": {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"]}}),
                "/spec/clusterIP",
                None,
            ),
            (
                "clusterIPs",
                json!({"kind": "Service", "spec": {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"]}}),
                "/spec/clusterIPs",
                None,
            ),
            (
                "headless kept",
                json!({"kind": "Service", "spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
                "/spec/clusterIP",
                Some(json!("None")),
            ),
            (
                "nodePort",
                json!({"kind": "Service", "spec": {"ports": [{"port": 80, "nodePort": 30080}]}}),
                "/spec/ports/0/nodePort",
                None,
            ),
            (
                "port kept",
                json!({"kind": "Service", "spec": {"ports": [{"port": 80, "nodePort": 30080}]}}),
                "/spec/ports/0/port",
                Some(json!(80)),
            ),
            (
                "PVC volumeName",
                json!({"kind": "PersistentVolumeClaim", "spec": {"volumeName": "pv-1", "storageClassName": "fast"}}),
                "/spec/volumeName",
                None,
            ),
            (
                "PVC class kept",
                json!({"kind": "PersistentVolumeClaim", "spec": {"volumeName": "pv-1", "storageClassName": "fast"}}),
                "/spec/storageClassName",
                Some(json!("fast")),
            ),
            (
                "lifeboat's group-snapshot label",
                json!({"kind": "PersistentVolumeClaim", "metadata": {"labels": {"lifeboat.dev/snapshot-group": "lb-1"}}}),
                "/metadata/labels",
                None,
            ),
            (
                "PVC bind annotations",
                json!({"kind": "PersistentVolumeClaim", "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}}),
                "/metadata/annotations",
                None,
            ),
            (
                "nodeName",
                json!({"kind": "Pod", "spec": {"nodeName": "node-3"}}),
                "/spec/nodeName",
                None,
            ),
            (
                "Job selector",
                json!({"kind": "Job", "spec": {"selector": {"matchLabels": {"controller-uid": "u"}},
                "template": {"metadata": {"labels": {"controller-uid": "u", "app": "x"}}}}}),
                "/spec/selector",
                None,
            ),
            (
                "Job uid label",
                json!({"kind": "Job", "spec": {"selector": {}, "template": {"metadata": {"labels": {"controller-uid": "u", "app": "x"}}}}}),
                "/spec/template/metadata/labels/controller-uid",
                None,
            ),
            (
                "Job app label kept",
                json!({"kind": "Job", "spec": {"template": {"metadata": {"labels": {"controller-uid": "u", "app": "x"}}}}}),
                "/spec/template/metadata/labels/app",
                Some(json!("x")),
            ),
            (
                "SA token secrets",
                json!({"kind": "ServiceAccount", "secrets": [{"name": "sa-token-x"}]}),
                "/secrets",
                None,
            ),
        ];
        for (what, input, pointer, want) in cases {
            let out = sanitise(&input);
            assert_eq!(out.pointer(pointer).cloned(), want, "{what}: {out}");
        }
    }

    #[test]
    fn duplicate_env_names_and_ports_are_made_unique_as_the_container_sees_them() {
        let d = json!({"kind": "Deployment", "spec": {"template": {"spec": {"containers": [{"name": "a",
            "env": [{"name": "M", "value": "1"}, {"name": "X", "value": "x"}, {"name": "M", "value": "2"}],
            "ports": [{"containerPort": 80}, {"containerPort": 80, "protocol": "TCP"}, {"containerPort": 80, "protocol": "UDP"}]}]}}}});
        let s = sanitise(&d);
        let c = &s["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["env"],
            json!([{"name": "X", "value": "x"}, {"name": "M", "value": "2"}])
        );
        assert_eq!(
            c["ports"],
            json!([{"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}])
        );
    }

    #[test]
    fn per_cluster_objects_are_recognised() {
        assert!(is_cluster_specific(
            &json!({"kind": "Secret", "type": "kubernetes.io/service-account-token", "metadata": {"name": "t"}})
        ));
        assert!(is_cluster_specific(
            &json!({"kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt"}})
        ));
        assert!(!is_cluster_specific(
            &json!({"kind": "Secret", "type": "Opaque", "metadata": {"name": "db"}})
        ));
    }
}
