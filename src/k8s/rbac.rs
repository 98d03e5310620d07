//! `lifeboat rbac`: each site's least-privilege RBAC for a primary config's Kubernetes
//! protections, made from the same tables the calls come from (the collected kinds of
//! [`super::kinds::builtin`] plus `custom_resources`, the planned-failover workloads, the
//! namespaces and their DR names), so it cannot drift from the code. deploy/kubernetes's
//! shipped files are this output for the example protection of `prod` (a test checks it).
//! Custom resources and non-built-in `include_kinds` must be named `plural.group` (no
//! discovery is run).

use std::collections::BTreeSet;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use super::kinds::{self, Kind};
use super::{KubeProtection, EXCLUDE_LABEL};

const RBAC_V1: &str = "rbac.authorization.k8s.io/v1";
const SNAP_G: &str = super::snapshot::SNAPSHOT_GROUP;
const GROUP_G: &str = super::snapshot::GROUP_SNAPSHOT_GROUP;

/// What a generated file set binds and may bind.
#[derive(Debug, Clone)]
pub struct RbacOptions {
    /// The daemons' ServiceAccount: (namespace, name).
    pub service_account: (String, String),
    /// ClusterRoles the protected namespaces' RoleBindings refer to (the DR site must bind
    /// them by name).
    pub bind_cluster_roles: Vec<String>,
}

/// The documents of `primary/rbac.yaml` and `dr/rbac.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRbac {
    pub primary: Vec<Value>,
    pub dr: Vec<Value>,
}

/// The kinds a protection collects: as `collect::resolve_kinds` resolves them, with names
/// that are not built in read as `plural.group`.
fn collected(kp: &KubeProtection) -> Result<Vec<Kind>> {
    let builtin = kinds::builtin();
    let find = |n: &str| -> Result<Kind> {
        if let Some(k) = builtin.iter().find(|k| k.is_named(n)) {
            return Ok(k.clone());
        }
        let (plural, group) = n
            .split_once('.')
            .ok_or_else(|| anyhow!("{n:?}: name a custom resource as plural.group"))?;
        Ok(Kind {
            group: group.into(),
            version: String::new(),
            kind: plural.into(),
            plural: plural.into(),
            namespaced: true,
        })
    };
    let mut out: Vec<Kind> = if kp.include_kinds.is_empty() {
        builtin.clone()
    } else {
        kp.include_kinds
            .iter()
            .map(|n| find(n))
            .collect::<Result<_>>()?
    };
    for n in &kp.custom_resources {
        out.push(find(n)?);
    }
    for n in &kp.exclude_kinds {
        let k = find(n)?;
        out.retain(|o| (&o.group, &o.plural) != (&k.group, &k.plural));
    }
    Ok(out)
}

fn rule(group: &str, resources: &[String], verbs: &[&str]) -> Value {
    json!({"apiGroups": [group], "resources": resources, "verbs": verbs})
}

/// One rule per API group (in first-seen order) over `resources`.
fn per_group(resources: &[(String, String)], verbs: &[&str]) -> Vec<Value> {
    let mut groups: Vec<&str> = Vec::new();
    for (g, _) in resources {
        if !groups.contains(&g.as_str()) {
            groups.push(g);
        }
    }
    groups
        .iter()
        .map(|g| {
            let mut seen = BTreeSet::new();
            let rs: Vec<String> = resources
                .iter()
                .filter(|(rg, r)| rg == g && seen.insert(r.clone()))
                .map(|(_, r)| r.clone())
                .collect();
            rule(g, &rs, verbs)
        })
        .collect()
}

fn cluster_role(name: &str, rules: Vec<Value>) -> Value {
    json!({"apiVersion": RBAC_V1, "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules})
}

fn subjects(o: &RbacOptions) -> Value {
    json!([{"kind": "ServiceAccount", "name": o.service_account.1, "namespace": o.service_account.0}])
}

fn role_binding(name: &str, ns: &str, o: &RbacOptions) -> Value {
    json!({"apiVersion": RBAC_V1, "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns, "labels": {EXCLUDE_LABEL: "true"}},
        "subjects": subjects(o),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}})
}

/// Both sites' RBAC for `protections` (the primary config's Kubernetes protections).
pub fn generate(protections: &[&KubeProtection], o: &RbacOptions) -> Result<SiteRbac> {
    let mut kinds: Vec<(String, String)> = Vec::new();
    let (mut namespaces, mut dr_namespaces) = (Vec::new(), Vec::new());
    // Where drills of CSI points restore (src/lifecycle/drill_kube.rs): the DR role there
    // too, so a drill needs no cluster-wide rights to create namespaces or objects.
    let mut drill_namespaces = Vec::new();
    let mut stork = false;
    let mut mover_namespaces = Vec::new();
    // (namespace, name) of the movers' ServiceAccount where they call SnapshotMetadata.
    let mut cbt_accounts: Vec<(String, String)> = Vec::new();
    for kp in protections {
        if let Some(c) = &kp.csi {
            mover_namespaces.push(c.mover.namespace.clone());
            let account = (c.mover.namespace.clone(), c.mover.service_account.clone());
            if c.mover.cbt && !cbt_accounts.contains(&account) {
                cbt_accounts.push(account);
            }
        }
        for k in collected(kp)? {
            kinds.push((k.group, k.plural));
        }
        for ns in &kp.namespaces {
            namespaces.push(ns.clone());
            dr_namespaces.push(kp.target_namespace(ns).to_string());
            if kp.csi.is_some() {
                drill_namespaces.push(kp.drill_namespace_of(kp.target_namespace(ns)));
            }
        }
        stork |= kp.pre_rule.is_some() || kp.post_rule.is_some();
    }
    let dedup = |v: &mut Vec<String>| {
        let mut seen = BTreeSet::new();
        v.retain(|n| seen.insert(n.clone()));
    };
    dedup(&mut namespaces);
    dedup(&mut dr_namespaces);
    dedup(&mut drill_namespaces);
    dedup(&mut mover_namespaces);
    let csi = !mover_namespaces.is_empty();
    let has = |g: &str, r: &str| kinds.iter().any(|(kg, kr)| kg == g && kr == r);

    // The primary: collect (src/k8s/collect.rs), quiesce (src/lifecycle/planned.rs), rules.
    let mut listed = vec![(String::new(), "pods".to_string())];
    listed.extend(kinds.iter().cloned());
    let workloads: Vec<(String, String)> = kinds::quiesced()
        .into_iter()
        .map(|k| (k.group, k.plural))
        .collect();
    listed.extend(workloads.iter().cloned());
    let mut rules = vec![rule("", &["namespaces".into()], &["get"])];
    rules.extend(per_group(&listed, &["list"]));
    rules.extend(per_group(&workloads, &["patch"]));
    rules.push(rule("", &["pods/exec".into()], &["get", "create"]));
    if stork {
        rules.push(rule(
            "stork.libopenstorage.org",
            &["rules".into()],
            &["get"],
        ));
    }
    if csi {
        // The CSI path (src/k8s/cut.rs): label the group's PVCs, cut and sweep snapshots.
        rules.push(rule(
            "",
            &["persistentvolumeclaims".into()],
            &["get", "patch"],
        ));
        for (g, r) in [
            (SNAP_G, "volumesnapshots"),
            (GROUP_G, "volumegroupsnapshots"),
        ] {
            rules.push(rule(g, &[r.into()], &["get", "list", "create", "delete"]));
        }
    }
    let mut primary = vec![cluster_role("lifeboat-primary", rules)];
    primary.extend(
        namespaces
            .iter()
            .map(|ns| role_binding("lifeboat-primary", ns, o)),
    );
    if csi {
        let cluster = vec![
            rule("", &["persistentvolumes".into()], &["get"]),
            rule(SNAP_G, &["volumesnapshotclasses".into()], &["list"]),
            rule(
                SNAP_G,
                &["volumesnapshotcontents".into()],
                &["get", "list", "create", "delete"],
            ),
            rule(GROUP_G, &["volumegroupsnapshotclasses".into()], &["list"]),
            rule(GROUP_G, &["volumegroupsnapshotcontents".into()], &["get"]),
        ];
        let mut cluster = cluster;
        if !cbt_accounts.is_empty() {
            // Changed block tracking (src/k8s/cbt.rs): each driver's service, by name.
            cluster.push(rule(
                super::cbt::CBT_GROUP,
                &["snapshotmetadataservices".into()],
                &["get"],
            ));
        }
        primary.push(cluster_role("lifeboat-primary-cluster", cluster));
        primary.push(json!({"apiVersion": RBAC_V1, "kind": "ClusterRoleBinding",
            "metadata": {"name": "lifeboat-primary-cluster"}, "subjects": subjects(o),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lifeboat-primary-cluster"}}));
        // The movers' namespace (src/k8s/movers.rs): their Jobs, PVCs and snapshots.
        let mut movers = job_rules();
        movers.extend([
            rule(
                "",
                &["persistentvolumeclaims".into()],
                &["list", "create", "delete"],
            ),
            rule(
                SNAP_G,
                &["volumesnapshots".into()],
                &["list", "create", "delete"],
            ),
        ]);
        primary.push(cluster_role("lifeboat-primary-movers", movers));
        primary.extend(
            mover_namespaces
                .iter()
                .map(|ns| role_binding("lifeboat-primary-movers", ns, o)),
        );
        // The movers' own identity, for the SnapshotMetadata service only: the sidecar
        // authorizes a caller that may get the target VolumeSnapshot (the movers' copy in
        // their namespace). No API token is mounted in a mover; the projected token's
        // audience is the service's.
        if !cbt_accounts.is_empty() {
            primary.push(cluster_role(
                "lifeboat-mover",
                vec![rule(SNAP_G, &["volumesnapshots".into()], &["get"])],
            ));
        }
        for (ns, sa) in &cbt_accounts {
            primary.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": ns}, "automountServiceAccountToken": false}));
            let mut b = role_binding("lifeboat-mover", ns, o);
            b["metadata"]["name"] = json!(sa);
            b["subjects"] = json!([{"kind": "ServiceAccount", "name": sa, "namespace": ns}]);
            primary.push(b);
        }
    }

    // The DR site: apply, prune and wait (src/k8s/apply.rs).
    let mut rules = vec![rule("", &["namespaces".into()], &["get", "patch"])];
    rules.extend(per_group(&kinds, &["list", "create", "patch", "delete"]));
    let waited: Vec<String> = ["deployments", "statefulsets", "daemonsets"]
        .iter()
        .filter(|r| has("apps", r))
        .map(|r| r.to_string())
        .collect();
    if !waited.is_empty() {
        rules.push(rule("apps", &waited, &["watch", "get"]));
    }
    let rbac_g = "rbac.authorization.k8s.io";
    if has(rbac_g, "roles") || has(rbac_g, "rolebindings") {
        rules.push(rule(rbac_g, &["roles".into()], &["escalate", "bind"]));
    }
    if has(rbac_g, "rolebindings") && !o.bind_cluster_roles.is_empty() {
        let mut r = rule(rbac_g, &["clusterroles".into()], &["bind"]);
        r["resourceNames"] = json!(o.bind_cluster_roles);
        rules.push(r);
    }
    if csi {
        // Failover from a recovery point (src/k8s/restore.rs): each PVC's restore snapshot
        // in its namespace, deleted once the PVC is bound.
        rules.push(rule(
            SNAP_G,
            &["volumesnapshots".into()],
            &["create", "delete"],
        ));
        rules.push(rule("", &["persistentvolumeclaims".into()], &["get"]));
    }
    let cluster_rules = if csi {
        // CSI replicas (src/k8s/replicas.rs): snapshot them into points, restore from them.
        vec![
            rule("", &["persistentvolumes".into()], &["get"]),
            rule(SNAP_G, &["volumesnapshotclasses".into()], &["list"]),
            rule(
                SNAP_G,
                &["volumesnapshotcontents".into()],
                &["get", "list", "create", "patch", "delete"],
            ),
            rule(GROUP_G, &["volumegroupsnapshotclasses".into()], &["list"]),
            rule(GROUP_G, &["volumegroupsnapshotcontents".into()], &["get"]),
        ]
    } else {
        vec![rule(
            "",
            &["persistentvolumes".into()],
            &["list", "create", "patch", "delete"],
        )]
    };
    let mut dr = vec![
        cluster_role("lifeboat-dr", rules),
        cluster_role("lifeboat-dr-cluster", cluster_rules),
        json!({"apiVersion": RBAC_V1, "kind": "ClusterRoleBinding",
            "metadata": {"name": "lifeboat-dr-cluster"}, "subjects": subjects(o),
            "roleRef": {"apiGroup": rbac_g, "kind": "ClusterRole", "name": "lifeboat-dr-cluster"}}),
    ];
    for ns in dr_namespaces.iter().chain(&drill_namespaces) {
        dr.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        dr.push(role_binding("lifeboat-dr", ns, o));
    }
    if csi {
        // The replicas' namespace: replica PVCs, writer Jobs, the points' snapshots.
        let mut writers = job_rules();
        writers.extend([
            rule(
                "",
                &["persistentvolumeclaims".into()],
                &["get", "create", "patch"],
            ),
            rule(
                SNAP_G,
                &["volumesnapshots".into()],
                &["get", "list", "create", "delete"],
            ),
            rule(
                GROUP_G,
                &["volumegroupsnapshots".into()],
                &["get", "list", "create", "delete"],
            ),
        ]);
        dr.push(cluster_role("lifeboat-dr-writers", writers));
        // The movers' namespace is the daemon's own by default, which exists (as at the
        // primary, no Namespace object for it).
        for ns in &mover_namespaces {
            dr.push(role_binding("lifeboat-dr-writers", ns, o));
        }
    }
    Ok(SiteRbac { primary, dr })
}

/// A Job-running role's rules: its Jobs, and their Pods and Events read for node, phase
/// and why one is stuck.
fn job_rules() -> Vec<Value> {
    vec![
        rule(
            "batch",
            &["jobs".into()],
            &["get", "list", "create", "delete"],
        ),
        rule("", &["pods".into(), "events".into()], &["list"]),
    ]
}

/// Documents as one multi-document YAML, after a header comment.
pub fn to_yaml(header: &str, docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
    }
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(d)?);
    }
    Ok(out)
}
