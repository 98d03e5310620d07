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
use serde_json::Value;

use super::api_error;
use super::cut::Cut;
use super::kinds::Kind;
use super::mover_job;
pub use super::mover_job::{Outcome, Spec};
use super::objects::{
    api, delete, delete_labelled, events_kind, jobs, pods, pvcs_kind, volume_snapshot_contents,
    volume_snapshots,
};
use super::snapshot;
use crate::ids::Gen;

/// What every mover of one cycle shares.
pub struct Movers<'a> {
    pub client: kube::Client,
    pub spec: Spec<'a>,
    /// The base gen's cuts, when this daemon cut it (refinement reads them as the
    /// replica's old chunks); a PVC without one sends its changed chunks whole.
    pub bases: &'a [Cut],
    /// The site's movers at once, over all protections.
    pub site: &'a tokio::sync::Semaphore,
}

/// One moved volume.
#[derive(Debug, Clone)]
pub struct Moved {
    pub volume: String,
    pub node: Option<String>,
    pub outcome: Outcome,
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
    let n = mover_job::names(&m.spec, cut);
    let result = async {
        let base = m.bases.iter().find(|b| b.pvc.id() == cut.pvc.id());
        let ns = m.spec.settings.namespace.as_str();
        for o in mover_job::objects(&m.spec, cut, base, &n)? {
            match o["kind"].as_str() {
                Some("VolumeSnapshotContent") => {
                    create(&m.client, &volume_snapshot_contents(), None, o).await?
                }
                Some("VolumeSnapshot") => {
                    create(&m.client, &volume_snapshots(), Some(ns), o).await?
                }
                Some("PersistentVolumeClaim") => {
                    create(&m.client, &pvcs_kind(), Some(ns), o).await?
                }
                _ => create(&m.client, &jobs(), Some(ns), o).await?,
            }
        }
        let watched = Watched {
            client: &m.client,
            ns,
            job: &n.job,
            pvc: &n.source.pvc,
            stuck_after: m.spec.settings.stuck_after,
        };
        watch(&watched, &|state| match state {
            JobState::Running(node) => events(Event::Running {
                cut,
                node: node.to_string(),
            }),
            JobState::Waiting(why) => events(Event::Waiting {
                cut,
                why: why.to_string(),
            }),
        })
        .await
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

pub(super) async fn create(
    client: &kube::Client,
    kind: &Kind,
    ns: Option<&str>,
    v: Value,
) -> Result<()> {
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

async fn cleanup(client: &kube::Client, ns: &str, n: &mover_job::Names) {
    let mut steps: Vec<(Kind, Option<&str>, &str)> = vec![(jobs(), Some(ns), &n.job)];
    for r in [&n.source, &n.base] {
        steps.extend([
            (pvcs_kind(), Some(ns), r.pvc.as_str()),
            (volume_snapshots(), Some(ns), r.snapshot.as_str()),
            (volume_snapshot_contents(), None, r.content.as_str()),
        ]);
    }
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

/// A Job being watched, and the PVC whose events explain a Pod that does not start.
pub(super) struct Watched<'a> {
    pub client: &'a kube::Client,
    pub ns: &'a str,
    pub job: &'a str,
    pub pvc: &'a str,
    pub stuck_after: Duration,
}

/// Where a watched Job's Pod is, told once per change.
pub(super) enum JobState<'a> {
    Running(&'a str),
    Waiting(&'a str),
}

/// Waits for the Job to end. Its result is in the succeeded Pod's termination message; a
/// Job that failed, or a Pod stuck (Pending, or not started) past `stuck_after`, ends it
/// with the reason its Pod gives.
pub(super) async fn watch<T: serde::de::DeserializeOwned>(
    w: &Watched<'_>,
    tell: &(dyn Fn(JobState<'_>) + Sync),
) -> Result<(Option<String>, T)> {
    let (ns, job_name) = (w.ns, w.job);
    let started = Instant::now();
    let mut told: Option<String> = None;
    let mut delay = Duration::from_millis(50);
    let pod_list =
        ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job_name}"));
    loop {
        let job = api(w.client, &jobs(), Some(ns))
            .get(job_name)
            .await
            .map_err(|e| api_error(e, format!("get Job {ns}/{job_name}")))?;
        let job = serde_json::to_value(job)?;
        let pods: Vec<Value> = api(w.client, &pods(), Some(ns))
            .list(&pod_list)
            .await
            .map_err(|e| api_error(e, format!("list the Pods of Job {ns}/{job_name}")))?
            .items
            .into_iter()
            .map(|p| serde_json::to_value(p).expect("objects serialise"))
            .collect();
        if condition(&job, "Complete").is_some() {
            let pod = pods
                .iter()
                .find(|p| p["status"]["phase"] == "Succeeded")
                .ok_or_else(|| anyhow!("Job {job_name} completed but its Pod is gone"))?;
            let node = pod["spec"]["nodeName"].as_str().map(str::to_string);
            let (_, message) = terminated(pod).unwrap_or_default();
            let outcome: T = serde_json::from_str(&message).with_context(|| {
                format!("the Job's termination message is not its outcome: {message:?}")
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
                "Job {ns}/{job_name} failed ({}): {why}",
                c["reason"].as_str().unwrap_or("Failed")
            );
        }
        let running = pods.iter().find(|p| p["status"]["phase"] == "Running");
        // Told once per change: where it runs, or why it does not.
        let node = running.map(|p| p["spec"]["nodeName"].as_str().unwrap_or("?"));
        let now = match node {
            Some(node) => format!("running on {node}"),
            None => match pods.iter().find_map(pod_reason) {
                Some(why) => why,
                None => match pvc_event(w.client, ns, w.pvc).await {
                    Some(e) => format!("PVC {ns}/{}: {e}", w.pvc),
                    None => "waiting for its Pod to start".into(),
                },
            },
        };
        if told.as_deref() != Some(now.as_str()) {
            match node {
                Some(node) => tell(JobState::Running(node)),
                None => tell(JobState::Waiting(&now)),
            }
            told = Some(now.clone());
        }
        if running.is_none() && started.elapsed() >= w.stuck_after {
            let why = now;
            bail!("Job {ns}/{job_name} stuck for {:?}: {why}", w.stuck_after);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// The newest event about a Job's PVC (why it is not provisioned, typically).
async fn pvc_event(client: &kube::Client, ns: &str, pvc: &str) -> Option<String> {
    let lp = ListParams::default().fields(&format!("involvedObject.name={pvc}"));
    let list = api(client, &events_kind(), Some(ns)).list(&lp).await.ok()?;
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
