//! The primary's CSI group snapshot, the shell around [`super::snapshot`]: read the group's
//! PVCs and the snapshot classes, create every snapshot of the gen before awaiting any
//! (inside the rule barrier), wait until each is cut, and after the thaw until each is
//! ready. Also finds and removes what earlier gens (or a killed daemon) left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use super::api_error;
use super::kinds::Kind;
use super::objects::{
    api, delete, delete_labelled, group_kind, persistent_volumes, pvcs_kind, to_value, vgs_kind,
    volume_snapshot_classes, volume_snapshot_contents, volume_snapshots,
};
use super::snapshot::{
    self, Class, Plan, Progress, Pvc, Wanted, GROUP_LABEL, GROUP_SNAPSHOT_GROUP,
};
use crate::ids::Gen;

/// One cut volume of the gen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub pvc: Pvc,
    /// The VolumeSnapshot in the PVC's namespace (a group snapshot's member, or our own).
    pub snapshot: String,
    /// Filled once ready: the bound content, its driver handle and the size a restore needs.
    pub content: Option<String>,
    pub handle: Option<String>,
    pub restore_size: Option<u64>,
}

/// The gen's snapshots.
#[derive(Debug, Clone, Default)]
pub struct CutSet {
    pub gen: Gen,
    pub cuts: Vec<Cut>,
    /// (namespace, name) of each VolumeGroupSnapshot.
    pub groups: Vec<(String, String)>,
    /// From the first create to the last cut.
    pub cut_time: Duration,
}

pub struct Snapshotter {
    pub client: kube::Client,
    pub protection: String,
    pub wanted: Wanted,
    /// How long cutting, and then becoming ready, may each take.
    pub timeout: Duration,
}

/// The served version of the group snapshot API, if any.
async fn group_version(client: &kube::Client) -> Result<Option<String>> {
    let groups = client
        .list_api_groups()
        .await
        .map_err(|e| api_error(e, "API discovery (/apis)"))?;
    Ok(groups
        .groups
        .into_iter()
        .find(|g| g.name == GROUP_SNAPSHOT_GROUP)
        .and_then(|g| {
            g.preferred_version
                .or_else(|| g.versions.into_iter().next())
        })
        .map(|v| v.version))
}

impl Snapshotter {
    /// Reads each (namespace, PVC, volume) of the group and its PV.
    pub async fn read_pvcs(&self, group: &[(String, String, String)]) -> Result<Vec<Pvc>> {
        let mut out = Vec::new();
        for (ns, name, volume) in group {
            let pvc = api(&self.client, &pvcs_kind(), Some(ns))
                .get(name)
                .await
                .map_err(|e| api_error(e, format!("get PVC {ns}/{name}")))?;
            let pvc = to_value(pvc);
            let pv = match pvc["spec"]["volumeName"].as_str() {
                Some(pv) if pvc["status"]["phase"] == "Bound" => Some(to_value(
                    api(&self.client, &persistent_volumes(), None)
                        .get(pv)
                        .await
                        .map_err(|e| api_error(e, format!("get PV {pv} of PVC {ns}/{name}")))?,
                )),
                _ => None,
            };
            out.push(Pvc::read(&pvc, pv.as_ref(), volume.clone()));
        }
        Ok(out)
    }

    /// How each PVC is cut; every PVC that cannot be is named. Labels the members of each
    /// group snapshot (before the barrier: the freeze window holds only the creates).
    pub async fn plan(&self, pvcs: &[Pvc]) -> Result<(Plan, Option<String>)> {
        let classes: Vec<Class> = api(&self.client, &volume_snapshot_classes(), None)
            .list(&ListParams::default())
            .await
            .map_err(|e| {
                api_error(
                    e,
                    "list VolumeSnapshotClasses (is the CSI snapshot controller installed?)",
                )
            })?
            .items
            .into_iter()
            .map(|c| Class::read(&to_value(c), false))
            .collect();
        let version = group_version(&self.client).await?;
        let group_classes = match &version {
            Some(v) if self.wanted.group_snapshots => Some(
                api(
                    &self.client,
                    &group_kind(
                        v,
                        "VolumeGroupSnapshotClass",
                        "volumegroupsnapshotclasses",
                        false,
                    ),
                    None,
                )
                .list(&ListParams::default())
                .await
                .map_err(|e| api_error(e, "list VolumeGroupSnapshotClasses"))?
                .items
                .into_iter()
                .map(|c| Class::read(&to_value(c), true))
                .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        let plan = snapshot::plan(
            &self.protection,
            pvcs,
            &classes,
            group_classes.as_deref(),
            &self.wanted,
        )
        .map_err(|problems| anyhow!("{}", problems.join("; ")))?;
        for g in &plan.groups {
            for &i in &g.members {
                let p = &pvcs[i];
                api(&self.client, &pvcs_kind(), Some(&p.namespace))
                    .patch(
                        &p.name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {GROUP_LABEL: g.label}}})),
                    )
                    .await
                    .map_err(|e| {
                        api_error(e, format!("label PVC {} for its group snapshot", p.id()))
                    })?;
            }
        }
        Ok((plan, version))
    }

    /// Creates every snapshot of the gen, then waits until each is cut. Inside the rule
    /// barrier: the post rules run once this returns. On failure what was created is
    /// deleted again.
    pub async fn cut(
        &self,
        gen: Gen,
        pvcs: &[Pvc],
        plan: &Plan,
        version: Option<&str>,
    ) -> Result<CutSet> {
        let started = Instant::now();
        let labels = snapshot::labels_for(&self.protection, gen);
        let mut set = CutSet {
            gen,
            ..Default::default()
        };
        let mut singles = Vec::new();
        let created = async {
            for g in &plan.groups {
                let version = version.ok_or_else(|| anyhow!("group snapshot API not served"))?;
                let name = snapshot::object_name(
                    &self.protection,
                    gen,
                    &format!("{}-group", g.namespace),
                    253,
                );
                let obj = snapshot::volume_group_snapshot(version, &name, g, &labels);
                self.create(&vgs_kind(version), &g.namespace, obj)
                    .await
                    .with_context(|| {
                        let members: Vec<String> =
                            g.members.iter().map(|&i| pvcs[i].id()).collect();
                        format!("group snapshot of PVCs {}", members.join(", "))
                    })?;
                set.groups.push((g.namespace.clone(), name));
            }
            for s in &plan.singles {
                let p = &pvcs[s.member];
                let name = snapshot::object_name(&self.protection, gen, &p.name, 253);
                let obj =
                    snapshot::volume_snapshot(&name, &p.namespace, &p.name, &s.class, &labels);
                self.create(&volume_snapshots(), &p.namespace, obj)
                    .await
                    .with_context(|| format!("snapshot of PVC {}", p.id()))?;
                singles.push((s.member, name));
            }
            anyhow::Ok(())
        }
        .await;
        let waited = match created {
            Ok(()) => {
                self.await_cut(&mut set, pvcs, plan, version, &singles)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = waited {
            let mut namespaces: Vec<String> = pvcs.iter().map(|p| p.namespace.clone()).collect();
            namespaces.dedup();
            if let Err(d) = self.delete_gen(&namespaces, gen).await {
                tracing::warn!(error = %format!("{d:#}"), "could not delete the failed gen's snapshots");
            }
            return Err(e);
        }
        set.cut_time = started.elapsed();
        Ok(set)
    }

    async fn create(&self, k: &Kind, ns: &str, obj: Value) -> Result<()> {
        let o: DynamicObject = serde_json::from_value(obj)?;
        let name = o.metadata.name.clone().unwrap_or_default();
        match api(&self.client, k, Some(ns))
            .create(&PostParams::default(), &o)
            .await
        {
            Ok(_) => Ok(()),
            // A stale one of the same gen (a cycle killed after its create): start afresh.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.delete_one(k, ns, &name).await?;
                api(&self.client, k, Some(ns))
                    .create(&PostParams::default(), &o)
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error(e, format!("create {} {ns}/{name}", k.kind)))
            }
            Err(e) => Err(api_error(e, format!("create {} {ns}/{name}", k.kind))),
        }
    }

    async fn get(&self, k: &Kind, ns: &str, name: &str) -> Result<Value> {
        api(&self.client, k, Some(ns))
            .get(name)
            .await
            .map(to_value)
            .map_err(|e| api_error(e, format!("get {} {ns}/{name}", k.kind)))
    }

    /// Polls until every snapshot of the set is cut (its members found, for a group).
    async fn await_cut(
        &self,
        set: &mut CutSet,
        pvcs: &[Pvc],
        plan: &Plan,
        version: Option<&str>,
        singles: &[(usize, String)],
    ) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut cuts: BTreeMap<usize, String> = BTreeMap::new();
        let mut delay = Duration::from_millis(20);
        loop {
            let mut waiting = Vec::new();
            for ((ns, name), g) in set.groups.iter().zip(&plan.groups) {
                if g.members.iter().all(|i| cuts.contains_key(i)) {
                    continue;
                }
                let k = vgs_kind(version.unwrap_or_default());
                let vgs = self.get(&k, ns, name).await?;
                match snapshot::progress(&vgs) {
                    Progress::Failed(m) => {
                        let members: Vec<String> =
                            g.members.iter().map(|&i| pvcs[i].id()).collect();
                        bail!(
                            "group snapshot {ns}/{name} of PVCs {} failed: {m}",
                            members.join(", ")
                        )
                    }
                    Progress::Pending => waiting.push(format!("group snapshot {ns}/{name}")),
                    Progress::Cut | Progress::Ready => {
                        match self
                            .group_members(&vgs, version.unwrap_or_default(), g, pvcs)
                            .await?
                        {
                            Some(m) => {
                                for (i, s) in m {
                                    cuts.insert(i, s);
                                }
                            }
                            None => waiting.push(format!("members of group snapshot {ns}/{name}")),
                        }
                    }
                }
            }
            for (i, name) in singles {
                if cuts.contains_key(i) {
                    continue;
                }
                let p = &pvcs[*i];
                let vs = self.get(&volume_snapshots(), &p.namespace, name).await?;
                match snapshot::progress(&vs) {
                    Progress::Failed(m) => bail!("snapshot of PVC {} failed: {m}", p.id()),
                    Progress::Pending => waiting.push(format!("snapshot of PVC {}", p.id())),
                    Progress::Cut | Progress::Ready => {
                        cuts.insert(*i, name.clone());
                    }
                }
            }
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "not cut within {:?}: {} (does the CSI driver support snapshots, and is its snapshotter sidecar running?)",
                    self.timeout,
                    waiting.join(", ")
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        set.cuts = cuts
            .into_iter()
            .map(|(i, snapshot)| Cut {
                pvc: pvcs[i].clone(),
                snapshot,
                content: None,
                handle: None,
                restore_size: None,
            })
            .collect();
        Ok(())
    }

    /// The member snapshot of each PVC of a cut group snapshot, once all exist.
    async fn group_members(
        &self,
        vgs: &Value,
        version: &str,
        g: &snapshot::GroupCut,
        pvcs: &[Pvc],
    ) -> Result<Option<Vec<(usize, String)>>> {
        let ns = &g.namespace;
        let snaps: Vec<Value> = api(&self.client, &volume_snapshots(), Some(ns))
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error(e, format!("list VolumeSnapshots in {ns}")))?
            .items
            .into_iter()
            .map(to_value)
            .collect();
        let contents: Vec<Value> = api(&self.client, &volume_snapshot_contents(), None)
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error(e, "list VolumeSnapshotContents"))?
            .items
            .into_iter()
            .map(to_value)
            .collect();
        let group_content = match vgs["status"]["boundVolumeGroupSnapshotContentName"].as_str() {
            Some(c) => Some(to_value(
                api(
                    &self.client,
                    &group_kind(
                        version,
                        "VolumeGroupSnapshotContent",
                        "volumegroupsnapshotcontents",
                        false,
                    ),
                    None,
                )
                .get(c)
                .await
                .map_err(|e| api_error(e, format!("get VolumeGroupSnapshotContent {c}")))?,
            )),
            None => None,
        };
        let mut handles = Vec::new();
        for &i in &g.members {
            let p = &pvcs[i];
            let h = match &p.pv {
                Some(pv) => api(&self.client, &persistent_volumes(), None)
                    .get(pv)
                    .await
                    .ok()
                    .map(to_value)
                    .and_then(|v| {
                        v["spec"]["csi"]["volumeHandle"]
                            .as_str()
                            .map(str::to_string)
                    }),
                None => None,
            };
            handles.push((p, h));
        }
        match snapshot::members(vgs, group_content.as_ref(), &snaps, &contents, &handles) {
            Ok(m) => Ok(Some(
                g.members
                    .iter()
                    .map(|&i| (i, m[&pvcs[i].name].clone()))
                    .collect(),
            )),
            Err(_) => Ok(None),
        }
    }

    /// After the thaw: waits until every snapshot is ready to restore from, and records
    /// its content, handle and restore size.
    pub async fn ready(&self, set: &mut CutSet) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            let mut waiting = Vec::new();
            for c in set.cuts.iter_mut().filter(|c| c.restore_size.is_none()) {
                let vs = self
                    .get(&volume_snapshots(), &c.pvc.namespace, &c.snapshot)
                    .await?;
                match snapshot::progress(&vs) {
                    Progress::Failed(m) => {
                        bail!("snapshot {} of PVC {} failed: {m}", c.snapshot, c.pvc.id())
                    }
                    Progress::Ready => {
                        let content = vs["status"]["boundVolumeSnapshotContentName"]
                            .as_str()
                            .map(str::to_string);
                        let handle = match &content {
                            Some(n) => self
                                .get(&volume_snapshot_contents(), "", n)
                                .await?
                                .pointer("/status/snapshotHandle")
                                .and_then(Value::as_str)
                                .map(str::to_string),
                            None => None,
                        };
                        let size = snapshot::quantity_bytes(&vs["status"]["restoreSize"])
                            .ok_or_else(|| {
                                anyhow!(
                                    "snapshot {} of PVC {} is ready without a restore size",
                                    c.snapshot,
                                    c.pvc.id()
                                )
                            })?;
                        c.content = content;
                        c.handle = handle;
                        c.restore_size = Some(size);
                    }
                    _ => waiting.push(format!("{} (PVC {})", c.snapshot, c.pvc.id())),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "snapshots not ready to use within {:?}: {}",
                    self.timeout,
                    waiting.join(", ")
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    async fn delete_one(&self, k: &Kind, ns: &str, name: &str) -> Result<()> {
        delete(&self.client, k, Some(ns), name).await
    }

    /// Deletes the snapshot objects of the protection's gens not in `keep` (a killed
    /// daemon's leftovers included): group snapshots first, which take their members.
    pub async fn sweep(&self, namespaces: &[String], keep: &[Gen]) -> Result<()> {
        let selector = snapshot::selector_for(&self.protection);
        for k in &self.kinds().await? {
            for ns in namespaces {
                delete_labelled(&self.client, k, Some(ns), &selector, keep).await?;
            }
        }
        Ok(())
    }

    /// Deletes one gen's snapshot objects in `namespaces`.
    pub async fn delete_gen(&self, namespaces: &[String], gen: Gen) -> Result<()> {
        let selector = format!(
            "{},{}={}",
            snapshot::selector_for(&self.protection),
            snapshot::GEN_LABEL,
            gen.0
        );
        for k in &self.kinds().await? {
            for ns in namespaces {
                delete_labelled(&self.client, k, Some(ns), &selector, &[]).await?;
            }
        }
        Ok(())
    }

    /// The snapshot kinds lifeboat creates, group snapshots first.
    async fn kinds(&self) -> Result<Vec<Kind>> {
        let mut kinds = Vec::new();
        if let Some(v) = group_version(&self.client).await? {
            kinds.push(vgs_kind(&v));
        }
        kinds.push(volume_snapshots());
        Ok(kinds)
    }
}
