//! The object rules of a real kube-apiserver that lifeboat's DR apply meets, for the test
//! API server ([`super::kubeapi`]) to enforce on every create, update, patch and apply:
//! names and labels validated, immutable fields kept, and the server-side apply list-map
//! rule that a container's `env` (by name) and `ports` (by containerPort and protocol)
//! have no duplicate keys. Messages follow the real server's (`Kind.group "name" is
//! invalid: field: ...`, 422 Invalid), so lifeboat's handling of them is tested as it will
//! meet them.
//!
//! Not modelled: defaulting (fields a real server fills in), any validation of field
//! values beyond names and labels, status subresource rules, the Job template fields
//! mutable while suspended, Service clusterIP rules, volume expansion through a
//! StorageClass (a claim on a pre-bound PV is never resizable, as with a real static PV).

use serde_json::Value;

/// A refusal: HTTP code, reason and message.
pub type Refusal = (u16, &'static str, String);

fn invalid(kind: &str, group: &str, name: &str, detail: String) -> Refusal {
    let what = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    (
        422,
        "Invalid",
        format!("{what} \"{name}\" is invalid: {detail}"),
    )
}

const SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_1123: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_1035: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_label_1123(s: &str) -> bool {
    s.len() <= 63 && matches_label_1123(s)
}

/// The label regex alone: a subdomain's parts have no length limit of their own
/// (apimachinery's IsDNS1123Subdomain checks only the whole name's 253).
fn matches_label_1123(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(matches_label_1123)
}

/// A label key's name part or a label value (the value may also be empty).
fn is_label_part(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Which rule a kind's `metadata.name` follows.
fn name_problem(group: &str, kind: &str, name: &str) -> Option<String> {
    let bad = |rule: &str| Some(format!("metadata.name: Invalid value: \"{name}\": {rule}"));
    match (group, kind) {
        ("", "Namespace") if !is_label_1123(name) => bad(LABEL_1123),
        ("", "Service") => {
            let ok = is_label_1123(name) && name.starts_with(|c: char| c.is_ascii_lowercase());
            if ok {
                None
            } else {
                bad(LABEL_1035)
            }
        }
        // RBAC names are path segments: anything but '/', '%' and the dot names.
        ("rbac.authorization.k8s.io", _) => {
            (name.is_empty() || name.contains(['/', '%']) || name == "." || name == "..").then(
                || format!("metadata.name: Invalid value: \"{name}\": may not contain '/' or '%'"),
            )
        }
        ("", "Namespace") => None,
        _ if !is_subdomain(name) => bad(SUBDOMAIN),
        _ => None,
    }
}

fn label_problems(v: &Value) -> Option<String> {
    let labels = v["metadata"]["labels"].as_object()?;
    for (k, val) in labels {
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        if !is_label_part(name) || prefix.is_some_and(|p| !is_subdomain(p)) {
            return Some(format!("metadata.labels: Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
        let val = val.as_str().unwrap_or("");
        if !val.is_empty() && !is_label_part(val) {
            return Some(format!("metadata.labels: Invalid value: \"{val}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
    }
    None
}

/// The pod template's containers, wherever the kind keeps them.
fn containers(v: &Value) -> Vec<(&str, &Value)> {
    let spec = match v["kind"].as_str() {
        Some("Pod") => &v["spec"],
        Some("CronJob") => &v["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &v["spec"]["template"]["spec"],
    };
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            out.push((c["name"].as_str().unwrap_or(""), c));
        }
    }
    out
}

/// Server-side apply refuses a body whose list-maps have one key twice.
pub fn apply_body(v: &Value) -> Result<(), Refusal> {
    for (cname, c) in containers(v) {
        let mut env = std::collections::HashSet::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let n = e["name"].as_str().unwrap_or("");
            if !env.insert(n) {
                return Err((500, "InternalError", format!("Internal error occurred: failed to create typed patch object: .spec.template.spec.containers[name=\"{cname}\"].env: duplicate entries for key [name=\"{n}\"]")));
            }
        }
        let mut ports = std::collections::HashSet::new();
        for p in c["ports"].as_array().into_iter().flatten() {
            let key = (
                p["containerPort"].as_i64().unwrap_or(0),
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
            );
            if !ports.insert(key.clone()) {
                return Err((500, "InternalError", format!("Internal error occurred: failed to create typed patch object: .spec.template.spec.containers[name=\"{cname}\"].ports: duplicate entries for key [containerPort={},protocol=\"{}\"]", key.0, key.1)));
            }
        }
    }
    Ok(())
}

/// Whether `new` may be stored, replacing `old` (None: a create).
pub fn admit(group: &str, kind: &str, old: Option<&Value>, new: &Value) -> Result<(), Refusal> {
    let name = new["metadata"]["name"].as_str().unwrap_or("");
    let refuse = |detail: String| Err(invalid(kind, group, name, detail));
    if let Some(p) = name_problem(group, kind, name) {
        return refuse(p);
    }
    if let Some(p) = label_problems(new) {
        return refuse(p);
    }
    let Some(old) = old else { return Ok(()) };
    let changed = |ptr: &str| old.pointer(ptr) != new.pointer(ptr);
    match (group, kind) {
        ("apps", "StatefulSet") => {
            const MUTABLE: [&str; 6] = [
                "replicas",
                "ordinals",
                "template",
                "updateStrategy",
                "persistentVolumeClaimRetentionPolicy",
                "minReadySeconds",
            ];
            let rest = |v: &Value| {
                let mut s = v["spec"].as_object().cloned().unwrap_or_default();
                s.retain(|k, _| !MUTABLE.contains(&k.as_str()));
                s
            };
            if rest(old) != rest(new) {
                return refuse("spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into());
            }
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet") if changed("/spec/selector") => {
            return refuse(format!(
                "spec.selector: Invalid value: {}: field is immutable",
                new["spec"]["selector"]
            ));
        }
        ("batch", "Job") => {
            for (ptr, field) in [
                ("/spec/selector", "spec.selector"),
                ("/spec/template", "spec.template"),
            ] {
                if changed(ptr) {
                    return refuse(format!(
                        "{field}: Invalid value: {}: field is immutable",
                        new.pointer(ptr).cloned().unwrap_or(Value::Null)
                    ));
                }
            }
        }
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding")
            if changed("/roleRef") =>
        {
            return refuse(format!(
                "roleRef: Invalid value: {}: cannot change roleRef",
                new["roleRef"]
            ));
        }
        ("", "ConfigMap" | "Secret") => {
            if kind == "Secret" && changed("/type") && old.get("type").is_some() {
                return refuse(format!(
                    "type: Invalid value: {}: field is immutable",
                    new["type"]
                ));
            }
            if old["immutable"] == true {
                if new["immutable"] != true {
                    return refuse(
                        "immutable: Forbidden: field is immutable when `immutable` is set".into(),
                    );
                }
                for field in ["data", "binaryData", "stringData"] {
                    if old.get(field) != new.get(field) {
                        return refuse(format!(
                            "{field}: Forbidden: field is immutable when `immutable` is set"
                        ));
                    }
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            let rest = |v: &Value| {
                let mut s = v["spec"].clone();
                if let Some(o) = s.as_object_mut() {
                    o.remove("resources");
                    o.remove("volumeAttributesClassName");
                }
                s
            };
            if rest(old) != rest(new) {
                return refuse("spec: Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into());
            }
            if changed("/spec/resources/requests/storage") {
                return refuse("spec: Forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize".into());
            }
        }
        ("", "PersistentVolume") => {
            for source in ["hostPath", "csi", "local", "nfs"] {
                if changed(&format!("/spec/{source}")) {
                    return refuse("spec.persistentvolumesource: Forbidden: spec.persistentvolumesource is immutable after creation".into());
                }
            }
        }
        _ => {}
    }
    Ok(())
}
