//! Collection at the primary: list what a protection selects, follow the references of the
//! selected pods, and build the gen's manifest bundle and volume group. Any API error
//! (403, unknown kind, missing namespace) fails the whole collection, so a cycle never
//! commits half a bundle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use kube::api::{Api, DynamicObject, ListParams};
use serde_json::Value;

use super::bundle::{self, Bundle, Coverage, KindRef, PvcRef, BUNDLE_VERSION};
use super::kinds::{self, Kind};
use super::labels::{label_map, Selector};
use super::sanitise::{is_cluster_specific, sanitise};
use super::transform::{self, containers, pod_specs};
use super::{api_error, volume_name, KubeProtection};

/// A volume of the group: its name and where the primary reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvcVolume {
    pub name: String,
    pub path: PathBuf,
}

pub struct Collected {
    pub bundle: Bundle,
    pub volumes: Vec<PvcVolume>,
    /// The selected pods as read (rules run in them; Velero hooks are their annotations).
    pub pods: Vec<Value>,
}

/// Lists `kind` in `ns` (None: cluster-wide), with apiVersion and kind set on each item
/// (list responses leave them out).
pub async fn list(
    client: &kube::Client,
    kind: &Kind,
    ns: Option<&str>,
    lp: &ListParams,
) -> Result<Vec<Value>> {
    let ar = kind.resource();
    let api: Api<DynamicObject> = match ns {
        Some(ns) if kind.namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    let where_ = ns.map_or(String::new(), |ns| format!(" in namespace {ns}"));
    let list = api
        .list(lp)
        .await
        .map_err(|e| api_error(e, format!("list {}{where_}", kind.group_resource())))?;
    Ok(list
        .items
        .into_iter()
        .map(|o| {
            let mut v = serde_json::to_value(o).expect("objects serialise");
            v["apiVersion"] = Value::String(kind.api_version());
            v["kind"] = Value::String(kind.kind.clone());
            v
        })
        .collect())
}

/// Resolves the kinds to collect: the built-in ones (or `include_kinds`), plus custom
/// resources, minus `exclude_kinds`. Names that are not built in are looked up by API
/// discovery; a name the server does not serve is an error.
async fn resolve_kinds(client: &kube::Client, kp: &KubeProtection) -> Result<Vec<Kind>> {
    let builtin = kinds::builtin();
    let needs_discovery = kp
        .include_kinds
        .iter()
        .chain(&kp.exclude_kinds)
        .any(|n| !builtin.iter().any(|k| k.is_named(n)))
        || !kp.custom_resources.is_empty();
    let served: Vec<Kind> = if needs_discovery {
        let d = kube::discovery::Discovery::new(client.clone())
            .run()
            .await
            .map_err(|e| api_error(e, "API discovery"))?;
        d.groups()
            .flat_map(|g| g.recommended_resources())
            .map(|(ar, caps)| Kind {
                group: ar.group,
                version: ar.version,
                kind: ar.kind,
                plural: ar.plural,
                namespaced: caps.scope == kube::discovery::Scope::Namespaced,
            })
            .collect()
    } else {
        Vec::new()
    };
    let find = |name: &str, field: &str| -> Result<Kind> {
        builtin
            .iter()
            .chain(&served)
            .find(|k| k.is_named(name))
            .cloned()
            .ok_or_else(|| {
                let hint = builtin
                    .iter()
                    .find(|k| strsim_close(&k.kind, name))
                    .map_or(String::new(), |k| format!(" (did you mean {}?)", k.kind));
                anyhow!("{field}: unknown kind {name:?}: the API server serves no resource of that name{hint}")
            })
    };
    let mut out: Vec<Kind> = if kp.include_kinds.is_empty() {
        builtin.clone()
    } else {
        kp.include_kinds
            .iter()
            .map(|n| find(n, "include_kinds"))
            .collect::<Result<_>>()?
    };
    for n in &kp.custom_resources {
        let k = find(n, "custom_resources")?;
        if !k.namespaced {
            bail!("custom_resources: {n} is cluster-scoped; lifeboat mirrors namespaced resources only (report it, do not guess)");
        }
        out.push(k);
    }
    for n in &kp.exclude_kinds {
        let k = find(n, "exclude_kinds")?;
        out.retain(|o| *o != k);
    }
    out.dedup();
    Ok(out)
}

/// At most two edits apart, ignoring case: enough to suggest "Deployment" for "Deploymnet".
fn strsim_close(a: &str, b: &str) -> bool {
    strsim::levenshtein(&a.to_ascii_lowercase(), &b.to_ascii_lowercase()) <= 2
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

fn ns_of(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or("")
}

/// Owned by a controller: the owner recreates it, so it is not mirrored itself.
fn has_controller(v: &Value) -> bool {
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
fn select_closure(
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

/// Collects the protection's objects and volumes from the primary's cluster.
pub async fn collect(client: &kube::Client, kp: &KubeProtection) -> Result<Collected> {
    let kinds = resolve_kinds(client, kp).await?;
    let excluded = |v: &Value| {
        v.pointer("/metadata/labels")
            .and_then(|l| l.get(&kp.exclude_label))
            .and_then(Value::as_str)
            == Some("true")
    };
    let mut objects = Vec::new();
    let mut pods = Vec::new();
    let mut namespaces = Vec::new();
    for ns in &kp.namespaces {
        let ns_api: Api<DynamicObject> =
            Api::all_with(client.clone(), &kinds::namespaces().resource());
        let nso = ns_api
            .get_opt(ns)
            .await
            .map_err(|e| api_error(e, format!("get namespace {ns}")))?
            .ok_or_else(|| anyhow!("namespace {ns:?} does not exist in the primary's cluster"))?;
        let mut nsv = serde_json::to_value(nso)?;
        nsv["apiVersion"] = "v1".into();
        nsv["kind"] = "Namespace".into();
        namespaces.push(nsv);
        let lp = ListParams::default();
        for k in &kinds {
            objects.extend(
                list(client, k, Some(ns), &lp)
                    .await?
                    .into_iter()
                    .filter(|v| !excluded(v) && !is_cluster_specific(v))
                    .filter(|v| !has_controller(v) || v["kind"] == "PersistentVolumeClaim"),
            );
        }
        let pod_lp = match &kp.selector {
            Some(sel) => ListParams::default().labels(&sel.to_string()),
            None => ListParams::default(),
        };
        pods.extend(
            list(client, &kinds::pods(), Some(ns), &pod_lp)
                .await?
                .into_iter()
                .filter(|p| !excluded(p)),
        );
    }
    let mut warnings = Vec::new();
    if let Some(sel) = &kp.selector {
        let keep = select_closure(sel, &objects, &pods);
        if keep.is_empty() && pods.is_empty() {
            bail!(
                "selector {sel} matches no pods and no workloads in namespace(s) {}",
                kp.namespaces.join(", ")
            );
        }
        objects.retain(|o| {
            keep.contains(&(
                o["kind"].as_str().unwrap_or("").to_string(),
                ns_of(o).to_string(),
                name(o).to_string(),
            ))
        });
    }
    for p in &pods {
        if !has_controller(p) {
            warnings.push(format!(
                "Pod {}/{} has no controller; bare pods are not mirrored",
                ns_of(p),
                name(p)
            ));
        }
    }
    // Volumes: the PVCs mirrored, read at the primary's path, named by their DR namespace.
    let mut volumes = Vec::new();
    let mut vol_map = BTreeMap::new();
    let mut pvc_lines = Vec::new();
    for pvc in objects
        .iter()
        .filter(|o| o["kind"] == "PersistentVolumeClaim")
    {
        let (ns, n) = (ns_of(pvc), name(pvc));
        let target = kp.target_namespace(ns);
        let vname = volume_name(target, n);
        if let Err(e) = crate::ids::check_name(&vname) {
            bail!("PVC {ns}/{n}: its volume name {e}; shorten the PVC or namespace name");
        }
        let path = kp.path_of(ns, n);
        pvc_lines.push(format!("{ns}/{n} -> {}", path.display()));
        vol_map.insert(
            vname.clone(),
            PvcRef {
                namespace: target.to_string(),
                name: n.to_string(),
            },
        );
        volumes.push(PvcVolume { name: vname, path });
    }
    if volumes.is_empty() {
        warnings.push(
            "the selection has no PersistentVolumeClaims: only manifests are mirrored".into(),
        );
    }
    let mut coverage = Coverage {
        namespaces: kp.namespaces.clone(),
        pods: pods
            .iter()
            .map(|p| format!("{}/{}", ns_of(p), name(p)))
            .collect(),
        pvcs: pvc_lines,
        objects: Vec::new(),
    };
    let mut out = Vec::with_capacity(objects.len() + namespaces.len());
    for o in namespaces.iter().chain(&objects) {
        let kind = kinds
            .iter()
            .chain(std::iter::once(&kinds::namespaces()))
            .find(|k| o["kind"] == k.kind.as_str() && o["apiVersion"] == k.api_version().as_str())
            .cloned();
        let mut v = sanitise(o);
        warnings.extend(transform::map_namespace(&mut v, &kp.namespace_map));
        transform::map_storage_class(&mut v, &kp.storage_class_map);
        if let (Some(m), Some(k)) = (&kp.resource_modifiers, &kind) {
            m.apply(&mut v, &k.group_resource())?;
        }
        out.push(v);
    }
    bundle::sort(&mut out);
    coverage.objects = out.iter().map(bundle::describe).collect();
    let mut dr_namespaces: Vec<String> = kp
        .namespaces
        .iter()
        .map(|n| kp.target_namespace(n).to_string())
        .collect();
    dr_namespaces.sort();
    Ok(Collected {
        bundle: Bundle {
            v: BUNDLE_VERSION,
            namespaces: dr_namespaces,
            kinds: kinds.iter().map(KindRef::from).collect(),
            objects: out,
            volumes: vol_map,
            coverage,
            warnings,
        },
        volumes,
        pods,
    })
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

    #[test]
    fn near_misses_of_kind_names_are_suggested() {
        assert!(strsim_close("Deployment", "Deploymnet"));
        assert!(strsim_close("Secret", "secret"));
        assert!(!strsim_close("Secret", "ConfigMap"));
    }
}
