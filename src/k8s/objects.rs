//! The Kubernetes objects of the CSI path as the API serves them (kinds and a dynamic
//! client per kind), and the deletes every part of it shares: one object, or all that a
//! label selector finds but the gens kept.

use anyhow::Result;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use serde_json::Value;

use super::api_error;
use super::kinds::{self, Kind};
pub use super::kinds::{persistent_volumes, pods};
use super::snapshot::{self, GROUP_SNAPSHOT_GROUP, SNAPSHOT_GROUP};
use crate::ids::Gen;

pub fn volume_snapshots() -> Kind {
    Kind::new(
        SNAPSHOT_GROUP,
        "v1",
        "VolumeSnapshot",
        "volumesnapshots",
        true,
    )
}

pub fn volume_snapshot_contents() -> Kind {
    Kind::new(
        SNAPSHOT_GROUP,
        "v1",
        "VolumeSnapshotContent",
        "volumesnapshotcontents",
        false,
    )
}

pub fn volume_snapshot_classes() -> Kind {
    Kind::new(
        SNAPSHOT_GROUP,
        "v1",
        "VolumeSnapshotClass",
        "volumesnapshotclasses",
        false,
    )
}

pub fn group_kind(version: &str, k: &str, plural: &str, namespaced: bool) -> Kind {
    Kind::new(GROUP_SNAPSHOT_GROUP, version, k, plural, namespaced)
}

/// PersistentVolumeClaims, as the collector knows them.
pub fn pvcs_kind() -> Kind {
    kinds::of("v1", "PersistentVolumeClaim").expect("a built-in kind")
}

pub fn api(client: &kube::Client, k: &Kind, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) if k.namespaced => Api::namespaced_with(client.clone(), ns, &k.resource()),
        _ => Api::all_with(client.clone(), &k.resource()),
    }
}

pub fn to_value(o: DynamicObject) -> Value {
    serde_json::to_value(o).expect("objects serialise")
}

pub fn vgs_kind(version: &str) -> Kind {
    group_kind(version, "VolumeGroupSnapshot", "volumegroupsnapshots", true)
}

pub fn jobs() -> Kind {
    kinds::of("batch/v1", "Job").expect("a built-in kind")
}

pub fn events_kind() -> Kind {
    Kind::new("", "v1", "Event", "events", true)
}

/// Deletes an object (Background: what it owns goes with it); gone already is fine.
pub async fn delete(client: &kube::Client, k: &Kind, ns: Option<&str>, name: &str) -> Result<()> {
    match api(client, k, ns)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(api_error(e, format!("delete {} {name}", k.kind))),
    }
}

/// Deletes every `k` in `ns` (None: cluster-scoped) that `selector` matches, but those
/// whose gen label is in `keep`.
pub async fn delete_labelled(
    client: &kube::Client,
    k: &Kind,
    ns: Option<&str>,
    selector: &str,
    keep: &[Gen],
) -> Result<()> {
    let items = api(client, k, ns)
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| api_error(e, format!("list {} ({selector})", k.kind)))?
        .items;
    for o in items {
        let gen = o
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(snapshot::GEN_LABEL))
            .and_then(|g| g.parse::<u64>().ok());
        if gen.is_some_and(|g| keep.contains(&Gen(g))) {
            continue;
        }
        delete(
            client,
            k,
            ns,
            o.metadata.name.as_deref().unwrap_or_default(),
        )
        .await?;
    }
    Ok(())
}
