//! A mover Job, the pure part: what the daemon creates for one cut volume in the movers'
//! namespace (a pre-provisioned content showing the snapshot there, a Block PVC restored
//! from it, the Job that runs `lifeboat mover` on it) and what the mover reports back (its
//! termination message), the contract between the daemon and the mover.

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::cut::Cut;
use super::snapshot::{self, object_name, VolumeMode};
use super::MoverSettings;
use crate::ids::{ChunkHash, CycleId, Gen};

/// Lets a Block-mode PVC be restored from a Filesystem-mode snapshot (external-provisioner
/// refuses a mode change without it, on the content).
pub const ALLOW_MODE_CHANGE: &str = "snapshot.storage.kubernetes.io/allow-volume-mode-change";
/// Where the mover sees its device and TLS material.
const DEVICE: &str = "/dev/lifeboat-source";
/// The base gen's snapshot, read for refinement.
const BASE_DEVICE: &str = "/dev/lifeboat-base";
pub(super) const TLS_DIR: &str = "/etc/lifeboat/tls";
const SCRATCH: &str = "/scratch";
/// The projected ServiceAccount token for the SnapshotMetadata service.
const CBT_TOKEN_DIR: &str = "/var/run/lifeboat/cbt";
/// Tokens live 10 minutes (the shortest the API allows); the kubelet renews them.
const CBT_TOKEN_SECONDS: u64 = 600;

/// A mover's result, as the daemon reads it from the termination message (at most 4 KiB).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub volume: String,
    pub size: u64,
    pub chunk_size: u32,
    /// The volume's root over all chunk hashes, hex.
    pub root: String,
    pub chunks: u64,
    pub chunks_changed: u64,
    pub bytes_scanned: u64,
    pub bytes_changed: u64,
    pub chunk_bytes_sent: u64,
    pub zero_chunks_sent: u64,
    pub hash_bytes_received: u64,
    /// Changed chunks sent as their changed blocks, and the bytes that saved.
    #[serde(default)]
    pub refined_chunks: u64,
    #[serde(default)]
    pub refine_saved_bytes: u64,
    /// Bytes read from the device (the scan's and the changed block check's).
    #[serde(default)]
    pub bytes_read: u64,
    /// Changed block tracking: `delta` or `allocated` (only the ranges the driver's
    /// SnapshotMetadata service reported were read), `full` (it was asked, but its answer
    /// failed or did not hold: see `cbt_fallback`), empty (not offered).
    #[serde(default)]
    pub cbt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_fallback: Option<String>,
    /// The answer left out a chunk that had changed (a lying or broken tracker).
    #[serde(default)]
    pub cbt_mismatch: bool,
    #[serde(default)]
    pub cbt_ranges: u64,
}

impl Outcome {
    pub fn root_hash(&self) -> Result<ChunkHash> {
        let b = self.root.as_bytes();
        anyhow::ensure!(b.len() == 64, "root {:?} is not 64 hex digits", self.root);
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let s = std::str::from_utf8(&b[i * 2..i * 2 + 2])?;
            *o = u8::from_str_radix(s, 16).with_context(|| format!("root {:?}", self.root))?;
        }
        Ok(ChunkHash(out))
    }
}

/// The movers' parameters (pure).
pub struct Spec<'a> {
    pub protection: String,
    pub gen: Gen,
    pub cycle: CycleId,
    pub settings: &'a MoverSettings,
    /// The DR site's peer address and certificate name, and this site's name.
    pub peer: String,
    pub server_name: String,
    pub site: String,
    pub chunk_size: u32,
    pub compress: bool,
    pub refine: bool,
    /// The drivers' SnapshotMetadata services (changed block tracking), by driver.
    pub cbt: std::collections::BTreeMap<String, super::cbt::Service>,
}

/// The names of one snapshot's copy in the movers' namespace and the PVC restored from it.
pub struct Restored {
    pub content: String,
    pub snapshot: String,
    pub pvc: String,
}

/// The names of one volume's mover objects: its snapshot's restore, the base gen's (for
/// refinement), and the Job.
pub struct Names {
    pub source: Restored,
    pub base: Restored,
    pub job: String,
}

pub fn names(m: &Spec<'_>, cut: &Cut) -> Names {
    let what = format!("{}-{}", cut.pvc.namespace, cut.pvc.name);
    let restored = |what: &str| Restored {
        content: object_name(&m.protection, m.gen, &format!("{what}-src"), 253),
        snapshot: object_name(&m.protection, m.gen, what, 253),
        pvc: object_name(&m.protection, m.gen, what, 253),
    };
    // Job names become a label value of their Pods: 63 at most.
    Names {
        source: restored(&what),
        base: restored(&format!("{what}-base")),
        job: object_name(&m.protection, m.gen, &what, 52),
    }
}

/// A snapshot's copy in the movers' namespace and the Block PVC restored from it, pure.
fn restore_objects(m: &Spec<'_>, cut: &Cut, n: &Restored) -> Result<([Value; 3], u64)> {
    let ns = &m.settings.namespace;
    let labels = snapshot::labels_for(&m.protection, m.gen);
    let handle = cut
        .handle
        .as_deref()
        .ok_or_else(|| anyhow!("snapshot of PVC {} has no handle", cut.pvc.id()))?;
    let size = cut
        .restore_size
        .ok_or_else(|| anyhow!("snapshot of PVC {} has no restore size", cut.pvc.id()))?;
    let driver = cut
        .pvc
        .driver
        .as_deref()
        .ok_or_else(|| anyhow!("PVC {} has no CSI driver", cut.pvc.id()))?;
    let mut annotations = json!({});
    if cut.pvc.mode == VolumeMode::Filesystem {
        annotations[ALLOW_MODE_CHANGE] = json!("true");
    }
    let content = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": n.content, "labels": labels, "annotations": annotations},
        "spec": {
            // The driver snapshot belongs to the application's VolumeSnapshot: this
            // content only shows it in the movers' namespace, and must never delete it.
            "deletionPolicy": "Retain",
            "driver": driver,
            "source": {"snapshotHandle": handle},
            "sourceVolumeMode": cut.pvc.mode.as_str(),
            "volumeSnapshotRef": {"namespace": ns, "name": n.snapshot},
        },
    });
    let vs = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": n.snapshot, "namespace": ns, "labels": labels},
        "spec": {"source": {"volumeSnapshotContentName": n.content}},
    });
    let mut pvc = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": n.pvc, "namespace": ns, "labels": labels},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Block",
            "resources": {"requests": {"storage": size.to_string()}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": n.snapshot},
        },
    });
    if let Some(sc) = &cut.pvc.storage_class {
        pvc["spec"]["storageClassName"] = json!(sc);
    }
    Ok(([content, vs, pvc], size))
}

/// The objects of one volume's mover in creation order, pure: its snapshot's restore, the
/// base gen's `base` (with refinement) and the Job.
pub fn objects(m: &Spec<'_>, cut: &Cut, base: Option<&Cut>, n: &Names) -> Result<Vec<Value>> {
    let labels = snapshot::labels_for(&m.protection, m.gen);
    let (mut out, size) = restore_objects(m, cut, &n.source).map(|(o, s)| (o.to_vec(), s))?;
    let mut args = vec![
        "mover".to_string(),
        format!("--device={DEVICE}"),
        format!("--size={size}"),
        format!("--peer={}", m.peer),
        format!("--server-name={}", m.server_name),
        format!("--site={}", m.site),
        format!("--tls-dir={TLS_DIR}"),
        format!("--protection={}", m.protection),
        format!("--cycle={}", m.cycle),
        format!("--volume={}", cut.pvc.volume),
        format!("--chunk-size={}", m.chunk_size),
        format!("--scratch={SCRATCH}"),
        format!("--stall-after={}s", m.settings.stuck_after.as_secs().max(1)),
        "--result=/dev/termination-log".to_string(),
    ];
    if m.compress {
        args.push("--compress".into());
    }
    let mut devices = vec![JobDevice {
        name: "device",
        path: DEVICE,
        claim: &n.source.pvc,
        read_only: true,
    }];
    if m.refine {
        args.push("--refine".into());
        if let Some(base) = base {
            out.extend(restore_objects(m, base, &n.base)?.0);
            args.push(format!("--base-device={BASE_DEVICE}"));
            devices.push(JobDevice {
                name: "base",
                path: BASE_DEVICE,
                claim: &n.base.pvc,
                read_only: true,
            });
        }
    }
    let service = (m.settings.cbt)
        .then(|| cut.pvc.driver.as_ref().and_then(|d| m.cbt.get(d)))
        .flatten();
    let mut job = job_object(&n.job, &labels, m.settings, args, &devices);
    if let Some(service) = service {
        cbt_access(&mut job, m, service, &n.source.snapshot, base);
    }
    out.push(job);
    Ok(out)
}

/// Lets a mover call the SnapshotMetadata service: its arguments (the movers' copy of the
/// snapshot as the target, the base gen's handle for a delta) and a token of the movers'
/// ServiceAccount projected with the service's audience (a short-lived token the kubelet
/// renews; no Secret, no API access: the Pod still mounts no API token).
fn cbt_access(
    job: &mut Value,
    m: &Spec<'_>,
    s: &super::cbt::Service,
    target: &str,
    base: Option<&Cut>,
) {
    let pod = &mut job["spec"]["template"]["spec"];
    pod["serviceAccountName"] = json!(m.settings.service_account);
    pod["volumes"].as_array_mut().expect("volumes").push(json!({
        "name": "cbt-token",
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": s.audience, "expirationSeconds": CBT_TOKEN_SECONDS, "path": "token",
        }}]},
    }));
    let c = &mut pod["containers"][0];
    c["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "cbt-token", "mountPath": CBT_TOKEN_DIR, "readOnly": true}));
    let args = c["args"].as_array_mut().expect("args");
    let mut push = |a: String| args.push(json!(a));
    push(format!("--cbt-address={}", s.address));
    push(format!("--cbt-ca={}", s.ca_cert));
    push(format!("--cbt-token={CBT_TOKEN_DIR}/token"));
    push(format!("--cbt-namespace={}", m.settings.namespace));
    push(format!("--cbt-snapshot={target}"));
    push(format!("--cbt-sample={}", m.settings.cbt_sample));
    if let Some(h) = base.and_then(|b| b.handle.as_deref()) {
        push(format!("--cbt-base-id={h}"));
    }
}

/// The PVC a mover or writer Job attaches as a raw device.
pub(super) struct JobDevice<'a> {
    /// The pod's volume name.
    pub name: &'a str,
    pub path: &'a str,
    pub claim: &'a str,
    pub read_only: bool,
}

/// A Job running `lifeboat` with `args` under the restricted Pod Security level: non-root,
/// no privilege, the device through volumeDevices (no hostPath), the site's pair TLS from
/// its Secret, no service-account token.
pub(super) fn job_object(
    name: &str,
    labels: &Value,
    s: &MoverSettings,
    args: Vec<String>,
    devices: &[JobDevice<'_>],
) -> Value {
    let ns = &s.namespace;
    let mut volumes: Vec<Value> = devices
        .iter()
        .map(|d| json!({"name": d.name, "persistentVolumeClaim": {"claimName": d.claim, "readOnly": d.read_only}}))
        .collect();
    volumes
        .push(json!({"name": "tls", "secret": {"secretName": s.tls_secret, "defaultMode": 288}}));
    volumes.push(json!({"name": "scratch", "emptyDir": {}}));
    let mut limits = json!({"memory": s.memory_limit});
    if let Some(c) = &s.cpu_limit {
        limits["cpu"] = json!(c);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "mover",
                        "image": s.image,
                        "command": ["lifeboat"],
                        "args": args,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "resources": {"requests": {"cpu": s.cpu, "memory": s.memory}, "limits": limits},
                        "securityContext": {
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeDevices": devices
                            .iter()
                            .map(|d| json!({"name": d.name, "devicePath": d.path}))
                            .collect::<Vec<_>>(),
                        "volumeMounts": [
                            {"name": "tls", "mountPath": TLS_DIR, "readOnly": true},
                            {"name": "scratch", "mountPath": SCRATCH},
                        ],
                    }],
                    "volumes": volumes,
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::snapshot::Pvc;

    #[test]
    fn a_mover_runs_restricted_with_its_device_and_the_mode_change_allowed() {
        let settings = MoverSettings::default();
        let client_free = |cut: &Cut, base: Option<&Cut>| {
            let m = Spec {
                protection: "shop".into(),
                gen: Gen(3),
                cycle: CycleId(0xabc),
                settings: &settings,
                peer: "dr.example:7420".into(),
                server_name: "dr".into(),
                site: "primary".into(),
                chunk_size: 65536,
                compress: true,
                refine: true,
                cbt: Default::default(),
            };
            let n = names(&m, cut);
            objects(&m, cut, base, &n).unwrap()
        };
        let mut cut = Cut {
            pvc: Pvc {
                namespace: "db".into(),
                name: "data-0".into(),
                volume: "db-dr.data-0".into(),
                storage_class: Some("fast".into()),
                mode: VolumeMode::Filesystem,
                pv: Some("pv-1".into()),
                driver: Some("rbd.csi.ceph.com".into()),
                phase: "Bound".into(),
            },
            snapshot: "s".into(),
            content: Some("c".into()),
            handle: Some("snap-123".into()),
            restore_size: Some(1 << 30),
        };
        let [content, _vs, pvc, job] = <[Value; 4]>::try_from(client_free(&cut, None)).unwrap();
        assert_eq!(
            content["metadata"]["annotations"][ALLOW_MODE_CHANGE],
            "true"
        );
        assert_eq!(content["spec"]["deletionPolicy"], "Retain");
        assert_eq!(content["spec"]["source"]["snapshotHandle"], "snap-123");
        assert_eq!(pvc["spec"]["volumeMode"], "Block");
        assert_eq!(pvc["spec"]["storageClassName"], "fast");
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let c = &pod["containers"][0];
        assert_eq!(c["volumeDevices"][0]["devicePath"], DEVICE);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert!(!pod["volumes"].to_string().contains("hostPath"));
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.contains(&"--volume=db-dr.data-0") && args.contains(&"--cycle=0000000000000abc")
        );
        assert!(job["metadata"]["name"].as_str().unwrap().len() <= 52);
        // With the base gen's snapshot: it is restored too and attached read-only as the
        // mover's base device.
        let mut base = cut.clone();
        base.handle = Some("snap-122".into());
        let objs = client_free(&cut, Some(&base));
        assert_eq!(objs.len(), 7);
        assert_eq!(objs[3]["spec"]["source"]["snapshotHandle"], "snap-122");
        assert_ne!(objs[3]["metadata"]["name"], objs[0]["metadata"]["name"]);
        let job = &objs[6];
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["volumeDevices"][1]["devicePath"], BASE_DEVICE);
        assert!(c["args"]
            .to_string()
            .contains("--base-device=/dev/lifeboat-base"));
        let vols = &job["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            vols[1]["persistentVolumeClaim"]["claimName"],
            objs[5]["metadata"]["name"]
        );
        assert_eq!(vols[1]["persistentVolumeClaim"]["readOnly"], true);
        // A Block source needs no mode change.
        cut.pvc.mode = VolumeMode::Block;
        let content = &client_free(&cut, None)[0];
        assert!(content["metadata"]["annotations"][ALLOW_MODE_CHANGE].is_null());
    }

    #[test]
    fn with_a_snapshot_metadata_service_the_mover_gets_its_address_and_an_audience_token() {
        let settings = MoverSettings::default();
        let service = crate::k8s::cbt::Service {
            address: "sms.rbd:6443".into(),
            audience: "rbd-cbt".into(),
            ca_cert: "Q0E=".into(),
        };
        let m = Spec {
            protection: "shop".into(),
            gen: Gen(3),
            cycle: CycleId(1),
            settings: &settings,
            peer: "dr:7420".into(),
            server_name: "dr".into(),
            site: "primary".into(),
            chunk_size: 65536,
            compress: false,
            refine: false,
            cbt: [("rbd.csi.ceph.com".to_string(), service)].into(),
        };
        let cut = Cut {
            pvc: Pvc {
                namespace: "db".into(),
                name: "data-0".into(),
                volume: "db.data-0".into(),
                storage_class: None,
                mode: VolumeMode::Block,
                pv: None,
                driver: Some("rbd.csi.ceph.com".into()),
                phase: "Bound".into(),
            },
            snapshot: "s".into(),
            content: Some("c".into()),
            handle: Some("snap-9".into()),
            restore_size: Some(1 << 20),
        };
        let mut base = cut.clone();
        base.handle = Some("snap-8".into());
        let n = names(&m, &cut);
        let objs = objects(&m, &cut, Some(&base), &n).unwrap();
        let pod = &objs.last().unwrap()["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "lifeboat-mover");
        // Still no API token: only the audience-scoped one.
        assert_eq!(pod["automountServiceAccountToken"], false);
        let token = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "cbt-token")
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "rbd-cbt"
        );
        let args = pod["containers"][0]["args"].to_string();
        for a in [
            "--cbt-address=sms.rbd:6443",
            "--cbt-base-id=snap-8",
            "--cbt-namespace=lifeboat",
            &format!("--cbt-snapshot={}", n.source.snapshot),
            "--cbt-token=/var/run/lifeboat/cbt/token",
        ] {
            assert!(args.contains(a), "{a} not in {args}");
        }
        // Another driver's PVC, or cbt = false: no access at all.
        let mut other = cut.clone();
        other.pvc.driver = Some("ebs.csi.aws.com".into());
        let objs = objects(&m, &other, None, &names(&m, &other)).unwrap();
        let pod = &objs.last().unwrap()["spec"]["template"]["spec"];
        assert!(pod["serviceAccountName"].is_null());
        assert!(!pod.to_string().contains("cbt"));
    }
}
