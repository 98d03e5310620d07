//! Mover Jobs at the primary: for each cut volume, a snapshot visible in the movers'
//! namespace (a pre-provisioned VolumeSnapshotContent naming the same driver snapshot,
//! with the volume-mode change allowed), a Block-mode PVC restored from it, and a Job
//! running `lifeboat mover` that attaches it as a raw device on whichever node CSI puts it.
//! At most `concurrency` run at once. Whatever a mover's end, its Job, PVC, snapshot and
//! content are deleted; a killed daemon's leftovers are swept by label.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{self, StreamExt};
use kube::api::{DynamicObject, ListParams, PostParams};
use serde_json::{json, Value};

use super::cut::Cut;
use super::kinds::Kind;
use super::objects::{
    api, delete, delete_labelled, events_kind, jobs, pods, pvcs_kind, volume_snapshot_contents,
    volume_snapshots,
};
use super::snapshot::{self, object_name, VolumeMode};
use super::{api_error, MoverSettings};
use crate::ids::{CycleId, Gen};
use crate::mover::Outcome;

/// Lets a Block-mode PVC be restored from a Filesystem-mode snapshot (external-provisioner
/// refuses a mode change without it, on the content).
pub const ALLOW_MODE_CHANGE: &str = "snapshot.storage.kubernetes.io/allow-volume-mode-change";
/// Where the mover sees its device and TLS material.
const DEVICE: &str = "/dev/lifeboat-source";
const TLS_DIR: &str = "/etc/lifeboat/tls";
const SCRATCH: &str = "/scratch";

/// What every mover of one cycle shares.
pub struct Movers<'a> {
    pub client: kube::Client,
    pub spec: Spec<'a>,
    /// The site's movers at once, over all protections.
    pub site: &'a tokio::sync::Semaphore,
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
}

/// One moved volume.
#[derive(Debug, Clone)]
pub struct Moved {
    pub volume: String,
    pub node: Option<String>,
    pub outcome: Outcome,
}

/// The names of one volume's mover objects.
struct Names {
    content: String,
    snapshot: String,
    pvc: String,
    job: String,
}

fn names(m: &Spec<'_>, cut: &Cut) -> Names {
    let what = format!("{}-{}", cut.pvc.namespace, cut.pvc.name);
    // Job names become a label value of their Pods: 63 at most.
    Names {
        content: object_name(&m.protection, m.gen, &format!("{what}-src"), 253),
        snapshot: object_name(&m.protection, m.gen, &what, 253),
        pvc: object_name(&m.protection, m.gen, &what, 253),
        job: object_name(&m.protection, m.gen, &what, 52),
    }
}

/// The objects of one volume's mover, pure.
fn objects(m: &Spec<'_>, cut: &Cut, n: &Names) -> Result<[Value; 4]> {
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
    let s = m.settings;
    let mut limits = json!({"memory": s.memory_limit});
    if let Some(c) = &s.cpu_limit {
        limits["cpu"] = json!(c);
    }
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
        "--result=/dev/termination-log".to_string(),
    ];
    if m.compress {
        args.push("--compress".into());
    }
    if m.refine {
        args.push("--refine".into());
    }
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": n.job, "namespace": ns, "labels": labels},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    // The restricted Pod Security level: non-root, no privilege, the
                    // device through volumeDevices (no hostPath).
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
                        "volumeDevices": [{"name": "source", "devicePath": DEVICE}],
                        "volumeMounts": [
                            {"name": "tls", "mountPath": TLS_DIR, "readOnly": true},
                            {"name": "scratch", "mountPath": SCRATCH},
                        ],
                    }],
                    "volumes": [
                        {"name": "source", "persistentVolumeClaim": {"claimName": n.pvc, "readOnly": true}},
                        {"name": "tls", "secret": {"secretName": s.tls_secret, "defaultMode": 288}},
                        {"name": "scratch", "emptyDir": {}},
                    ],
                },
            },
        },
    });
    Ok([content, vs, pvc, job])
}

/// What `move_all` reports as movers start and end.
pub enum Event<'a> {
    Started(&'a Cut),
    /// Its Pod runs on `node`.
    Running {
        cut: &'a Cut,
        node: String,
    },
    /// Not running yet, and why (its Pod's condition or state, its PVC's last event).
    Waiting {
        cut: &'a Cut,
        why: String,
    },
    Done(&'a Moved),
    /// `result`: `failed`, `stuck` or `unschedulable` (a metric label).
    Failed {
        cut: &'a Cut,
        result: &'static str,
        why: String,
    },
}

/// Moves every cut volume, at most `concurrency` at once, telling `events` as each starts
/// and ends. The failures are returned together (each names its PVC), after every mover
/// ended.
pub async fn move_all(
    m: &Movers<'_>,
    cuts: &[Cut],
    events: &(dyn Fn(Event<'_>) + Sync),
) -> Result<Vec<Moved>> {
    // Futures made up front (not in an async closure): the stream stays `Send` for any
    // lifetime, as the scheduler's spawned task needs.
    let futures: Vec<_> = cuts.iter().map(|c| move_one(m, c, events)).collect();
    let mut running = stream::iter(futures).buffer_unordered(m.spec.settings.concurrency.max(1));
    let mut out = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = running.next().await {
        match r {
            Ok(x) => out.push(x),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(out)
}

async fn move_one(m: &Movers<'_>, cut: &Cut, events: &(dyn Fn(Event<'_>) + Sync)) -> Result<Moved> {
    // The protection's concurrency is the stream's; the site's is this permit.
    let _permit = m
        .site
        .acquire()
        .await
        .map_err(|_| anyhow!("the site's mover limit was closed"))?;
    events(Event::Started(cut));
    let n = names(&m.spec, cut);
    let result = async {
        let [content, vs, pvc, job] = objects(&m.spec, cut, &n)?;
        let ns = m.spec.settings.namespace.as_str();
        create(&m.client, &volume_snapshot_contents(), None, content).await?;
        create(&m.client, &volume_snapshots(), Some(ns), vs).await?;
        create(&m.client, &pvcs_kind(), Some(ns), pvc).await?;
        create(&m.client, &jobs(), Some(ns), job).await?;
        watch(m, cut, &n, events).await
    }
    .await
    .with_context(|| format!("mover of PVC {}", cut.pvc.id()));
    cleanup(&m.client, &m.spec.settings.namespace, &n).await;
    match result {
        Ok((node, outcome)) => {
            let moved = Moved {
                volume: cut.pvc.volume.clone(),
                node,
                outcome,
            };
            events(Event::Done(&moved));
            Ok(moved)
        }
        Err(e) => {
            let why = format!("{e:#}");
            let result = if why.contains("unschedulable") {
                "unschedulable"
            } else if why.contains(" stuck ") {
                "stuck"
            } else {
                "failed"
            };
            events(Event::Failed { cut, result, why });
            Err(e)
        }
    }
}

async fn create(client: &kube::Client, kind: &Kind, ns: Option<&str>, v: Value) -> Result<()> {
    let o: DynamicObject = serde_json::from_value(v)?;
    let name = o.metadata.name.clone().unwrap_or_default();
    let a = api(client, kind, ns);
    match a.create(&PostParams::default(), &o).await {
        Ok(_) => Ok(()),
        // Left by a killed daemon for this same gen: replace it.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            delete(client, kind, ns, &name).await?;
            a.create(&PostParams::default(), &o)
                .await
                .map(|_| ())
                .map_err(|e| api_error(e, format!("create {} {name}", kind.kind)))
        }
        Err(e) => Err(api_error(e, format!("create {} {name}", kind.kind))),
    }
}

async fn cleanup(client: &kube::Client, ns: &str, n: &Names) {
    let steps: [(Kind, Option<&str>, &str); 4] = [
        (jobs(), Some(ns), &n.job),
        (pvcs_kind(), Some(ns), &n.pvc),
        (volume_snapshots(), Some(ns), &n.snapshot),
        (volume_snapshot_contents(), None, &n.content),
    ];
    for (kind, ns, name) in steps {
        if let Err(e) = delete(client, &kind, ns, name).await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove a mover's object; the next cycle's sweep retries");
        }
    }
}

/// Why a Pod is not running, from its conditions and container states.
fn pod_reason(pod: &Value) -> Option<String> {
    for c in pod["status"]["conditions"].as_array().into_iter().flatten() {
        if c["type"] == "PodScheduled" && c["status"] == "False" {
            return Some(format!(
                "unschedulable: {}",
                c["message"].as_str().unwrap_or("no node fits")
            ));
        }
    }
    for cs in pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(w) = cs["state"]["waiting"].as_object() {
            return Some(format!(
                "{}: {}",
                w.get("reason").and_then(Value::as_str).unwrap_or("Waiting"),
                w.get("message").and_then(Value::as_str).unwrap_or("")
            ));
        }
    }
    None
}

/// The terminated state of the mover container, if it ended.
fn terminated(pod: &Value) -> Option<(i64, String)> {
    pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find_map(|cs| cs["state"]["terminated"].as_object())
        .map(|t| {
            (
                t.get("exitCode").and_then(Value::as_i64).unwrap_or(-1),
                t.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        })
}

fn condition<'v>(job: &'v Value, kind: &str) -> Option<&'v Value> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind && c["status"] == "True")
}

/// Waits for the Job to end. Its result is in the succeeded Pod's termination message; a
/// Job that failed, or a Pod stuck (Pending, or not started) past `stuck_after`, ends it
/// with the reason its Pod gives.
async fn watch(
    m: &Movers<'_>,
    cut: &Cut,
    n: &Names,
    events: &(dyn Fn(Event<'_>) + Sync),
) -> Result<(Option<String>, Outcome)> {
    let ns = m.spec.settings.namespace.as_str();
    let started = Instant::now();
    let mut told: Option<String> = None;
    let mut delay = Duration::from_millis(50);
    let pod_list = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={}", n.job));
    loop {
        let job = api(&m.client, &jobs(), Some(ns))
            .get(&n.job)
            .await
            .map_err(|e| api_error(e, format!("get Job {ns}/{}", n.job)))?;
        let job = serde_json::to_value(job)?;
        let pods: Vec<Value> = api(&m.client, &pods(), Some(ns))
            .list(&pod_list)
            .await
            .map_err(|e| api_error(e, format!("list the Pods of Job {ns}/{}", n.job)))?
            .items
            .into_iter()
            .map(|p| serde_json::to_value(p).expect("objects serialise"))
            .collect();
        if condition(&job, "Complete").is_some() {
            let pod = pods
                .iter()
                .find(|p| p["status"]["phase"] == "Succeeded")
                .ok_or_else(|| anyhow!("Job {} completed but its Pod is gone", n.job))?;
            let node = pod["spec"]["nodeName"].as_str().map(str::to_string);
            let (_, message) = terminated(pod).unwrap_or_default();
            let outcome: Outcome = serde_json::from_str(&message).with_context(|| {
                format!("the mover's termination message is not its outcome: {message:?}")
            })?;
            return Ok((node, outcome));
        }
        if let Some(c) = condition(&job, "Failed") {
            let last = pods.iter().filter_map(terminated).next_back();
            let why = match last {
                Some((code, msg)) if !msg.is_empty() => format!("exit {code}: {}", msg.trim()),
                Some((code, _)) => format!("exit {code}"),
                None => c["message"].as_str().unwrap_or("").to_string(),
            };
            bail!(
                "Job {ns}/{} failed ({}): {why}",
                n.job,
                c["reason"].as_str().unwrap_or("Failed")
            );
        }
        let running = pods.iter().find(|p| p["status"]["phase"] == "Running");
        // Told once per change: where it runs, or why it does not.
        let now = match running {
            Some(p) => format!(
                "running on {}",
                p["spec"]["nodeName"].as_str().unwrap_or("?")
            ),
            None => match pods.iter().find_map(pod_reason) {
                Some(why) => why,
                None => match pvc_event(m, &n.pvc).await {
                    Some(e) => format!("PVC {ns}/{}: {e}", n.pvc),
                    None => "waiting for its Pod to start".into(),
                },
            },
        };
        if told.as_deref() != Some(now.as_str()) {
            match running {
                Some(p) => events(Event::Running {
                    cut,
                    node: p["spec"]["nodeName"].as_str().unwrap_or("?").to_string(),
                }),
                None => events(Event::Waiting {
                    cut,
                    why: now.clone(),
                }),
            }
            told = Some(now.clone());
        }
        if running.is_none() && started.elapsed() >= m.spec.settings.stuck_after {
            let why = now;
            bail!(
                "Job {ns}/{} stuck for {:?}: {why}",
                n.job,
                m.spec.settings.stuck_after
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// The newest event about the mover's PVC (why it is not provisioned, typically).
async fn pvc_event(m: &Movers<'_>, pvc: &str) -> Option<String> {
    let ns = m.spec.settings.namespace.as_str();
    let lp = ListParams::default().fields(&format!("involvedObject.name={pvc}"));
    let list = api(&m.client, &events_kind(), Some(ns))
        .list(&lp)
        .await
        .ok()?;
    list.items
        .into_iter()
        .map(|e| serde_json::to_value(e).expect("objects serialise"))
        .rfind(|e| e["involvedObject"]["name"] == pvc)
        .and_then(|e| {
            let reason = e["reason"].as_str().unwrap_or("Event");
            e["message"].as_str().map(|m| format!("{reason}: {m}"))
        })
}

/// Removes the protection's mover objects of gens other than `keep` (a killed daemon's).
pub async fn sweep(client: &kube::Client, ns: &str, protection: &str, keep: &[Gen]) -> Result<()> {
    let selector = snapshot::selector_for(protection);
    for (kind, ns) in [
        (jobs(), Some(ns)),
        (pvcs_kind(), Some(ns)),
        (volume_snapshots(), Some(ns)),
        (volume_snapshot_contents(), None),
    ] {
        delete_labelled(client, &kind, ns, &selector, keep).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::snapshot::Pvc;

    #[test]
    fn a_mover_runs_restricted_with_its_device_and_the_mode_change_allowed() {
        let settings = MoverSettings::default();
        let client_free = |cut: &Cut| {
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
            };
            let n = names(&m, cut);
            objects(&m, cut, &n).unwrap()
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
        let [content, _vs, pvc, job] = client_free(&cut);
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
        // A Block source needs no mode change.
        cut.pvc.mode = VolumeMode::Block;
        let [content, ..] = client_free(&cut);
        assert!(content["metadata"]["annotations"][ALLOW_MODE_CHANGE].is_null());
    }
}
