//! The control API's model: every request option and answer, shared by the daemon's HTTP
//! server, the CLI, the demo and the tests, and the client that speaks it ([`client`]).

use serde::{Deserialize, Serialize};

use crate::metrics::ErrorKind;

pub mod client;
pub use client::{Client, Unreachable};

/// What a control API caller may do; each level includes the ones before it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// `/metrics`, `/readyz` with its reason, `status`, manifests without Secret data.
    Read,
    /// `sync`.
    Operate,
    /// `failover`, `quiesce`, `reprotect`, manifests with Secret data.
    Admin,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Read, Level::Operate, Level::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Operate => "operate",
            Level::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Phases {
    pub snapshot: f64,
    pub freeze: f64,
    pub transfer: f64,
    pub commit: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct VolumeReport {
    pub name: String,
    pub size: u64,
    pub snapshot_method: String,
    pub resync: bool,
    pub chunks_changed: u64,
    pub bytes_changed: u64,
    pub chunk_bytes_sent: u64,
    /// Bytes read from the snapshot (CSI movers: what changed block tracking left to read).
    #[serde(default)]
    pub bytes_read: u64,
    /// CSI movers' changed block tracking: `delta`, `allocated`, `full` (asked, but not
    /// used: see `cbt_fallback`) or empty (not offered).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cbt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_fallback: Option<String>,
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
    /// Rule actions that failed with `onError: Continue` (the cycle went on), each named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_failures: Vec<String>,
    pub volumes: Vec<VolumeReport>,
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
    /// DR, CSI replicas: the gens of the recovery points kept, oldest first (the newest is
    /// the consistent gen).
    #[serde(default)]
    pub points: Vec<u64>,
    pub rpo_target_seconds: f64,
    pub activity: String,
    pub last_cycle: Option<CycleReport>,
    pub last_error: Option<ErrorReport>,
    /// Why this site no longer replicates (fenced primary, failed-over DR site).
    pub stopped_because: Option<String>,
    /// After a failback: which way the protection goes from this site, since when, and
    /// (at the receiving site) what the failback discarded and where it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// DR: the last replication attempt this site refused, and why.
    pub last_refusal: Option<ErrorReport>,
    /// DR: replicas found changed outside lifeboat, waiting for their repair by the next
    /// cycle, each with what was found.
    #[serde(default)]
    pub degraded: Vec<String>,
    /// DR: when a background scrub pass last found every replica equal to the DR index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_clean_scrub_ms: Option<u64>,
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
    /// Primary, CSI path: the gen's movers, one per volume.
    #[serde(default)]
    pub movers: Vec<MoverStatus>,
}

/// One mover of the cycle in progress (or of the last one).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct MoverStatus {
    pub volume: String,
    pub pvc: String,
    /// `starting`, `waiting`, `running`, `done` or `failed`.
    pub phase: String,
    pub node: Option<String>,
    /// Why it waits or failed.
    pub reason: Option<String>,
    pub bytes_scanned: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
    /// Bytes it read from the device, and its changed block tracking (as in
    /// [`VolumeReport`]).
    #[serde(default)]
    pub bytes_read: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cbt: String,
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
    /// What did not work: objects the server refused, workloads not ready in time. The
    /// failover itself (the fence, the replicas) is done; these need an operator. The CLI
    /// exits non-zero when there are any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
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
    /// Objects recreated because their change touched an immutable field.
    #[serde(default)]
    pub recreated: Vec<String>,
}

/// The body of every error answer.
#[derive(Serialize, Deserialize, Debug)]
pub struct ApiError {
    pub error: String,
    pub kind: Option<ErrorKind>,
}

/// `POST /v1/protections/{name}/failover` query options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverOptions {
    pub dry_run: bool,
    /// How long to wait for the workloads to report ready replicas.
    pub ready_timeout_secs: u64,
    /// Recover this retained recovery point instead of the default.
    pub gen: Option<u64>,
    /// Recover the newest point even where `apply_delay` makes an older one the default.
    pub latest: bool,
}

impl Default for FailoverOptions {
    fn default() -> Self {
        FailoverOptions {
            gen: None,
            latest: false,
            dry_run: false,
            ready_timeout_secs: 300,
        }
    }
}

/// A gen's objects for `lifeboat export` (`GET /v1/protections/{name}/manifests`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exported {
    pub protection: String,
    pub gen: u64,
    pub standby: bool,
    pub objects: Vec<serde_json::Value>,
    pub warnings: Vec<String>,
    /// The gens whose manifests this site keeps.
    pub kept: Vec<u64>,
}

/// One recovery point the DR site keeps.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PointInfo {
    pub gen: u64,
    /// When the gen's group snapshot was taken at the primary.
    pub taken_at_ms: u64,
    pub age_seconds: f64,
    pub volumes: usize,
    /// The snapshots' restore sizes, summed.
    pub size_bytes: u64,
    /// Pinned: pruning passes it by.
    pub held: bool,
}

/// The recovery points of a protection, oldest first (the newest is the failover default).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PointsReport {
    pub protection: String,
    pub keep: usize,
    /// `keep_for`: the window the points are spread over.
    #[serde(default)]
    pub keep_for_seconds: Option<u64>,
    #[serde(default)]
    pub apply_delay_seconds: Option<u64>,
    /// The gen a failover recovers unless told otherwise.
    #[serde(default)]
    pub failover_default: Option<u64>,
    pub points: Vec<PointInfo>,
}

/// One replica as `lifeboat verify` read it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VolumeVerify {
    pub volume: String,
    pub path: String,
    pub chunks: u64,
    /// Chunk index ranges (inclusive) whose bytes differ from the DR index.
    pub divergent: Vec<(u64, u64)>,
    pub divergent_bytes: u64,
}

/// What `lifeboat verify` found in the replicas of the consistent point.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub protection: String,
    pub gen: u64,
    pub volumes: Vec<VolumeVerify>,
    /// The divergent volumes were marked: the next cycle resyncs them.
    pub marked_for_repair: bool,
}

/// A drill started at the DR site: where its copies of the recovery point are.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrillStarted {
    pub protection: String,
    /// GEN-MILLISECONDS, to end it with.
    pub id: String,
    pub gen: u64,
    /// Volume -> its copy.
    pub files: std::collections::BTreeMap<String, String>,
    /// `reflink`, or `copy` where the file system cannot share extents; `csi` for a
    /// drill restored into namespaces.
    pub method: String,
    pub clone_seconds: f64,
    /// Kubernetes mode: DR namespace -> the drill namespace it was restored into.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub namespaces: std::collections::BTreeMap<String, String>,
    /// Kubernetes mode: the daemon's steps (restore and apply, wait for the workloads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    /// What was left out of the drill or not applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Kubernetes mode: workloads that did not become ready (the drill fails).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready: Vec<String>,
}

/// A drill ended: its copies removed, or kept (`--keep`) where they are.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrillEnded {
    pub id: String,
    pub removed: bool,
    pub kept: Vec<String>,
}

/// What `lifeboat drill` reports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrillReport {
    pub started: DrillStarted,
    /// Each step and its seconds; their sum is the drill's measured recovery time.
    pub steps: Vec<Step>,
    pub rto_seconds: f64,
    pub check: Option<DrillCheck>,
    pub passed: bool,
    pub ended: DrillEnded,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrillCheck {
    pub command: String,
    pub exit_code: Option<i32>,
    /// The end of its output (stdout and stderr), at most 4 KiB.
    pub output: String,
}

/// What `lifeboat failback` did at the old primary.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FailbackReport {
    pub protection: String,
    /// The site that sends the protection from now on (where it failed over).
    pub sender: String,
    pub epoch: u64,
    /// The gen the sender failed over at: the last one both sites had.
    pub common_gen: Option<u64>,
    /// The gen the discarded writes were counted against.
    pub fork_gen: Option<u64>,
    /// Chunks (and their bytes) written here after `fork_gen`: overwritten by the first
    /// cycle, kept in `kept` before.
    pub discarded_chunks: u64,
    pub discarded_bytes: u64,
    /// Volume → the file it is kept in, as it was before the failback.
    pub kept: std::collections::BTreeMap<String, String>,
    pub done: Vec<String>,
}
