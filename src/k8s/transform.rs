//! Transforms from the primary's objects to the DR site's: namespace mapping (with the
//! references a mapping breaks), storage-class mapping, and JSON-patch rules in the format
//! of Velero's resource modifiers. Pure functions of the object.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::labels::Selector;

/// Moves an object to its mapped namespace and rewrites the references that move breaks:
/// RoleBinding subjects in a mapped namespace. References that cannot be rewritten safely
/// (Service DNS names inside env values) are returned as warnings.
pub fn map_namespace(v: &mut Value, map: &BTreeMap<String, String>) -> Vec<String> {
    let mut warnings = Vec::new();
    if map.is_empty() {
        return warnings;
    }
    let kind = v["kind"].as_str().unwrap_or("").to_string();
    let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
    if kind == "Namespace" {
        if let Some(to) = map.get(&name) {
            v["metadata"]["name"] = Value::String(to.clone());
        }
    }
    if let Some(to) = v["metadata"]["namespace"]
        .as_str()
        .and_then(|ns| map.get(ns))
    {
        v["metadata"]["namespace"] = Value::String(to.clone());
    }
    if kind == "RoleBinding" {
        if let Some(subjects) = v.get_mut("subjects").and_then(Value::as_array_mut) {
            for s in subjects {
                if let Some(to) = s["namespace"].as_str().and_then(|ns| map.get(ns)) {
                    s["namespace"] = Value::String(to.clone());
                }
            }
        }
    }
    let at = format!(
        "{kind} {}/{name}",
        v["metadata"]["namespace"].as_str().unwrap_or("")
    );
    for spec in pod_specs(v) {
        for c in containers(spec) {
            for e in c["env"].as_array().into_iter().flatten() {
                let Some(value) = e["value"].as_str() else {
                    continue;
                };
                for from in map.keys() {
                    if mentions_namespace(value, from) {
                        warnings.push(format!(
                            "{at}: env {} = {value:?} names namespace {from:?}, which maps to {:?}; not rewritten",
                            e["name"].as_str().unwrap_or("?"),
                            map[from]
                        ));
                    }
                }
            }
        }
    }
    warnings
}

/// `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`: Service DNS names in namespace `ns`.
fn mentions_namespace(value: &str, ns: &str) -> bool {
    value
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .any(|host| {
            let labels: Vec<&str> = host.split('.').collect();
            labels.len() >= 2 && labels[1..].first() == Some(&ns) && !labels[0].is_empty()
        })
}

/// The pod specs inside an object (a Pod's own, a workload's template, a CronJob's).
pub fn pod_specs(v: &Value) -> Vec<&Value> {
    let candidates = [
        v.pointer("/spec/template/spec"),
        v.pointer("/spec/jobTemplate/spec/template/spec"),
        if v["kind"] == "Pod" {
            v.get("spec")
        } else {
            None
        },
    ];
    candidates.into_iter().flatten().collect()
}

pub fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|k| spec[k].as_array())
        .flatten()
}

/// Rewrites storage class names of PVCs and StatefulSet claim templates.
pub fn map_storage_class(v: &mut Value, map: &BTreeMap<String, String>) {
    if map.is_empty() {
        return;
    }
    let remap = |spec: &mut Value| {
        if let Some(to) = spec["storageClassName"].as_str().and_then(|c| map.get(c)) {
            spec["storageClassName"] = Value::String(to.clone());
        }
    };
    match v["kind"].as_str() {
        Some("PersistentVolumeClaim") => {
            if let Some(spec) = v.get_mut("spec") {
                remap(spec);
            }
        }
        Some("StatefulSet") => {
            if let Some(tpls) = v
                .pointer_mut("/spec/volumeClaimTemplates")
                .and_then(Value::as_array_mut)
            {
                for t in tpls {
                    if let Some(spec) = t.get_mut("spec") {
                        remap(spec);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Velero's resource modifiers file (`version: v1`, `resourceModifierRules`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modifiers {
    pub version: String,
    #[serde(rename = "resourceModifierRules")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub conditions: Conditions,
    #[serde(default)]
    pub patches: Vec<JsonPatch>,
    #[serde(default, rename = "mergePatches")]
    pub merge_patches: Vec<MergePatch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    #[serde(rename = "groupResource")]
    pub group_resource: String,
    #[serde(default, rename = "resourceNameRegex")]
    pub resource_name_regex: Option<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default, rename = "labelSelector")]
    pub label_selector: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPatch {
    pub operation: String,
    pub path: String,
    #[serde(default)]
    pub from: Option<String>,
    /// Velero writes values as strings; JSON in them (numbers, objects) is taken as JSON.
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergePatch {
    #[serde(rename = "patchData")]
    pub patch_data: String,
}

impl Modifiers {
    pub fn load(path: &Path) -> Result<Modifiers> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read resource modifiers {}", path.display()))?;
        Modifiers::parse(&text).with_context(|| format!("resource modifiers {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Modifiers> {
        let m: Modifiers = serde_saphyr::from_str(text)
            .context("not Velero's resource modifier format (version, resourceModifierRules)")?;
        if m.version != "v1" {
            bail!("version {:?}; expected \"v1\"", m.version);
        }
        for (i, r) in m.rules.iter().enumerate() {
            if let Some(re) = &r.conditions.resource_name_regex {
                regex::Regex::new(re).with_context(|| {
                    format!("resourceModifierRules[{i}].conditions.resourceNameRegex")
                })?;
            }
            for (j, p) in r.patches.iter().enumerate() {
                if !matches!(
                    p.operation.as_str(),
                    "add" | "remove" | "replace" | "move" | "copy" | "test"
                ) {
                    bail!(
                        "resourceModifierRules[{i}].patches[{j}].operation {:?}; expected add, remove, replace, move, copy or test",
                        p.operation
                    );
                }
            }
            for (j, p) in r.merge_patches.iter().enumerate() {
                serde_saphyr::from_str::<Value>(&p.patch_data).with_context(|| {
                    format!("resourceModifierRules[{i}].mergePatches[{j}].patchData")
                })?;
            }
        }
        Ok(m)
    }

    /// Applies every rule whose conditions match. `group_resource` is the object's
    /// `plural.group`. A patch that does not apply (a `test` that fails, a missing path) is
    /// an error naming the rule and the object: a silently skipped rule would leave the DR
    /// site with manifests the operator did not ask for.
    pub fn apply(&self, v: &mut Value, group_resource: &str) -> Result<()> {
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.conditions.matches(v, group_resource)? {
                continue;
            }
            let ops: Vec<Value> = rule
                .patches
                .iter()
                .map(|p| {
                    let mut op = serde_json::json!({"op": p.operation, "path": p.path});
                    if let Some(from) = &p.from {
                        op["from"] = Value::String(from.clone());
                    }
                    if let Some(value) = &p.value {
                        op["value"] = match serde_json::from_str::<Value>(value) {
                            Ok(j) if !j.is_string() => j,
                            _ => Value::String(value.clone()),
                        };
                    }
                    op
                })
                .collect();
            let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                .with_context(|| format!("resourceModifierRules[{i}].patches"))?;
            json_patch::patch(v, &patch).with_context(|| {
                format!(
                    "resourceModifierRules[{i}] on {} {}: patch does not apply",
                    group_resource,
                    v["metadata"]["name"].as_str().unwrap_or("?")
                )
            })?;
            for p in &rule.merge_patches {
                let data: Value = serde_saphyr::from_str(&p.patch_data)
                    .with_context(|| format!("resourceModifierRules[{i}].mergePatches"))?;
                json_patch::merge(v, &data);
            }
        }
        Ok(())
    }
}

impl Conditions {
    fn matches(&self, v: &Value, group_resource: &str) -> Result<bool> {
        if self.group_resource != "*" && !self.group_resource.eq_ignore_ascii_case(group_resource) {
            return Ok(false);
        }
        let name = v["metadata"]["name"].as_str().unwrap_or("");
        if let Some(re) = &self.resource_name_regex {
            if !regex::Regex::new(re)?.is_match(name) {
                return Ok(false);
            }
        }
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("");
        if !self.namespaces.is_empty() && !self.namespaces.iter().any(|n| n == ns) {
            return Ok(false);
        }
        if let Some(sel) = &self.label_selector {
            let sel = Selector::from_object(sel).map_err(anyhow::Error::msg)?;
            if !sel.matches_json(v.pointer("/metadata/labels")) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn namespace_mapping_moves_objects_and_rewrites_rolebinding_subjects() {
        let map: BTreeMap<String, String> = [("prod".to_string(), "prod-dr".to_string())].into();
        let mut rb = json!({"kind": "RoleBinding", "metadata": {"name": "rb", "namespace": "prod"},
            "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": "prod"},
                         {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"}]});
        assert!(map_namespace(&mut rb, &map).is_empty());
        assert_eq!(rb["metadata"]["namespace"], "prod-dr");
        assert_eq!(rb["subjects"][0]["namespace"], "prod-dr");
        assert_eq!(rb["subjects"][1]["namespace"], "tools");

        let mut dep = json!({"kind": "Deployment", "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "env": [
                {"name": "DB", "value": "mysql.prod.svc.cluster.local:3306"},
                {"name": "OTHER", "value": "production"}]}]}}}});
        let w = map_namespace(&mut dep, &map);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("env DB") && w[0].contains("prod-dr"), "{w:?}");
    }

    #[test]
    fn storage_classes_map_in_pvcs_and_claim_templates() {
        let map: BTreeMap<String, String> = [("fast".to_string(), "dr-ssd".to_string())].into();
        let mut sts = json!({"kind": "StatefulSet", "spec": {"volumeClaimTemplates": [
            {"metadata": {"name": "data"}, "spec": {"storageClassName": "fast"}}]}});
        map_storage_class(&mut sts, &map);
        assert_eq!(
            sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
            "dr-ssd"
        );
        let mut pvc =
            json!({"kind": "PersistentVolumeClaim", "spec": {"storageClassName": "slow"}});
        map_storage_class(&mut pvc, &map);
        assert_eq!(pvc["spec"]["storageClassName"], "slow");
    }

    #[test]
    fn velero_resource_modifiers_patch_only_matching_objects() {
        let m = Modifiers::parse(
            r#"
version: v1
resourceModifierRules:
- conditions:
    groupResource: deployments.apps
    resourceNameRegex: "^mysql.*$"
    namespaces: [prod]
    labelSelector:
      matchLabels:
        app: mysql
  patches:
  - operation: replace
    path: "/spec/template/spec/containers/0/image"
    value: "registry.dr.example/mysql:8.4"
  - operation: add
    path: "/spec/minReadySeconds"
    value: "10"
  mergePatches:
  - patchData: |
      metadata:
        annotations:
          dr: "yes"
"#,
        )
        .unwrap();
        let dep = |name: &str, app: &str| {
            json!({"kind": "Deployment", "metadata": {"name": name, "namespace": "prod", "labels": {"app": app}},
                "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "mysql:8.4"}]}}}})
        };
        let mut hit = dep("mysql-a", "mysql");
        m.apply(&mut hit, "deployments.apps").unwrap();
        assert_eq!(
            hit["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.dr.example/mysql:8.4"
        );
        assert_eq!(hit["spec"]["minReadySeconds"], 10);
        assert_eq!(hit["metadata"]["annotations"]["dr"], "yes");
        for (mut miss, gr) in [
            (dep("web", "mysql"), "deployments.apps"),
            (dep("mysql-b", "web"), "deployments.apps"),
            (dep("mysql-c", "mysql"), "statefulsets.apps"),
        ] {
            let before = miss.clone();
            m.apply(&mut miss, gr).unwrap();
            assert_eq!(miss, before);
        }
    }

    #[test]
    fn bad_modifier_files_are_refused_with_the_reason() {
        let e = Modifiers::parse("version: v2\nresourceModifierRules: []\n").unwrap_err();
        assert!(format!("{e:#}").contains("v2"), "{e:#}");
        let e = Modifiers::parse(
            "version: v1\nresourceModifierRules:\n- conditions: {groupResource: pods}\n  patches:\n  - {operation: frobnicate, path: /x}\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("frobnicate"), "{e:#}");
        let mut v = json!({"kind": "Pod", "metadata": {"name": "p"}});
        let m = Modifiers::parse(
            "version: v1\nresourceModifierRules:\n- conditions: {groupResource: pods}\n  patches:\n  - {operation: remove, path: /spec/missing}\n",
        )
        .unwrap();
        let e = m.apply(&mut v, "pods").unwrap_err();
        assert!(
            format!("{e:#}").contains("resourceModifierRules[0]"),
            "{e:#}"
        );
    }
}
