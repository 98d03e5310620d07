//! Failover from a recovery point (DR site, CSI replicas), the pure part: for each PVC of
//! the gen's bundle, a pre-provisioned VolumeSnapshotContent naming the point's driver
//! snapshot (Retain: the point keeps its snapshot) bound to a VolumeSnapshot in the PVC's
//! namespace, and the PVC, with its original name, restored from it (`dataSource`). A
//! PVC's data source must be in its own namespace, and the point's snapshots live in the
//! movers' namespace: the content shows the same driver snapshot there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::bundle::PvcRef;
use super::mover_job::ALLOW_MODE_CHANGE;
use super::snapshot::MANAGED_BY;
use crate::ids::{Gen, VolumeName};

/// One volume's snapshot in a recovery point (Kubernetes mode, CSI replicas): the
/// replica's VolumeSnapshot in the movers' namespace and the driver snapshot behind it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PointSnapshot {
    pub namespace: String,
    pub name: String,
    pub content: Option<String>,
    pub handle: String,
    pub driver: String,
    pub size: u64,
}

/// Labels the restore objects of a failover with their protection.
pub const RESTORE_LABEL: &str = "lifeboat.dev/restore-of";

/// One PVC's restore objects.
#[derive(Debug, Clone)]
pub struct Restore {
    pub namespace: String,
    pub pvc: String,
    pub content: Value,
    pub snapshot: Value,
    /// The VolumeSnapshot's (and the content's) name.
    pub name: String,
}

fn name_for(protection: &str, gen: Gen, ns: &str, pvc: &str) -> String {
    let h = blake3::hash(format!("{protection}\0{}\0{ns}\0{pvc}", gen.0).as_bytes()).to_hex();
    let readable: String = format!("lifeboat-{protection}-g{}-restore-{pvc}", gen.0)
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .take(200)
        .collect();
    format!("{}-{}", readable.trim_end_matches('-'), &h[..10])
}

/// The restore objects of every bundle PVC whose volume the point holds.
pub fn restores(
    protection: &str,
    gen: Gen,
    volumes: &BTreeMap<String, PvcRef>,
    snapshots: &BTreeMap<VolumeName, PointSnapshot>,
) -> Vec<Restore> {
    let labels = json!({MANAGED_BY: "lifeboat", RESTORE_LABEL: protection});
    let mut out = Vec::new();
    for (volume, r) in volumes {
        let Some(s) = snapshots.get(volume.as_str()) else {
            continue;
        };
        let name = name_for(protection, gen, &r.namespace, &r.name);
        let content = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            // The replicas are Block; the application's PVC may be Filesystem.
            "metadata": {"name": name, "labels": labels, "annotations": {ALLOW_MODE_CHANGE: "true"}},
            "spec": {
                "deletionPolicy": "Retain",
                "driver": s.driver,
                "source": {"snapshotHandle": s.handle},
                "sourceVolumeMode": "Block",
                "volumeSnapshotRef": {"namespace": r.namespace, "name": name},
            },
        });
        let snapshot = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": r.namespace, "labels": labels},
            "spec": {"source": {"volumeSnapshotContentName": name}},
        });
        out.push(Restore {
            namespace: r.namespace.clone(),
            pvc: r.name.clone(),
            content,
            snapshot,
            name,
        });
    }
    out
}

/// The application's PVC restored from its restore snapshot: no PV binding of the
/// primary's, at least the snapshot's size.
pub fn restored_pvc(pvc: &mut Value, snapshot: &str, size: u64) {
    let spec = &mut pvc["spec"];
    if let Some(o) = spec.as_object_mut() {
        o.remove("volumeName");
        o.remove("dataSourceRef");
    }
    spec["dataSource"] =
        json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot});
    let asked = super::snapshot::quantity_bytes(&spec["resources"]["requests"]["storage"]);
    if asked.is_none_or(|a| a < size) {
        spec["resources"]["requests"]["storage"] = json!(size.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pvc_is_restored_in_its_namespace_from_the_points_driver_snapshot() {
        let mut volumes = BTreeMap::new();
        volumes.insert(
            "prod.data-0".to_string(),
            PvcRef {
                namespace: "prod".into(),
                name: "data-0".into(),
            },
        );
        volumes.insert(
            "prod.gone".to_string(),
            PvcRef {
                namespace: "prod".into(),
                name: "gone".into(),
            },
        );
        let mut snaps = BTreeMap::new();
        snaps.insert(
            VolumeName::new("prod.data-0").unwrap(),
            PointSnapshot {
                namespace: "lifeboat".into(),
                name: "p".into(),
                content: Some("c".into()),
                handle: "snap-9".into(),
                driver: "rbd.csi.ceph.com".into(),
                size: 1 << 30,
            },
        );
        let r = restores("shop", Gen(7), &volumes, &snaps);
        assert_eq!(r.len(), 1, "a volume the point lacks gets nothing");
        let r = &r[0];
        assert_eq!(r.content["spec"]["deletionPolicy"], "Retain");
        assert_eq!(r.content["spec"]["source"]["snapshotHandle"], "snap-9");
        assert_eq!(r.snapshot["metadata"]["namespace"], "prod");
        assert_eq!(
            r.content["spec"]["volumeSnapshotRef"]["name"],
            r.name.as_str()
        );
        let mut pvc =
            json!({"spec": {"volumeName": "pv-x", "resources": {"requests": {"storage": "1Mi"}}}});
        restored_pvc(&mut pvc, &r.name, 1 << 30);
        assert!(pvc["spec"]["volumeName"].is_null());
        assert_eq!(pvc["spec"]["dataSource"]["name"], r.name.as_str());
        assert_eq!(
            pvc["spec"]["resources"]["requests"]["storage"],
            "1073741824"
        );
    }
}
