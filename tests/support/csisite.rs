//! A pair of sites for the CSI data path (tests/csi.rs, benches/csi.rs): the primary's
//! API server with its cluster ([`super::cluster`]: a CSI driver, snapshot controller,
//! kubelet running mover Jobs as processes), a storage class and snapshot classes, the
//! PVCs of a [`Spec`] filled with random bytes, the RBAC `lifeboat rbac` makes for the
//! config, the movers' TLS Secret, and both daemons over real QUIC and TLS. The DR site has
//! a cluster of its own (`dr_csi`): replica PVCs written by writer Jobs and snapshotted
//! into recovery points; otherwise it writes host-path replicas under
//! `replicas/{namespace}/{pvc}.img`.
#![allow(dead_code)]

use std::path::PathBuf;

use super::cluster::{Cluster, Driver, Options};
use super::kubeapi::KubeApi;
use super::{random_file, Pair, PairOptions};

pub const DRIVER: &str = "rbd.csi.test";
pub const IMAGE: &str = "lifeboat:test";

/// What the sites hold.
pub struct Spec {
    /// PVCs of the namespace `prod`.
    pub pvcs: Vec<String>,
    /// Those of them in Block mode (the others are Filesystem).
    pub block: Vec<String>,
    pub size: u64,
    /// A VolumeGroupSnapshotClass for the driver.
    pub group_class: bool,
    /// More lines of `[protection.kubernetes.mover]`.
    pub mover: String,
    pub snapshots: bool,
    /// More lines of the primary's `[kubernetes]`.
    pub kube_lines: String,
    pub nodes: usize,
    pub concurrency: usize,
    /// The DR site's replicas are PVCs of its own cluster (else host-path files).
    pub dr_csi: bool,
    /// More lines of the DR site's `[protection]` (after its name), e.g. `keep = 5`.
    pub dr_protection: String,
    /// The primary's driver offers changed block tracking: a SnapshotMetadata service
    /// ([`super::cbt`]), its volumes on XFS so snapshots share extents.
    pub cbt: bool,
}

/// The audience of the stand-in SnapshotMetadata service.
pub const CBT_AUDIENCE: &str = "rbd-cbt";

/// A cluster's storage and snapshot classes of the driver (the DR cluster's are its
/// replicas').
fn classes(spec: &Spec) -> String {
    let mut docs = vec![format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: fast}}
provisioner: {DRIVER}
reclaimPolicy: Delete
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: rbd-snap
  annotations: {{snapshot.storage.kubernetes.io/is-default-class: "true"}}
driver: {DRIVER}
deletionPolicy: Delete
"#
    )];
    if spec.group_class {
        docs.push(format!(
            "apiVersion: groupsnapshot.storage.k8s.io/v1beta1\nkind: VolumeGroupSnapshotClass\nmetadata: {{name: rbd-group}}\ndriver: {DRIVER}\ndeletionPolicy: Delete\n"
        ));
    }
    docs.join("---\n")
}

fn fixtures(spec: &Spec) -> String {
    let mut docs = vec![
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n".to_string(),
        classes(spec),
    ];
    let size = spec.size;
    for p in &spec.pvcs {
        let mode = if spec.block.contains(p) {
            "Block"
        } else {
            "Filesystem"
        };
        docs.push(format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {p}, namespace: prod}}\nspec: {{accessModes: [ReadWriteOnce], storageClassName: fast, volumeMode: {mode}, resources: {{requests: {{storage: {size}}}}}}}\n"
        ));
    }
    docs.join("---\n")
}

pub struct Sites {
    pub pair: Pair,
    pub primary_api: KubeApi,
    pub dr_api: KubeApi,
    pub cluster: Cluster,
    /// The DR site's cluster (`dr_csi`).
    pub dr_cluster: Option<Cluster>,
    pub cbt: Option<super::cbt::MetadataService>,
    _xfs: Option<super::relay::Xfs>,
    _kdir: tempfile::TempDir,
}

impl Sites {
    /// Both API servers, the primary's cluster with its CSI driver, the fixtures and RBAC,
    /// every PVC provisioned and filled, and the pair started.
    pub fn start(spec: &Spec) -> Sites {
        let kdir = tempfile::tempdir().unwrap();
        let primary_api = KubeApi::start(kdir.path(), "primary");
        let dr_api = KubeApi::start(kdir.path(), "dr");
        // Changed block tracking compares extents: the primary's volumes on a reflink file
        // system.
        let xfs = spec.cbt.then(|| {
            super::relay::Xfs::mount(
                &kdir.path().join("xfs.img"),
                &kdir.path().join("xfs"),
                2 << 30,
            )
            .expect("an XFS file system for the CBT stand-in")
        });
        let csi_root = xfs.as_ref().map_or(kdir.path(), |x| &x.mnt).join("csi");
        let options = |root: PathBuf, snapshots: bool| Options {
            root,
            drivers: vec![Driver {
                name: DRIVER.into(),
                snapshots,
                group_snapshots: true,
                ready_delay: std::time::Duration::from_millis(200),
            }],
            binary: PathBuf::from(env!("CARGO_BIN_EXE_lifeboat")),
            image: IMAGE.into(),
            node_cpu_m: 2000,
            nodes: spec.nodes,
            group_version: "v1beta1",
        };
        let cluster = Cluster::start(&primary_api, options(csi_root.clone(), spec.snapshots));
        let cbt = spec.cbt.then(|| {
            super::cbt::MetadataService::start(
                &primary_api,
                cluster.tokens.clone(),
                DRIVER,
                CBT_AUDIENCE,
            )
        });
        let dr_cluster = spec
            .dr_csi
            .then(|| Cluster::start(&dr_api, options(kdir.path().join("dr-csi"), true)));
        let kube = |api: &KubeApi| {
            format!(
                "[kubernetes]\nkubeconfig = \"{}\"\n",
                api.kubeconfig.display()
            )
        };
        let primary_sel = format!(
        "[protection.kubernetes]\nnamespaces = [\"prod\"]\n[protection.kubernetes.mover]\nimage = \"{IMAGE}\"\nconcurrency = {}\n{}\n",
        spec.concurrency, spec.mover
    );
        let mut pair = Pair::new(PairOptions {
            volumes: vec![],
            start: false,
            primary_tail: format!("{primary_sel}{}{}\n", kube(&primary_api), spec.kube_lines),
            dr_protection: spec.dr_protection.clone(),
            dr_tail: if spec.dr_csi {
                format!(
                    "[protection.kubernetes]\n[protection.kubernetes.mover]\nimage = \"{IMAGE}\"\nconcurrency = {}\n{}\n{}",
                    spec.concurrency,
                    spec.mover,
                    kube(&dr_api)
                )
            } else {
                format!(
                    "[protection.kubernetes]\nvolume_path = \"replicas/{{namespace}}/{{pvc}}.img\"\n{}",
                    kube(&dr_api)
                )
            },
            ..Default::default()
        });
        // The RBAC `lifeboat rbac` makes for this config, as an administrator applied it.
        let cfg = lifeboat::config::load(&pair.dir.path().join("primary.toml")).unwrap();
        let kps: Vec<_> = cfg
            .protections
            .iter()
            .filter_map(|p| p.kubernetes.as_ref())
            .collect();
        let rbac = lifeboat::k8s::rbac::generate(
            &kps,
            &lifeboat::k8s::rbac::RbacOptions {
                service_account: ("lifeboat".into(), "lifeboat".into()),
                bind_cluster_roles: vec![],
            },
        )
        .unwrap();
        for v in rbac.primary {
            primary_api.seed(v);
        }
        for v in rbac.dr {
            dr_api.seed(v);
        }
        primary_api.create_yaml(&fixtures(spec));
        // The primary's pair TLS, as the Secret the movers mount.
        let certs = pair.dir.path().join("certs");
        let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
        primary_api.seed(serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "lifeboat-tls", "namespace": "lifeboat"},
        "stringData": {"ca.pem": read("ca.pem"), "site.pem": read("primary.pem"), "site.key": read("primary.key")}}));
        if spec.dr_csi {
            dr_api.create_yaml(&classes(spec));
            // The DR site's own pair TLS, which its writers present to it.
            dr_api.seed(serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "lifeboat-tls", "namespace": "lifeboat"},
            "stringData": {"ca.pem": read("ca.pem"), "site.pem": read("dr.pem"), "site.key": read("dr.key")}}));
        }
        // Every PVC provisioned, with data.
        for (i, p) in spec.pvcs.iter().enumerate() {
            let f = wait_for(|| Cluster::backing_file(&primary_api, "prod", p));
            random_file(&f, spec.size, 900 + i as u64);
        }
        pair.start();
        Sites {
            pair,
            primary_api,
            dr_api,
            cluster,
            dr_cluster,
            cbt,
            _xfs: xfs,
            _kdir: kdir,
        }
    }
}

/// `f`'s value once it has one (30 s at most).
pub fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
