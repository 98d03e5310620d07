//! A drill of a CSI recovery point, the pure part: the gen's bundle moved into the drill
//! namespaces (each DR namespace's `drill_namespace`), in the active form (workloads at
//! their counts), every PVC restored from the point's snapshots through restore objects of
//! its own, and every object labelled with the drill. What would let the copy reach the
//! outside or act for the application is left out or made inert: no Namespace objects (the
//! drill namespaces come with the DR site's RBAC, which binds lifeboat's role there), no
//! cluster-scoped objects, no Ingress or Gateway routes, Services only inside the cluster,
//! Jobs and CronJobs suspended.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::bundle::{dr_objects, Backing, Bundle, Form};
use super::restore::{restores, PointSnapshot, Restore};
use super::transform::map_namespace;
use crate::ids::{Gen, VolumeName};

/// Labels every object of a drill with its protection.
pub const DRILL_OF_LABEL: &str = "lifeboat.dev/drill-of";
/// Labels every object of a drill with its id.
pub const DRILL_LABEL: &str = "lifeboat.dev/drill";
/// On a drill namespace: a kept drill's id (the start-up sweep leaves it).
pub const KEPT_ANNOTATION: &str = "lifeboat.dev/drill-kept";

/// What a drill applies.
#[derive(Debug, Clone)]
pub struct DrillPlan {
    /// DR namespace -> its drill namespace.
    pub namespaces: BTreeMap<String, String>,
    /// The bundle as the drill sees it (its namespaces and volumes moved): the scope of
    /// apply and of the teardown.
    pub bundle: Bundle,
    pub objects: Vec<Value>,
    pub restores: Vec<Restore>,
    /// What was left out or changed, and references the move could not rewrite.
    pub notes: Vec<String>,
}

/// Kinds a drill never creates: they route traffic from outside to the copy.
fn reaches_outside(v: &Value) -> bool {
    let api = v["apiVersion"].as_str().unwrap_or("");
    let kind = v["kind"].as_str().unwrap_or("");
    api.starts_with("gateway.networking.k8s.io/")
        || (api.starts_with("networking.k8s.io/") && kind == "Ingress")
}

/// A Service reachable from inside the cluster only, with no address of the original's.
fn inward(v: &mut Value) -> Option<String> {
    let spec = v["spec"].as_object_mut()?;
    let was = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    let note = matches!(was, "NodePort" | "LoadBalancer").then(|| was.to_string());
    if note.is_some() {
        spec.insert("type".into(), json!("ClusterIP"));
    }
    for k in [
        "clusterIP",
        "clusterIPs",
        "externalIPs",
        "loadBalancerIP",
        "loadBalancerSourceRanges",
        "externalTrafficPolicy",
        "healthCheckNodePort",
    ] {
        spec.remove(k);
    }
    for p in spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(p) = p.as_object_mut() {
            p.remove("nodePort");
        }
    }
    note
}

/// The drill `id` of recovery point `gen` (its `snapshots`) from `bundle` (that gen's
/// manifests), with `drill_ns` naming each DR namespace's drill namespace.
pub fn plan(
    protection: &str,
    id: &str,
    bundle: &Bundle,
    gen: Gen,
    snapshots: &BTreeMap<VolumeName, PointSnapshot>,
    drill_ns: &dyn Fn(&str) -> String,
) -> DrillPlan {
    let namespaces: BTreeMap<String, String> = bundle
        .namespaces
        .iter()
        .map(|ns| (ns.clone(), drill_ns(ns)))
        .collect();
    let mut notes = Vec::new();
    let mut moved = bundle.clone();
    moved.namespaces = namespaces.values().cloned().collect();
    moved.objects = Vec::new();
    for o in &bundle.objects {
        let what = super::bundle::describe(o);
        let Some(ns) = o["metadata"]["namespace"].as_str() else {
            if o["kind"] != "Namespace" {
                notes.push(format!("{what}: cluster-scoped, not created by a drill"));
            }
            continue;
        };
        if !namespaces.contains_key(ns) {
            continue;
        }
        if reaches_outside(o) {
            notes.push(format!(
                "{what}: routes traffic from outside, not created by a drill"
            ));
            continue;
        }
        let mut v = o.clone();
        notes.extend(map_namespace(&mut v, &namespaces));
        if v["kind"] == "Service" && v["apiVersion"] == "v1" {
            if let Some(was) = inward(&mut v) {
                notes.push(format!(
                    "{what}: a {was} Service in the primary's bundle; ClusterIP in the drill"
                ));
            }
        }
        moved.objects.push(v);
    }
    for r in moved.volumes.values_mut() {
        if let Some(d) = namespaces.get(&r.namespace) {
            r.namespace = d.clone();
        }
    }
    let mut restores = restores(protection, gen, &moved.volumes, snapshots);
    for r in &mut restores {
        for o in [&mut r.content, &mut r.snapshot] {
            o["metadata"]["labels"][DRILL_OF_LABEL] = json!(protection);
            o["metadata"]["labels"][DRILL_LABEL] = json!(id);
        }
    }
    let from: BTreeMap<(String, String), (String, u64)> = restores
        .iter()
        .map(|r| {
            let size = moved
                .volumes
                .iter()
                .find(|(_, v)| v.namespace == r.namespace && v.name == r.pvc)
                .and_then(|(vol, _)| snapshots.get(vol.as_str()))
                .map_or(0, |s| s.size);
            ((r.namespace.clone(), r.pvc.clone()), (r.name.clone(), size))
        })
        .collect();
    let mut objects = dr_objects(
        &moved,
        protection,
        Form::Active,
        &[],
        Backing::Snapshots(&from),
    );
    for v in &mut objects {
        v["metadata"]["labels"][DRILL_OF_LABEL] = json!(protection);
        v["metadata"]["labels"][DRILL_LABEL] = json!(id);
        // Nothing the application schedules runs in a drill (backups, reports, mail).
        if (v["kind"] == "CronJob" || v["kind"] == "Job") && v["apiVersion"] == "batch/v1" {
            v["spec"]["suspend"] = json!(true);
        }
    }
    DrillPlan {
        namespaces,
        bundle: moved,
        objects,
        restores,
        notes,
    }
}

/// A drill id (GEN-MILLISECONDS) as a label value: it is one already.
pub fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 63 && id.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::bundle::PvcRef;

    fn snapshots() -> BTreeMap<VolumeName, PointSnapshot> {
        let mut snapshots = BTreeMap::new();
        snapshots.insert(
            VolumeName::new("prod.data").unwrap(),
            PointSnapshot {
                namespace: "lifeboat".into(),
                name: "p".into(),
                content: Some("c".into()),
                handle: "snap-1".into(),
                driver: "d".into(),
                size: 1 << 20,
            },
        );
        snapshots
    }

    fn bundle() -> Bundle {
        let mut volumes = BTreeMap::new();
        volumes.insert(
            "prod.data".to_string(),
            PvcRef {
                namespace: "prod".into(),
                name: "data".into(),
            },
        );
        Bundle {
            namespaces: vec!["prod".into()],
            objects: vec![
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}),
                json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": "prod"},
                    "spec": {"resources": {"requests": {"storage": "1Mi"}}}}),
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "db", "namespace": "prod"},
                    "spec": {"replicas": 2}}),
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "prod"},
                    "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.9", "ports": [{"port": 5432, "nodePort": 31000}]}}),
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web", "namespace": "prod"}}),
                json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "backup", "namespace": "prod"}, "spec": {}}),
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "x"}}),
            ],
            volumes,
            ..Default::default()
        }
    }

    #[test]
    fn a_drill_moves_the_bundle_into_its_namespace_restores_pvcs_and_keeps_it_inside() {
        let p = plan("shop", "4-99", &bundle(), Gen(4), &snapshots(), &|ns| {
            format!("{ns}-drill")
        });
        assert_eq!(p.namespaces["prod"], "prod-drill");
        assert_eq!(p.bundle.namespaces, vec!["prod-drill".to_string()]);
        assert!(p
            .objects
            .iter()
            .all(|o| o["metadata"]["namespace"] == "prod-drill"
                && o["metadata"]["labels"][DRILL_LABEL] == "4-99"
                && o["metadata"]["labels"][DRILL_OF_LABEL] == "shop"));
        let kinds: Vec<&str> = p
            .objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert!(
            !kinds.contains(&"Ingress")
                && !kinds.contains(&"Namespace")
                && !kinds.contains(&"ClusterRole"),
            "{kinds:?}"
        );
        let deploy = p
            .objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .unwrap();
        assert_eq!(deploy["spec"]["replicas"], 2, "active form");
        let svc = p.objects.iter().find(|o| o["kind"] == "Service").unwrap();
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert!(
            svc["spec"]["clusterIP"].is_null() && svc["spec"]["ports"][0]["nodePort"].is_null()
        );
        let cron = p.objects.iter().find(|o| o["kind"] == "CronJob").unwrap();
        assert_eq!(cron["spec"]["suspend"], true);
        assert_eq!(p.restores.len(), 1);
        let r = &p.restores[0];
        assert_eq!(r.namespace, "prod-drill");
        assert_eq!(r.content["spec"]["source"]["snapshotHandle"], "snap-1");
        assert_eq!(r.snapshot["metadata"]["labels"][DRILL_LABEL], "4-99");
        let pvc = p
            .objects
            .iter()
            .find(|o| o["kind"] == "PersistentVolumeClaim")
            .unwrap();
        assert_eq!(pvc["spec"]["dataSource"]["name"], r.name.as_str());
        for what in ["Ingress prod/web", "ClusterRole x", "LoadBalancer"] {
            assert!(
                p.notes.iter().any(|n| n.contains(what)),
                "{what}: {:?}",
                p.notes
            );
        }
    }
}
