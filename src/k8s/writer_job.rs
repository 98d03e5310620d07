//! The DR site's writer Jobs, the pure part: one replica PVC per protected volume (Block,
//! in the movers' namespace, kept from cycle to cycle), the Job that runs `lifeboat mover
//! --write` on it for one committed gen, and what a writer reports back.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::mover_job::{job_object, JobDevice, TLS_DIR};
use super::snapshot::{labels_for, MANAGED_BY};
use super::MoverSettings;
use crate::ids::Gen;

/// Labels a replica PVC with the protection it belongs to. Not the protection label of
/// per-gen objects: a sweep of those must never select a replica.
pub const REPLICA_LABEL: &str = "lifeboat.dev/replica-of";
/// The lifeboat volume a replica PVC holds (`namespace.pvc`, which a label value cannot
/// always carry).
pub const VOLUME_ANNOTATION: &str = "lifeboat.dev/volume";
/// Labels what a writer Job is, beside its protection and gen.
pub const ROLE_LABEL: &str = "lifeboat.dev/role";
const DEVICE: &str = "/dev/lifeboat-replica";

/// A writer's result, as the daemon reads it from the termination message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub volume: String,
    pub gen: u64,
    pub log_bytes: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub patched_chunks: u64,
    pub bytes_written: u64,
    /// The replica did not hold what a patch was made against (chunk and why): the
    /// writer stopped before that patch, and the volume needs a resync.
    #[serde(default)]
    pub diverged: Option<String>,
}

/// A reader's result (`lifeboat mover --verify`), as the daemon reads it from the
/// termination message; the divergent chunks themselves the daemon has from the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    pub volume: String,
    pub gen: u64,
    pub chunks: u64,
    pub divergent: u64,
    pub bytes_read: u64,
}

/// A Kubernetes name for `what` of `protection`: lowercase, `-` for anything else, a hash
/// of the original always appended (so `a-b.c` and `a.b-c` never meet), at most `max`.
fn hashed_name(prefix: &str, what: &str, max: usize) -> String {
    let clean = super::snapshot::name_chars(&format!("{prefix}-{what}"));
    let h = blake3::hash(format!("{prefix}\0{what}").as_bytes()).to_hex();
    let keep = clean.len().min(max - 11);
    format!("{}-{}", clean[..keep].trim_end_matches('-'), &h[..10])
}

/// The replica PVC of `volume`.
pub fn replica_name(protection: &str, volume: &str) -> String {
    hashed_name(&format!("lifeboat-{protection}-replica"), volume, 253)
}

/// The writer Job of `volume` at `gen` (a Job name is a label value of its Pods: 63 at
/// most, 52 leaves room for the Pod suffix).
pub fn writer_name(protection: &str, gen: Gen, volume: &str) -> String {
    hashed_name(&format!("lifeboat-{protection}-g{}-w", gen.0), volume, 52)
}

/// The reader Job of `volume` for a verify of `gen`.
pub fn reader_name(protection: &str, gen: Gen, volume: &str) -> String {
    hashed_name(&format!("lifeboat-{protection}-g{}-r", gen.0), volume, 52)
}

/// The replica PVC of `volume`: Block, `size` bytes, of `class` (None: the default).
pub fn replica_pvc(
    s: &MoverSettings,
    protection: &str,
    volume: &str,
    size: u64,
    class: Option<&str>,
) -> Value {
    let mut pvc = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": replica_name(protection, volume),
            "namespace": s.namespace,
            "labels": {MANAGED_BY: "lifeboat", REPLICA_LABEL: protection},
            "annotations": {VOLUME_ANNOTATION: volume},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Block",
            "resources": {"requests": {"storage": size.to_string()}},
        },
    });
    if let Some(c) = class {
        pvc["spec"]["storageClassName"] = json!(c);
    }
    pvc
}

/// How a writer reaches its daemon.
pub struct WriterSpec<'a> {
    pub protection: &'a str,
    pub gen: Gen,
    pub settings: &'a MoverSettings,
    /// The DR daemon's address as the cluster reaches it, and the DR site's name.
    pub connect: &'a str,
    pub site: &'a str,
}

/// The writer Job of `volume` at the spec's gen.
pub fn writer_job(w: &WriterSpec<'_>, volume: &str) -> Value {
    let mut labels = labels_for(w.protection, w.gen);
    labels[ROLE_LABEL] = json!("writer");
    let args = vec![
        "mover".to_string(),
        "--write".to_string(),
        format!("--device={DEVICE}"),
        format!("--peer={}", w.connect),
        format!("--server-name={}", w.site),
        format!("--site={}", w.site),
        format!("--tls-dir={TLS_DIR}"),
        format!("--protection={}", w.protection),
        format!("--gen={}", w.gen.0),
        format!("--volume={volume}"),
        "--result=/dev/termination-log".to_string(),
    ];
    job_object(
        &writer_name(w.protection, w.gen, volume),
        &labels,
        w.settings,
        args,
        &[JobDevice {
            name: "device",
            path: DEVICE,
            claim: &replica_name(w.protection, volume),
            read_only: false,
        }],
    )
}

/// The reader Job of `volume` (`size` bytes in `chunk_size` chunks at the spec's gen): the
/// replica attached read-only.
pub fn reader_job(w: &WriterSpec<'_>, volume: &str, size: u64, chunk_size: u32) -> Value {
    let mut labels = labels_for(w.protection, w.gen);
    labels[ROLE_LABEL] = json!("reader");
    let args = vec![
        "mover".to_string(),
        "--verify".to_string(),
        format!("--device={DEVICE}"),
        format!("--peer={}", w.connect),
        format!("--server-name={}", w.site),
        format!("--site={}", w.site),
        format!("--tls-dir={TLS_DIR}"),
        format!("--protection={}", w.protection),
        format!("--gen={}", w.gen.0),
        format!("--volume={volume}"),
        format!("--size={size}"),
        format!("--chunk-size={chunk_size}"),
        "--result=/dev/termination-log".to_string(),
    ];
    job_object(
        &reader_name(w.protection, w.gen, volume),
        &labels,
        w.settings,
        args,
        &[JobDevice {
            name: "device",
            path: DEVICE,
            claim: &replica_name(w.protection, volume),
            read_only: true,
        }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_and_writer_names_are_valid_and_never_collide() {
        let a = replica_name("shop", "a-b.c");
        let b = replica_name("shop", "a.b-c");
        assert_ne!(a, b);
        for n in [&a, &b] {
            assert!(n.len() <= 253 && n.starts_with("lifeboat-shop-replica-a-b-c-"));
        }
        let long = "n".repeat(60) + "." + &"p".repeat(200);
        assert!(replica_name("shop", &long).len() <= 253);
        let w = writer_name("shop", Gen(12), &long);
        assert!(w.len() <= 52, "{w}");
        assert_ne!(
            writer_name("shop", Gen(12), "a-b.c"),
            writer_name("shop", Gen(12), "a.b-c")
        );
    }

    #[test]
    fn a_writer_attaches_its_replica_writable_and_runs_restricted() {
        let s = MoverSettings::default();
        let w = WriterSpec {
            protection: "shop",
            gen: Gen(4),
            settings: &s,
            connect: "lifeboat.lifeboat.svc:7420",
            site: "dr",
        };
        let job = writer_job(&w, "prod.data-0");
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["automountServiceAccountToken"], false);
        let claim = &pod["volumes"][0]["persistentVolumeClaim"];
        assert_eq!(claim["claimName"], replica_name("shop", "prod.data-0"));
        assert_eq!(claim["readOnly"], false);
        assert_eq!(job["metadata"]["labels"][ROLE_LABEL], "writer");
        let args = pod["containers"][0]["args"].to_string();
        assert!(
            args.contains("--write") && args.contains("--gen=4"),
            "{args}"
        );
        let reader = reader_job(&w, "prod.data-0", 1 << 20, 65536);
        let rpod = &reader["spec"]["template"]["spec"];
        assert_eq!(
            rpod["volumes"][0]["persistentVolumeClaim"]["readOnly"],
            true
        );
        assert_eq!(reader["metadata"]["labels"][ROLE_LABEL], "reader");
        let rargs = rpod["containers"][0]["args"].to_string();
        assert!(
            rargs.contains("--verify") && rargs.contains("--size=1048576"),
            "{rargs}"
        );
        assert_ne!(reader["metadata"]["name"], job["metadata"]["name"]);
        let pvc = replica_pvc(&s, "shop", "prod.data-0", 1 << 30, Some("fast"));
        assert_eq!(pvc["spec"]["volumeMode"], "Block");
        assert!(pvc["metadata"]["labels"][crate::k8s::PROTECTION_LABEL].is_null());
    }
}
