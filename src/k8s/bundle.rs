//! The manifest bundle of a gen: the protection's objects as the DR site will apply them
//! (sanitised and mapped, with the primary's replica counts), which PVC each volume is,
//! and what the selection covered. It travels with the gen's data and commits with it.
//!
//! From the bundle, [`dr_objects`] derives what is applied at the DR site: the standby form
//! (workloads at zero, CronJobs and Jobs suspended, DaemonSets scheduled nowhere) or the
//! active form used at failover. Both bind each PVC to a PersistentVolume naming its
//! replica. Pure functions.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::kinds::{self, Kind};
use super::{PROTECTION_LABEL, REPLICAS_ANNOTATION, STANDBY_NODE_LABEL, SUSPEND_ANNOTATION};

pub const BUNDLE_VERSION: u32 = 1;

/// A kind as recorded in a bundle, so the DR site can list (and prune) it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindRef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
}

impl From<&Kind> for KindRef {
    fn from(k: &Kind) -> Self {
        KindRef {
            group: k.group.clone(),
            version: k.version.clone(),
            kind: k.kind.clone(),
            plural: k.plural.clone(),
            namespaced: k.namespaced,
        }
    }
}

impl From<&KindRef> for Kind {
    fn from(k: &KindRef) -> Self {
        Kind {
            group: k.group.clone(),
            version: k.version.clone(),
            kind: k.kind.clone(),
            plural: k.plural.clone(),
            namespaced: k.namespaced,
        }
    }
}

/// The PVC a volume of the group is, at the DR site (mapped namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvcRef {
    pub namespace: String,
    pub name: String,
}

/// What a selection covered, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub namespaces: Vec<String>,
    pub pods: Vec<String>,
    pub pvcs: Vec<String>,
    pub objects: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bundle {
    pub v: u32,
    /// DR-side namespaces the protection covers: the scope of pruning.
    pub namespaces: Vec<String>,
    /// The kinds collected: the DR site prunes objects of these kinds only.
    pub kinds: Vec<KindRef>,
    /// In apply order.
    pub objects: Vec<Value>,
    /// Volume name -> PVC.
    pub volumes: BTreeMap<String, PvcRef>,
    pub coverage: Coverage,
    /// References a mapping could not rewrite, cluster-scoped needs, and the like.
    pub warnings: Vec<String>,
}

/// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
pub fn describe(v: &Value) -> String {
    let kind = v["kind"].as_str().unwrap_or("?");
    let name = v["metadata"]["name"].as_str().unwrap_or("?");
    match v["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Apply order, then namespace and name: stable across cycles.
/// Marks a Secret whose data an export left out.
pub const REDACTED_ANNOTATION: &str = "lifeboat.io/redacted";

/// Takes the data out of every Secret, for callers allowed to see manifests but not
/// Secrets; each one left out is annotated so nobody applies it by mistake as is.
pub fn redact_secrets(objects: &mut [Value]) {
    for o in objects.iter_mut().filter(|o| o["kind"] == "Secret") {
        let Some(map) = o.as_object_mut() else {
            continue;
        };
        map.remove("data");
        map.remove("stringData");
        o["metadata"]["annotations"][REDACTED_ANNOTATION] =
            json!("data left out: export with --secrets as an admin caller");
    }
}

pub fn sort(objects: &mut [Value]) {
    objects.sort_by_key(|v| {
        (
            kinds::rank(
                v["apiVersion"].as_str().unwrap_or(""),
                v["kind"].as_str().unwrap_or(""),
            ),
            v["kind"].as_str().unwrap_or("").to_string(),
            v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            v["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    });
}

impl Bundle {
    /// A version byte, then zstd-compressed JSON.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("bundles serialise");
        let mut out = vec![BUNDLE_VERSION as u8];
        out.extend(zstd::bulk::compress(&json, 3).expect("zstd into memory"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Bundle> {
        let Some((&version, rest)) = bytes.split_first() else {
            bail!("empty manifest bundle");
        };
        if version as u32 != BUNDLE_VERSION {
            bail!("manifest bundle format {version}; this lifeboat reads {BUNDLE_VERSION}");
        }
        let json = zstd::stream::decode_all(rest).context("manifest bundle is not zstd")?;
        let b: Bundle = serde_json::from_slice(&json).context("manifest bundle is not valid")?;
        for o in &b.objects {
            if o["apiVersion"].as_str().is_none()
                || o["kind"].as_str().is_none()
                || o["metadata"]["name"].as_str().is_none()
            {
                bail!("manifest bundle holds an object without apiVersion, kind or name");
            }
        }
        Ok(b)
    }
}

/// What the DR site applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Mirrored and ready, running nothing.
    Standby,
    /// After failover: the primary's replica counts and schedules.
    Active,
}

/// The PersistentVolume that binds a PVC to its replica at `path`.
pub fn persistent_volume(protection: &str, pvc: &Value, path: &Path, node: Option<&str>) -> Value {
    let ns = pvc["metadata"]["namespace"].as_str().unwrap_or("");
    let name = pvc["metadata"]["name"].as_str().unwrap_or("");
    let spec = &pvc["spec"];
    let capacity = spec
        .pointer("/resources/requests/storage")
        .cloned()
        .unwrap_or(json!("1Gi"));
    let mut pv = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": pv_name(protection, ns, name),
            "labels": {PROTECTION_LABEL: protection},
        },
        "spec": {
            "capacity": {"storage": capacity},
            "accessModes": spec.get("accessModes").cloned().unwrap_or(json!(["ReadWriteOnce"])),
            "persistentVolumeReclaimPolicy": "Retain",
            "volumeMode": spec.get("volumeMode").cloned().unwrap_or(json!("Filesystem")),
            "hostPath": {"path": path.display().to_string()},
            "claimRef": {"namespace": ns, "name": name},
        }
    });
    if let Some(class) = spec.get("storageClassName") {
        pv["spec"]["storageClassName"] = class.clone();
    }
    // The files exist on one node only: a pod elsewhere would start on an empty directory.
    if let Some(node) = node {
        pv["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}});
    }
    pv
}

/// The PV's name: readable (`lifeboat-PROTECTION-NAMESPACE-PVC`, made a valid DNS-1123
/// subdomain) and unique, by a hash of the three parts: joined with `-` alone, `a-b`+`c`
/// and `a`+`b-c` would be one name.
pub fn pv_name(protection: &str, ns: &str, pvc: &str) -> String {
    let hash = blake3::hash(format!("{protection}\0{ns}\0{pvc}").as_bytes()).to_hex();
    let mut readable: String = format!("lifeboat-{protection}-{ns}-{pvc}")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    readable.truncate(253 - 1 - 10);
    let readable = readable.trim_end_matches(['-', '.']);
    format!("{readable}-{}", &hash[..10])
}

/// What the DR site's PVCs are backed by.
pub enum Backing<'a> {
    /// Host-path replicas: each PVC is bound to a PersistentVolume naming its replica (of
    /// a PVC's namespace and name), on `node` when given.
    HostPath {
        path: &'a dyn Fn(&str, &str) -> std::path::PathBuf,
        node: Option<&'a str>,
    },
    /// CSI replicas: no PVC at standby (the recovery points hold the data); at failover
    /// each PVC is restored from the snapshot named for its (namespace, name), of at
    /// least its size.
    Snapshots(&'a BTreeMap<(String, String), (String, u64)>),
}

/// The objects to apply at the DR site, in apply order, each labelled with the protection.
/// In the standby form, objects of a kind with a standby patch (`patches`, else the
/// defaults of [`super::standby_patch`]) get it applied.
pub fn dr_objects(
    bundle: &Bundle,
    protection: &str,
    form: Form,
    patches: &[super::standby_patch::StandbyPatch],
    backing: Backing<'_>,
) -> Vec<Value> {
    let defaults = super::standby_patch::defaults();
    let mut out = Vec::with_capacity(bundle.objects.len() * 2);
    for o in &bundle.objects {
        let mut v = o.clone();
        v["metadata"]["labels"][PROTECTION_LABEL] = json!(protection);
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        let api = v["apiVersion"].as_str().unwrap_or("").to_string();
        let scalable = kinds::of(&api, &kind).is_some_and(|k| k.is_scalable());
        if scalable {
            let replicas = v["spec"]["replicas"].as_i64().unwrap_or(1);
            v["metadata"]["annotations"][REPLICAS_ANNOTATION] = json!(replicas.to_string());
            v["spec"]["replicas"] = json!(if form == Form::Standby { 0 } else { replicas });
        }
        if (kind == "CronJob" || kind == "Job") && api == "batch/v1" {
            let suspend = v["spec"]["suspend"].as_bool().unwrap_or(false);
            v["metadata"]["annotations"][SUSPEND_ANNOTATION] = json!(suspend.to_string());
            v["spec"]["suspend"] = json!(form == Form::Standby || suspend);
        }
        if form == Form::Standby {
            let (group, _) = api.rsplit_once('/').unwrap_or(("", ""));
            let plural = bundle
                .kinds
                .iter()
                .map(Kind::from)
                .find(|k| k.group == group && k.kind == kind)
                .map(|k| k.plural)
                .unwrap_or_default();
            if let Some(p) = super::standby_patch::find(patches, &defaults, &kind, &plural, group) {
                super::standby_patch::apply(&mut v, p);
            }
        }
        if kind == "DaemonSet" && form == Form::Standby {
            v["spec"]["template"]["spec"]["nodeSelector"][STANDBY_NODE_LABEL] = json!("true");
        }
        if kind == "PersistentVolumeClaim" && api == "v1" {
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
            match &backing {
                Backing::HostPath { path, node } => {
                    out.push(persistent_volume(protection, &v, &path(&ns, &name), *node));
                    v["spec"]["volumeName"] = json!(pv_name(protection, &ns, &name));
                }
                Backing::Snapshots(_) if form == Form::Standby => continue,
                Backing::Snapshots(from) => match from.get(&(ns, name)) {
                    Some((snapshot, size)) => {
                        super::restore::restored_pvc(&mut v, snapshot, *size);
                    }
                    // Not in the point: created empty, as the primary had it.
                    None => {
                        if let Some(o) = v["spec"].as_object_mut() {
                            o.remove("volumeName");
                        }
                    }
                },
            }
        }
        out.push(v);
    }
    sort(&mut out);
    out
}

/// The bundle's objects as YAML files, one per object, named `NN-kind-namespace-name.yaml`
/// so that a directory listing is the apply order.
pub fn export(objects: &[Value], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut files = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let kind = o["kind"].as_str().unwrap_or("object").to_ascii_lowercase();
        let ns = o["metadata"]["namespace"].as_str().unwrap_or("cluster");
        let name = o["metadata"]["name"].as_str().unwrap_or("unnamed");
        let path = dir.join(format!("{i:03}-{kind}-{ns}-{name}.yaml"));
        let yaml = serde_saphyr::to_string(o).context("render YAML")?;
        std::fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pv_names_are_valid_and_never_collide() {
        let a = pv_name("db", "a-b", "c");
        let b = pv_name("db", "a", "b-c");
        assert_ne!(a, b);
        assert!(a.starts_with("lifeboat-db-a-b-c-"), "{a}");
        let long = pv_name("Prot_1", "ns", &"x".repeat(300));
        assert!(long.len() <= 253, "{}", long.len());
        let valid = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        assert!(
            valid(&long) && valid(&a) && valid(&pv_name("P", "n", "data.0")),
            "{long}"
        );
    }

    fn bundle() -> Bundle {
        let mut objects = vec![
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "cassandra", "namespace": "prod"},
                   "spec": {"replicas": 3, "template": {"spec": {"containers": []}}}}),
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "repair", "namespace": "prod"},
                   "spec": {"schedule": "0 3 * * *"}}),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data-cassandra-0", "namespace": "prod"},
                   "spec": {"resources": {"requests": {"storage": "10Gi"}}, "storageClassName": "fast"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "prod"},
                   "spec": {"template": {"spec": {"containers": []}}}}),
        ];
        sort(&mut objects);
        Bundle {
            v: BUNDLE_VERSION,
            objects,
            ..Default::default()
        }
    }

    #[test]
    fn standby_holds_workloads_at_zero_and_active_restores_them() {
        let b = bundle();
        let path = |ns: &str, pvc: &str| std::path::PathBuf::from(format!("/dr/{ns}/{pvc}.img"));
        let standby = dr_objects(
            &b,
            "shop",
            Form::Standby,
            &[],
            Backing::HostPath {
                path: &path,
                node: None,
            },
        );
        let find =
            |objs: &[Value], kind: &str| objs.iter().find(|o| o["kind"] == kind).cloned().unwrap();
        let sts = find(&standby, "StatefulSet");
        assert_eq!(sts["spec"]["replicas"], 0);
        assert_eq!(sts["metadata"]["annotations"][REPLICAS_ANNOTATION], "3");
        assert_eq!(sts["metadata"]["labels"][PROTECTION_LABEL], "shop");
        assert_eq!(find(&standby, "CronJob")["spec"]["suspend"], true);
        assert_eq!(
            find(&standby, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"]
                [STANDBY_NODE_LABEL],
            "true"
        );
        let pv = find(&standby, "PersistentVolume");
        assert_eq!(
            pv["spec"]["hostPath"]["path"],
            "/dr/prod/data-cassandra-0.img"
        );
        assert_eq!(pv["spec"]["claimRef"]["name"], "data-cassandra-0");
        assert_eq!(pv["spec"]["storageClassName"], "fast");
        assert_eq!(
            find(&standby, "PersistentVolumeClaim")["spec"]["volumeName"],
            pv["metadata"]["name"]
        );
        let order: Vec<&str> = standby
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(order[0], "Namespace", "{order:?}");
        assert!(
            order.iter().position(|k| *k == "PersistentVolumeClaim")
                < order.iter().position(|k| *k == "StatefulSet"),
            "{order:?}"
        );

        let node = Some("node-b");
        let active = dr_objects(
            &b,
            "shop",
            Form::Active,
            &[],
            Backing::HostPath { path: &path, node },
        );
        assert_eq!(
            find(&active, "PersistentVolume")["spec"]["nodeAffinity"]["required"]
                ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
            "node-b"
        );
        assert_eq!(find(&active, "StatefulSet")["spec"]["replicas"], 3);
        assert_eq!(find(&active, "CronJob")["spec"]["suspend"], false);
        assert!(find(&active, "DaemonSet")["spec"]["template"]["spec"]
            .get("nodeSelector")
            .is_none());
    }

    #[test]
    fn bundles_round_trip_and_bad_ones_are_refused() {
        let b = bundle();
        let back = Bundle::decode(&b.encode()).unwrap();
        assert_eq!(back.objects, b.objects);
        let mut bytes = b.encode();
        bytes[0] = 9;
        assert!(Bundle::decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("format 9"));
        assert!(Bundle::decode(&[1, 2, 3]).is_err());
    }
}
