//! The config exactly as read from TOML: serde structs that reject unknown keys and wrong
//! types (the parser names the key). [`super::validate`] turns them into the validated
//! types of [`super`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) site: RawSite,
    pub(super) tls: RawTls,
    pub(super) peer: Option<RawPeer>,
    pub(super) listen: Option<RawListen>,
    pub(super) control: Option<RawControl>,
    pub(super) kubernetes: Option<RawKubernetes>,
    #[serde(default, rename = "protection")]
    pub(super) protections: Vec<RawProtection>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSite {
    pub(super) name: String,
    pub(super) role: String,
    pub(super) state_dir: String,
    pub(super) staging_dir: Option<String>,
    pub(super) min_free_space: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca: String,
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) address: String,
    pub(super) server_name: String,
    pub(super) max_bandwidth: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) address: String,
    /// The primary site's name: only a certificate for it may replicate here.
    pub(super) peer: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub(super) address: String,
    #[serde(default, rename = "client")]
    pub(super) clients: Vec<RawClient>,
}

/// `[[control.client]]`: one caller of the control API and what it may do.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: String,
    pub(super) level: String,
    pub(super) token_file: String,
}

/// `[kubernetes]`: how this site's daemon reaches its own cluster.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    /// Movers of every protection of this site at once (the CSI path).
    pub(super) max_movers: Option<usize>,
    pub(super) kubeconfig: Option<String>,
    pub(super) context: Option<String>,
}

/// `[protection.kubernetes]`: what a protection selects in the cluster.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubeProtection {
    #[serde(default)]
    pub(super) namespaces: Vec<String>,
    pub(super) selector: Option<String>,
    #[serde(default)]
    pub(super) include_kinds: Vec<String>,
    #[serde(default)]
    pub(super) exclude_kinds: Vec<String>,
    #[serde(default)]
    pub(super) custom_resources: Vec<String>,
    pub(super) exclude_label: Option<String>,
    #[serde(default)]
    pub(super) namespace_map: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) storage_class_map: BTreeMap<String, String>,
    /// DR site, CSI replicas: where a drill restores each namespace (`{namespace}` is the
    /// DR site's name for it).
    pub(super) drill_namespace: Option<String>,
    pub(super) resource_modifiers: Option<String>,
    pub(super) volume_path: Option<String>,
    /// DR site, host-path mode: the node holding the replica files (node affinity of the
    /// PersistentVolumes).
    pub(super) volume_node: Option<String>,
    /// A Stork Rule object in the (first) protected namespace, run before the snapshot.
    pub(super) pre_rule: Option<String>,
    pub(super) post_rule: Option<String>,
    /// Run Velero's backup hook annotations of the selected pods (default true).
    pub(super) velero_hooks: Option<bool>,
    /// DR site: how custom resources (and other controllers) stay paused at standby.
    #[serde(default, rename = "standby_patch")]
    pub(super) standby_patches: Vec<RawStandbyPatch>,
    /// CSI data path (no `volume_path`): the snapshot classes and how long a cut may take.
    pub(super) snapshot_class: Option<String>,
    pub(super) group_snapshot_class: Option<String>,
    pub(super) group_snapshots: Option<bool>,
    pub(super) snapshot_timeout: Option<String>,
    pub(super) mover: Option<RawMover>,
}

/// `[protection.kubernetes.mover]`: the Jobs that move each volume.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMover {
    pub(super) image: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) concurrency: Option<usize>,
    pub(super) cpu: Option<String>,
    pub(super) memory: Option<String>,
    pub(super) cpu_limit: Option<String>,
    pub(super) memory_limit: Option<String>,
    pub(super) tls_secret: Option<String>,
    pub(super) stuck_after: Option<String>,
    /// DR site: the address its writers reach this daemon at (HOST:PORT).
    pub(super) connect: Option<String>,
    pub(super) cbt: Option<bool>,
    pub(super) cbt_sample: Option<f64>,
    pub(super) service_account: Option<String>,
}

/// `[[protection.kubernetes.standby_patch]]`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStandbyPatch {
    /// `Kind.group` or `plural.group`.
    pub(super) kind: String,
    /// A JSON merge patch, as JSON text.
    pub(super) patch: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProtection {
    pub(super) name: String,
    pub(super) interval: Option<String>,
    pub(super) rpo_target: Option<String>,
    pub(super) chunk_size: Option<String>,
    pub(super) snapshot: Option<String>,
    pub(super) snapshot_dir: Option<String>,
    #[serde(default)]
    pub(super) pre: Vec<String>,
    #[serde(default)]
    pub(super) post: Vec<String>,
    pub(super) hook_timeout: Option<String>,
    pub(super) pre_rule: Option<String>,
    pub(super) post_rule: Option<String>,
    pub(super) sync_on_start: Option<bool>,
    pub(super) compression: Option<String>,
    pub(super) refine: Option<String>,
    pub(super) keep: Option<usize>,
    pub(super) keep_for: Option<String>,
    pub(super) apply_delay: Option<String>,
    pub(super) scrub_every: Option<String>,
    pub(super) scrub_rate: Option<String>,
    pub(super) kubernetes: Option<RawKubeProtection>,
    #[serde(default, rename = "volume")]
    pub(super) volumes: Vec<RawVolume>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVolume {
    pub(super) name: String,
    pub(super) path: String,
}
