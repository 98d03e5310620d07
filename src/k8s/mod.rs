//! Kubernetes mode: what a protection selects in the primary's cluster ([`collect`]), how
//! its manifests are cleaned ([`sanitise`]) and mapped ([`transform`]) into the bundle that
//! travels with each gen ([`bundle`]), and how the DR site applies a bundle to its own
//! cluster, scaled down on standby and scaled up at failover ([`apply`]). [`rbac`] makes
//! each site's least-privilege RBAC for a config.

pub mod apply;
pub mod bundle;
pub mod cbt;
pub mod closure;
pub mod collect;
pub mod cut;
pub mod drill;
pub mod kinds;
pub mod labels;
pub mod mover_job;
pub mod movers;
pub mod objects;
pub mod rbac;
pub mod replicas;
pub mod restore;
pub mod sanitise;
pub mod snapshot;
pub mod standby_patch;
pub mod transform;
pub mod writer_job;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use labels::Selector;
use transform::Modifiers;

/// Objects with this label (value "true") are left out of every protection.
pub const EXCLUDE_LABEL: &str = "lifeboat.dev/exclude";
/// Set on every object lifeboat applies at the DR site: the protection it belongs to.
pub const PROTECTION_LABEL: &str = "lifeboat.dev/protection";
/// The primary's replica count of a workload held at zero on standby.
pub const REPLICAS_ANNOTATION: &str = "lifeboat.dev/replicas";
/// The primary's `suspend` of a CronJob or Job held suspended on standby.
pub const SUSPEND_ANNOTATION: &str = "lifeboat.dev/suspend";
/// A node label no node carries: DaemonSets select it on standby so they run no pods.
pub const STANDBY_NODE_LABEL: &str = "lifeboat.dev/standby-never-scheduled";
/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "lifeboat";

/// How the daemon reaches its cluster (the validated `[kubernetes]` table): a kubeconfig
/// file (and context), or, without one, the in-cluster service account (or `$KUBECONFIG`,
/// as kubectl infers it).
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Movers of every protection of the site at once (None: the default, 8).
    pub max_movers: Option<usize>,
}

/// Movers of every protection of a site at once, unless `[kubernetes] max_movers` says.
pub const DEFAULT_MAX_MOVERS: usize = 8;

/// A protection's selection in its cluster (`[protection.kubernetes]`).
#[derive(Debug, Clone)]
pub struct KubeProtection {
    pub namespaces: Vec<String>,
    /// Pods by label: their PVCs form the group. None: the whole namespaces.
    pub selector: Option<Selector>,
    pub include_kinds: Vec<String>,
    pub exclude_kinds: Vec<String>,
    /// Custom resources to mirror, as `plural.group` (`cassandradatacenters.cassandra.datastax.com`).
    pub custom_resources: Vec<String>,
    pub exclude_label: String,
    pub namespace_map: BTreeMap<String, String>,
    /// Template with `{namespace}` (the DR site's name): a drill's namespace for it.
    pub drill_namespace: String,
    pub storage_class_map: BTreeMap<String, String>,
    pub resource_modifiers: Option<Modifiers>,
    /// Template with `{namespace}` and `{pvc}`: the PVC's bytes at the primary, its replica
    /// at the DR site.
    pub volume_path: String,
    /// Host-path mode at the DR site: the node whose disk holds the replica files; each
    /// PersistentVolume gets a node affinity for it, so pods using the PVC start there.
    pub volume_node: Option<String>,
    /// Stork Rule objects (in the first protected namespace) run before and after the
    /// group snapshot, through pods/exec.
    pub pre_rule: Option<String>,
    pub post_rule: Option<String>,
    /// Run Velero's `pre.hook.backup.velero.io/*` and `post...` annotations of the pods.
    pub velero_hooks: bool,
    /// DR site: merge patches that keep custom resources paused at standby (on top of the
    /// defaults of [`standby_patch`]).
    pub standby_patches: Vec<standby_patch::StandbyPatch>,
    /// The CSI data path (no `volume_path`): at the primary, snapshots read by mover Jobs;
    /// at the DR site, replica PVCs written by writer Jobs and snapshotted into recovery
    /// points.
    pub csi: Option<CsiSettings>,
}

/// How the primary cuts and moves a protection's PVCs through CSI.
#[derive(Debug, Clone)]
pub struct CsiSettings {
    pub wanted: snapshot::Wanted,
    /// How long cutting the gen's snapshots, and then their becoming ready, may each take.
    pub snapshot_timeout: std::time::Duration,
    pub mover: MoverSettings,
}

/// `[protection.kubernetes.mover]`.
#[derive(Debug, Clone)]
pub struct MoverSettings {
    /// The lifeboat image (the same binary runs `lifeboat mover`).
    pub image: String,
    /// Where movers, their PVCs and snapshots run (lifeboat's own namespace).
    pub namespace: String,
    /// Movers of the protection at once.
    pub concurrency: usize,
    pub cpu: String,
    pub memory: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: String,
    /// The Secret with this site's pair TLS (ca.pem, site.pem, site.key).
    pub tls_secret: String,
    /// A mover Pending or silent this long is stuck: the cycle fails naming why.
    pub stuck_after: std::time::Duration,
    /// DR site: where its writers reach this daemon (HOST:PORT); None: the listen address.
    pub connect: Option<String>,
    /// Use the driver's SnapshotMetadata service (changed block tracking) where the
    /// cluster has one: movers read only the ranges it reports.
    pub cbt: bool,
    /// The share of the chunks a changed block answer leaves out that movers read anyway.
    pub cbt_sample: f64,
    /// The movers' ServiceAccount when they call the SnapshotMetadata service (its token,
    /// projected with the service's audience, is what the service authorizes).
    pub service_account: String,
}

impl Default for MoverSettings {
    fn default() -> Self {
        MoverSettings {
            image: concat!("ghcr.io/lifeboat-dr/lifeboat:", env!("CARGO_PKG_VERSION")).into(),
            namespace: "lifeboat".into(),
            concurrency: 4,
            cpu: "250m".into(),
            memory: "256Mi".into(),
            cpu_limit: None,
            memory_limit: "1Gi".into(),
            tls_secret: "lifeboat-tls".into(),
            stuck_after: std::time::Duration::from_secs(300),
            connect: None,
            cbt: true,
            cbt_sample: 0.01,
            service_account: "lifeboat-mover".into(),
        }
    }
}

impl KubeProtection {
    pub fn path_of(&self, namespace: &str, pvc: &str) -> PathBuf {
        PathBuf::from(
            self.volume_path
                .replace("{namespace}", namespace)
                .replace("{pvc}", pvc),
        )
    }

    /// A volume named `namespace.pvc` (see [`volume_name`]) at this site.
    pub fn path_of_volume(&self, volume: &str) -> Option<PathBuf> {
        let (ns, pvc) = volume.split_once('.')?;
        Some(self.path_of(ns, pvc))
    }

    /// The namespace a drill restores the DR namespace `ns` into.
    pub fn drill_namespace_of(&self, ns: &str) -> String {
        self.drill_namespace.replace("{namespace}", ns)
    }

    /// The DR site's namespace for a primary namespace.
    pub fn target_namespace<'a>(&'a self, ns: &'a str) -> &'a str {
        self.namespace_map.get(ns).map_or(ns, String::as_str)
    }
}

/// Where a drill restores a namespace unless `drill_namespace` says.
pub const DEFAULT_DRILL_NAMESPACE: &str = "{namespace}-drill";

/// The volume of a PVC: `namespace.pvc` with the DR site's namespace (a namespace name has
/// no dots, so the first dot splits it back).
pub fn volume_name(namespace: &str, pvc: &str) -> String {
    format!("{namespace}.{pvc}")
}

/// A client for this site's cluster.
pub async fn connect(settings: &KubeSettings) -> Result<kube::Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            let opts = kube::config::KubeConfigOptions {
                context: settings.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .with_context(|| {
                    format!(
                        "kubeconfig {} (context {})",
                        path.display(),
                        settings.context.as_deref().unwrap_or("current")
                    )
                })?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig in the config file, and neither the in-cluster service account nor $KUBECONFIG is usable")?,
    };
    kube::Client::try_from(config).context("build the Kubernetes client")
}

/// An API error with what was being done and, for the errors an operator fixes (RBAC,
/// missing namespaces), what to check.
pub fn api_error(e: kube::Error, doing: impl std::fmt::Display) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.code == 403 => {
            // A creating server-side apply's own check names neither verb nor namespace.
            let create = if s.message.ends_with("is forbidden: ") {
                " (the `create` check of a server-side apply that creates the object)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "{doing}: the API server denied it (403 Forbidden: {}){create}; grant the daemon's service account this permission (see deploy/kubernetes/primary/rbac.yaml or deploy/kubernetes/dr/rbac.yaml; a server-side apply that creates an object needs `create`)",
                s.message
            )
        }
        kube::Error::Api(s) => anyhow::anyhow!("{doing}: {} {} ({})", s.code, s.reason, s.message),
        _ => anyhow::Error::new(e).context(doing.to_string()),
    }
}
