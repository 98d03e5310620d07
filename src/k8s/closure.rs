//! The selection closure, pure: from the objects of the protected namespaces and a pod
//! label selector, the objects a selection keeps: the matching workloads and pods, their
//! claims, and what their pods reference (ConfigMaps, Secrets, ServiceAccounts and their
//! RoleBindings and Roles, Services that select them, Ingresses to those Services).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::labels::{label_map, Selector};
use super::transform::{containers, pod_specs};

pub(super) fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

pub(super) fn ns_of(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or("")
}

/// Owned by a controller: the owner recreates it, so it is not mirrored itself.
pub(super) fn has_controller(v: &Value) -> bool {
    v["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|o| o.iter().any(|r| r["controller"].as_bool() == Some(true)))
}

/// Where pod specs name other objects: (kind, JSON pointer) within a volume, a projected
/// volume source, an env entry and an envFrom entry.
const VOLUME_REFS: &[(&str, &str)] = &[
    ("PersistentVolumeClaim", "/persistentVolumeClaim/claimName"),
    ("ConfigMap", "/configMap/name"),
    ("Secret", "/secret/secretName"),
];
const PROJECTED_REFS: &[(&str, &str)] =
    &[("ConfigMap", "/configMap/name"), ("Secret", "/secret/name")];
const ENV_REFS: &[(&str, &str)] = &[
    ("ConfigMap", "/valueFrom/configMapKeyRef/name"),
    ("Secret", "/valueFrom/secretKeyRef/name"),
];
const ENV_FROM_REFS: &[(&str, &str)] = &[
    ("ConfigMap", "/configMapRef/name"),
    ("Secret", "/secretRef/name"),
];

fn each<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// What a pod spec refers to by name: (kind, name).
fn references(spec: &Value) -> BTreeSet<(&'static str, String)> {
    let mut out = BTreeSet::new();
    let mut add = |v: &Value, table: &[(&'static str, &str)]| {
        for (kind, pointer) in table {
            if let Some(n) = v.pointer(pointer).and_then(Value::as_str) {
                out.insert((*kind, n.to_string()));
            }
        }
    };
    add(spec, &[("ServiceAccount", "/serviceAccountName")]);
    for s in each(spec, "/imagePullSecrets") {
        add(s, &[("Secret", "/name")]);
    }
    for vol in each(spec, "/volumes") {
        add(vol, VOLUME_REFS);
        for src in each(vol, "/projected/sources") {
            add(src, PROJECTED_REFS);
        }
    }
    for c in containers(spec) {
        for e in each(c, "/env") {
            add(e, ENV_REFS);
        }
        for e in each(c, "/envFrom") {
            add(e, ENV_FROM_REFS);
        }
    }
    out
}

/// The labels of the pods a workload makes.
fn template_labels(v: &Value) -> BTreeMap<String, String> {
    let l = v
        .pointer("/spec/template/metadata/labels")
        .or_else(|| v.pointer("/spec/jobTemplate/spec/template/metadata/labels"));
    label_map(l)
}

/// Selector mode: the objects that the selected pods and workloads need.
pub(super) fn select_closure(
    sel: &Selector,
    objects: &[Value],
    pods: &[Value],
) -> BTreeSet<(String, String, String)> {
    let key = |v: &Value| {
        (
            v["kind"].as_str().unwrap_or("").to_string(),
            ns_of(v).to_string(),
            name(v).to_string(),
        )
    };
    let mut keep = BTreeSet::new();
    let mut pod_labels: Vec<BTreeMap<String, String>> = Vec::new();
    let mut refs: BTreeSet<(String, &'static str, String)> = BTreeSet::new();
    for p in pods {
        pod_labels.push(label_map(p.pointer("/metadata/labels")));
        for (k, n) in references(&p["spec"]) {
            refs.insert((ns_of(p).to_string(), k, n));
        }
    }
    for o in objects {
        let labels = label_map(o.pointer("/metadata/labels"));
        let tpl = template_labels(o);
        let is_workload = !pod_specs(o).is_empty();
        if sel.matches(&labels) || (is_workload && !tpl.is_empty() && sel.matches(&tpl)) {
            keep.insert(key(o));
            if is_workload {
                pod_labels.push(tpl);
                for spec in pod_specs(o) {
                    for (k, n) in references(spec) {
                        refs.insert((ns_of(o).to_string(), k, n));
                    }
                }
            }
        }
    }
    // StatefulSet claim templates: PVCs named <template>-<set>-<ordinal>.
    let mut claim_prefixes = Vec::new();
    for o in objects
        .iter()
        .filter(|o| o["kind"] == "StatefulSet" && keep.contains(&key(o)))
    {
        for t in o
            .pointer("/spec/volumeClaimTemplates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            claim_prefixes.push((ns_of(o).to_string(), format!("{}-{}-", name(t), name(o))));
        }
    }
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or("");
        let (ns, n) = (ns_of(o).to_string(), name(o).to_string());
        let referenced = refs
            .iter()
            .any(|(rns, rk, rn)| *rns == ns && *rk == kind && *rn == n);
        let claim = kind == "PersistentVolumeClaim"
            && claim_prefixes.iter().any(|(pns, pre)| {
                *pns == ns
                    && n.strip_prefix(pre.as_str())
                        .is_some_and(|rest| rest.parse::<u32>().is_ok())
            });
        let fronts_pods = |sel: Option<Selector>| {
            sel.is_some_and(|s| !s.is_empty() && pod_labels.iter().any(|l| s.matches(l)))
        };
        let service = kind == "Service"
            && fronts_pods(
                o.pointer("/spec/selector")
                    .and_then(Value::as_object)
                    .map(Selector::from_map),
            );
        let by_selector = matches!(kind, "PodDisruptionBudget" | "NetworkPolicy")
            && fronts_pods(
                o.pointer("/spec/selector")
                    .or_else(|| o.pointer("/spec/podSelector"))
                    .and_then(|s| Selector::from_object(s).ok()),
            );
        if referenced || claim || service || by_selector {
            keep.insert(key(o));
        }
    }
    // Second pass: what the kept objects refer to (RoleBindings of kept ServiceAccounts,
    // their Roles, HPAs of kept workloads, Ingresses of kept Services).
    let kept = keep.clone();
    let is_kept =
        |k: &str, ns: &str, n: &str| kept.contains(&(k.to_string(), ns.to_string(), n.to_string()));
    for o in objects {
        let ns = ns_of(o);
        let add = match o["kind"].as_str().unwrap_or("") {
            "RoleBinding" => o["subjects"].as_array().into_iter().flatten().any(|s| {
                s["kind"] == "ServiceAccount"
                    && is_kept(
                        "ServiceAccount",
                        s["namespace"].as_str().unwrap_or(ns),
                        s["name"].as_str().unwrap_or(""),
                    )
            }),
            "HorizontalPodAutoscaler" => is_kept(
                o.pointer("/spec/scaleTargetRef/kind")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                ns,
                o.pointer("/spec/scaleTargetRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ),
            "Ingress" => ingress_services(o)
                .iter()
                .any(|s| is_kept("Service", ns, s)),
            _ => false,
        };
        if add {
            keep.insert(key(o));
            if o["kind"] == "RoleBinding"
                && o.pointer("/roleRef/kind") == Some(&Value::from("Role"))
            {
                let role = o
                    .pointer("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                keep.insert(("Role".into(), ns.to_string(), role.to_string()));
            }
        }
    }
    keep
}

fn ingress_services(o: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = o
        .pointer("/spec/defaultBackend/service/name")
        .and_then(Value::as_str)
    {
        out.push(s.to_string());
    }
    for rule in o
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in rule
            .pointer("/http/paths")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(s) = p.pointer("/backend/service/name").and_then(Value::as_str) {
                out.push(s.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_label_selector_keeps_the_workload_its_claims_and_what_its_pods_use() {
        let objects = vec![
            json!({"kind": "StatefulSet", "metadata": {"name": "cassandra", "namespace": "prod"},
                "spec": {"template": {"metadata": {"labels": {"app": "cassandra"}},
                    "spec": {"serviceAccountName": "cass", "containers": [{"name": "c",
                        "envFrom": [{"configMapRef": {"name": "cass-env"}}]}]}},
                    "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}}),
            json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "data-cassandra-0", "namespace": "prod"}}),
            json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "data-cassandra-x", "namespace": "prod"}}),
            json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "mysql-a", "namespace": "prod"}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "cass-env", "namespace": "prod"}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "mysql-cnf", "namespace": "prod"}}),
            json!({"kind": "ServiceAccount", "metadata": {"name": "cass", "namespace": "prod"}}),
            json!({"kind": "RoleBinding", "metadata": {"name": "cass-rb", "namespace": "prod"},
                "subjects": [{"kind": "ServiceAccount", "name": "cass"}], "roleRef": {"kind": "Role", "name": "cass-role"}}),
            json!({"kind": "Role", "metadata": {"name": "cass-role", "namespace": "prod"}}),
            json!({"kind": "Service", "metadata": {"name": "cassandra", "namespace": "prod"}, "spec": {"selector": {"app": "cassandra"}}}),
            json!({"kind": "Service", "metadata": {"name": "mysql", "namespace": "prod"}, "spec": {"selector": {"app": "mysql"}}}),
        ];
        let sel = Selector::parse("app=cassandra").unwrap();
        let keep = select_closure(&sel, &objects, &[]);
        let names: BTreeSet<String> = keep.iter().map(|(k, _, n)| format!("{k}/{n}")).collect();
        let want: BTreeSet<String> = [
            "StatefulSet/cassandra",
            "PersistentVolumeClaim/data-cassandra-0",
            "ConfigMap/cass-env",
            "ServiceAccount/cass",
            "RoleBinding/cass-rb",
            "Role/cass-role",
            "Service/cassandra",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(names, want);
    }
}
