//! Collection at the primary: list what a protection selects, follow the references of the
//! selected pods, and build the gen's manifest bundle and volume group. Any API error
//! (403, unknown kind, missing namespace) fails the whole collection, so a cycle never
//! commits half a bundle.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use kube::api::{Api, DynamicObject, ListParams};
use serde_json::Value;

use super::bundle::{self, Bundle, Coverage, KindRef, PvcRef, BUNDLE_VERSION};
use super::closure::{has_controller, name, ns_of, select_closure};
use super::kinds::{self, Kind};
use super::sanitise::{is_cluster_specific, sanitise};
use super::transform;
use super::{api_error, volume_name, KubeProtection};

/// A volume of the group: its name and where the primary reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvcVolume {
    pub name: String,
    /// Host-path mode: where the primary reads it.
    pub path: PathBuf,
    /// The PVC at the primary.
    pub namespace: String,
    pub pvc: String,
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
    let (served, unavailable) = if needs_discovery {
        discover(client, kp).await?
    } else {
        (Vec::new(), Vec::new())
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
                let down = if unavailable.is_empty() {
                    String::new()
                } else {
                    format!("; these API groups did not answer discovery: {}", unavailable.join(", "))
                };
                anyhow!("{field}: unknown kind {name:?}: the API server serves no resource of that name{hint}{down}")
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

/// How long one API group's discovery may take. The client retries a 503 (what an
/// aggregated API whose service is down answers) for minutes; a cycle must not wait that
/// long for a group it may not need.
const GROUP_DISCOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The resources the server serves, group by group, and the groups that did not answer. An
/// aggregated API that is down (metrics.k8s.io without its metrics-server, say) only
/// matters when a name the config gives is in it: a group named by `plural.group` in the
/// config that fails is an error naming it; any other failing group is skipped (and
/// named if a kind is then not found).
async fn discover(client: &kube::Client, kp: &KubeProtection) -> Result<(Vec<Kind>, Vec<String>)> {
    let named: Vec<&str> = kp
        .include_kinds
        .iter()
        .chain(&kp.exclude_kinds)
        .chain(&kp.custom_resources)
        .filter_map(|n| n.split_once('.').map(|(_, g)| g))
        .collect();
    let mut versions: Vec<(String, String)> = client
        .list_core_api_versions()
        .await
        .map_err(|e| api_error(e, "API discovery (/api)"))?
        .versions
        .into_iter()
        .map(|v| (String::new(), v))
        .collect();
    let groups = client
        .list_api_groups()
        .await
        .map_err(|e| api_error(e, "API discovery (/apis)"))?;
    for g in groups.groups {
        let v = g
            .preferred_version
            .or_else(|| g.versions.into_iter().next())
            .map(|v| v.version);
        if let Some(v) = v {
            versions.push((g.name, v));
        }
    }
    let (mut served, mut unavailable) = (Vec::new(), Vec::new());
    for (group, version) in versions {
        let gv = format!("{group}/{version}");
        let listed = tokio::time::timeout(GROUP_DISCOVERY_TIMEOUT, async {
            if group.is_empty() {
                client.list_core_api_resources(&version).await
            } else {
                client.list_api_group_resources(&gv).await
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer in {GROUP_DISCOVERY_TIMEOUT:?}").into(),
            ))
        });
        let list = match listed {
            Ok(l) => l,
            Err(e) if named.contains(&group.as_str()) => {
                return Err(api_error(
                    e,
                    format!("API discovery of {group}/{version}, which the config names"),
                ));
            }
            Err(e) => {
                tracing::warn!(group = %group, version = %version, error = %e, "API group skipped: it did not answer discovery");
                unavailable.push(format!("{group}/{version}"));
                continue;
            }
        };
        for r in list.resources.into_iter().filter(|r| !r.name.contains('/')) {
            served.push(Kind {
                group: group.clone(),
                version: version.clone(),
                kind: r.kind,
                plural: r.name,
                namespaced: r.namespaced,
            });
        }
    }
    Ok((served, unavailable))
}

/// At most two edits apart, ignoring case: enough to suggest "Deployment" for "Deploymnet".
fn strsim_close(a: &str, b: &str) -> bool {
    strsim::levenshtein(&a.to_ascii_lowercase(), &b.to_ascii_lowercase()) <= 2
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
        volumes.push(PvcVolume {
            name: vname,
            path,
            namespace: ns.to_string(),
            pvc: n.to_string(),
        });
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

    #[test]
    fn near_misses_of_kind_names_are_suggested() {
        assert!(strsim_close("Deployment", "Deploymnet"));
        assert!(strsim_close("Secret", "secret"));
        assert!(!strsim_close("Secret", "ConfigMap"));
    }
}
