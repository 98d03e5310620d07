//! The resource kinds lifeboat mirrors, where the API serves them, and the order in which
//! the DR site applies them (what others refer to goes first).

use kube::api::ApiResource;

/// A resource kind as the API serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
}

impl Kind {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Kind {
        Kind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.clone(),
            version: self.version.clone(),
            api_version: self.api_version(),
            kind: self.kind.clone(),
            plural: self.plural.clone(),
        }
    }

    /// `plural.group` as kubectl and Velero's `groupResource` write it (`deployments.apps`,
    /// core kinds without a group: `persistentvolumeclaims`).
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether `name` names this kind: its Kind, its plural, or `plural.group`.
    pub fn is_named(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case(&self.kind)
            || name.eq_ignore_ascii_case(&self.plural)
            || name.eq_ignore_ascii_case(&self.group_resource())
    }

    /// Workloads whose replica count the DR site keeps at zero until failover.
    pub fn is_scalable(&self) -> bool {
        self.group == "apps"
            && matches!(
                self.kind.as_str(),
                "Deployment" | "StatefulSet" | "ReplicaSet"
            )
    }
}

/// Apply order: namespaces and CRDs, then what pods refer to, then volumes, workloads, and
/// what fronts them. Custom resources go last (their controllers act on the rest).
pub fn rank(api_version: &str, kind: &str) -> u8 {
    match (api_version, kind) {
        ("v1", "Namespace") | ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => 0,
        ("v1", "ServiceAccount") => 1,
        ("v1", "Secret") | ("v1", "ConfigMap") => 2,
        ("rbac.authorization.k8s.io/v1", "Role") => 2,
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => 3,
        ("v1", "PersistentVolume") => 4,
        ("v1", "PersistentVolumeClaim") => 5,
        ("apps/v1", _) | ("batch/v1", _) => 6,
        ("v1", "Service")
        | ("networking.k8s.io/v1", _)
        | ("autoscaling/v2", _)
        | ("policy/v1", _) => 7,
        _ => 8,
    }
}

/// Every built-in kind that a protection mirrors (DESIGN.md, Kubernetes mode).
pub fn builtin() -> Vec<Kind> {
    vec![
        Kind::new("", "v1", "ServiceAccount", "serviceaccounts", true),
        Kind::new("", "v1", "Secret", "secrets", true),
        Kind::new("", "v1", "ConfigMap", "configmaps", true),
        Kind::new("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        Kind::new(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
        ),
        Kind::new(
            "",
            "v1",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            true,
        ),
        Kind::new("apps", "v1", "Deployment", "deployments", true),
        Kind::new("apps", "v1", "StatefulSet", "statefulsets", true),
        Kind::new("apps", "v1", "DaemonSet", "daemonsets", true),
        Kind::new("apps", "v1", "ReplicaSet", "replicasets", true),
        Kind::new("batch", "v1", "Job", "jobs", true),
        Kind::new("batch", "v1", "CronJob", "cronjobs", true),
        Kind::new("", "v1", "Service", "services", true),
        Kind::new("networking.k8s.io", "v1", "Ingress", "ingresses", true),
        Kind::new(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            true,
        ),
        Kind::new(
            "autoscaling",
            "v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
            true,
        ),
        Kind::new(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        ),
    ]
}

/// What a planned failover scales down (or suspends) at the primary.
pub fn quiesced() -> Vec<Kind> {
    builtin()
        .into_iter()
        .filter(|k| k.is_scalable() || k.kind == "CronJob")
        .collect()
}

pub fn pods() -> Kind {
    Kind::new("", "v1", "Pod", "pods", true)
}

pub fn namespaces() -> Kind {
    Kind::new("", "v1", "Namespace", "namespaces", false)
}

pub fn persistent_volumes() -> Kind {
    Kind::new("", "v1", "PersistentVolume", "persistentvolumes", false)
}

/// The kind an object says it is, if lifeboat knows it.
pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
    builtin()
        .into_iter()
        .chain([namespaces(), persistent_volumes()])
        .find(|k| k.api_version() == api_version && k.kind == kind)
}
