//! Kubernetes mode end to end: two real daemons, each talking through the real `kube` client
//! over real HTTP to its own test API server (tests/support/kubeapi.rs). The primary's
//! server holds a `prod` namespace with Cassandra (a 3-replica StatefulSet with claim
//! templates) and two MySQL Deployments; the DR site's server starts with only what its
//! administrator applied: the shipped RBAC (deploy/kubernetes/dr/rbac.yaml, which
//! pre-creates the DR namespaces). Both servers authorize every request of the daemons
//! against the shipped RBAC of their site (tests/support/rbac.rs).

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::kubeapi::{ExecCall, ExecResult, KubeApi};
use support::{b3, random_file, Pair, PairOptions, PROT};

const FIXTURES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: data}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: cassandra, namespace: prod}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: mysql, namespace: prod}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: prod}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: kube-root-ca.crt, namespace: prod}
data: {ca.crt: "cluster specific"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cassandra-seeds, namespace: prod}
rules: [{apiGroups: [""], resources: [endpoints], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: cassandra-seeds, namespace: prod}
subjects: [{kind: ServiceAccount, name: cassandra, namespace: prod}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cassandra-seeds}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: mysql-view, namespace: prod}
subjects: [{kind: ServiceAccount, name: mysql, namespace: prod}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: shelf, namespace: prod}
spec: {size: 3}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cassandra-env, namespace: prod, labels: {app: cassandra}}
data: {MAX_HEAP_SIZE: 512M}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: mysql-cnf, namespace: prod}
data: {my.cnf: "[mysqld]\nmax_connections=200\n"}
---
apiVersion: v1
kind: Secret
metadata: {name: mysql-root, namespace: prod}
type: Opaque
stringData: {password: hunter2}
---
apiVersion: v1
kind: Secret
metadata: {name: mysql-token-x7k2, namespace: prod}
type: kubernetes.io/service-account-token
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: cassandra, namespace: prod, labels: {app: cassandra}}
spec:
  replicas: 3
  serviceName: cassandra
  selector: {matchLabels: {app: cassandra}}
  template:
    metadata: {labels: {app: cassandra}}
    spec:
      serviceAccountName: cassandra
      containers:
      - name: cassandra
        image: cassandra:4.1
        envFrom: [{configMapRef: {name: cassandra-env}}]
        volumeMounts: [{name: data, mountPath: /var/lib/cassandra}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], storageClassName: fast, resources: {requests: {storage: 1Gi}}}
---
apiVersion: v1
kind: Service
metadata: {name: cassandra, namespace: prod, labels: {app: cassandra}}
spec: {clusterIP: None, selector: {app: cassandra}, ports: [{port: 9042}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: mysql-backup, namespace: prod, labels: {app: mysql}}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: mysql-backup}}
        spec:
          restartPolicy: OnFailure
          containers: [{name: dump, image: "mysql:8.4", command: [mysqldump, --all-databases]}]
"#;

fn mysql(instance: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: mysql-{instance}-data
  namespace: prod
  annotations: {{pv.kubernetes.io/bind-completed: "yes"}}
spec: {{accessModes: [ReadWriteOnce], storageClassName: fast, volumeName: pvc-mysql-{instance}, resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: mysql-{instance}, namespace: prod, labels: {{app: mysql}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: mysql, instance: "{instance}"}}}}
  template:
    metadata: {{labels: {{app: mysql, instance: "{instance}"}}}}
    spec:
      serviceAccountName: mysql
      containers:
      - name: mysql
        image: "mysql:8.4"
        env:
        - {{name: MYSQL_ROOT_PASSWORD, valueFrom: {{secretKeyRef: {{name: mysql-root, key: password}}}}}}
        - {{name: REPLICA_OF, value: "mysql-a.prod.svc.cluster.local"}}
        volumeMounts: [{{name: data, mountPath: /var/lib/mysql}}, {{name: cnf, mountPath: /etc/mysql/conf.d}}]
      volumes:
      - {{name: data, persistentVolumeClaim: {{claimName: mysql-{instance}-data}}}}
      - {{name: cnf, configMap: {{name: mysql-cnf}}}}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: mysql-{instance}-5d8f
  namespace: prod
  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: mysql-{instance}, uid: u-{instance}, controller: true}}]
spec:
  replicas: 1
  selector: {{matchLabels: {{app: mysql, instance: "{instance}"}}}}
  template:
    metadata: {{labels: {{app: mysql, instance: "{instance}"}}}}
    spec: {{containers: [{{name: mysql, image: "mysql:8.4"}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: mysql-{instance}-5d8f-abcde
  namespace: prod
  labels: {{app: mysql, instance: "{instance}"}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: mysql-{instance}-5d8f, uid: rs-{instance}, controller: true}}]
spec:
  nodeName: node-2
  containers: [{{name: mysql, image: "mysql:8.4"}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: mysql-{instance}-data}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: mysql-{instance}, namespace: prod, labels: {{app: mysql}}}}
spec: {{clusterIP: 10.96.0.{n}, clusterIPs: [10.96.0.{n}], selector: {{app: mysql, instance: "{instance}"}}, ports: [{{port: 3306}}]}}
"#,
        n = if instance == "a" { 21 } else { 22 }
    )
}

fn cassandra_pod(i: u32) -> String {
    format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data-cassandra-{i}
  namespace: prod
  labels: {{app: cassandra}}
spec: {{accessModes: [ReadWriteOnce], storageClassName: fast, volumeName: pvc-cass-{i}, resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: cassandra-{i}
  namespace: prod
  labels: {{app: cassandra}}
  ownerReferences: [{{apiVersion: apps/v1, kind: StatefulSet, name: cassandra, uid: sts-uid, controller: true}}]
spec:
  nodeName: node-{i}
  serviceAccountName: cassandra
  containers: [{{name: cassandra, image: "cassandra:4.1"}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: data-cassandra-{i}}}}}]
"#
    )
}

const ALL_PVCS: [&str; 5] = [
    "data-cassandra-0",
    "data-cassandra-1",
    "data-cassandra-2",
    "mysql-a-data",
    "mysql-b-data",
];

struct Sites {
    pair: Pair,
    primary_api: KubeApi,
    dr_api: KubeApi,
    _kdir: tempfile::TempDir,
}

const PRIMARY_RBAC: &str = include_str!("../deploy/kubernetes/primary/rbac.yaml");
const DR_RBAC: &str = include_str!("../deploy/kubernetes/dr/rbac.yaml");

/// A site's shipped RBAC, as its file says to apply it: the per-namespace objects (written
/// for the example namespace `prod`) once per namespace in `namespaces`, and the rule the
/// file documents for the declared custom resource (the fixtures' `widgets.example.com`)
/// added to its ClusterRole with the verbs `verbs`.
fn shipped_rbac(file: &str, namespaces: &[&str], role: &str, verbs: &[&str]) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(file).unwrap();
    let mut out = Vec::new();
    for mut d in docs.into_iter().filter(|d| !d.is_null()) {
        let drill = d["metadata"]["namespace"] == "prod-drill"
            || (d["kind"] == "Namespace" && d["metadata"]["name"] == "prod-drill");
        let per_ns = drill
            || d["metadata"]["namespace"] == "prod"
            || (d["kind"] == "Namespace" && d["metadata"]["name"] == "prod");
        if d["kind"] == "ClusterRole" && d["metadata"]["name"] == role && !verbs.is_empty() {
            d["rules"].as_array_mut().unwrap().push(serde_json::json!(
                {"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": verbs}));
        }
        if !per_ns {
            out.push(d);
            continue;
        }
        for ns in namespaces {
            let mut c = d.clone();
            let ns = if drill {
                format!("{ns}-drill")
            } else {
                ns.to_string()
            };
            if c["kind"] == "Namespace" {
                c["metadata"]["name"] = ns.into();
            } else {
                c["metadata"]["namespace"] = ns.into();
            }
            out.push(c);
        }
    }
    out
}

/// The DR RBAC as the shipped file says to change it for host-path replicas
/// (`volume_path`): lifeboat-dr-cluster grants PersistentVolumes instead of snapshots, and
/// there are no drill namespaces (drills of files copy them at the DR host).
fn host_path_dr(mut docs: Vec<Value>) -> Vec<Value> {
    docs.retain(|d| {
        let named = d["metadata"]["namespace"].as_str().or(d["metadata"]["name"]
            .as_str()
            .filter(|_| d["kind"] == "Namespace"));
        !named.is_some_and(|n| n.ends_with("-drill"))
    });
    for d in &mut docs {
        if d["kind"] == "ClusterRole" && d["metadata"]["name"] == "lifeboat-dr-cluster" {
            d["rules"] = serde_json::json!([{"apiGroups": [""], "resources": ["persistentvolumes"],
                "verbs": ["list", "create", "patch", "delete"]}]);
        }
    }
    docs
}

/// Both API servers, the fixtures at the primary with a volume file per PVC, and a pair
/// whose protection has `selection` (lines of `[protection.kubernetes]`).
fn sites(selection: &str, dr_selection: &str) -> Sites {
    sites_in(selection, dr_selection, &["prod"])
}

/// As [`sites`], with the DR site's RBAC made for `dr_namespaces`.
fn sites_in(selection: &str, dr_selection: &str, dr_namespaces: &[&str]) -> Sites {
    let kdir = tempfile::tempdir().unwrap();
    let primary_api = KubeApi::start(kdir.path(), "primary");
    let dr_api = KubeApi::start(kdir.path(), "dr");
    let mut docs = vec![FIXTURES.to_string(), mysql("a"), mysql("b")];
    docs.extend((0..3).map(cassandra_pod));
    let all = docs.join("\n---\n");
    primary_api.add_type(
        "stork.libopenstorage.org",
        "v1alpha1",
        "Rule",
        "rules",
        true,
    );
    for api in [&primary_api, &dr_api] {
        api.add_type("example.com", "v1", "Widget", "widgets", true);
    }
    for v in shipped_rbac(PRIMARY_RBAC, &["prod"], "lifeboat-primary", &["list"]) {
        primary_api.seed(v);
    }
    let dr_verbs = ["list", "create", "patch", "delete"];
    for v in host_path_dr(shipped_rbac(
        DR_RBAC,
        dr_namespaces,
        "lifeboat-dr",
        &dr_verbs,
    )) {
        dr_api.seed(v);
    }
    primary_api.create_yaml(&all);
    let pair = Pair::new(PairOptions {
        volumes: vec![],
        start: false,
        primary_tail: format!(
            "[protection.kubernetes]\nvolume_path = \"vols/{{namespace}}/{{pvc}}.img\"\n{selection}\n[kubernetes]\nkubeconfig = \"{}\"\n",
            primary_api.kubeconfig.display()
        ),
        dr_tail: format!(
            "[protection.kubernetes]\nvolume_path = \"replicas/{{namespace}}/{{pvc}}.img\"\n{dr_selection}\n[kubernetes]\nkubeconfig = \"{}\"\n",
            dr_api.kubeconfig.display()
        ),
        ..Default::default()
    });
    std::fs::create_dir_all(pair.dir.path().join("vols/prod")).unwrap();
    for (i, pvc) in ALL_PVCS.iter().enumerate() {
        random_file(&primary_volume(&pair, pvc), 1 << 20, 500 + i as u64);
    }
    let mut s = Sites {
        pair,
        primary_api,
        dr_api,
        _kdir: kdir,
    };
    s.pair.start();
    s
}

fn primary_volume(pair: &Pair, pvc: &str) -> PathBuf {
    pair.dir.path().join(format!("vols/prod/{pvc}.img"))
}

fn dr_replica(pair: &Pair, ns: &str, pvc: &str) -> PathBuf {
    pair.dir.path().join(format!("replicas/{ns}/{pvc}.img"))
}

impl Sites {
    /// Runs a cycle and waits until the DR site applied that gen's manifests.
    fn sync_and_apply(&self) -> u64 {
        let r = self.pair.sync();
        self.wait_applied(r.gen);
        r.gen
    }

    fn wait_applied(&self, gen: u64) -> lifeboat::api::KubeStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self.pair.dr.status();
            let k = st.protections[0].kubernetes.clone().unwrap_or_default();
            if let Some(e) = &k.apply_error {
                panic!("standby apply failed: {e}\n{}", self.pair.dr.log_text());
            }
            if k.gen == Some(gen) && k.applied.is_some() {
                return k;
            }
            assert!(
                Instant::now() < deadline,
                "gen {gen} never applied: {k:?}\n{}",
                self.pair.dr.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What lifeboat put in a DR namespace: everything but the site's own RBAC objects
    /// (labelled `lifeboat.dev/exclude`, applied by the administrator).
    fn dr_mirrored(&self, ns: &str) -> Vec<Value> {
        self.dr_api
            .in_namespace(ns)
            .into_iter()
            .filter(|o| o["metadata"]["labels"]["lifeboat.dev/exclude"] != "true")
            .collect()
    }

    fn dr_names(&self, ns: &str) -> BTreeSet<String> {
        self.dr_mirrored(ns)
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    fn dr_get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Value {
        self.dr_api
            .get(group, plural, ns, name)
            .unwrap_or_else(|| panic!("{plural} {ns}/{name} missing at the DR site"))
    }

    fn dr_gen(&self) -> Option<u64> {
        self.pair.dr.status().protections[0].consistent_gen
    }

    fn primary_error(&self) -> String {
        self.pair.primary.status().protections[0]
            .last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default()
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const NAMESPACE: &str = "namespaces = [\"prod\"]";

#[test]
fn protecting_a_namespace_mirrors_every_object_scaled_to_zero_with_the_data() {
    // The replica files are on one node: its PVs say so.
    let s = sites(NAMESPACE, "volume_node = \"node-a\"");
    s.sync_and_apply();
    let want = set(&[
        "ServiceAccount/cassandra",
        "ServiceAccount/mysql",
        "Role/cassandra-seeds",
        "RoleBinding/cassandra-seeds",
        "RoleBinding/mysql-view",
        "ConfigMap/cassandra-env",
        "ConfigMap/mysql-cnf",
        "Secret/mysql-root",
        "StatefulSet/cassandra",
        "Deployment/mysql-a",
        "Deployment/mysql-b",
        "PersistentVolumeClaim/data-cassandra-0",
        "PersistentVolumeClaim/data-cassandra-1",
        "PersistentVolumeClaim/data-cassandra-2",
        "PersistentVolumeClaim/mysql-a-data",
        "PersistentVolumeClaim/mysql-b-data",
        "Service/cassandra",
        "Service/mysql-a",
        "Service/mysql-b",
        "CronJob/mysql-backup",
    ]);
    // Not mirrored: pods and controller-owned ReplicaSets (their controllers recreate
    // them), the token Secret, kube-root-ca.crt and the default ServiceAccount.
    assert_eq!(s.dr_names("prod"), want);
    assert!(s.dr_api.get("", "namespaces", "", "prod").is_some());
    assert_eq!(
        s.dr_api.get("", "namespaces", "", "prod").unwrap()["metadata"]["labels"]["team"],
        "data"
    );

    let sts = s.dr_get("apps", "statefulsets", "prod", "cassandra");
    assert_eq!(sts["spec"]["replicas"], 0);
    assert_eq!(sts["metadata"]["annotations"]["lifeboat.dev/replicas"], "3");
    assert_eq!(
        sts["status"]["readyReplicas"], 0,
        "the DR site runs nothing on standby"
    );
    for d in ["mysql-a", "mysql-b"] {
        let dep = s.dr_get("apps", "deployments", "prod", d);
        assert_eq!(dep["spec"]["replicas"], 0);
        assert_eq!(dep["metadata"]["annotations"]["lifeboat.dev/replicas"], "1");
    }
    assert_eq!(
        s.dr_get("batch", "cronjobs", "prod", "mysql-backup")["spec"]["suspend"],
        true
    );

    // Nothing cluster-specific crossed over.
    for o in s.dr_mirrored("prod") {
        let what = format!("{} {}", o["kind"], o["metadata"]["name"]);
        let primary = s
            .primary_api
            .in_namespace("prod")
            .into_iter()
            .find(|p| p["kind"] == o["kind"] && p["metadata"]["name"] == o["metadata"]["name"]);
        assert_ne!(
            o["metadata"]["uid"],
            primary.unwrap()["metadata"]["uid"],
            "{what}: uid"
        );
        assert!(o["metadata"].get("ownerReferences").is_none(), "{what}");
        let managers: Vec<&str> = o["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["lifeboat"], "{what}: applied by lifeboat only");
        if !matches!(o["kind"].as_str(), Some("StatefulSet" | "Deployment")) {
            assert!(o.get("status").is_none(), "{what}: status");
        }
    }
    assert!(s.dr_get("", "services", "prod", "mysql-a")["spec"]
        .get("clusterIP")
        .is_none());
    assert_eq!(
        s.dr_get("", "services", "prod", "cassandra")["spec"]["clusterIP"],
        "None"
    );
    // Each PVC is bound to a PV naming its replica, and the replica holds the data.
    for pvc in ALL_PVCS {
        let claim = s.dr_get("", "persistentvolumeclaims", "prod", pvc);
        let pv_name = claim["spec"]["volumeName"].as_str().unwrap().to_string();
        assert!(pv_name.starts_with("lifeboat-"), "{pvc}: {pv_name}");
        let pv = s.dr_get("", "persistentvolumes", "", &pv_name);
        let replica = dr_replica(&s.pair, "prod", pvc);
        assert_eq!(
            pv["spec"]["hostPath"]["path"],
            replica.display().to_string()
        );
        assert_eq!(pv["spec"]["claimRef"]["name"], pvc);
        let term = &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0];
        assert_eq!(
            term["matchExpressions"][0],
            serde_json::json!({"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]})
        );
        assert_eq!(b3(&replica), b3(&primary_volume(&s.pair, pvc)), "{pvc}");
    }
    // Every change lifeboat made at the DR site was a server-side apply.
    for r in s.dr_api.requests() {
        if !matches!(r.method.as_str(), "GET") {
            assert_eq!(r.method, "PATCH", "{r:?}");
            assert!(
                r.content_type.starts_with("application/apply-patch"),
                "{r:?}"
            );
            assert!(r.query.contains("fieldManager=lifeboat"), "{r:?}");
        }
    }
    // status at the primary lists what the protection covers.
    let st = s.pair.primary.status();
    let k = st.protections[0].kubernetes.clone().unwrap();
    assert_eq!(k.covers.pods.len(), 5, "{k:?}");
    assert_eq!(k.covers.pvcs.len(), 5, "{k:?}");
    assert!(
        k.covers
            .objects
            .contains(&"StatefulSet prod/cassandra".to_string()),
        "{k:?}"
    );
    let text = lifeboat::cli::render_status(&st);
    assert!(text.contains("pvc prod/data-cassandra-0 ->"), "{text}");
}

#[test]
fn protecting_only_app_cassandra_mirrors_the_statefulset_its_claims_and_references() {
    let s = sites("namespaces = [\"prod\"]\nselector = \"app=cassandra\"", "");
    let r = s.pair.sync();
    s.wait_applied(r.gen);
    let want = set(&[
        "StatefulSet/cassandra",
        "PersistentVolumeClaim/data-cassandra-0",
        "PersistentVolumeClaim/data-cassandra-1",
        "PersistentVolumeClaim/data-cassandra-2",
        "ConfigMap/cassandra-env",
        "ServiceAccount/cassandra",
        "RoleBinding/cassandra-seeds",
        "Role/cassandra-seeds",
        "Service/cassandra",
    ]);
    assert_eq!(s.dr_names("prod"), want);
    let vols: BTreeSet<String> = r.volumes.iter().map(|v| v.name.clone()).collect();
    assert_eq!(
        vols,
        set(&[
            "prod.data-cassandra-0",
            "prod.data-cassandra-1",
            "prod.data-cassandra-2"
        ])
    );
    for i in 0..3 {
        let pvc = format!("data-cassandra-{i}");
        assert_eq!(
            b3(&dr_replica(&s.pair, "prod", &pvc)),
            b3(&primary_volume(&s.pair, &pvc))
        );
    }
    assert!(!dr_replica(&s.pair, "prod", "mysql-a-data").exists());
}

#[test]
fn changes_at_the_primary_reach_the_dr_site_by_patch_keeping_uids() {
    let s = sites(NAMESPACE, "");
    s.sync_and_apply();
    let sts_uid = s.dr_get("apps", "statefulsets", "prod", "cassandra")["metadata"]["uid"].clone();
    let cm_uid = s.dr_get("", "configmaps", "prod", "mysql-cnf")["metadata"]["uid"].clone();
    let before = s.dr_api.requests().len();

    let p = &s.primary_api;
    p.merge_patch("apps", "statefulsets", "prod", "cassandra",
        serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "cassandra", "image": "cassandra:5.0",
            "envFrom": [{"configMapRef": {"name": "cassandra-env"}}]}]}}}}));
    p.merge_patch(
        "",
        "configmaps",
        "prod",
        "mysql-cnf",
        serde_json::json!({"data": {"my.cnf": "[mysqld]\nmax_connections=500\n"}}),
    );
    p.delete("", "services", "prod", "mysql-b");
    support::scatter_writes(&primary_volume(&s.pair, "mysql-a-data"), 20, 65536, 9);
    s.sync_and_apply();

    let sts = s.dr_get("apps", "statefulsets", "prod", "cassandra");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "cassandra:5.0"
    );
    assert_eq!(
        sts["metadata"]["uid"], sts_uid,
        "patched in place, not recreated"
    );
    assert_eq!(sts["spec"]["replicas"], 0);
    let cm = s.dr_get("", "configmaps", "prod", "mysql-cnf");
    assert_eq!(cm["data"]["my.cnf"], "[mysqld]\nmax_connections=500\n");
    assert_eq!(cm["metadata"]["uid"], cm_uid);
    assert!(
        s.dr_api.get("", "services", "prod", "mysql-b").is_none(),
        "pruned"
    );
    assert!(s.dr_api.get("", "services", "prod", "mysql-a").is_some());
    let k = s.pair.dr.status().protections[0]
        .kubernetes
        .clone()
        .unwrap();
    let applied = k.applied.unwrap();
    assert_eq!(applied.pruned, vec!["Service prod/mysql-b".to_string()]);
    // Only what changed at the primary changed at the DR site.
    assert_eq!(
        applied.changed,
        vec![
            "ConfigMap prod/mysql-cnf".to_string(),
            "StatefulSet prod/cassandra".to_string()
        ]
    );
    // The only delete is the prune; every other change was an apply.
    let deletes: Vec<_> = s.dr_api.requests()[before..]
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        deletes,
        vec!["/api/v1/namespaces/prod/services/mysql-b".to_string()]
    );
    assert!(s.dr_api.requests()[before..]
        .iter()
        .all(|r| r.method != "POST" && r.method != "PUT"));
    assert_eq!(
        b3(&dr_replica(&s.pair, "prod", "mysql-a-data")),
        b3(&primary_volume(&s.pair, "mysql-a-data"))
    );
}

#[test]
fn failover_scales_up_with_the_manifests_of_the_recovered_gen_and_a_dry_run_changes_nothing() {
    let mut s = sites(NAMESPACE, "");
    s.sync_and_apply();
    s.primary_api.merge_patch(
        "apps",
        "statefulsets",
        "prod",
        "cassandra",
        serde_json::json!({"spec": {"replicas": 4}}),
    );
    let gen2 = s.sync_and_apply();

    // Gen 3 starts with newer manifests, and the primary's site is lost mid-transfer.
    s.primary_api.merge_patch(
        "apps",
        "statefulsets",
        "prod",
        "cassandra",
        serde_json::json!({"spec": {"replicas": 9}}),
    );
    support::scatter_writes(&primary_volume(&s.pair, "data-cassandra-1"), 50, 65536, 3);
    s.pair.primary.stop();
    s.pair.primary.failpoint = Some("primary-sending:prod.data-cassandra-1".into());
    s.pair.primary.start();
    let ctl = s.pair.primary.control.clone();
    std::thread::spawn(move || {
        let _ =
            lifeboat::api::Client::at(&ctl).post::<Value>(&format!("/v1/protections/{PROT}/sync"));
    });
    s.pair.primary.wait_failpoint();
    s.pair.primary.kill9();

    let dr_cfg = s.pair.dr.config.clone();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
            .args(args)
            .arg("--config")
            .arg(&dr_cfg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let before = s.dr_api.all("apps", "statefulsets");
    let epoch_before = s.pair.dr.status().protections[0].epoch;
    let plan = run(&["failover", "--protection", PROT, "--dry-run"]);
    assert!(
        plan.contains("dry run") && plan.contains("StatefulSet prod/cassandra to 4"),
        "{plan}"
    );
    assert!(plan.contains("resume CronJob prod/mysql-backup"), "{plan}");
    assert_eq!(
        s.dr_api.all("apps", "statefulsets"),
        before,
        "a dry run changes nothing"
    );
    assert_eq!(s.pair.dr.status().protections[0].epoch, epoch_before);

    let report = run(&["failover", "--protection", PROT, "--ready-timeout", "30s"]);
    assert!(
        report.contains(&format!("recovered gen {gen2}")),
        "{report}"
    );
    assert!(
        report.contains("ready: StatefulSet prod/cassandra (4 replicas)"),
        "{report}"
    );
    assert!(report.contains("steps (the recovery time)"), "{report}");
    let sts = s.dr_get("apps", "statefulsets", "prod", "cassandra");
    assert_eq!(
        sts["spec"]["replicas"], 4,
        "gen {gen2}'s count, not the newer 9"
    );
    assert_eq!(sts["status"]["readyReplicas"], 4);
    for d in ["mysql-a", "mysql-b"] {
        assert_eq!(
            s.dr_get("apps", "deployments", "prod", d)["spec"]["replicas"],
            1
        );
    }
    assert_eq!(
        s.dr_get("batch", "cronjobs", "prod", "mysql-backup")["spec"]["suspend"],
        false
    );
    // The recovered replicas are gen 2's data.
    let st = s.pair.dr.status();
    assert_eq!(st.protections[0].consistent_gen, Some(gen2));
    assert_eq!(st.protections[0].role, "failed-over");

    // export writes a gen's manifests for review: gen 1 still has 3 Cassandra replicas.
    let dir = s.pair.dir.path().join("export");
    let out = run(&[
        "export",
        "--protection",
        PROT,
        "--gen",
        "1",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("of gen 1"), "{out}");
    let sts_file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("statefulset-prod-cassandra"))
        .unwrap();
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(&sts_file).unwrap()).unwrap();
    assert_eq!(doc["spec"]["replicas"], 3);
    let first = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .min()
        .unwrap();
    assert!(
        first.contains("namespace-cluster-prod"),
        "apply order: {first}"
    );
}

#[test]
fn namespace_mapping_moves_every_object_and_rewrites_references() {
    let s = sites_in(
        "namespaces = [\"prod\"]\nnamespace_map = { prod = \"prod-dr\" }",
        "",
        &["prod-dr"],
    );
    s.sync_and_apply();
    assert!(
        s.dr_api.in_namespace("prod").is_empty(),
        "nothing left in prod"
    );
    assert!(s.dr_api.get("", "namespaces", "", "prod-dr").is_some());
    assert!(s.dr_api.get("", "namespaces", "", "prod").is_none());
    assert_eq!(s.dr_names("prod-dr").len(), 20);
    let rb = s.dr_get(
        "rbac.authorization.k8s.io",
        "rolebindings",
        "prod-dr",
        "cassandra-seeds",
    );
    assert_eq!(rb["subjects"][0]["namespace"], "prod-dr");
    for pvc in ALL_PVCS {
        let replica = dr_replica(&s.pair, "prod-dr", pvc);
        assert_eq!(b3(&replica), b3(&primary_volume(&s.pair, pvc)), "{pvc}");
        let claim = s.dr_get("", "persistentvolumeclaims", "prod-dr", pvc);
        let pv = s.dr_get(
            "",
            "persistentvolumes",
            "",
            claim["spec"]["volumeName"].as_str().unwrap(),
        );
        assert_eq!(pv["spec"]["claimRef"]["namespace"], "prod-dr");
    }
    // A Service DNS name in env is reported, not rewritten.
    let k = s.pair.dr.status().protections[0]
        .kubernetes
        .clone()
        .unwrap();
    assert!(
        k.warnings
            .iter()
            .any(|w| w.contains("REPLICA_OF") && w.contains("prod-dr")),
        "{:?}",
        k.warnings
    );
    let dep = s.dr_get("apps", "deployments", "prod-dr", "mysql-b");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"],
        "mysql-a.prod.svc.cluster.local"
    );
}

#[test]
fn bad_selections_and_rbac_denials_fail_the_cycle_with_a_clear_error_and_commit_nothing() {
    let s = sites("namespaces = [\"prod\"]\nselector = \"app=nothing\"", "");
    let e = s.pair.try_sync().unwrap_err();
    assert!(
        e.contains("selector app=nothing matches no pods and no workloads in namespace(s) prod"),
        "{e}"
    );
    assert!(s.primary_error().contains("app=nothing"));
    assert_eq!(s.dr_gen(), None);
    drop(s);

    let s = sites(
        "namespaces = [\"prod\"]\ninclude_kinds = [\"Deploymnet\", \"Secret\"]",
        "",
    );
    let e = s.pair.try_sync().unwrap_err();
    assert!(
        e.contains("unknown kind \"Deploymnet\"") && e.contains("did you mean Deployment?"),
        "{e}"
    );
    assert_eq!(s.dr_gen(), None);
    drop(s);

    let s = sites(NAMESPACE, "");
    let gen = s.sync_and_apply();
    s.primary_api.deny("list", "secrets");
    s.primary_api.merge_patch(
        "",
        "configmaps",
        "prod",
        "mysql-cnf",
        serde_json::json!({"data": {"my.cnf": "changed"}}),
    );
    let e = s.pair.try_sync().unwrap_err();
    assert!(
        e.contains("403 Forbidden") && e.contains("secrets") && e.contains("namespace prod"),
        "{e}"
    );
    let st = s.pair.primary.status();
    let err = st.protections[0].last_error.clone().unwrap();
    assert_eq!(err.kind.as_str(), "kubernetes");
    assert!(lifeboat::cli::render_status(&st).contains("403 Forbidden"));
    assert_eq!(s.dr_gen(), Some(gen), "no new gen at the DR site");
    assert_ne!(
        s.dr_get("", "configmaps", "prod", "mysql-cnf")["data"]["my.cnf"],
        "changed"
    );
    // Fixed permissions: the next cycle commits data and manifests together.
    s.primary_api.allow_all();
    let next = s.sync_and_apply();
    assert_eq!(next, gen + 1);
    assert_eq!(
        s.dr_get("", "configmaps", "prod", "mysql-cnf")["data"]["my.cnf"],
        "changed"
    );
}

/// The same scenario against a real cluster pair, when kubeconfigs are given:
/// LIFEBOAT_TEST_PRIMARY_KUBECONFIG and LIFEBOAT_TEST_DR_KUBECONFIG (contexts as current).
/// It creates the namespace `lifeboat-e2e` at the primary and deletes it at both ends.
#[test]
#[ignore = "needs two real clusters: set LIFEBOAT_TEST_PRIMARY_KUBECONFIG and LIFEBOAT_TEST_DR_KUBECONFIG"]
fn real_clusters_mirror_a_namespace_and_fail_over() {
    let (Ok(pk), Ok(dk)) = (
        std::env::var("LIFEBOAT_TEST_PRIMARY_KUBECONFIG"),
        std::env::var("LIFEBOAT_TEST_DR_KUBECONFIG"),
    ) else {
        panic!("set LIFEBOAT_TEST_PRIMARY_KUBECONFIG and LIFEBOAT_TEST_DR_KUBECONFIG");
    };
    let kubectl = |cfg: &str, args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut c = std::process::Command::new("kubectl")
            .env("KUBECONFIG", cfg)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl on PATH");
        if let Some(s) = stdin {
            c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fixtures = [FIXTURES.to_string(), mysql("a")]
        .join("\n---\n")
        .replace("prod", "lifeboat-e2e");
    kubectl(&pk, &["apply", "-f", "-"], Some(&fixtures));
    let mut pair = Pair::new(PairOptions {
        volumes: vec![],
        start: false,
        primary_tail: format!("[protection.kubernetes]\nnamespaces = [\"lifeboat-e2e\"]\nvolume_path = \"vols/{{namespace}}/{{pvc}}.img\"\n[kubernetes]\nkubeconfig = \"{pk}\"\n"),
        dr_tail: format!("[protection.kubernetes]\nvolume_path = \"replicas/{{namespace}}/{{pvc}}.img\"\n[kubernetes]\nkubeconfig = \"{dk}\"\n"),
        ..Default::default()
    });
    std::fs::create_dir_all(pair.dir.path().join("vols/lifeboat-e2e")).unwrap();
    random_file(
        &pair.dir.path().join("vols/lifeboat-e2e/mysql-a-data.img"),
        1 << 20,
        1,
    );
    pair.start();
    pair.sync();
    std::thread::sleep(Duration::from_secs(5));
    let replicas = kubectl(
        &dk,
        &[
            "-n",
            "lifeboat-e2e",
            "get",
            "deploy",
            "mysql-a",
            "-o",
            "jsonpath={.spec.replicas}",
        ],
        None,
    );
    assert_eq!(replicas.trim(), "0");
    for cfg in [&pk, &dk] {
        kubectl(
            cfg,
            &["delete", "namespace", "lifeboat-e2e", "--wait=false"],
            None,
        );
    }
}

// ---- Rules in pods (issue 5): Stork Rules and Velero hooks through pods/exec ----

/// A post rule of ours; the pre rule is the seed document's, verbatim.
const POST_RULE: &str = "apiVersion: stork.libopenstorage.org/v1alpha1
kind: Rule
metadata:
  name: cassandra-postsnap-rule
  namespace: prod
rules:
  - podSelector:
      app: cassandra
    actions:
    - type: command
      value: echo thawed
";

/// The PVC file a pod's "container" writes to, as the test's stand-in for the pod.
fn pod_volume(dir: &std::path::Path, pod: &str) -> PathBuf {
    let pvc = match pod {
        p if p.starts_with("cassandra-") => format!("data-{p}"),
        p if p.starts_with("mysql-a") => "mysql-a-data".into(),
        _ => "mysql-b-data".into(),
    };
    dir.join(format!("vols/prod/{pvc}.img"))
}

fn stamp(path: &std::path::Path, what: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(what, 0)
        .unwrap();
}

fn head(path: &std::path::Path, n: usize) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()[..n]).into_owned()
}

fn rule_sites(extra: &str) -> Sites {
    let s = sites(&format!("{NAMESPACE}\n{extra}"), "");
    let seed = include_str!("../deploy/rules/cassandra-presnap-rule.yaml");
    s.primary_api
        .create_yaml(&seed.replace("metadata:\n", "metadata:\n  namespace: prod\n"));
    s.primary_api.create_yaml(POST_RULE);
    s
}

/// An exec handler that stamps the pod's volume: "FLUSHED" for the flush, "THAWED!" for
/// the post rule, and fails the flush in `failing` pods.
fn cassandra_handler(s: &Sites, failing: &'static str) {
    let dir = s.pair.dir.path().to_path_buf();
    s.primary_api.set_exec_handler(move |c: &ExecCall| {
        let cmd = c.command.join(" ");
        if cmd.contains("nodetool flush") {
            if c.pod == failing {
                return ExecResult {
                    stderr: "nodetool: Failed to connect to 127.0.0.1:7199".into(),
                    exit_code: 2,
                    ..Default::default()
                };
            }
            stamp(&pod_volume(&dir, &c.pod), b"FLUSHED");
        } else if cmd.contains("echo thawed") {
            stamp(&pod_volume(&dir, &c.pod), b"THAWED!");
        }
        ExecResult::default()
    });
}

#[test]
fn rules_the_seed_cassandra_rule_flushes_every_cassandra_pod_before_the_snapshot() {
    let s = rule_sites(
        "pre_rule = \"cassandra-presnap-rule\"\npost_rule = \"cassandra-postsnap-rule\"",
    );
    cassandra_handler(&s, "");
    s.sync_and_apply();
    let execs = s.primary_api.execs();
    let pre: Vec<&ExecCall> = execs
        .iter()
        .filter(|c| c.command.join(" ").contains("nodetool flush"))
        .collect();
    let post: Vec<&ExecCall> = execs
        .iter()
        .filter(|c| c.command.join(" ").contains("echo thawed"))
        .collect();
    let pods = |calls: &[&ExecCall]| calls.iter().map(|c| c.pod.clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        pods(&pre),
        set(&["cassandra-0", "cassandra-1", "cassandra-2"]),
        "{execs:?}"
    );
    assert_eq!(pods(&post), pods(&pre));
    // In the pod's default container, wrapped to print its PID (to kill it after a timeout).
    assert_eq!(
        pre[0].command,
        vec!["/bin/sh", "-c", "echo lifeboat-pid $$; nodetool flush"]
    );
    assert_eq!(pre[0].container.as_deref(), Some("cassandra"));
    assert!(
        execs.iter().all(|c| c.pod.starts_with("cassandra-")),
        "no MySQL pod: {execs:?}"
    );
    let last_pre = pre.iter().map(|c| c.seq).max().unwrap();
    assert!(
        post.iter().all(|c| c.seq > last_pre),
        "post only after every pre action"
    );
    // Order against the snapshot: the replica (the snapshot) has the flush, not the thaw.
    for i in 0..3 {
        let pvc = format!("data-cassandra-{i}");
        assert_eq!(
            head(&dr_replica(&s.pair, "prod", &pvc), 7),
            "FLUSHED",
            "{pvc}"
        );
        assert_eq!(head(&primary_volume(&s.pair, &pvc), 7), "THAWED!", "{pvc}");
    }
    let m = s.pair.primary.metrics();
    let freeze = support::metric(&m, "lifeboat_freeze_seconds{protection=\"p\"}").unwrap();
    assert!(freeze > 0.0, "{m}");
}

#[test]
fn rules_a_pre_action_failing_in_one_pod_takes_no_snapshot_and_post_runs_in_all() {
    let s = rule_sites(
        "pre_rule = \"cassandra-presnap-rule\"\npost_rule = \"cassandra-postsnap-rule\"",
    );
    cassandra_handler(&s, "cassandra-1");
    let e = s.pair.try_sync().unwrap_err();
    for part in [
        "pod prod/cassandra-1",
        "`nodetool flush`",
        "exited with 2",
        "Failed to connect",
        "snapshot not taken",
    ] {
        assert!(e.contains(part), "{part:?} not in {e}");
    }
    let post: BTreeSet<String> = s
        .primary_api
        .execs()
        .iter()
        .filter(|c| c.command.join(" ").contains("echo thawed"))
        .map(|c| c.pod.clone())
        .collect();
    assert_eq!(post, set(&["cassandra-0", "cassandra-1", "cassandra-2"]));
    assert_eq!(s.dr_gen(), None, "no gen at the DR site");
    assert!(
        !s.pair.snapshot(1, "prod.data-cassandra-0").exists(),
        "no snapshot taken"
    );
    let st = s.pair.primary.status();
    let err = st.protections[0].last_error.clone().unwrap();
    assert_eq!(err.kind.as_str(), "hook");
    assert!(err.message.contains("cassandra-1"));
    let m = s.pair.primary.metrics();
    assert_eq!(
        support::metric(&m, "lifeboat_hook_failures_total{protection=\"p\"}"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn rules_velero_hook_annotations_run_in_their_containers_in_order_and_timeouts_kill() {
    let s = sites(NAMESPACE, "");
    s.primary_api.merge_patch("", "pods", "prod", "mysql-a-5d8f-abcde", serde_json::json!({"metadata": {"annotations": {
        "pre.hook.backup.velero.io/container": "mysql",
        "pre.hook.backup.velero.io/command": "[\"/bin/sh\", \"-c\", \"mysql -e 'FLUSH TABLES WITH READ LOCK'\"]",
        "post.hook.backup.velero.io/container": "sidecar",
        "post.hook.backup.velero.io/command": "[\"/bin/echo\", \"unlocked\"]"}},
        "spec": {"containers": [{"name": "mysql", "image": "mysql:8.4"}, {"name": "sidecar", "image": "busybox"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "mysql", "ready": true}, {"name": "sidecar", "ready": true}]}}));
    let dir = s.pair.dir.path().to_path_buf();
    s.primary_api.set_exec_handler(move |c: &ExecCall| {
        let cmd = c.command.join(" ");
        if cmd.contains("FLUSH TABLES") {
            stamp(&pod_volume(&dir, &c.pod), b"PRE-HK");
        } else if cmd.contains("unlocked") {
            stamp(&pod_volume(&dir, &c.pod), b"POSTHK");
        } else if cmd.contains("slow") {
            return ExecResult {
                delay: Duration::from_secs(20),
                ..Default::default()
            };
        }
        ExecResult::default()
    });
    s.sync_and_apply();
    let execs = s.primary_api.execs();
    assert_eq!(execs.len(), 2, "{execs:?}");
    assert_eq!(
        (execs[0].pod.as_str(), execs[0].container.as_deref()),
        ("mysql-a-5d8f-abcde", Some("mysql"))
    );
    assert_eq!(
        execs[0].command,
        vec!["/bin/sh", "-c", "mysql -e 'FLUSH TABLES WITH READ LOCK'"]
    );
    assert_eq!(execs[1].container.as_deref(), Some("sidecar"));
    assert_eq!(execs[1].command, vec!["/bin/echo", "unlocked"]);
    assert_eq!(
        head(&dr_replica(&s.pair, "prod", "mysql-a-data"), 6),
        "PRE-HK"
    );
    assert_eq!(head(&primary_volume(&s.pair, "mysql-a-data"), 6), "POSTHK");

    // A hook that outlives its Velero timeout is killed and named.
    s.primary_api.merge_patch(
        "",
        "pods",
        "prod",
        "mysql-b-5d8f-abcde",
        serde_json::json!({"metadata": {"annotations": {
        "pre.hook.backup.velero.io/command": "[\"/bin/sh\", \"-c\", \"slow flush\"]",
        "pre.hook.backup.velero.io/timeout": "1s"}}}),
    );
    let e = s.pair.try_sync().unwrap_err();
    assert!(
        e.contains("pod prod/mysql-b-5d8f-abcde")
            && e.contains("outlived its timeout and was killed"),
        "{e}"
    );
}

#[test]
fn a_planned_failover_scales_the_primary_down_and_loses_nothing_written_before() {
    let s = sites(NAMESPACE, "");
    s.sync_and_apply();
    // Written after the last cycle: only a final cycle carries it.
    stamp(&primary_volume(&s.pair, "data-cassandra-2"), b"LAST-WRITE");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args([
            "failover",
            "--protection",
            PROT,
            "--planned",
            "--ready-timeout",
            "30s",
            "--primary",
        ])
        .arg(&s.pair.primary.control)
        .arg("--config")
        .arg(&s.pair.dr.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("scale down the primary's workloads") && text.contains("final cycle: gen 2"),
        "{text}"
    );
    // The primary runs nothing; the DR site runs the counts the primary ran.
    let p = |plural: &str, name: &str| s.primary_api.get("apps", plural, "prod", name).unwrap();
    assert_eq!(p("statefulsets", "cassandra")["spec"]["replicas"], 0);
    assert_eq!(p("deployments", "mysql-a")["spec"]["replicas"], 0);
    assert_eq!(
        s.primary_api
            .get("batch", "cronjobs", "prod", "mysql-backup")
            .unwrap()["spec"]["suspend"],
        true
    );
    assert_eq!(
        s.dr_get("apps", "statefulsets", "prod", "cassandra")["spec"]["replicas"],
        3
    );
    assert_eq!(
        s.dr_get("apps", "deployments", "prod", "mysql-a")["spec"]["replicas"],
        1
    );
    assert_eq!(
        s.dr_get("batch", "cronjobs", "prod", "mysql-backup")["spec"]["suspend"],
        false
    );
    let replica = dr_replica(&s.pair, "prod", "data-cassandra-2");
    assert_eq!(head(&replica, 10), "LAST-WRITE");
    assert_eq!(
        b3(&replica),
        b3(&primary_volume(&s.pair, "data-cassandra-2"))
    );
}

#[test]
fn rules_a_background_lock_in_one_pod_is_held_across_the_snapshot() {
    let mut s = sites(NAMESPACE, "");
    let rule = s.pair.dir.path().join("mysql-lock.yaml");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rules/mysql-lock.yaml");
    std::fs::copy(shipped, &rule).unwrap();
    // The rule file is read at start: restart the primary with it.
    s.pair.primary.stop();
    let cfg = std::fs::read_to_string(&s.pair.primary.config)
        .unwrap()
        .replace(
            "sync_on_start = false",
            "sync_on_start = false\npre_rule = \"mysql-lock.yaml\"",
        );
    std::fs::write(&s.pair.primary.config, cfg).unwrap();
    s.pair.primary.start();
    let dir = s.pair.dir.path().to_path_buf();
    s.primary_api.set_exec_handler(move |c: &ExecCall| {
        let vol = pod_volume(&dir, &c.pod);
        if c.command.join(" ").contains("read -r") {
            stamp(&vol, b"LOCKED__");
            let v = vol.clone();
            return ExecResult {
                stdout: format!("{}\n", lifeboat::rules::WAIT_MARKER),
                wait_for_stdin: true,
                on_stdin_closed: Some(std::sync::Arc::new(move || stamp(&v, b"RELEASED"))),
                ..Default::default()
            };
        }
        ExecResult::default()
    });
    s.sync_and_apply();
    let execs = s.primary_api.execs();
    assert_eq!(execs.len(), 1, "runInSinglePod: {execs:?}");
    assert!(execs[0].pod.starts_with("mysql-a"), "{execs:?}");
    assert_eq!(
        head(&dr_replica(&s.pair, "prod", "mysql-a-data"), 8),
        "LOCKED__",
        "held during the snapshot"
    );
    assert_eq!(
        head(&primary_volume(&s.pair, "mysql-a-data"), 8),
        "RELEASED",
        "ended after it"
    );
    // Ended by closing its stdin, not by its timeout.
    let m = s.pair.primary.metrics();
    let failures = support::metric(&m, "lifeboat_hook_failures_total{protection=\"p\"}");
    assert_eq!(failures.unwrap_or(0.0), 0.0, "{m}");
}

/// `lifeboat failover` at the DR site (20 s for readiness): its exit code and output.
fn failover_at_dr(s: &Sites) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args([
            "failover",
            "--protection",
            PROT,
            "--ready-timeout",
            "20s",
            "--config",
        ])
        .arg(&s.pair.dr.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Polls the DR site's status until `gen`'s standby apply is done, failures included.
fn applied_with_failures(s: &Sites, gen: u64) -> lifeboat::api::KubeStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let k = s.pair.dr.status().protections[0]
            .kubernetes
            .clone()
            .unwrap_or_default();
        if k.gen == Some(gen) && k.applied.is_some() {
            return k;
        }
        assert!(Instant::now() < deadline, "gen {gen} never applied: {k:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces an object at the primary as a user must when the server refuses the change
/// in place (`kubectl delete --cascade=orphan` and create again).
fn replace_at_primary(
    s: &Sites,
    group: &str,
    plural: &str,
    name: &str,
    change: impl Fn(&mut Value),
) {
    let mut v = s.primary_api.get(group, plural, "prod", name).unwrap();
    change(&mut v);
    let m = v["metadata"].as_object_mut().unwrap();
    for k in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
    ] {
        m.remove(k);
    }
    s.primary_api.delete(group, plural, "prod", name);
    s.primary_api
        .create_yaml(&serde_json::to_string(&v).unwrap());
}

#[test]
fn immutable_changes_recreate_only_their_object_and_one_refused_object_fails_alone() {
    let s = sites(NAMESPACE, "");
    // An object stored before the server's validation tightened (in etcd as it was): the
    // primary serves it, the DR server refuses it, whatever lifeboat does.
    s.primary_api.seed_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: legacy, namespace: prod, labels: {tier: \"not valid!\"}}\ndata: {k: v}\n",
    );
    // A Deployment made by `kubectl create` with one env name twice, which a server-side
    // apply refuses: lifeboat sends it with the env as the container sees it.
    s.primary_api.create_yaml(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: dup-env, namespace: prod, labels: {app: dup}}
spec:
  replicas: 1
  selector: {matchLabels: {app: dup}}
  template:
    metadata: {labels: {app: dup}}
    spec:
      containers:
      - name: app
        image: busybox
        env: [{name: MODE, value: a}, {name: MODE, value: b}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: frozen, namespace: prod}
immutable: true
data: {version: "1"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cassandra-seeds-v2, namespace: prod}
rules: [{apiGroups: [""], resources: [endpoints, pods], verbs: [get, list]}]
"#,
    );
    let gen1 = s.pair.sync().gen;
    let k = applied_with_failures(&s, gen1);
    let first = k.applied.unwrap();
    assert!(
        first
            .failed
            .iter()
            .any(|f| f.object == "ConfigMap prod/legacy"),
        "{:?}",
        first.failed
    );
    assert!(first
        .applied
        .contains(&"StatefulSet prod/cassandra".to_string()));
    let claim_uid = s.dr_get("", "persistentvolumeclaims", "prod", "data-cassandra-0")["metadata"]
        ["uid"]
        .clone();
    let sts_uid = s.dr_get("apps", "statefulsets", "prod", "cassandra")["metadata"]["uid"].clone();

    // Four changes a server refuses in place, made at the primary the way users make them.
    replace_at_primary(&s, "apps", "statefulsets", "cassandra", |v| {
        v["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
            "20Gi".into();
    });
    replace_at_primary(&s, "apps", "deployments", "mysql-b", |v| {
        v["spec"]["selector"]["matchLabels"]["tier"] = "db".into();
        v["spec"]["template"]["metadata"]["labels"]["tier"] = "db".into();
    });
    replace_at_primary(
        &s,
        "rbac.authorization.k8s.io",
        "rolebindings",
        "cassandra-seeds",
        |v| {
            v["roleRef"]["name"] = "cassandra-seeds-v2".into();
        },
    );
    replace_at_primary(&s, "", "configmaps", "frozen", |v| {
        v["data"]["version"] = "2".into();
    });
    s.primary_api.merge_patch(
        "",
        "configmaps",
        "prod",
        "mysql-cnf",
        serde_json::json!({"data": {"my.cnf": "[mysqld]\nmax_connections=900\n"}}),
    );
    let gen2 = s.pair.sync().gen;
    let k = applied_with_failures(&s, gen2);
    let r = k.applied.clone().unwrap();
    let mut recreated = r.recreated.clone();
    recreated.sort();
    assert_eq!(
        recreated,
        [
            "ConfigMap prod/frozen",
            "Deployment prod/mysql-b",
            "RoleBinding prod/cassandra-seeds",
            "StatefulSet prod/cassandra"
        ]
    );
    // Only that ConfigMap failed; status says so. The Deployment with the duplicate env
    // name is applied with the value its container sees.
    assert!(
        r.failed.iter().all(|f| f.object == "ConfigMap prod/legacy"),
        "{:?}",
        r.failed
    );
    assert!(r.failed.iter().any(|f| f.object == "ConfigMap prod/legacy"));
    assert!(
        k.apply_error
            .as_deref()
            .unwrap_or("")
            .contains("ConfigMap prod/legacy"),
        "{k:?}"
    );
    let sts = s.dr_get("apps", "statefulsets", "prod", "cassandra");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "20Gi"
    );
    assert_ne!(sts["metadata"]["uid"], sts_uid, "recreated");
    assert_eq!(sts["spec"]["replicas"], 0, "still in the standby form");
    assert_eq!(
        s.dr_get("apps", "deployments", "prod", "mysql-b")["spec"]["selector"]["matchLabels"]
            ["tier"],
        "db"
    );
    assert_eq!(
        s.dr_get(
            "rbac.authorization.k8s.io",
            "rolebindings",
            "prod",
            "cassandra-seeds"
        )["roleRef"]["name"],
        "cassandra-seeds-v2"
    );
    assert_eq!(
        s.dr_get("", "configmaps", "prod", "frozen")["data"]["version"],
        "2"
    );
    assert_eq!(
        s.dr_get("", "configmaps", "prod", "mysql-cnf")["data"]["my.cnf"],
        "[mysqld]\nmax_connections=900\n",
        "the other objects are applied"
    );
    // The claims holding the data were not touched.
    assert_eq!(
        s.dr_get("", "persistentvolumeclaims", "prod", "data-cassandra-0")["metadata"]["uid"],
        claim_uid
    );
    // Workloads went by orphaning delete (pods, had there been any, stay for the new one).
    let deletes: Vec<String> = s
        .dr_api
        .requests()
        .iter()
        .filter(|q| q.method == "DELETE" && q.path.contains("/statefulsets/"))
        .map(|q| q.path.clone() + "?" + &q.query)
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");

    // Failover with that ConfigMap still refused: every workload scales up, the ConfigMap
    // is named, and the CLI exits non-zero.
    let (code, text) = failover_at_dr(&s);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("NOT COMPLETE") && text.contains("not applied: ConfigMap prod/legacy"),
        "{text}"
    );
    assert!(
        text.contains("ready: StatefulSet prod/cassandra (3 replicas)"),
        "{text}"
    );
    let dup = s.dr_get("apps", "deployments", "prod", "dup-env");
    assert_eq!(
        dup["spec"]["template"]["spec"]["containers"][0]["env"],
        serde_json::json!([{"name": "MODE", "value": "b"}])
    );
    for (plural, name, replicas) in [
        ("statefulsets", "cassandra", 3),
        ("deployments", "mysql-a", 1),
        ("deployments", "mysql-b", 1),
    ] {
        assert_eq!(
            s.dr_get("apps", plural, "prod", name)["spec"]["replicas"],
            replicas,
            "{name}: {text}"
        );
    }
    assert_eq!(s.pair.dr.status().protections[0].role, "failed-over");
}

/// Restarts the primary with `rule` (a Stork Rule's YAML) as its pre rule.
fn with_pre_rule(s: &mut Sites, rule: &str) {
    let path = s.pair.dir.path().join("exec-rule.yaml");
    std::fs::write(&path, rule).unwrap();
    s.pair.primary.stop();
    let cfg = std::fs::read_to_string(&s.pair.primary.config).unwrap();
    if !cfg.contains("exec-rule.yaml") {
        let cfg = cfg.replace(
            "sync_on_start = false",
            "sync_on_start = false\npre_rule = \"exec-rule.yaml\"",
        );
        std::fs::write(&s.pair.primary.config, cfg).unwrap();
    }
    s.pair.primary.start();
}

#[test]
fn exec_goes_to_the_default_container_and_skips_pods_that_are_not_running() {
    let mut s = sites(NAMESPACE, "");
    with_pre_rule(
        &mut s,
        "apiVersion: stork.libopenstorage.org/v1alpha1\nkind: Rule\nmetadata: {name: flush}\nrules:\n- podSelector: {app: cassandra}\n  actions:\n  - {type: command, value: nodetool flush, onError: Continue}\n",
    );
    // cassandra-0 has a sidecar listed first, with the annotation naming the app's
    // container; cassandra-1 has two containers and no annotation; cassandra-2 is Pending.
    let two = |first: &str, second: &str| serde_json::json!([{"name": first, "image": "x"}, {"name": second, "image": "y"}]);
    let statuses = |a: &str, b: &str| serde_json::json!([{"name": a, "ready": true}, {"name": b, "ready": true}]);
    s.primary_api.merge_patch(
        "",
        "pods",
        "prod",
        "cassandra-0",
        serde_json::json!({
        "metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "cassandra"}},
        "spec": {"containers": two("istio-proxy", "cassandra")},
        "status": {"phase": "Running", "containerStatuses": statuses("istio-proxy", "cassandra")}}),
    );
    s.primary_api.merge_patch(
        "",
        "pods",
        "prod",
        "cassandra-1",
        serde_json::json!({
        "spec": {"containers": two("cassandra", "exporter")},
        "status": {"phase": "Running", "containerStatuses": statuses("cassandra", "exporter")}}),
    );
    s.primary_api.merge_patch("", "pods", "prod", "cassandra-2", serde_json::json!({
        "status": {"phase": "Pending", "containerStatuses": [{"name": "cassandra", "ready": false}]}}));
    s.primary_api.set_exec_handler(|_| ExecResult::default());

    // onError: Continue: the cycle goes on, the Pending pod is named in its status.
    let report = s.pair.sync();
    assert_eq!(report.rule_failures.len(), 1, "{:?}", report.rule_failures);
    assert!(
        report.rule_failures[0].contains("pod prod/cassandra-2")
            && report.rule_failures[0].contains("did not run: the pod is Pending, not Running"),
        "{:?}",
        report.rule_failures
    );
    let execs = s.primary_api.execs();
    let got: BTreeSet<(String, Option<String>)> = execs
        .iter()
        .map(|c| (c.pod.clone(), c.container.clone()))
        .collect();
    let want: BTreeSet<(String, Option<String>)> = [
        ("cassandra-0".to_string(), Some("cassandra".to_string())),
        ("cassandra-1".to_string(), Some("cassandra".to_string())),
    ]
    .into();
    assert_eq!(
        got, want,
        "never the Pending pod, always a container: {execs:?}"
    );
    let m = s.pair.primary.metrics();
    assert_eq!(
        support::metric(&m, "lifeboat_hook_failures_total{protection=\"p\"}"),
        Some(1.0),
        "{m}"
    );
    let log = s.pair.primary.log_text();
    assert!(
        log.contains("cassandra-2") && log.contains("the pod is Pending, not Running; not exec'd"),
        "{log}"
    );

    // onError: Fail: the same pod fails the cycle by name, and no snapshot is taken.
    with_pre_rule(
        &mut s,
        "apiVersion: stork.libopenstorage.org/v1alpha1\nkind: Rule\nmetadata: {name: flush}\nrules:\n- podSelector: {app: cassandra}\n  actions:\n  - {type: command, value: nodetool flush}\n",
    );
    let err = s.pair.try_sync().unwrap_err();
    assert!(
        err.contains("pod prod/cassandra-2") && err.contains("did not run: the pod is Pending"),
        "{err}"
    );
}

/// Whether process `pid` still runs (a zombie has ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn a_timed_out_exec_is_killed_in_the_container_and_a_lock_works_over_exec_v4() {
    let mut s = sites(NAMESPACE, "");
    s.primary_api.exec_v4_only();
    s.primary_api.set_exec_handler(|_| ExecResult {
        run_locally: true,
        ..Default::default()
    });
    let dir = s.pair.dir.path().to_path_buf();
    let pidfile = dir.join("sleeper.pid");

    // A command that outlives its timeout: its process (and its child) end with it.
    with_pre_rule(
        &mut s,
        &format!(
            "apiVersion: stork.libopenstorage.org/v1alpha1\nkind: Rule\nmetadata: {{name: slow}}\nrules:\n- podSelector: {{app: mysql}}\n  actions:\n  - {{type: command, runInSinglePod: true, timeout: 1s, value: 'sleep 300 & echo $! > {}; wait'}}\n",
            pidfile.display()
        ),
    );
    let err = s.pair.try_sync().unwrap_err();
    assert!(err.contains("outlived its timeout"), "{err}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(pid) {
        assert!(
            Instant::now() < deadline,
            "sleep {pid} still runs after the timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A background lock over v4, which cannot close stdin: held across the snapshot, then
    // ended by the line lifeboat sends, not by its timeout.
    let state = dir.join("lock.state");
    with_pre_rule(
        &mut s,
        &format!(
            "apiVersion: stork.libopenstorage.org/v1alpha1\nkind: Rule\nmetadata: {{name: lock}}\nrules:\n- podSelector: {{app: mysql}}\n  actions:\n  - {{type: command, background: true, runInSinglePod: true, timeout: 20s, value: 'echo locked > {f}; ${{WAIT_CMD}}; echo released > {f}'}}\n",
            f = state.display()
        ),
    );
    let r = s.pair.sync();
    assert!(r.gen >= 1);
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "released");
    let m = s.pair.primary.metrics();
    assert_eq!(
        support::metric(&m, "lifeboat_hook_failures_total{protection=\"p\"}").unwrap_or(0.0),
        0.0,
        "the lock ended by its line, not by its timeout: {m}"
    );
}

// ---- RBAC (issue 11): the shipped roles are exactly what the calls need ----

#[test]
fn every_shipped_rbac_rule_is_needed_by_some_call_of_a_sync_an_update_a_rule_and_failover() {
    let s = rule_sites(
        "custom_resources = [\"widgets.example.com\"]\npre_rule = \"cassandra-presnap-rule\"\npost_rule = \"cassandra-postsnap-rule\"",
    );
    cassandra_handler(&s, "");
    // Initial sync with manifests (every object created at the DR site).
    s.sync_and_apply();
    assert!(s
        .dr_api
        .get("example.com", "widgets", "prod", "shelf")
        .is_some());
    // An update and a prune.
    s.primary_api.merge_patch(
        "",
        "configmaps",
        "prod",
        "mysql-cnf",
        serde_json::json!({"data": {"my.cnf": "changed"}}),
    );
    s.primary_api.delete("", "services", "prod", "mysql-b");
    s.sync_and_apply();
    // A planned failover: the primary quiesces, the DR site applies and waits for ready.
    // The DR site's controllers lag, so the wait watches until they catch up.
    s.dr_api.state.lock().unwrap().controllers_ready = false;
    let dr_api = s.dr_api.clone();
    let catch_up = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !dr_api
            .requests()
            .iter()
            .any(|r| r.query.contains("watch=true"))
        {
            assert!(Instant::now() < deadline, "failover never watched");
            std::thread::sleep(Duration::from_millis(20));
        }
        dr_api.controllers_catch_up();
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(["failover", "--protection", PROT, "--planned"])
        .args(["--ready-timeout", "30s", "--primary"])
        .arg(&s.pair.primary.control)
        .arg("--config")
        .arg(&s.pair.dr.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    catch_up.join().unwrap();
    assert_eq!(
        s.dr_get("apps", "statefulsets", "prod", "cassandra")["spec"]["replicas"],
        3
    );
    // This run is host-path mode: the CSI path's rules are proven by tests/csi.rs.
    let csi = |u: &String| {
        [
            "snapshot",
            "get\", \"patch\"], api_groups: [\"\"], resources: [\"persistentvolumeclaims",
            "-cluster",
            "-movers",
        ]
        .iter()
        .any(|k| u.contains(k))
    };
    let mut unneeded: Vec<String> = support::rbac::unneeded_rules("primary", &s.primary_api)
        .into_iter()
        .filter(|u| !csi(u))
        .collect();
    let dr_csi = |u: &String| {
        [
            "snapshot",
            "[\"get\"], api_groups: [\"\"], resources: [\"persistentvolumeclaims",
            "-writers",
        ]
        .iter()
        .any(|k| u.contains(k))
    };
    unneeded.extend(
        support::rbac::unneeded_rules("dr", &s.dr_api)
            .into_iter()
            .filter(|u| !dr_csi(u)),
    );
    assert!(unneeded.is_empty(), "{unneeded:#?}");
}

#[test]
fn dropping_a_shipped_rule_fails_the_cycle_with_a_403_naming_verb_resource_and_namespace() {
    let s = sites(NAMESPACE, "");
    let gen = s.sync_and_apply();
    let without = |api: &KubeApi, role: &str, group: &str| {
        let mut cr = api
            .get("rbac.authorization.k8s.io", "clusterroles", "", role)
            .unwrap();
        let rules = cr["rules"].as_array_mut().unwrap();
        let all = rules.clone();
        rules.retain(|r| r["apiGroups"][0] != group || r["verbs"][0] == "patch");
        assert!(rules.len() < all.len());
        let patch = serde_json::json!({"rules": rules.clone()});
        api.merge_patch("rbac.authorization.k8s.io", "clusterroles", "", role, patch);
        serde_json::json!({ "rules": all })
    };
    // The primary without `list` on the apps kinds: the cycle fails, nothing is committed.
    let restore = without(&s.primary_api, "lifeboat-primary", "apps");
    let e = s.pair.try_sync().unwrap_err();
    for part in [
        "403 Forbidden",
        "deployments.apps is forbidden",
        "cannot list resource \"deployments\" in API group \"apps\" in the namespace \"prod\"",
        "deploy/kubernetes/primary/rbac.yaml",
    ] {
        assert!(e.contains(part), "{part:?} not in {e}");
    }
    assert_eq!(s.dr_gen(), Some(gen));
    let cr = "clusterroles";
    let rbac_g = "rbac.authorization.k8s.io";
    s.primary_api
        .merge_patch(rbac_g, cr, "", "lifeboat-primary", restore);

    // The DR site without its apps rules: the standby apply fails and says why.
    let restore = without(&s.dr_api, "lifeboat-dr", "apps");
    let r = s.pair.sync();
    let deadline = Instant::now() + Duration::from_secs(60);
    let err = loop {
        let k = s.pair.dr.status().protections[0]
            .kubernetes
            .clone()
            .unwrap_or_default();
        if let Some(e) = k.apply_error {
            break e;
        }
        assert!(Instant::now() < deadline, "no apply error: {k:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for part in [
        "403 Forbidden",
        "cannot list resource \"deployments\" in API group \"apps\" in the namespace \"prod\"",
        "deploy/kubernetes/dr/rbac.yaml",
    ] {
        assert!(err.contains(part), "{part:?} not in {err}");
    }
    // Restored, the next apply succeeds.
    s.dr_api.merge_patch(rbac_g, cr, "", "lifeboat-dr", restore);
    let next = s.pair.sync().gen;
    assert!(next > r.gen);
    loop {
        let k = s.pair.dr.status().protections[0]
            .kubernetes
            .clone()
            .unwrap_or_default();
        if k.gen == Some(next) && k.applied.is_some() && k.apply_error.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "gen {next} never applied: {k:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test server's RBAC answers as a real API server: 401 without a token; 403 bodies
/// (filter and in-handler) in upstream's format; a creating server-side apply needs `create`;
/// a RoleBinding needs `bind` or the permissions it grants; exec is authorized before the
/// upgrade; discovery is open to every authenticated user.
#[test]
fn the_test_api_server_authenticates_and_authorizes_as_a_real_api_server() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kube::api::{Api, Patch, PatchParams};
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start(dir.path(), "dr");
    let sa = "system:serviceaccount:lifeboat:lifeboat";
    api.seed_yaml(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: writer, namespace: prod}
rules:
- {apiGroups: [""], resources: [configmaps], verbs: [patch]}
- {apiGroups: [rbac.authorization.k8s.io], resources: [rolebindings], verbs: [create, patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: writer, namespace: prod}
subjects: [{kind: ServiceAccount, name: lifeboat, namespace: lifeboat}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: writer}
"#,
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |path: &str, token: Option<&str>| {
        let mut req = agent.get(&format!("http://{}{path}", api.addr));
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().unwrap();
        let code = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().unwrap();
        (code, body)
    };
    let (code, body) = get("/api/v1/namespaces/prod/configmaps", None);
    assert_eq!(code, 401);
    assert_eq!(
        body,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );
    let token = api.sa_token.clone();
    let (code, body) = get("/apis/apps/v1/namespaces/prod/deployments", Some(&token));
    assert_eq!(code, 403);
    assert_eq!(
        body,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("deployments.apps is forbidden: User \"{sa}\" cannot list resource \"deployments\" in API group \"apps\" in the namespace \"prod\""),
            "reason": "Forbidden", "details": {"group": "apps", "kind": "deployments"}, "code": 403})
    );
    let (code, body) = get("/api/v1/persistentvolumes/pv-1", Some(&token));
    assert_eq!(code, 403);
    assert_eq!(
        body["message"],
        format!("persistentvolumes \"pv-1\" is forbidden: User \"{sa}\" cannot get resource \"persistentvolumes\" in API group \"\" at the cluster scope")
    );
    assert_eq!(get("/apis", Some(&token)).0, 200, "system:discovery");
    let (code, body) = get("/metrics", Some(&token));
    assert_eq!(code, 403);
    assert_eq!(
        body["message"],
        format!("forbidden: User \"{sa}\" cannot get path \"/metrics\"")
    );
    // Exec: refused before the upgrade (and before looking for the pod).
    let (code, body) = get(
        "/api/v1/namespaces/prod/pods/p-0/exec?command=true&stdout=true",
        Some(&token),
    );
    assert_eq!(code, 403);
    assert_eq!(
        body["message"],
        format!("pods \"p-0\" is forbidden: User \"{sa}\" cannot get resource \"pods/exec\" in API group \"\" in the namespace \"prod\"")
    );

    let client = api.daemon_client();
    let pp = PatchParams::apply("lifeboat").force();
    // patch without create: an apply that would create is refused by the create check, whose
    // message names no verb; lifeboat's hint says what is missing.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "prod");
    let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": "prod"}, "data": {"a": "1"}});
    let e = api
        .block_on(cms.patch("x", &pp, &Patch::Apply(&cm)))
        .unwrap_err();
    let kube::Error::Api(s) = &e else {
        panic!("{e}")
    };
    assert_eq!(
        (s.code, s.message.as_str()),
        (403, "configmaps \"x\" is forbidden: ")
    );
    let text = lifeboat::k8s::api_error(e, "apply ConfigMap prod/x").to_string();
    assert!(
        text.contains("the `create` check of a server-side apply")
            && text.contains("deploy/kubernetes/dr/rbac.yaml"),
        "{text}"
    );
    assert!(api.get("", "configmaps", "prod", "x").is_none());
    // A binding of a ClusterRole the user neither may bind nor holds: the escalation check.
    let rbs: Api<RoleBinding> = Api::namespaced(client, "prod");
    let rb = |role: &str| {
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "v", "namespace": "prod"},
            "subjects": [{"kind": "ServiceAccount", "name": "mysql", "namespace": "prod"}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}})
    };
    let e = api
        .block_on(rbs.patch("v", &pp, &Patch::Apply(&rb("view"))))
        .unwrap_err();
    let kube::Error::Api(s) = &e else {
        panic!("{e}")
    };
    assert_eq!(s.code, 403);
    assert!(
        s.message.starts_with(&format!(
            "rolebindings.rbac.authorization.k8s.io \"v\" is forbidden: user \"{sa}\" (groups=[\"system:serviceaccounts\" \"system:serviceaccounts:lifeboat\" \"system:authenticated\"]) is attempting to grant RBAC permissions not currently held:\n"
        )) && s.message.contains("{APIGroups:[\"\"], Resources:[\"configmaps\"], Verbs:[\"get\"]}"),
        "{}",
        s.message
    );
    let e = api
        .block_on(rbs.patch("v", &pp, &Patch::Apply(&rb("nope"))))
        .unwrap_err();
    let kube::Error::Api(s) = &e else {
        panic!("{e}")
    };
    assert_eq!(
        (s.code, s.message.as_str()),
        (
            404,
            "clusterroles.rbac.authorization.k8s.io \"nope\" not found"
        )
    );
    // With `bind` on that ClusterRole (by name), the binding goes through.
    api.seed_yaml(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: binder, namespace: prod}
rules: [{apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles], verbs: [bind], resourceNames: [view]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: binder, namespace: prod}
subjects: [{kind: ServiceAccount, name: lifeboat, namespace: lifeboat}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: binder}
"#,
    );
    api.block_on(rbs.patch("v", &pp, &Patch::Apply(&rb("view"))))
        .unwrap();
}

/// A site's RBAC documents by (kind, namespace, name), each role's rules as the set of what
/// they allow (verb, group, resource, names), so files that grant the same compare equal.
fn rbac_meaning(docs: &[Value]) -> std::collections::BTreeMap<String, Value> {
    docs.iter()
        .map(|d| {
            let key = format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap()
            );
            let mut d = d.clone();
            if let Some(rules) = d["rules"].as_array() {
                let mut atoms = BTreeSet::new();
                for r in rules {
                    let l = |k: &str| r[k].as_array().cloned().unwrap_or_default();
                    for g in l("apiGroups") {
                        for res in l("resources") {
                            for v in l("verbs") {
                                atoms.insert(format!("{v} {g}/{res} {}", r["resourceNames"]));
                            }
                        }
                    }
                }
                d["rules"] = serde_json::json!(atoms);
            }
            (key, d)
        })
        .collect()
}

#[test]
fn lifeboat_rbac_makes_the_shipped_rbac_from_the_example_config_and_adds_custom_resources() {
    use lifeboat::k8s::rbac::{generate, RbacOptions};
    let example = include_str!("../config/k8s-primary.toml");
    // (The peer's name does not resolve here; the selection is what matters.)
    let prod = example
        .replace("shop", "prod")
        .replace("dr.example.internal:7420", "127.0.0.1:7420");
    let cfg = lifeboat::config::parse(&prod, std::path::Path::new("k8s-primary.toml")).unwrap();
    let kps: Vec<_> = cfg
        .protections
        .iter()
        .filter_map(|p| p.kubernetes.as_ref())
        .collect();
    let opts = RbacOptions {
        service_account: ("lifeboat".into(), "lifeboat".into()),
        bind_cluster_roles: vec!["view".into()],
    };
    let made = generate(&kps, &opts).unwrap();
    let shipped = |file: &str, ns: &str, role: &str, verbs: &[&str]| {
        rbac_meaning(&shipped_rbac(file, &[ns], role, verbs))
    };
    assert_eq!(
        rbac_meaning(&made.primary),
        shipped(PRIMARY_RBAC, "prod", "lifeboat-primary", &[])
    );
    assert_eq!(
        rbac_meaning(&made.dr),
        shipped(DR_RBAC, "prod-dr", "lifeboat-dr", &[]),
        "the DR files are per DR namespace"
    );
    // A declared custom resource gets exactly the rules the files document.
    let with_cr = prod.replace(
        "# custom_resources = [\"cassandradatacenters.cassandra.datastax.com\"]",
        "custom_resources = [\"widgets.example.com\"]",
    );
    let cfg = lifeboat::config::parse(&with_cr, std::path::Path::new("k8s-primary.toml")).unwrap();
    let kps: Vec<_> = cfg
        .protections
        .iter()
        .filter_map(|p| p.kubernetes.as_ref())
        .collect();
    let made = generate(&kps, &opts).unwrap();
    let dr_verbs = ["list", "create", "patch", "delete"];
    assert_eq!(
        rbac_meaning(&made.primary),
        shipped(PRIMARY_RBAC, "prod", "lifeboat-primary", &["list"])
    );
    assert_eq!(
        rbac_meaning(&made.dr),
        shipped(DR_RBAC, "prod-dr", "lifeboat-dr", &dr_verbs)
    );

    // The command writes both files, which parse as the same documents.
    let dir = tempfile::tempdir().unwrap();
    let cfg_file = dir.path().join("primary.toml");
    std::fs::write(&cfg_file, &with_cr).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(["rbac", "--bind-clusterrole", "view", "--config"])
        .arg(&cfg_file)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for (site, docs) in [("primary", &made.primary), ("dr", &made.dr)] {
        let text = std::fs::read_to_string(dir.path().join(site).join("rbac.yaml")).unwrap();
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        let parsed: Vec<Value> = parsed.into_iter().filter(|d| !d.is_null()).collect();
        assert_eq!(rbac_meaning(&parsed), rbac_meaning(docs), "{site}: {text}");
    }
}

#[test]
fn a_custom_resource_sits_paused_at_the_dr_site_until_failover_and_a_down_aggregated_api_is_skipped(
) {
    let selection = format!("{NAMESPACE}\ncustom_resources = [\"widgets.example.com\"]");
    let dr_selection = "[[protection.kubernetes.standby_patch]]\nkind = \"widgets.example.com\"\npatch = '{\"spec\": {\"paused\": true}}'\n";
    let s = sites(&selection, dr_selection);
    // metrics.k8s.io is served by an aggregated API whose metrics-server is down.
    s.primary_api.add_type(
        "metrics.k8s.io",
        "v1beta1",
        "PodMetrics",
        "podmetrics",
        true,
    );
    s.primary_api.make_unavailable("metrics.k8s.io");
    s.sync_and_apply();
    // Host-path replicas on a file system without reflink: the default keeps the newest
    // point only, and leaves no points' directory behind.
    let replicas = s.pair.dir.path().join("replicas/prod");
    if lifeboat::volume::points::probe(&replicas).is_err() {
        assert!(!replicas.join(".lifeboat-points").exists());
        assert!(s
            .pair
            .dr
            .log_text()
            .contains("only the newest recovery point is kept"));
    }
    let log = s.pair.primary.log_text();
    assert!(
        log.contains("API group skipped") && log.contains("metrics.k8s.io"),
        "{log}"
    );
    let w = s.dr_get("example.com", "widgets", "prod", "shelf");
    assert_eq!(w["spec"]["paused"], true, "{w}");
    assert_eq!(w["spec"]["size"], 3);
    assert_eq!(
        w["metadata"]["annotations"]["lifeboat.dev/standby-patched"],
        "widgets.example.com"
    );

    let (code, text) = failover_at_dr(&s);
    assert_eq!(code, Some(0), "{text}");
    let w = s.dr_get("example.com", "widgets", "prod", "shelf");
    assert!(
        w["spec"].get("paused").is_none(),
        "unpaused by failover: {w}"
    );
    assert!(
        w["metadata"]["annotations"]
            .get("lifeboat.dev/standby-patched")
            .is_none(),
        "{w}"
    );
    assert_eq!(w["spec"]["size"], 3);
}
