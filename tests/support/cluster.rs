//! The cluster around the test API server ([`super::kubeapi`]): a CSI driver with its
//! snapshot controller and provisioner, and a kubelet with a Job controller, running
//! beside the server as a real cluster's controllers do (reading stored objects, writing
//! their status). What lifeboat's CSI data path depends on follows the real components:
//!
//! - Provisioning: a PVC of a StorageClass whose provisioner is the stand-in driver gets a
//!   PV `pvc-<uid>` (spec.csi {driver, volumeHandle, volumeAttributes with the backing
//!   file}), spec.volumeName and phase Bound; its bytes are a sparse file under the root.
//!   A PVC restored from a VolumeSnapshot waits until the snapshot is ready, then gets a
//!   reflink (or copy) of the snapshot file; a volume-mode change without the content's
//!   `snapshot.storage.kubernetes.io/allow-volume-mode-change: "true"` stays Pending with
//!   a ProvisioningFailed Event, as external-provisioner does.
//! - Snapshots: a VolumeSnapshot of a PVC takes its class (named, or the driver's default),
//!   is cut at once (content `snapcontent-<uid>` bound both ways, snapshot handle,
//!   creation time, restore size) and becomes readyToUse after the driver's delay (or when
//!   the test releases `hold_ready`). No class, a class of another driver, and a driver
//!   without snapshot support are reported in `status.error`, as the snapshot controller
//!   and sidecar do. A pre-provisioned content (`spec.source.snapshotHandle`) binds to
//!   the VolumeSnapshot that names it, when both point at each other. A VolumeGroupSnapshot
//!   cuts every PVC its selector matches under one lock hold (one instant) and creates a
//!   member VolumeSnapshot per PVC owned by it. Deleting a snapshot with deletionPolicy
//!   Delete deletes its content and file; Retain keeps them.
//! - Kubelet and Job controller: a Job gets one Pod at a time (`<job>-<5 chars>`, labels
//!   `batch.kubernetes.io/job-name`, ownerReference), up to backoffLimit failures, then
//!   condition Failed (BackoffLimitExceeded); success sets Complete. Pods are bound to the
//!   node with the fewest running pods (nodes `node-a`, `node-b`); one whose requests
//!   exceed every node's allocatable is Pending with PodScheduled=False, Unschedulable.
//!   A Pod of the lifeboat image runs as a local process of the binary under test, with
//!   each volumeDevices path, Secret and emptyDir mount and the termination message path
//!   substituted in its arguments by a file or directory standing in for it; its exit ends
//!   the Pod (Succeeded/Failed, exit code, termination message).
//!
//! What it does not model: attach/detach and node topology of volumes (any node reaches
//! any volume), CSI sidecar retries and backoff, finalizers (deletes are immediate; a PVC
//! in use is deleted at once), garbage collection other than a deleted Job's Pods (which
//! are killed and removed whatever the propagation policy), Pod restarts within a Pod,
//! resource limits, image pulls (other images stay Waiting, ErrImageNeverPull), and
//! SnapshotMetadata (changed block tracking).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::kubeapi::{ApiState, KubeApi};

pub const PATH_ATTR: &str = "lifeboat.test/path";
const MANAGER: &str = "cluster-stand-in";

#[derive(Clone, Debug)]
pub struct Driver {
    pub name: String,
    pub snapshots: bool,
    pub group_snapshots: bool,
    pub ready_delay: Duration,
}

pub struct Options {
    pub root: PathBuf,
    pub drivers: Vec<Driver>,
    /// The lifeboat binary and the image name that runs it.
    pub binary: PathBuf,
    pub image: String,
    /// Node allocatable CPU in millicores.
    pub node_cpu_m: u64,
    /// How many nodes: `node-a`, `node-b`, ...
    pub nodes: usize,
    pub group_version: &'static str,
}

pub struct Cluster {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub hold_ready: Arc<AtomicBool>,
    /// Pod (namespace/name) -> its process id, while running.
    pub pids: Arc<Mutex<HashMap<String, u32>>>,
    /// Nodes each pod ran on, in order.
    pub scheduled: Arc<Mutex<Vec<(String, String)>>>,
    /// The most pods that ran at once.
    pub peak: Arc<std::sync::atomic::AtomicUsize>,
    pub root: PathBuf,
    /// ServiceAccount tokens the kubelet projected into Pods (what a TokenReview knows).
    pub tokens: Tokens,
}

/// A projected ServiceAccount token: who it names and for which audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
}

pub type Tokens = Arc<Mutex<HashMap<String, Issued>>>;

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_rfc3339() -> String {
    "2026-12-02T00:00:00Z".into()
}

fn quantity(q: &Value) -> u64 {
    lifeboat::k8s::snapshot::quantity_bytes(q).unwrap_or(0)
}

fn cpu_m(q: &Value) -> u64 {
    match q.as_str() {
        Some(s) if s.ends_with('m') => s.trim_end_matches('m').parse().unwrap_or(0),
        Some(s) => s.parse::<f64>().map(|f| (f * 1000.0) as u64).unwrap_or(0),
        None => q.as_u64().map(|n| n * 1000).unwrap_or(0),
    }
}

/// Secret `data` as stored (standard base64).
fn b64_decode(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let Some(v) = T.iter().position(|&t| t == c) else {
            continue;
        };
        buf = (buf << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

/// Copies `src` to `dst` sharing extents where the file system can.
fn clone_file(src: &Path, dst: &Path) {
    let ok = Command::new("cp")
        .arg("--reflink=auto")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "copy {} to {}", src.display(), dst.display());
}

struct Proc {
    child: Child,
    message: PathBuf,
    ns: String,
    name: String,
}

struct World {
    opts: Options,
    hold_ready: Arc<AtomicBool>,
    ready_at: HashMap<String, Instant>,
    procs: HashMap<String, Proc>,
    pids: Arc<Mutex<HashMap<String, u32>>>,
    scheduled: Arc<Mutex<Vec<(String, String)>>>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
    seq: u64,
    tokens: Tokens,
}

impl Cluster {
    pub fn start(api: &KubeApi, opts: Options) -> Cluster {
        std::fs::create_dir_all(opts.root.join("volumes")).unwrap();
        std::fs::create_dir_all(opts.root.join("snapshots")).unwrap();
        std::fs::create_dir_all(opts.root.join("pods")).unwrap();
        api.add_type(
            "storage.k8s.io",
            "v1",
            "StorageClass",
            "storageclasses",
            false,
        );
        api.add_type("", "v1", "Node", "nodes", false);
        api.add_type("", "v1", "Event", "events", true);
        let snap = "snapshot.storage.k8s.io";
        api.add_type(snap, "v1", "VolumeSnapshot", "volumesnapshots", true);
        api.add_type(
            snap,
            "v1",
            "VolumeSnapshotContent",
            "volumesnapshotcontents",
            false,
        );
        api.add_type(
            snap,
            "v1",
            "VolumeSnapshotClass",
            "volumesnapshotclasses",
            false,
        );
        if opts.drivers.iter().any(|d| d.group_snapshots) {
            let g = "groupsnapshot.storage.k8s.io";
            let v = opts.group_version;
            api.add_type(g, v, "VolumeGroupSnapshot", "volumegroupsnapshots", true);
            api.add_type(
                g,
                v,
                "VolumeGroupSnapshotContent",
                "volumegroupsnapshotcontents",
                false,
            );
            api.add_type(
                g,
                v,
                "VolumeGroupSnapshotClass",
                "volumegroupsnapshotclasses",
                false,
            );
        }
        for n in &node_names(opts.nodes) {
            api.seed(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n,
                "labels": {"kubernetes.io/hostname": n}},
                "status": {"allocatable": {"cpu": format!("{}m", opts.node_cpu_m), "memory": "8Gi"}}}));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let hold_ready = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(HashMap::new()));
        let scheduled = Arc::new(Mutex::new(Vec::new()));
        let root = opts.root.clone();
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tokens: Tokens = Default::default();
        let mut world = World {
            tokens: tokens.clone(),
            peak: peak.clone(),
            opts,
            hold_ready: hold_ready.clone(),
            ready_at: HashMap::new(),
            procs: HashMap::new(),
            pids: pids.clone(),
            scheduled: scheduled.clone(),
            seq: 0,
        };
        let (api2, stop2) = (api.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                api2.with_state(|st| world.step(st));
                std::thread::sleep(Duration::from_millis(15));
            }
            for (_, mut p) in world.procs.drain() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        });
        Cluster {
            stop,
            thread: Some(thread),
            hold_ready,
            pids,
            scheduled,
            peak,
            root,
            tokens,
        }
    }

    /// Holds every snapshot at readyToUse false until released.
    pub fn hold_ready(&self, hold: bool) {
        self.hold_ready.store(hold, Ordering::SeqCst);
    }

    /// The backing file of a PVC.
    pub fn backing_file(api: &KubeApi, ns: &str, pvc: &str) -> Option<PathBuf> {
        api.with_state(|st| backing_file(st, ns, pvc))
    }

    /// The file of a VolumeSnapshot's content.
    pub fn snapshot_file(api: &KubeApi, ns: &str, vs: &str) -> Option<PathBuf> {
        api.with_state(|st| {
            let v = st.get_object("snapshot.storage.k8s.io", "volumesnapshots", ns, vs)?;
            let c = v["status"]["boundVolumeSnapshotContentName"].as_str()?;
            let content =
                st.get_object("snapshot.storage.k8s.io", "volumesnapshotcontents", "", c)?;
            content["status"]["snapshotHandle"]
                .as_str()
                .map(PathBuf::from)
        })
    }

    /// The nodes pods ran on.
    pub fn nodes_used(&self) -> std::collections::BTreeSet<String> {
        self.scheduled
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Kills a running pod's process with SIGKILL (a node losing it, or a test's kill -9).
    pub fn kill_pod(&self, key: &str) -> bool {
        let pid = self.pids.lock().unwrap().get(key).copied();
        match pid {
            Some(p) => unsafe { libc::kill(p as i32, libc::SIGKILL) == 0 },
            None => false,
        }
    }
}

/// `node-a`, `node-b`, ... (`n` of them).
fn node_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("node-{}", (b'a' + i as u8) as char))
        .collect()
}

pub fn backing_file(st: &ApiState, ns: &str, pvc: &str) -> Option<PathBuf> {
    let c = st.get_object("", "persistentvolumeclaims", ns, pvc)?;
    let pv = st.get_object(
        "",
        "persistentvolumes",
        "",
        c["spec"]["volumeName"].as_str()?,
    )?;
    pv["spec"]["csi"]["volumeAttributes"][PATH_ATTR]
        .as_str()
        .map(PathBuf::from)
}

fn name(v: &Value) -> String {
    v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn ns(v: &Value) -> String {
    v["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn uid(v: &Value) -> String {
    v["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

impl World {
    fn driver(&self, n: &str) -> Option<&Driver> {
        self.opts.drivers.iter().find(|d| d.name == n)
    }

    fn step(&mut self, st: &mut ApiState) {
        self.provision(st);
        self.snapshots(st);
        self.group_snapshots(st);
        self.ready(st);
        self.deleted_snapshots(st);
        self.jobs(st);
        self.kubelet(st);
    }

    fn event(
        &mut self,
        st: &mut ApiState,
        ns: &str,
        kind: &str,
        obj: &str,
        reason: &str,
        msg: &str,
    ) {
        self.seq += 1;
        st.put(
            json!({"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": format!("{obj}.{}", self.seq), "namespace": ns},
                "involvedObject": {"kind": kind, "name": obj, "namespace": ns},
                "reason": reason, "message": msg, "type": "Warning"}),
            MANAGER,
        );
    }

    fn provision(&mut self, st: &mut ApiState) {
        for pvc in st.list_objects("", "persistentvolumeclaims") {
            if pvc["status"]["phase"] == "Bound" || pvc["spec"]["volumeName"].is_string() {
                continue;
            }
            let Some(class) = pvc["spec"]["storageClassName"].as_str() else {
                continue;
            };
            let Some(sc) = st.get_object("storage.k8s.io", "storageclasses", "", class) else {
                // The PV controller's complaint, once per claim.
                let (pns, pname) = (ns(&pvc), name(&pvc));
                if self
                    .ready_at
                    .insert(format!("noclass/{pns}/{pname}"), Instant::now())
                    .is_none()
                {
                    self.event(
                        st,
                        &pns,
                        "PersistentVolumeClaim",
                        &pname,
                        "ProvisioningFailed",
                        &format!("storageclass.storage.k8s.io \"{class}\" not found"),
                    );
                }
                continue;
            };
            let driver = sc["provisioner"].as_str().unwrap_or_default().to_string();
            if self.driver(&driver).is_none() {
                continue;
            }
            let (pns, pname) = (ns(&pvc), name(&pvc));
            let size = quantity(&pvc["spec"]["resources"]["requests"]["storage"]);
            let mode = pvc["spec"]["volumeMode"]
                .as_str()
                .unwrap_or("Filesystem")
                .to_string();
            let handle = format!("vol-{}", uid(&pvc));
            let file = self.opts.root.join("volumes").join(&handle);
            let source = pvc["spec"]["dataSourceRef"]
                .as_object()
                .or_else(|| pvc["spec"]["dataSource"].as_object())
                .cloned();
            if let Some(src) = source {
                if src.get("kind").and_then(Value::as_str) != Some("VolumeSnapshot") {
                    continue;
                }
                let vs_name = src.get("name").and_then(Value::as_str).unwrap_or_default();
                let Some(vs) =
                    st.get_object("snapshot.storage.k8s.io", "volumesnapshots", &pns, vs_name)
                else {
                    continue;
                };
                if vs["status"]["readyToUse"] != true {
                    continue;
                }
                let cname = vs["status"]["boundVolumeSnapshotContentName"]
                    .as_str()
                    .unwrap_or_default();
                let Some(content) = st.get_object(
                    "snapshot.storage.k8s.io",
                    "volumesnapshotcontents",
                    "",
                    cname,
                ) else {
                    continue;
                };
                let source_mode = content["spec"]["sourceVolumeMode"]
                    .as_str()
                    .unwrap_or("Filesystem");
                let allowed = content["metadata"]["annotations"]
                    ["snapshot.storage.kubernetes.io/allow-volume-mode-change"]
                    == "true";
                if source_mode != mode && !allowed {
                    let key = format!("modechange/{pns}/{pname}");
                    // Reported once per claim (the map only marks it).
                    if self.ready_at.insert(key, Instant::now()).is_none() {
                        self.event(st, &pns, "PersistentVolumeClaim", &pname, "ProvisioningFailed",
                            &format!("failed to provision volume: requested volume {pns}/{pname} modification for volume mode is not allowed: the source snapshot {cname} has volume mode {source_mode} and the annotation snapshot.storage.kubernetes.io/allow-volume-mode-change is not set"));
                    }
                    continue;
                }
                let restore = quantity(&vs["status"]["restoreSize"]);
                if size < restore {
                    continue;
                }
                let snap = PathBuf::from(
                    content["status"]["snapshotHandle"]
                        .as_str()
                        .unwrap_or_default(),
                );
                clone_file(&snap, &file);
            } else {
                std::fs::File::create(&file).unwrap().set_len(size).unwrap();
            }
            let pv = format!("pvc-{}", uid(&pvc));
            st.put(
                json!({"apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": pv},
                    "spec": {"capacity": {"storage": size.to_string()}, "accessModes": pvc["spec"]["accessModes"],
                        "volumeMode": mode, "storageClassName": class,
                        "persistentVolumeReclaimPolicy": sc["reclaimPolicy"].as_str().unwrap_or("Delete"),
                        "claimRef": {"namespace": pns, "name": pname, "uid": uid(&pvc)},
                        "csi": {"driver": driver, "volumeHandle": handle,
                            "volumeAttributes": {PATH_ATTR: file.display().to_string()}}},
                    "status": {"phase": "Bound"}}),
                MANAGER,
            );
            let mut pvc = pvc.clone();
            pvc["spec"]["volumeName"] = json!(pv);
            pvc["spec"]["volumeMode"] = json!(mode);
            pvc["status"] = json!({"phase": "Bound", "capacity": {"storage": size.to_string()}});
            st.put(pvc, MANAGER);
        }
        // A deleted PVC's PV (reclaim Delete) and file go.
        for pv in st.list_objects("", "persistentvolumes") {
            let claim = &pv["spec"]["claimRef"];
            let Some(f) = pv["spec"]["csi"]["volumeAttributes"][PATH_ATTR].as_str() else {
                continue;
            };
            let gone = st
                .get_object(
                    "",
                    "persistentvolumeclaims",
                    claim["namespace"].as_str().unwrap_or(""),
                    claim["name"].as_str().unwrap_or(""),
                )
                .is_none_or(|c| uid(&c) != claim["uid"].as_str().unwrap_or(""));
            if gone && pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete" {
                let _ = std::fs::remove_file(f);
                st.remove("", "persistentvolumes", "", &name(&pv));
            }
        }
    }

    fn class_for(
        &self,
        st: &ApiState,
        named: Option<&str>,
        driver: &str,
        plural: &str,
        group: &str,
        default_key: &str,
    ) -> Result<Value, String> {
        let classes = st.list_objects(group, plural);
        match named {
            Some(n) => match classes.iter().find(|c| name(c) == n) {
                Some(c) if c["driver"] == driver => Ok(c.clone()),
                Some(c) => Err(format!(
                    "the class {n} is for driver {}, not {driver}",
                    c["driver"]
                )),
                None => Err(format!(
                    "failed to get input parameters to create snapshot: class {n} not found"
                )),
            },
            None => classes
                .iter()
                .find(|c| {
                    c["driver"] == driver && c["metadata"]["annotations"][default_key] == "true"
                })
                .cloned()
                .ok_or_else(|| format!("cannot find default snapshot class for driver {driver}")),
        }
    }

    /// Cuts one PVC now: a content bound to `vs`, the file copied. Err: status.error.
    fn cut(
        &mut self,
        st: &mut ApiState,
        vs: &Value,
        pvc_name: &str,
        class: Option<&str>,
    ) -> Result<(), String> {
        let vns = ns(vs);
        let Some(pvc) = st.get_object("", "persistentvolumeclaims", &vns, pvc_name) else {
            return Err(format!("failed to get PVC {vns}/{pvc_name}"));
        };
        let Some(pv) = pvc["spec"]["volumeName"]
            .as_str()
            .and_then(|p| st.get_object("", "persistentvolumes", "", p))
        else {
            return Err(format!("PVC {vns}/{pvc_name} is not bound"));
        };
        let driver = pv["spec"]["csi"]["driver"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let class = match class {
            Some(c) => st
                .get_object("snapshot.storage.k8s.io", "volumesnapshotclasses", "", c)
                .map(|c| name(&c)),
            None => self
                .class_for(
                    st,
                    None,
                    &driver,
                    "volumesnapshotclasses",
                    "snapshot.storage.k8s.io",
                    "snapshot.storage.kubernetes.io/is-default-class",
                )
                .ok()
                .map(|c| name(&c)),
        };
        let cls = match class {
            Some(c) => st
                .get_object("snapshot.storage.k8s.io", "volumesnapshotclasses", "", &c)
                .unwrap(),
            None => {
                return Err(format!(
                    "cannot find default snapshot class for driver {driver}"
                ))
            }
        };
        if cls["driver"] != driver.as_str() {
            return Err(format!(
                "the snapshot class {} is for driver {}, not the PVC's {driver}",
                name(&cls),
                cls["driver"]
            ));
        }
        let Some(d) = self.driver(&driver).cloned() else {
            return Err(format!(
                "driver {driver} is not a CSI driver of this cluster"
            ));
        };
        if !d.snapshots {
            return Err(format!("failed to take snapshot of the volume {}: rpc error: code = Unimplemented desc = driver {driver} does not support snapshots", pv["spec"]["csi"]["volumeHandle"].as_str().unwrap_or("")));
        }
        let src = PathBuf::from(
            pv["spec"]["csi"]["volumeAttributes"][PATH_ATTR]
                .as_str()
                .unwrap(),
        );
        let handle = self
            .opts
            .root
            .join("snapshots")
            .join(format!("snap-{}", uid(vs)));
        clone_file(&src, &handle);
        let size = std::fs::metadata(&src).unwrap().len();
        let cname = format!("snapcontent-{}", uid(vs));
        st.put(
            json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
                "metadata": {"name": cname},
                "spec": {"deletionPolicy": cls["deletionPolicy"].as_str().unwrap_or("Delete"), "driver": driver,
                    "source": {"volumeHandle": pv["spec"]["csi"]["volumeHandle"]},
                    "sourceVolumeMode": pv["spec"]["volumeMode"].as_str().unwrap_or("Filesystem"),
                    "volumeSnapshotClassName": name(&cls),
                    "volumeSnapshotRef": {"kind": "VolumeSnapshot", "apiVersion": "snapshot.storage.k8s.io/v1",
                        "namespace": vns, "name": name(vs), "uid": uid(vs)}},
                "status": {"snapshotHandle": handle.display().to_string(), "creationTime": 1_764_633_600_000_000_000u64,
                    "restoreSize": size, "readyToUse": false}}),
            MANAGER,
        );
        let mut v = vs.clone();
        v["status"] = json!({"boundVolumeSnapshotContentName": cname, "creationTime": now_rfc3339(),
            "restoreSize": size.to_string(), "readyToUse": false});
        st.put(v, MANAGER);
        self.ready_at.insert(cname, Instant::now() + d.ready_delay);
        Ok(())
    }

    fn fail(st: &mut ApiState, v: &Value, message: String) {
        let mut v = v.clone();
        v["status"]["error"] = json!({"message": message, "time": now_rfc3339()});
        v["status"]["readyToUse"] = json!(false);
        st.put(v, MANAGER);
    }

    fn snapshots(&mut self, st: &mut ApiState) {
        for vs in st.list_objects("snapshot.storage.k8s.io", "volumesnapshots") {
            if !vs["status"].is_null() {
                continue;
            }
            if let Some(pvc) = vs["spec"]["source"]["persistentVolumeClaimName"].as_str() {
                let class = vs["spec"]["volumeSnapshotClassName"].as_str();
                if let Err(m) = self.cut(st, &vs, pvc, class) {
                    Self::fail(st, &vs, m);
                }
            } else if let Some(c) = vs["spec"]["source"]["volumeSnapshotContentName"].as_str() {
                // Pre-provisioned: binds only when the content points back at it.
                let Some(content) =
                    st.get_object("snapshot.storage.k8s.io", "volumesnapshotcontents", "", c)
                else {
                    continue;
                };
                let r = &content["spec"]["volumeSnapshotRef"];
                if r["name"] != name(&vs).as_str() || r["namespace"] != ns(&vs).as_str() {
                    continue;
                }
                let Some(h) = content["spec"]["source"]["snapshotHandle"].as_str() else {
                    continue;
                };
                let Ok(meta) = std::fs::metadata(h) else {
                    Self::fail(st, &vs, format!("snapshot handle {h} does not exist"));
                    continue;
                };
                let mut content = content.clone();
                content["spec"]["volumeSnapshotRef"]["uid"] = json!(uid(&vs));
                content["status"] = json!({"snapshotHandle": h, "creationTime": 1_764_633_600_000_000_000u64,
                    "restoreSize": meta.len(), "readyToUse": true});
                st.put(content, MANAGER);
                let mut v = vs.clone();
                v["status"] = json!({"boundVolumeSnapshotContentName": c, "creationTime": now_rfc3339(),
                    "restoreSize": meta.len().to_string(), "readyToUse": true});
                st.put(v, MANAGER);
            }
        }
    }

    fn group_snapshots(&mut self, st: &mut ApiState) {
        let g = "groupsnapshot.storage.k8s.io";
        let version = self.opts.group_version;
        for vgs in st.list_objects(g, "volumegroupsnapshots") {
            if !vgs["status"].is_null() {
                continue;
            }
            let sel =
                lifeboat::k8s::labels::Selector::from_object(&vgs["spec"]["source"]["selector"])
                    .unwrap();
            let vns = ns(&vgs);
            let members: Vec<Value> = st
                .list_objects("", "persistentvolumeclaims")
                .into_iter()
                .filter(|p| ns(p) == vns && sel.matches_json(p.pointer("/metadata/labels")))
                .collect();
            let class = vgs["spec"]["volumeGroupSnapshotClassName"]
                .as_str()
                .map(str::to_string);
            let cls = class.and_then(|c| st.get_object(g, "volumegroupsnapshotclasses", "", &c));
            let Some(cls) = cls else {
                Self::fail(st, &vgs, "VolumeGroupSnapshotClass not found".into());
                continue;
            };
            let driver = cls["driver"].as_str().unwrap_or_default().to_string();
            if !self.driver(&driver).is_some_and(|d| d.group_snapshots) {
                Self::fail(
                    st,
                    &vgs,
                    format!("driver {driver} does not support group snapshots"),
                );
                continue;
            }
            // One instant: every member cut under this one lock hold.
            let mut pairs = Vec::new();
            let mut failed = None;
            for p in &members {
                let sname = format!(
                    "snapshot-{}",
                    &blake3::hash(format!("{}{}", uid(&vgs), name(p)).as_bytes()).to_hex()[..40]
                );
                let member = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                    "metadata": {"name": sname, "namespace": vns,
                        "ownerReferences": [{"apiVersion": format!("{g}/{version}"), "kind": "VolumeGroupSnapshot",
                            "name": name(&vgs), "uid": uid(&vgs), "controller": true}]},
                    "spec": {"source": {"persistentVolumeClaimName": name(p)}}});
                let stored = st.put(member, MANAGER);
                // Cut with the group class's driver; the member's class is the driver's.
                let class = st
                    .list_objects("snapshot.storage.k8s.io", "volumesnapshotclasses")
                    .into_iter()
                    .find(|c| c["driver"] == driver.as_str())
                    .map(|c| name(&c));
                match self.cut(st, &stored, &name(p), class.as_deref()) {
                    Ok(()) => pairs.push(json!({"volumeHandle": format!("vol-{}", uid(p)), "snapshotHandle": format!("snap-{}", uid(&stored))})),
                    Err(m) => failed = Some(m),
                }
            }
            if let Some(m) = failed {
                Self::fail(st, &vgs, m);
                continue;
            }
            let cname = format!("groupsnapcontent-{}", uid(&vgs));
            st.put(
                json!({"apiVersion": format!("{g}/{version}"), "kind": "VolumeGroupSnapshotContent",
                    "metadata": {"name": cname},
                    "spec": {"deletionPolicy": cls["deletionPolicy"].as_str().unwrap_or("Delete"), "driver": driver,
                        "volumeGroupSnapshotClassName": name(&cls),
                        "volumeGroupSnapshotRef": {"namespace": vns, "name": name(&vgs), "uid": uid(&vgs)}},
                    "status": {"creationTime": 1_764_633_600_000_000_000u64, "readyToUse": false,
                        "volumeSnapshotHandlePairList": pairs}}),
                MANAGER,
            );
            let mut v = vgs.clone();
            v["status"] = json!({"boundVolumeGroupSnapshotContentName": cname, "creationTime": now_rfc3339(), "readyToUse": false});
            st.put(v, MANAGER);
        }
    }

    fn ready(&mut self, st: &mut ApiState) {
        if self.hold_ready.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        for vs in st.list_objects("snapshot.storage.k8s.io", "volumesnapshots") {
            let Some(c) = vs["status"]["boundVolumeSnapshotContentName"].as_str() else {
                continue;
            };
            if vs["status"]["readyToUse"] == true || self.ready_at.get(c).is_some_and(|t| *t > now)
            {
                continue;
            }
            if let Some(mut content) =
                st.get_object("snapshot.storage.k8s.io", "volumesnapshotcontents", "", c)
            {
                content["status"]["readyToUse"] = json!(true);
                st.put(content, MANAGER);
            }
            let mut v = vs.clone();
            v["status"]["readyToUse"] = json!(true);
            st.put(v, MANAGER);
        }
        let g = "groupsnapshot.storage.k8s.io";
        for vgs in st.list_objects(g, "volumegroupsnapshots") {
            if vgs["status"]["readyToUse"] != false || !vgs["status"]["error"].is_null() {
                continue;
            }
            let members_ready = st
                .list_objects("snapshot.storage.k8s.io", "volumesnapshots")
                .iter()
                .filter(|s| s["metadata"]["ownerReferences"][0]["uid"].as_str() == Some(&uid(&vgs)))
                .all(|s| s["status"]["readyToUse"] == true);
            if members_ready {
                let mut v = vgs.clone();
                v["status"]["readyToUse"] = json!(true);
                st.put(v, MANAGER);
            }
        }
    }

    /// Contents of deleted snapshots (policy Delete) and their files go; a deleted group
    /// snapshot takes its members and its content.
    fn deleted_snapshots(&mut self, st: &mut ApiState) {
        let g = "groupsnapshot.storage.k8s.io";
        let groups: Vec<String> = st
            .list_objects(g, "volumegroupsnapshots")
            .iter()
            .map(uid)
            .collect();
        for vs in st.list_objects("snapshot.storage.k8s.io", "volumesnapshots") {
            let owner = vs["metadata"]["ownerReferences"][0]["uid"].as_str();
            if owner.is_some_and(|o| !groups.iter().any(|g| g == o)) {
                st.remove(
                    "snapshot.storage.k8s.io",
                    "volumesnapshots",
                    &ns(&vs),
                    &name(&vs),
                );
            }
        }
        for gc in st.list_objects(g, "volumegroupsnapshotcontents") {
            let r = &gc["spec"]["volumeGroupSnapshotRef"];
            if !groups.iter().any(|u| r["uid"].as_str() == Some(u)) {
                st.remove(g, "volumegroupsnapshotcontents", "", &name(&gc));
            }
        }
        for c in st.list_objects("snapshot.storage.k8s.io", "volumesnapshotcontents") {
            let r = &c["spec"]["volumeSnapshotRef"];
            let Some(ruid) = r["uid"].as_str() else {
                continue;
            };
            let live = st
                .get_object(
                    "snapshot.storage.k8s.io",
                    "volumesnapshots",
                    r["namespace"].as_str().unwrap_or(""),
                    r["name"].as_str().unwrap_or(""),
                )
                .is_some_and(|v| uid(&v) == ruid);
            if !live && c["spec"]["deletionPolicy"] == "Delete" {
                if let Some(h) = c["status"]["snapshotHandle"].as_str() {
                    let _ = std::fs::remove_file(h);
                }
                st.remove(
                    "snapshot.storage.k8s.io",
                    "volumesnapshotcontents",
                    "",
                    &name(&c),
                );
            }
        }
    }

    fn jobs(&mut self, st: &mut ApiState) {
        let job_uids: Vec<String> = st.list_objects("batch", "jobs").iter().map(uid).collect();
        // A deleted Job's Pods are killed and removed.
        for pod in st.list_objects("", "pods") {
            let owner = &pod["metadata"]["ownerReferences"][0];
            if owner["kind"] == "Job" && !job_uids.iter().any(|u| owner["uid"].as_str() == Some(u))
            {
                let key = format!("{}/{}", ns(&pod), name(&pod));
                if let Some(mut p) = self.procs.remove(&key) {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    self.pids.lock().unwrap().remove(&key);
                }
                st.remove("", "pods", &ns(&pod), &name(&pod));
            }
        }
        for job in st.list_objects("batch", "jobs") {
            let conds = job["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if conds
                .iter()
                .any(|c| c["type"] == "Complete" || c["type"] == "Failed")
            {
                continue;
            }
            let jns = ns(&job);
            let pods: Vec<Value> = st
                .list_objects("", "pods")
                .into_iter()
                .filter(|p| p["metadata"]["ownerReferences"][0]["uid"].as_str() == Some(&uid(&job)))
                .collect();
            let failed = pods
                .iter()
                .filter(|p| p["status"]["phase"] == "Failed")
                .count() as i64;
            let succeeded = pods.iter().any(|p| p["status"]["phase"] == "Succeeded");
            let active = pods
                .iter()
                .filter(|p| p["status"]["phase"] != "Failed" && p["status"]["phase"] != "Succeeded")
                .count();
            let backoff = job["spec"]["backoffLimit"].as_i64().unwrap_or(6);
            let mut j = job.clone();
            if succeeded {
                j["status"] = json!({"succeeded": 1, "failed": failed, "active": 0,
                    "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]});
                st.put(j, MANAGER);
                continue;
            }
            if failed > backoff {
                j["status"] = json!({"failed": failed, "active": 0,
                    "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]});
                st.put(j, MANAGER);
                continue;
            }
            if active == 0 {
                self.seq += 1;
                let suffix: String = format!("{:05}", self.seq % 100_000)
                    .chars()
                    .map(|c| (b'a' + (c as u8 - b'0')) as char)
                    .collect();
                let mut template = job["spec"]["template"].clone();
                let mut labels = template["metadata"]["labels"].clone();
                if !labels.is_object() {
                    labels = json!({});
                }
                labels["batch.kubernetes.io/job-name"] = json!(name(&job));
                labels["job-name"] = json!(name(&job));
                labels["batch.kubernetes.io/controller-uid"] = json!(uid(&job));
                template["metadata"] = json!({"name": format!("{}-{suffix}", name(&job)), "namespace": jns, "labels": labels,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name(&job), "uid": uid(&job),
                        "controller": true, "blockOwnerDeletion": true}]});
                template["apiVersion"] = json!("v1");
                template["kind"] = json!("Pod");
                template["status"] = json!({"phase": "Pending"});
                st.put(template, MANAGER);
            }
            j["status"] = json!({"failed": failed, "active": active.max(1)});
            st.put(j, MANAGER);
        }
    }

    fn kubelet(&mut self, st: &mut ApiState) {
        // Ended processes end their Pods.
        let keys: Vec<String> = self.procs.keys().cloned().collect();
        for key in keys {
            let ended = self.procs.get_mut(&key).unwrap().child.try_wait().unwrap();
            let Some(status) = ended else { continue };
            let p = self.procs.remove(&key).unwrap();
            self.pids.lock().unwrap().remove(&key);
            let code = status.code().unwrap_or(
                128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
            );
            let message = std::fs::read_to_string(&p.message).unwrap_or_default();
            if let Some(mut pod) = st.get_object("", "pods", &p.ns, &p.name) {
                let phase = if code == 0 { "Succeeded" } else { "Failed" };
                pod["status"]["phase"] = json!(phase);
                pod["status"]["containerStatuses"] = json!([{"name": pod["spec"]["containers"][0]["name"], "ready": false,
                    "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                        "message": message.chars().take(4096).collect::<String>()}}}]);
                st.put(pod, MANAGER);
            }
        }
        for pod in st.list_objects("", "pods") {
            if pod["status"]["phase"] != "Pending"
                || pod["metadata"]["ownerReferences"][0]["kind"] != "Job"
            {
                continue;
            }
            let key = format!("{}/{}", ns(&pod), name(&pod));
            if self.procs.contains_key(&key) {
                continue;
            }
            // Schedule: requests against allocatable, fewest running pods first.
            let c = &pod["spec"]["containers"][0];
            let want = cpu_m(&c["resources"]["requests"]["cpu"]);
            if want > self.opts.node_cpu_m {
                if pod["status"]["conditions"].is_null() {
                    let mut p = pod.clone();
                    p["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": format!("0/{n} nodes are available: {n} Insufficient cpu. preemption: 0/{n} nodes are available: {n} No preemption victims found for incoming pod.", n = self.opts.nodes)}]);
                    st.put(p, MANAGER);
                }
                continue;
            }
            // Volumes must be bound first.
            let mut files: Vec<(String, String)> = Vec::new();
            let dir = self.opts.root.join("pods").join(key.replace('/', "_"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut waiting = false;
            for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
                let vname = v["name"].as_str().unwrap_or_default();
                let device = c["volumeDevices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["name"] == vname);
                let mount = c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["name"] == vname);
                if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                    match backing_file(st, &ns(&pod), claim) {
                        Some(f) => {
                            if let Some(d) = device {
                                files.push((
                                    d["devicePath"].as_str().unwrap().into(),
                                    f.display().to_string(),
                                ));
                            }
                        }
                        None => waiting = true,
                    }
                } else if let Some(secret) = v["secret"]["secretName"].as_str() {
                    let Some(s) = st.get_object("", "secrets", &ns(&pod), secret) else {
                        waiting = true;
                        continue;
                    };
                    let sdir = dir.join(vname);
                    std::fs::create_dir_all(&sdir).unwrap();
                    for (k, val) in s["data"].as_object().into_iter().flatten() {
                        std::fs::write(sdir.join(k), b64_decode(val.as_str().unwrap_or("")))
                            .unwrap();
                    }
                    for (k, val) in s["stringData"].as_object().into_iter().flatten() {
                        std::fs::write(sdir.join(k), val.as_str().unwrap_or("")).unwrap();
                    }
                    let mode = v["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                    for e in std::fs::read_dir(&sdir).unwrap().flatten() {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode))
                            .unwrap();
                    }
                    if let Some(m) = mount {
                        files.push((
                            m["mountPath"].as_str().unwrap().into(),
                            sdir.display().to_string(),
                        ));
                    }
                } else if let Some(sources) = v["projected"]["sources"].as_array() {
                    // Only ServiceAccount tokens: the Pod's account must exist (the
                    // ServiceAccount admission plugin refuses the Pod otherwise).
                    let sa = pod["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default");
                    if st
                        .get_object("", "serviceaccounts", &ns(&pod), sa)
                        .is_none()
                    {
                        waiting = true;
                        continue;
                    }
                    let pdir = dir.join(vname);
                    std::fs::create_dir_all(&pdir).unwrap();
                    for src in sources {
                        let t = &src["serviceAccountToken"];
                        let Some(path) = t["path"].as_str() else {
                            continue;
                        };
                        self.seq += 1;
                        let token = format!("sa-token-{}-{}", self.seq, uid(&pod));
                        self.tokens.lock().unwrap().insert(
                            token.clone(),
                            Issued {
                                namespace: ns(&pod),
                                service_account: sa.to_string(),
                                // No audience: the API server's own.
                                audience: t["audience"].as_str().unwrap_or("api").to_string(),
                            },
                        );
                        std::fs::write(pdir.join(path), token).unwrap();
                    }
                    if let Some(m) = mount {
                        files.push((
                            m["mountPath"].as_str().unwrap().into(),
                            pdir.display().to_string(),
                        ));
                    }
                } else if v["emptyDir"].is_object() {
                    let edir = dir.join(vname);
                    std::fs::create_dir_all(&edir).unwrap();
                    if let Some(m) = mount {
                        files.push((
                            m["mountPath"].as_str().unwrap().into(),
                            edir.display().to_string(),
                        ));
                    }
                }
            }
            if waiting {
                continue;
            }
            let message = dir.join("termination-log");
            let tpath = c["terminationMessagePath"]
                .as_str()
                .unwrap_or("/dev/termination-log")
                .to_string();
            files.push((tpath, message.display().to_string()));
            let node = {
                let names = node_names(self.opts.nodes);
                let mut running: BTreeMap<&str, usize> =
                    names.iter().map(|n| (n.as_str(), 0)).collect();
                for p in st.list_objects("", "pods") {
                    if p["status"]["phase"] == "Running" {
                        if let Some(n) = p["spec"]["nodeName"].as_str() {
                            if let Some(c) = running.get_mut(n) {
                                *c += 1;
                            }
                        }
                    }
                }
                let last = self
                    .scheduled
                    .lock()
                    .unwrap()
                    .last()
                    .map(|(_, n)| n.clone());
                let mut nodes: Vec<(&str, usize)> = running.into_iter().collect();
                nodes.sort_by_key(|(n, c)| (*c, Some(n.to_string()) == last));
                nodes[0].0.to_string()
            };
            let mut p = pod.clone();
            p["spec"]["nodeName"] = json!(node);
            if c["image"].as_str() != Some(&self.opts.image) {
                p["status"] = json!({"phase": "Pending", "containerStatuses": [{"name": c["name"], "ready": false,
                    "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "only the lifeboat image runs here"}}}]});
                st.put(p, MANAGER);
                continue;
            }
            let sub = |s: &str| {
                let mut s = s.to_string();
                // Longest paths first, so a path inside another is not cut.
                let mut f = files.clone();
                f.sort_by_key(|(a, _)| std::cmp::Reverse(a.len()));
                for (from, to) in &f {
                    s = s.replace(from.as_str(), to);
                }
                s
            };
            let args: Vec<String> = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| sub(a.as_str().unwrap_or("")))
                .collect();
            let log = std::fs::File::create(dir.join("log")).unwrap();
            let child = Command::new(&self.opts.binary)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            self.pids.lock().unwrap().insert(key.clone(), child.id());
            self.scheduled.lock().unwrap().push((key.clone(), node));
            self.procs.insert(
                key,
                Proc {
                    child,
                    message,
                    ns: ns(&pod),
                    name: name(&pod),
                },
            );
            self.peak.fetch_max(self.procs.len(), Ordering::SeqCst);
            p["status"] = json!({"phase": "Running", "hostIP": "10.0.0.1", "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{"name": c["name"], "ready": true, "state": {"running": {"startedAt": now_rfc3339()}}}]});
            st.put(p, MANAGER);
        }
    }
}
