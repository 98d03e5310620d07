//! Every manifest in `deploy/kubernetes/` parses into the Kubernetes types it claims to
//! be (unknown fields are errors), and the pieces agree with each other: the Deployment's
//! probes and ports are the daemon's, its ConfigMap holds a config lifeboat accepts, the
//! Services select the Deployment's pods, the control API's token files are mounted and
//! the NetworkPolicy admits only the daemon's two ports.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

/// Deserialises into the Kubernetes type and fails on any field the type does not have
/// (a field the type dropped is missing when serialised again).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, file: &str) -> T {
    let v: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    assert_subset(doc, &serde_json::to_value(&v).unwrap(), file, "");
    v
}

fn assert_subset(doc: &Value, back: &Value, file: &str, at: &str) {
    match (doc, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                // stringData is write-only in the API types (it becomes data).
                if k == "stringData" {
                    continue;
                }
                let Some(bv) = b.get(k) else {
                    panic!("{file}: {at}/{k} is not a field of the Kubernetes type");
                };
                assert_subset(v, bv, file, &format!("{at}/{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, file, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

#[test]
fn every_deploy_manifest_parses_into_its_kubernetes_type() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut deployment = None;
    let mut services = Vec::new();
    let mut config = None;
    let mut policy = None;
    let mut files: Vec<_> = ["base", "primary", "dr"]
        .iter()
        .flat_map(|sub| std::fs::read_dir(dir.join(sub)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no kind"))
                .to_string();
            match kind.as_str() {
                "Namespace" => drop(typed::<Namespace>(&doc, &file)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &file)),
                "ClusterRole" => drop(typed::<ClusterRole>(&doc, &file)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &file)),
                "RoleBinding" => drop(typed::<RoleBinding>(&doc, &file)),
                "ConfigMap" => config = Some(typed::<ConfigMap>(&doc, &file)),
                "Secret" => drop(typed::<Secret>(&doc, &file)),
                "Deployment" => deployment = Some(typed::<Deployment>(&doc, &file)),
                "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(&doc, &file)),
                "Service" => services.push(typed::<Service>(&doc, &file)),
                "NetworkPolicy" => policy = Some(typed::<NetworkPolicy>(&doc, &file)),
                other => panic!("{file}: unexpected kind {other}"),
            }
            *kinds.entry(kind).or_default() += 1;
        }
    }
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains_key(k), "deploy/ has no {k}: {kinds:?}");
    }

    let d = deployment.unwrap();
    let spec = d.spec;
    let pod = spec.template.spec.unwrap();
    let c = &pod.containers[0];
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(pod.service_account_name.as_deref(), Some("lifeboat"));
    let ports: Vec<(i32, String)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.container_port, p.protocol.clone().unwrap_or_default()))
        .collect();
    assert!(
        ports.contains(&(7420, "UDP".into())) && ports.contains(&(7421, "TCP".into())),
        "{ports:?}"
    );
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
    for s in &services {
        let sel = s.spec.as_ref().unwrap().selector.clone().unwrap();
        assert!(
            sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "a Service selects no daemon pod"
        );
    }

    // The ConfigMap's config is one lifeboat accepts, with the probes' control port.
    let cm = config.unwrap();
    let toml = &cm.data.unwrap()["lifeboat.toml"];
    let cfg = lifeboat::config::parse(toml, Path::new("/etc/lifeboat/lifeboat.toml"))
        .unwrap_or_else(|e| panic!("deploy ConfigMap: {e}"));
    assert_eq!(cfg.control.port(), 7421);
    assert!(cfg.protections[0].kubernetes.is_some());
    // Off loopback, so every caller has a token, mounted where the config says.
    assert!(!cfg.control.ip().is_loopback() && !cfg.control_clients.is_empty());
    let mounts: Vec<String> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    for client in &cfg.control_clients {
        let dir = client
            .token_file
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(mounts.contains(&dir), "{} is not mounted: {mounts:?}", dir);
    }

    // The NetworkPolicy selects the daemon and admits exactly its two ports.
    let np = policy.unwrap().spec.unwrap();
    let sel = np.pod_selector.unwrap().match_labels.unwrap();
    assert!(sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let mut admitted: Vec<(String, String)> = np
        .ingress
        .iter()
        .flatten()
        .flat_map(|r| r.ports.iter().flatten())
        .map(|p| {
            let port = match p.port.as_ref().unwrap() {
                IntOrString::Int(n) => n.to_string(),
                IntOrString::String(s) => s.clone(),
            };
            (port, p.protocol.clone().unwrap_or_default())
        })
        .collect();
    admitted.sort();
    assert_eq!(
        admitted,
        [("7420".into(), "UDP".into()), ("7421".into(), "TCP".into())]
    );
}

#[test]
fn the_alert_rules_are_a_prometheus_rule_file_on_lifeboat_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/alerts.yaml");
    let v: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rules = v["groups"][0]["rules"].as_array().unwrap();
    assert!(!rules.is_empty());
    for r in rules {
        assert!(r["expr"].as_str().unwrap().contains("lifeboat_"), "{r}");
    }
}
