//! What `status` shows: the serde model shared by the daemon's status API and the CLI, and
//! the in-memory live state (activity, last cycle, last error) behind it.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::metrics::ErrorKind;
use crate::volume::snapshot::Method;

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Phases {
    pub snapshot: f64,
    pub freeze: f64,
    pub transfer: f64,
    pub commit: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VolumeReport {
    pub name: String,
    pub size: u64,
    pub snapshot_method: String,
    pub resync: bool,
    pub chunks_changed: u64,
    pub bytes_changed: u64,
    pub chunk_bytes_sent: u64,
}

/// One finished cycle, as the primary saw it.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct CycleReport {
    pub gen: u64,
    pub started_at_ms: u64,
    pub seconds: f64,
    pub phases: Phases,
    pub bytes_scanned: u64,
    pub bytes_changed: u64,
    /// Bytes known unchanged because the snapshot shares their extents with the base
    /// gen's snapshot: neither read nor hashed.
    pub bytes_shared: u64,
    /// Bytes of chunk frames (data plus headers) sent.
    pub chunk_bytes_sent: u64,
    /// Bytes of hash frames exchanged for a resync.
    pub hash_bytes_received: u64,
    /// UDP bytes the connection sent during the cycle.
    pub wire_bytes: u64,
    /// Of those, bytes in packets QUIC declared lost (and sent again).
    pub lost_bytes: u64,
    pub chunks_sent: u64,
    pub zero_chunks_sent: u64,
    pub compressed_chunks: u64,
    /// Raw bytes of compressed chunks minus what was sent for them.
    pub compression_saved_bytes: u64,
    /// Whether changed chunks were refined into 4 KiB block patches this cycle.
    pub refine: bool,
    /// Chunks sent as block patches.
    pub refined_chunks: u64,
    /// Bytes of those chunks that did not need sending (unchanged blocks).
    pub refine_saved_bytes: u64,
    pub volumes: Vec<VolumeReport>,
}

pub fn method_name(m: Method) -> String {
    match m {
        Method::Reflink => "reflink".into(),
        Method::Copy => "copy".into(),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorReport {
    pub kind: ErrorKind,
    pub message: String,
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VolumeStatus {
    pub name: String,
    pub path: String,
    pub size: Option<u64>,
    pub root: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProtectionStatus {
    pub name: String,
    /// primary, dr, failed-over, or fenced.
    pub role: String,
    pub epoch: u64,
    pub consistent_gen: Option<u64>,
    pub consistent_taken_at_ms: Option<u64>,
    pub consistent_age_seconds: Option<f64>,
    pub rpo_target_seconds: f64,
    pub activity: String,
    pub last_cycle: Option<CycleReport>,
    pub last_error: Option<ErrorReport>,
    /// Why this site no longer replicates (fenced primary, failed-over DR site).
    pub stopped_because: Option<String>,
    /// DR: the last replication attempt this site refused, and why.
    pub last_refusal: Option<ErrorReport>,
    pub volumes: Vec<VolumeStatus>,
    /// Kubernetes mode: what the selection covers (primary) or what was applied (DR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeStatus>,
}

/// Kubernetes mode, per protection.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct KubeStatus {
    /// The gen the coverage (primary) or the applied manifests (DR) belong to.
    pub gen: Option<u64>,
    pub covers: crate::k8s::bundle::Coverage,
    pub warnings: Vec<String>,
    /// DR: the last standby apply.
    pub applied: Option<crate::k8s::apply::ApplyReport>,
    /// DR: why the last standby apply failed (the data of the gen is committed regardless).
    pub apply_error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub address: String,
    pub connected: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SiteStatus {
    pub site: String,
    pub role: String,
    pub version: String,
    pub peer: Option<PeerStatus>,
    pub protections: Vec<ProtectionStatus>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FailoverReport {
    pub protection: String,
    pub epoch: u64,
    pub recovered_gen: Option<u64>,
    pub snapshot_taken_at_ms: Option<u64>,
    pub age_seconds: Option<f64>,
    pub replicas: Vec<VolumeStatus>,
    pub already_failed_over: bool,
    pub seconds: f64,
    /// Each step and its seconds: the recovery time, broken down.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Kubernetes mode: the objects applied and the workloads that became ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeFailover>,
    /// A dry run: nothing was changed; `steps` is the plan.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Step {
    pub what: String,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct KubeFailover {
    pub gen: u64,
    pub applied: Vec<String>,
    pub scaled: Vec<String>,
    pub resumed: Vec<String>,
    pub ready: Vec<crate::k8s::apply::Readiness>,
}

/// In-memory state per protection that the store does not keep.
#[derive(Debug, Clone, Default)]
pub struct LiveProtection {
    pub activity: String,
    /// Bytes done of the volume in progress, and its size.
    pub progress: Option<(std::sync::Arc<std::sync::atomic::AtomicU64>, u64)>,
    pub last_cycle: Option<CycleReport>,
    pub last_error: Option<ErrorReport>,
    pub last_refusal: Option<ErrorReport>,
    pub kubernetes: Option<KubeStatus>,
}

#[derive(Default)]
pub struct Live {
    map: Mutex<HashMap<String, LiveProtection>>,
}

impl Live {
    pub fn update(&self, prot: &str, f: impl FnOnce(&mut LiveProtection)) {
        let mut map = self.map.lock().expect("live state lock");
        f(map.entry(prot.to_string()).or_default());
    }

    pub fn get(&self, prot: &str) -> LiveProtection {
        self.map
            .lock()
            .expect("live state lock")
            .get(prot)
            .cloned()
            .unwrap_or_default()
    }

    pub fn activity(&self, prot: &str, what: impl Into<String>) {
        let what = what.into();
        self.update(prot, |l| {
            l.activity = what;
            l.progress = None;
        });
    }

    /// The activity as shown: with the percentage of the volume in progress.
    pub fn describe(l: &LiveProtection) -> String {
        match &l.progress {
            Some((done, total)) if *total > 0 => {
                let done = done.load(std::sync::atomic::Ordering::Relaxed).min(*total);
                format!(
                    "{}: {:.0}% scanned",
                    l.activity,
                    100.0 * done as f64 / *total as f64
                )
            }
            _ => l.activity.clone(),
        }
    }
}
