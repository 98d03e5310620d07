//! The DR site's CSI replicas, the shell around [`super::writer_job`]: one Block replica
//! PVC per protected volume in the movers' namespace, written for each committed gen by a
//! writer Job (at most `concurrency` at once, under the site's mover limit), then
//! snapshotted together (a group snapshot where the driver offers one) into the gen's
//! recovery point. Writer Jobs end deleted; a killed daemon's Jobs, and the snapshots of a
//! point that was never recorded, are swept before the next redo.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::stream::{self, StreamExt};
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::api_error;
use super::cut::Snapshotter;
use super::movers::{create, watch, JobState, Watched};
use super::objects::{
    api, delete, delete_labelled, jobs, pvcs_kind, to_value, volume_snapshot_contents,
    volume_snapshots,
};
use super::restore::{PointSnapshot, Restore};
use super::snapshot::{quantity_bytes, selector_for};
use super::writer_job::{self, Read, WriterSpec, Written, ROLE_LABEL};
use super::CsiSettings;
use crate::ids::{Gen, VolumeName};

/// What every writer of the protection shares.
pub struct Replicas<'a> {
    pub client: kube::Client,
    pub protection: &'a str,
    pub csi: &'a CsiSettings,
    /// The site's movers and writers at once, over all protections.
    pub site_limit: &'a tokio::sync::Semaphore,
    /// The DR daemon's address as the writers reach it, and the DR site's name.
    pub connect: String,
    pub site: &'a str,
}

/// One replica: its volume, the bytes it holds, its storage class (None: the default).
#[derive(Debug, Clone)]
pub struct ReplicaVolume {
    pub volume: String,
    pub size: u64,
    pub class: Option<String>,
}

impl Replicas<'_> {
    fn ns(&self) -> &str {
        &self.csi.mover.namespace
    }

    /// Creates the replica PVCs that do not exist yet, and grows those that are smaller
    /// than their volume now is.
    pub async fn ensure(&self, volumes: &[ReplicaVolume]) -> Result<()> {
        let a = api(&self.client, &pvcs_kind(), Some(self.ns()));
        for v in volumes {
            let name = writer_job::replica_name(self.protection, &v.volume);
            match a.get_opt(&name).await {
                Ok(None) => {
                    let pvc = writer_job::replica_pvc(
                        &self.csi.mover,
                        self.protection,
                        &v.volume,
                        v.size,
                        v.class.as_deref(),
                    );
                    create(&self.client, &pvcs_kind(), Some(self.ns()), pvc).await?;
                }
                Ok(Some(pvc)) => {
                    let pvc = to_value(pvc);
                    let has = quantity_bytes(&pvc["spec"]["resources"]["requests"]["storage"]);
                    if has.is_some_and(|h| h < v.size) {
                        let grow = json!({"spec": {"resources": {"requests": {"storage": v.size.to_string()}}}});
                        a.patch(&name, &PatchParams::default(), &Patch::Merge(grow))
                            .await
                            .map_err(|e| {
                                api_error(
                                    e,
                                    format!(
                                        "grow replica PVC {}/{name} of volume {} to {} bytes (does its storage class allow volume expansion?)",
                                        self.ns(), v.volume, v.size
                                    ),
                                )
                            })?;
                    }
                }
                Err(e) => {
                    return Err(api_error(
                        e,
                        format!("get replica PVC {}/{name}", self.ns()),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Runs a writer for each volume of `gen`; every failure is named, after all ended.
    pub async fn write(&self, gen: Gen, volumes: &[String]) -> Result<Vec<Written>> {
        let futures: Vec<_> = volumes.iter().map(|v| self.write_one(gen, v)).collect();
        let mut running = stream::iter(futures).buffer_unordered(self.csi.mover.concurrency.max(1));
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        while let Some(r) = running.next().await {
            match r {
                Ok(w) => out.push(w),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(out)
    }

    async fn write_one(&self, gen: Gen, volume: &str) -> Result<Written> {
        let _permit = self
            .site_limit
            .acquire()
            .await
            .map_err(|_| anyhow!("the site's mover limit was closed"))?;
        let spec = WriterSpec {
            protection: self.protection,
            gen,
            settings: &self.csi.mover,
            connect: &self.connect,
            site: self.site,
        };
        let job = writer_job::writer_job(&spec, volume);
        let name = writer_job::writer_name(self.protection, gen, volume);
        let pvc = writer_job::replica_name(self.protection, volume);
        let result = async {
            create(&self.client, &jobs(), Some(self.ns()), job).await?;
            let w = Watched {
                client: &self.client,
                ns: self.ns(),
                job: &name,
                pvc: &pvc,
                stuck_after: self.csi.mover.stuck_after,
            };
            let tell = |s: JobState<'_>| match s {
                JobState::Running(node) => tracing::info!(volume, node, "writer running"),
                JobState::Waiting(why) => tracing::info!(volume, why, "writer waiting"),
            };
            let (_, written): (_, Written) = watch(&w, &tell).await?;
            anyhow::ensure!(
                written.volume == volume && written.gen == gen.0,
                "the writer reported volume {} gen {}, not {volume} gen {gen}",
                written.volume,
                written.gen
            );
            Ok(written)
        }
        .await
        .map_err(|e: anyhow::Error| e.context(format!("writer of replica {volume} (gen {gen})")));
        if let Err(e) = delete(&self.client, &jobs(), Some(self.ns()), &name).await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove a writer Job; the next redo's sweep retries");
        }
        result
    }

    /// Runs the reader Job of `volume` (`size` bytes in `chunk_size` chunks) for a verify
    /// of consistent gen `gen`: it hashes the replica PVC read-only and streams the hashes
    /// to this daemon, which compares them (see `replicate::receive::fetch`).
    pub async fn read(&self, gen: Gen, volume: &str, size: u64, chunk_size: u32) -> Result<Read> {
        let _permit = self
            .site_limit
            .acquire()
            .await
            .map_err(|_| anyhow!("the site's mover limit was closed"))?;
        let spec = WriterSpec {
            protection: self.protection,
            gen,
            settings: &self.csi.mover,
            connect: &self.connect,
            site: self.site,
        };
        let job = writer_job::reader_job(&spec, volume, size, chunk_size);
        let name = writer_job::reader_name(self.protection, gen, volume);
        let pvc = writer_job::replica_name(self.protection, volume);
        let result = async {
            create(&self.client, &jobs(), Some(self.ns()), job).await?;
            let w = Watched {
                client: &self.client,
                ns: self.ns(),
                job: &name,
                pvc: &pvc,
                stuck_after: self.csi.mover.stuck_after,
            };
            let tell = |s: JobState<'_>| match s {
                JobState::Running(node) => tracing::info!(volume, node, "reader running"),
                JobState::Waiting(why) => tracing::info!(volume, why, "reader waiting"),
            };
            let (_, read): (_, Read) = watch(&w, &tell).await?;
            anyhow::ensure!(
                read.volume == volume && read.gen == gen.0,
                "the reader reported volume {} gen {}, not {volume} gen {gen}",
                read.volume,
                read.gen
            );
            Ok(read)
        }
        .await
        .map_err(|e: anyhow::Error| e.context(format!("reader of replica {volume} (gen {gen})")));
        if let Err(e) = delete(&self.client, &jobs(), Some(self.ns()), &name).await {
            tracing::warn!(error = %format!("{e:#}"), "could not remove a reader Job; the next sweep retries");
        }
        result
    }

    fn snapshotter(&self) -> Snapshotter {
        Snapshotter {
            client: self.client.clone(),
            protection: self.protection.to_string(),
            wanted: self.csi.wanted.clone(),
            timeout: self.csi.snapshot_timeout,
        }
    }

    /// Snapshots every replica of the point together (one instant per group snapshot)
    /// and waits until each is ready: the recovery point's snapshot set.
    pub async fn snapshot(
        &self,
        gen: Gen,
        volumes: &[ReplicaVolume],
    ) -> Result<BTreeMap<VolumeName, PointSnapshot>> {
        let snap = self.snapshotter();
        let ns = self.ns().to_string();
        let group: Vec<_> = volumes
            .iter()
            .map(|v| {
                let name = writer_job::replica_name(self.protection, &v.volume);
                (ns.clone(), name, v.volume.clone())
            })
            .collect();
        let pvcs = snap.read_pvcs(&group).await?;
        let (plan, version) = snap.plan(&pvcs).await?;
        let mut set = snap.cut(gen, &pvcs, &plan, version.as_deref()).await?;
        snap.ready(&mut set).await?;
        let mut out = BTreeMap::new();
        for c in set.cuts {
            let volume = VolumeName::new(&c.pvc.volume).map_err(|e| anyhow!(e))?;
            out.insert(
                volume,
                PointSnapshot {
                    namespace: ns.clone(),
                    name: c.snapshot.clone(),
                    content: c.content.clone(),
                    handle: c
                        .handle
                        .ok_or_else(|| anyhow!("snapshot {} has no handle", c.snapshot))?,
                    driver: c.pvc.driver.unwrap_or_default(),
                    size: c.restore_size.unwrap_or_default(),
                },
            );
        }
        Ok(out)
    }

    /// Removes writer and reader Jobs (a killed daemon's) and the snapshots of gens not in `points`
    /// (an interrupted redo's, or a pruned point's whose delete did not finish).
    pub async fn sweep(&self, points: &[Gen]) -> Result<()> {
        for role in ["writer", "reader"] {
            let sel = format!("{},{ROLE_LABEL}={role}", selector_for(self.protection));
            delete_labelled(&self.client, &jobs(), Some(self.ns()), &sel, &[]).await?;
        }
        self.snapshotter()
            .sweep(&[self.ns().to_string()], points)
            .await
    }

    /// Deletes a pruned point's snapshots and the driver snapshots behind them: each
    /// content is switched to `deletionPolicy: Delete` first (a Retain class would keep the
    /// driver snapshot forever), then deleting the VolumeSnapshots lets the snapshot
    /// controller delete the contents and the driver their snapshots.
    pub async fn delete_point(
        &self,
        gen: Gen,
        snapshots: &BTreeMap<VolumeName, PointSnapshot>,
    ) -> Result<()> {
        for s in snapshots.values() {
            if let Some(c) = &s.content {
                let patch = json!({"spec": {"deletionPolicy": "Delete"}});
                let r = api(&self.client, &volume_snapshot_contents(), None)
                    .patch(c, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                match r {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(api_error(e, format!("patch VolumeSnapshotContent {c}"))),
                }
            }
        }
        self.snapshotter()
            .delete_gen(&[self.ns().to_string()], gen)
            .await
    }
}

/// Creates each restore's content and snapshot (failover from a recovery point).
pub async fn create_restores(client: &kube::Client, restores: &[Restore]) -> Result<()> {
    for r in restores {
        create(client, &volume_snapshot_contents(), None, r.content.clone()).await?;
        create(
            client,
            &volume_snapshots(),
            Some(&r.namespace),
            r.snapshot.clone(),
        )
        .await?;
    }
    Ok(())
}

/// Waits up to `wait` for the restored PVCs to bind, then deletes the restore objects of
/// those that are; returns a note for each PVC still restoring, whose objects stay until
/// it is (a PVC being restored needs its source).
pub async fn delete_restores(
    client: &kube::Client,
    restores: &[Restore],
    wait: Duration,
) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut unbound: Vec<&Restore> = restores.iter().collect();
    let mut bound = Vec::new();
    loop {
        let mut still = Vec::new();
        for r in unbound {
            let pvc = api(client, &pvcs_kind(), Some(&r.namespace))
                .get_opt(&r.pvc)
                .await
                .map_err(|e| api_error(e, format!("get PVC {}/{}", r.namespace, r.pvc)))?;
            if pvc.is_some_and(|p| to_value(p)["status"]["phase"] == "Bound") {
                bound.push(r);
            } else {
                still.push(r);
            }
        }
        unbound = still;
        if unbound.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for r in bound {
        delete(client, &volume_snapshots(), Some(&r.namespace), &r.name).await?;
        delete(client, &volume_snapshot_contents(), None, &r.name).await?;
    }
    let kept = unbound
        .iter()
        .map(|r| {
            format!(
                "PVC {}/{} is not bound yet: its restore snapshot {}/{} stays until it is",
                r.namespace, r.pvc, r.namespace, r.name
            )
        })
        .collect();
    Ok(kept)
}
