//! The primary's CSI group snapshot, the pure half: which mechanism cuts each PVC of the
//! group (one `VolumeGroupSnapshot` per namespace and driver where the driver offers a
//! group class, else one `VolumeSnapshot` per PVC), the objects to create, and what their
//! status says (cut, ready, failed). [`super::cut`] is the shell that talks to the API.
//!
//! Every object made here carries the labels of [`labels_for`], so whatever a killed
//! daemon left behind is found again by a label selector and removed.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::ids::Gen;

pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";
pub const GROUP_SNAPSHOT_GROUP: &str = "groupsnapshot.storage.k8s.io";
/// Labels every snapshot object lifeboat creates.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const GEN_LABEL: &str = "lifeboat.dev/gen";
/// Set on the application's PVCs of one group snapshot: the VolumeGroupSnapshot selects
/// them by it (a group snapshot selects PVCs by label, nothing else).
pub const GROUP_LABEL: &str = "lifeboat.dev/snapshot-group";
const DEFAULT_CLASS: &str = "snapshot.storage.kubernetes.io/is-default-class";
const DEFAULT_GROUP_CLASS: &str = "groupsnapshot.storage.kubernetes.io/is-default-class";

/// How a PVC's data is laid out, as its PV says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

impl VolumeMode {
    pub fn of(v: &Value) -> VolumeMode {
        match v.as_str() {
            Some("Block") => VolumeMode::Block,
            _ => VolumeMode::Filesystem,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// One PVC of the group, as read from the API just before the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pvc {
    pub namespace: String,
    pub name: String,
    /// The lifeboat volume (`namespace.pvc` at the DR site's namespace).
    pub volume: String,
    pub storage_class: Option<String>,
    pub mode: VolumeMode,
    /// Bound: the PV and its CSI driver (None for a PV that is not a CSI volume).
    pub pv: Option<String>,
    pub driver: Option<String>,
    pub phase: String,
}

impl Pvc {
    /// Reads a PVC and (when bound) its PV.
    pub fn read(pvc: &Value, pv: Option<&Value>, volume: String) -> Pvc {
        let s = |p: &str| pvc.pointer(p).and_then(Value::as_str).map(str::to_string);
        Pvc {
            namespace: s("/metadata/namespace").unwrap_or_default(),
            name: s("/metadata/name").unwrap_or_default(),
            volume,
            storage_class: s("/spec/storageClassName"),
            mode: VolumeMode::of(
                pv.and_then(|p| p.pointer("/spec/volumeMode"))
                    .or_else(|| pvc.pointer("/spec/volumeMode"))
                    .unwrap_or(&Value::Null),
            ),
            pv: s("/spec/volumeName").filter(|_| pv.is_some()),
            driver: pv
                .and_then(|p| p.pointer("/spec/csi/driver"))
                .and_then(Value::as_str)
                .map(str::to_string),
            phase: s("/status/phase").unwrap_or_else(|| "Pending".into()),
        }
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A snapshot class as the API lists it (VolumeSnapshotClass or VolumeGroupSnapshotClass).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub name: String,
    pub driver: String,
    pub default: bool,
}

impl Class {
    pub fn read(v: &Value, group: bool) -> Class {
        let key = if group {
            DEFAULT_GROUP_CLASS
        } else {
            DEFAULT_CLASS
        };
        Class {
            name: v["metadata"]["name"].as_str().unwrap_or_default().into(),
            driver: v["driver"].as_str().unwrap_or_default().into(),
            default: v["metadata"]["annotations"][key].as_str() == Some("true"),
        }
    }
}

/// What the protection asks for (`[protection.kubernetes]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// A VolumeSnapshotClass to use for every driver (else the driver's default, else its
    /// only class).
    pub snapshot_class: Option<String>,
    pub group_snapshot_class: Option<String>,
    /// Use group snapshots where offered (default true).
    pub group_snapshots: bool,
}

/// One VolumeGroupSnapshot: the PVCs of one namespace and driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCut {
    pub namespace: String,
    pub driver: String,
    pub class: String,
    /// The value of [`GROUP_LABEL`] on its PVCs.
    pub label: String,
    /// Indexes into the group's PVCs.
    pub members: Vec<usize>,
}

/// One VolumeSnapshot of one PVC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleCut {
    pub member: usize,
    pub class: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub groups: Vec<GroupCut>,
    pub singles: Vec<SingleCut>,
}

/// The class of `driver` among `classes`: the named one (which must be the driver's), the
/// driver's default, or its only class.
fn class_for(classes: &[Class], driver: &str, named: Option<&str>) -> Result<String, String> {
    if let Some(n) = named {
        return match classes.iter().find(|c| c.name == n) {
            Some(c) if c.driver == driver => Ok(c.name.clone()),
            Some(c) => Err(format!(
                "class {n} is for driver {}, not {driver}",
                c.driver
            )),
            None => Err(format!("class {n} does not exist")),
        };
    }
    let of: Vec<&Class> = classes.iter().filter(|c| c.driver == driver).collect();
    let defaults: Vec<&&Class> = of.iter().filter(|c| c.default).collect();
    match (defaults.as_slice(), of.as_slice()) {
        ([d], _) => Ok(d.name.clone()),
        ([], [only]) => Ok(only.name.clone()),
        ([], []) => Err(format!("no class exists for driver {driver}")),
        _ => Err(format!(
            "driver {driver} has {} classes and {} defaults: name one",
            of.len(),
            defaults.len()
        )),
    }
}

/// Decides how each PVC is cut. Every PVC that cannot be snapshotted is named with why;
/// `group_classes` is None where the server does not serve group snapshots.
pub fn plan(
    protection: &str,
    gen_pvcs: &[Pvc],
    classes: &[Class],
    group_classes: Option<&[Class]>,
    wanted: &Wanted,
) -> Result<Plan, Vec<String>> {
    let mut problems = Vec::new();
    let mut by_group: BTreeMap<(String, String), GroupCut> = BTreeMap::new();
    let mut singles = Vec::new();
    for (i, p) in gen_pvcs.iter().enumerate() {
        if p.phase != "Bound" || p.pv.is_none() {
            problems.push(format!(
                "PVC {} is not bound to a volume (phase {}): there is nothing to snapshot",
                p.id(),
                p.phase
            ));
            continue;
        }
        let Some(driver) = &p.driver else {
            problems.push(format!(
                "PVC {} is bound to PV {}, which is not a CSI volume: CSI snapshots need a CSI driver (for a local volume on one node, set volume_path to read it from the host)",
                p.id(),
                p.pv.as_deref().unwrap_or("?")
            ));
            continue;
        };
        let group_class = match group_classes {
            Some(gc) if wanted.group_snapshots => {
                match class_for(gc, driver, wanted.group_snapshot_class.as_deref()) {
                    Ok(c) => Some(c),
                    // A class the config names must exist; otherwise fall back to single
                    // snapshots for a driver without a group class.
                    Err(e) if wanted.group_snapshot_class.is_some() => {
                        problems.push(format!("PVC {}: VolumeGroupSnapshotClass: {e}", p.id()));
                        continue;
                    }
                    Err(_) => None,
                }
            }
            _ => None,
        };
        match group_class {
            Some(class) => {
                let key = (p.namespace.clone(), driver.clone());
                by_group
                    .entry(key)
                    .or_insert_with(|| GroupCut {
                        namespace: p.namespace.clone(),
                        driver: driver.clone(),
                        class,
                        label: group_label(protection, &p.namespace, driver),
                        members: Vec::new(),
                    })
                    .members
                    .push(i);
            }
            None => match class_for(classes, driver, wanted.snapshot_class.as_deref()) {
                Ok(class) => singles.push(SingleCut { member: i, class }),
                Err(e) => problems.push(format!(
                    "PVC {}: VolumeSnapshotClass: {e} (create one for the driver, or set snapshot_class)",
                    p.id()
                )),
            },
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Plan {
        groups: by_group.into_values().collect(),
        singles,
    })
}

/// A label value for one group snapshot's PVCs: short, valid, unique per protection,
/// namespace and driver.
pub fn group_label(protection: &str, ns: &str, driver: &str) -> String {
    let h = blake3::hash(format!("{protection}\0{ns}\0{driver}").as_bytes()).to_hex();
    format!("lb-{}", &h[..20])
}

/// `s` lowercased, with `-` for every character a Kubernetes name cannot hold.
pub(super) fn name_chars(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// A valid object name from readable parts: `lifeboat-{protection}-g{gen}-{what}`, cut
/// and suffixed with a hash where it would exceed `max` (63 for names that become labels
/// or DNS labels, 253 otherwise).
pub fn object_name(protection: &str, gen: Gen, what: &str, max: usize) -> String {
    let full = format!("lifeboat-{protection}-g{}-{what}", gen.0);
    let clean = name_chars(&full);
    if clean.len() <= max {
        return clean;
    }
    let h = blake3::hash(full.as_bytes()).to_hex();
    let keep = max - 11;
    format!("{}-{}", clean[..keep].trim_end_matches('-'), &h[..10])
}

/// The labels of every snapshot object of a protection's gen.
pub fn labels_for(protection: &str, gen: Gen) -> Value {
    json!({
        MANAGED_BY: "lifeboat",
        crate::k8s::PROTECTION_LABEL: protection,
        GEN_LABEL: gen.0.to_string(),
    })
}

/// The label selector of every snapshot object of a protection.
pub fn selector_for(protection: &str) -> String {
    format!(
        "{MANAGED_BY}=lifeboat,{}={protection}",
        crate::k8s::PROTECTION_LABEL
    )
}

pub fn volume_snapshot(name: &str, ns: &str, pvc: &str, class: &str, labels: &Value) -> Value {
    json!({
        "apiVersion": format!("{SNAPSHOT_GROUP}/v1"),
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "volumeSnapshotClassName": class,
            "source": {"persistentVolumeClaimName": pvc},
        },
    })
}

pub fn volume_group_snapshot(version: &str, name: &str, cut: &GroupCut, labels: &Value) -> Value {
    json!({
        "apiVersion": format!("{GROUP_SNAPSHOT_GROUP}/{version}"),
        "kind": "VolumeGroupSnapshot",
        "metadata": {"name": name, "namespace": cut.namespace, "labels": labels},
        "spec": {
            "volumeGroupSnapshotClassName": cut.class,
            "source": {"selector": {"matchLabels": {GROUP_LABEL: cut.label}}},
        },
    })
}

/// Where a snapshot (single or group) stands, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not cut yet.
    Pending,
    /// Cut (a point in time exists: creation time and bound content), not ready.
    Cut,
    Ready,
    Failed(String),
}

/// A VolumeSnapshot's or VolumeGroupSnapshot's status.
pub fn progress(v: &Value) -> Progress {
    let st = &v["status"];
    if let Some(m) = st["error"]["message"].as_str() {
        return Progress::Failed(m.to_string());
    }
    let bound = st["boundVolumeSnapshotContentName"].is_string()
        || st["boundVolumeGroupSnapshotContentName"].is_string();
    match (
        bound && st["creationTime"].is_string(),
        st["readyToUse"].as_bool(),
    ) {
        (true, Some(true)) => Progress::Ready,
        (true, _) => Progress::Cut,
        _ => Progress::Pending,
    }
}

/// Bytes of a Kubernetes quantity (`64Mi`, `1Gi`, `1G`, `1048576`); None when it is not
/// one lifeboat can size a volume from.
pub fn quantity_bytes(q: &Value) -> Option<u64> {
    if let Some(n) = q.as_u64() {
        return Some(n);
    }
    let s = q.as_str()?.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    Some((f * mult as f64).ceil() as u64)
}

/// The member VolumeSnapshot of each PVC of a cut group snapshot. Members are the
/// snapshots the group snapshot owns; each is matched to its PVC by its
/// `persistentVolumeClaimName` source where the controller sets one, else through the
/// volume handle its content (or the group content's handle list) names, which is the
/// PV's.
pub fn members(
    vgs: &Value,
    group_content: Option<&Value>,
    snapshots: &[Value],
    contents: &[Value],
    pvcs: &[(&Pvc, Option<String>)],
) -> Result<BTreeMap<String, String>, String> {
    let uid = vgs["metadata"]["uid"].as_str().unwrap_or_default();
    let owned = snapshots.iter().filter(|s| {
        s["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|o| o.iter().any(|r| r["uid"].as_str() == Some(uid)))
    });
    // snapshot handle -> volume handle, from the group content's status (v1beta1 pairs,
    // v1beta2/v1 info list).
    let mut handle_pairs: BTreeMap<String, String> = BTreeMap::new();
    if let Some(gc) = group_content {
        for key in ["volumeSnapshotHandlePairList", "volumeSnapshotInfoList"] {
            for p in gc["status"][key].as_array().into_iter().flatten() {
                if let (Some(s), Some(v)) =
                    (p["snapshotHandle"].as_str(), p["volumeHandle"].as_str())
                {
                    handle_pairs.insert(s.into(), v.into());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for s in owned {
        let sname = s["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let pvc_name = s["spec"]["source"]["persistentVolumeClaimName"].as_str();
        let found = match pvc_name {
            Some(n) => pvcs.iter().find(|(p, _)| p.name == n).map(|(p, _)| p),
            None => {
                let content = s["status"]["boundVolumeSnapshotContentName"]
                    .as_str()
                    .or_else(|| s["spec"]["source"]["volumeSnapshotContentName"].as_str())
                    .and_then(|c| contents.iter().find(|x| x["metadata"]["name"] == c));
                let handle = content.and_then(|c| {
                    c["spec"]["source"]["volumeHandle"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| {
                            let sh = c["status"]["snapshotHandle"]
                                .as_str()
                                .or_else(|| c["spec"]["source"]["snapshotHandle"].as_str())?;
                            handle_pairs.get(sh).cloned()
                        })
                });
                handle.and_then(|h| {
                    pvcs.iter()
                        .find(|(_, vh)| vh.as_deref() == Some(h.as_str()))
                        .map(|(p, _)| p)
                })
            }
        };
        if let Some(p) = found {
            out.insert(p.name.clone(), sname);
        }
    }
    let missing: Vec<String> = pvcs
        .iter()
        .filter(|(p, _)| !out.contains_key(&p.name))
        .map(|(p, _)| p.id())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "group snapshot {} has no member snapshot of PVC {}",
            vgs["metadata"]["name"].as_str().unwrap_or("?"),
            missing.join(", ")
        ));
    }
    Ok(out)
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
