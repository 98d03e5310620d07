//! What was in flight, finished or discarded. DR site: a gen with a group-commit record is
//! applied to the replicas (an idempotent redo) and becomes the consistent point; staged but
//! uncommitted volumes are discarded. Primary: indexes and snapshots other than the base's
//! and the tentative gen's are removed. Either way the replicas stay at one consistent
//! point. Runs at start-up, before each cycle at the DR site, and at failover; the DR
//! steps take the protection's [`Locked`] as proof that nothing else commits meanwhile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::{Config, Protection};
use crate::engine::chunk::{Geometry, RootHasher};
use crate::engine::scan::{scan_file, ScanOptions};
use crate::failpoint;
use crate::ids::{ChunkHash, Gen, ProtectionName, VolumeName};
use crate::replicate::points;
use crate::replicate::receive::check;
use crate::site::dr::{Dr, Locked};
use crate::site::Shared;
use crate::store::{CommitRecord, RecoveryPoint, Store};
use crate::volume::points as file_points;
use crate::volume::{replica, snapshot};

pub fn staging_dir(config: &Config, prot: &ProtectionName) -> PathBuf {
    config.staging_dir.join(prot.as_str())
}

/// Start-up, before the site accepts or sends anything. Protections with CSI replicas are
/// left to [`recover_csi`]: their redo runs writer Jobs, which fetch from this daemon's
/// listener.
pub async fn recover_dr(dr: &Dr) -> Result<()> {
    for p in dr.config.protections.iter().filter(|p| p.csi().is_none()) {
        // A protection this site sends has nothing staged, and its record's indexes are a
        // sender's (the tentative gen's among them), which the discard would drop.
        if dr.sends(&dr.store.record(&p.name).await?) {
            continue;
        }
        let lock = dr.lock_of(p.name.as_str()).expect("a lock per protection");
        let locked = lock.lock().await;
        finish_pending(dr, &locked, p).await?;
        discard_staging(dr, &locked, p).await?;
    }
    Ok(())
}

/// Start-up with the listener up: finishes the committed gens of CSI replicas as points.
/// A failure is logged; the protection's next cycle retries it before anything else.
pub async fn recover_csi(dr: Arc<Dr>) {
    for p in dr.config.protections.iter().filter(|p| p.csi().is_some()) {
        let lock = dr.lock_of(p.name.as_str()).expect("a lock per protection");
        let locked = lock.lock().await;
        let done = async {
            finish_pending(&dr, &locked, p).await?;
            discard_staging(&dr, &locked, p).await
        };
        if let Err(e) = done.await {
            tracing::error!(protection = %p.name, error = %format!("{e:#}"), "could not finish the committed gen; the next cycle retries");
        }
    }
}

/// Start-up at the primary (and at a DR site that sends a protection after a failback):
/// only the base and the tentative gen keep indexes and snapshots.
pub async fn recover_primary(shared: &Shared) -> Result<()> {
    for p in shared.config.protections.clone() {
        if !shared.sends(&shared.store.record(&p.name).await?) {
            continue;
        }
        shared
            .store
            .run(move |s| {
                let keep = s.prune_primary(&p.name)?;
                snapshot::prune(&p, &keep)
            })
            .await?;
    }
    Ok(())
}

/// Applies every committed but unfinished gen of `prot`. A gen that cannot be finished
/// (a staging log lost with a crash of its file system, and replicas that do not hold the
/// gen) is not retried forever: its volumes are marked for repair and the next cycle
/// resyncs them by hash exchange.
pub async fn finish_pending(dr: &Dr, locked: &Locked<'_>, prot: &Protection) -> Result<()> {
    debug_assert_eq!(locked.name(), &prot.name);
    if prot.csi().is_some() {
        let name = prot.name.clone();
        for commit in dr.store.run(move |s| s.commits(&name)).await? {
            tracing::info!(gen = %commit.point.point.gen, "finishing a committed gen on the replica PVCs (redo)");
            points::redo(dr, prot, commit).await?;
        }
        return Ok(());
    }
    let (config, prot) = (dr.config.clone(), prot.clone());
    dr.store
        .run(move |s| {
            for commit in s.commits(&prot.name)? {
                tracing::info!(gen = %commit.point.point.gen, "finishing a committed gen (redo)");
                redo_blocking(s, &config, &prot, &commit)?;
            }
            Ok(())
        })
        .await
}

/// Applies a committed gen to the replicas and makes it the consistent point.
pub async fn redo_commit(
    dr: &Dr,
    _locked: &Locked<'_>,
    prot: &Protection,
    commit: CommitRecord,
) -> Result<()> {
    if prot.csi().is_some() {
        return points::redo(dr, prot, commit).await;
    }
    let (config, prot) = (dr.config.clone(), prot.clone());
    dr.store
        .run(move |s| redo_blocking(s, &config, &prot, &commit))
        .await
}

/// The root of the file at `path` read as a volume of `geometry`.
fn replica_root(path: &Path, geometry: Geometry) -> Result<ChunkHash> {
    let mut root = RootHasher::new(geometry);
    scan_file(
        path,
        geometry,
        |_| Ok(None),
        |s| {
            root.push(&s.hash);
            Ok(())
        },
        &Default::default(),
        ScanOptions::default(),
    )?;
    Ok(root.finish())
}

fn redo_blocking(
    store: &Store,
    config: &Config,
    prot: &Protection,
    commit: &CommitRecord,
) -> Result<()> {
    let gen = commit.point.point.gen;
    let group = prot.with_volumes(commit.logs.keys().map(|v| v.as_str()));
    let mut stamps = BTreeMap::new();
    for v in &group.volumes {
        let Some(log) = commit.logs.get(v.name.as_str()) else {
            continue;
        };
        failpoint::hit(&format!("dr-applying:{}", v.name));
        if commit.fresh.contains(v.name.as_str()) {
            replica::install(log, &v.path).with_context(|| {
                format!(
                    "install gen {gen} as replica {} ({})",
                    v.name,
                    v.path.display()
                )
            })?;
        } else if !log.exists() {
            // The staging log is gone though its commit is durable (a lost write-back of
            // the staging file system): the replica may hold the gen already.
            let want = &commit.point.volumes[v.name.as_str()];
            let geometry = Geometry::new(want.size, want.chunk_size);
            let holds = replica_root(&v.path, geometry).is_ok_and(|r| r == want.root);
            if !holds {
                let why = format!(
                    "gen {gen} could not be finished: the staging log of volume {} ({}) is gone and its replica does not hold the gen",
                    v.name,
                    log.display()
                );
                tracing::error!(volume = %v.name, log = %log.display(), "{why}; the gen's volumes are resynced by hash exchange on the next cycle");
                store.abandon_commit(&prot.name, commit, &why)?;
                return remove_dir(&staging_dir(config, &prot.name));
            }
            tracing::warn!(volume = %v.name, "staging log gone, but the replica holds the gen already");
        } else {
            replica::apply(log, &v.path).with_context(|| {
                format!(
                    "apply gen {gen} to replica {} ({})",
                    v.name,
                    v.path.display()
                )
            })?;
        }
        if let Some(stamp) = check::stamp_of(&v.path)? {
            stamps.insert(v.name.clone(), stamp);
        }
    }
    if prot.keep.count > 1 {
        return finish_with_point(store, config, prot, commit, stamps);
    }
    store.finish_redo(&prot.name, commit, stamps)?;
    remove_dir(&staging_dir(config, &prot.name))
}

/// The DR site's retention rule for `prot`'s recovery points.
pub fn retention(prot: &Protection) -> crate::store::retention::Retention {
    crate::store::retention::Retention {
        count: prot.keep.count,
        window: prot.keep.window,
        recent: prot.keep.recent,
    }
}

/// File replicas keeping `keep` points: gen N's replicas are cloned into point N, which is
/// recorded with the gen in one synced batch; the pruned points' files go after.
fn finish_with_point(
    store: &Store,
    config: &Config,
    prot: &Protection,
    commit: &CommitRecord,
    stamps: BTreeMap<VolumeName, crate::volume::stamp::Stamp>,
) -> Result<()> {
    let gen = commit.point.point.gen;
    let all = prot.with_volumes(commit.point.volumes.keys().map(|v| v.as_str()));
    let replicas: Vec<(VolumeName, std::path::PathBuf)> = all
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.path.clone()))
        .collect();
    let kept: Vec<Gen> = store
        .record(&prot.name)?
        .points
        .iter()
        .map(|p| p.point.point.gen)
        .collect();
    let paths: Vec<_> = replicas.iter().map(|(_, p)| p.clone()).collect();
    file_points::sweep(prot.name.as_str(), &paths, &kept)?;
    let files = match file_points::cut(prot.name.as_str(), gen, &replicas) {
        Ok(files) => files,
        // The default asked for points where it could keep them: host-path replicas
        // (known only once the gen names them) on a file system without reflink keep the
        // newest only, as local ones do (checked at start there).
        Err(e) if prot.keep.by_default => {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(protection = %prot.name, error = %format!("{e:#}"), "{}", file_points::NEWEST_ONLY);
            }
            file_points::sweep(prot.name.as_str(), &paths, &kept)?;
            file_points::remove_empty_roots(prot.name.as_str(), &paths);
            store.finish_redo(&prot.name, commit, stamps)?;
            return remove_dir(&staging_dir(config, &prot.name));
        }
        Err(e) => return Err(e.context(format!("cut recovery point {gen}"))),
    };
    failpoint::hit("dr-point-cut");
    let point = RecoveryPoint {
        point: commit.point.clone(),
        snapshots: BTreeMap::new(),
        held: false,
        drill: None,
        files,
    };
    let (_, pruned) =
        store.finish_redo_with_point(&prot.name, commit, stamps, Some((point, retention(prot))))?;
    remove_dir(&staging_dir(config, &prot.name))?;
    for p in pruned {
        tracing::info!(gen = %p.point.point.gen, "recovery point pruned");
        if let Err(e) = file_points::remove(&p.files) {
            tracing::warn!(gen = %p.point.point.gen, error = %format!("{e:#}"), "could not remove a pruned point's files; the next point's sweep retries");
        }
    }
    Ok(())
}

/// Drops staged volumes of uncommitted gens, their logs and their partial indexes; a new
/// replica being built where there is none yet stays for the next cycle to resume.
pub async fn discard_staging(dr: &Dr, _locked: &Locked<'_>, prot: &Protection) -> Result<()> {
    let (config, prot) = (dr.config.clone(), prot.clone());
    dr.store
        .run(move |s| {
            let staged = s.discard_staged(&prot.name)?;
            let rec = s.record(&prot.name)?;
            let known = rec
                .point
                .iter()
                .flat_map(|p| p.volumes.keys().map(|v| v.as_str()))
                .chain(staged.iter().map(String::as_str));
            // CSI replicas are PVCs: no fresh replica file is ever made.
            let group = match prot.csi() {
                Some(_) => prot.with_volumes(std::iter::empty()),
                None => prot.with_volumes(known),
            };
            for v in &group.volumes {
                let fresh = replica::fresh_path(&v.path);
                // With no replica yet, it is an interrupted first sync's work: the next
                // one resumes it. Beside a replica it is stale.
                if !v.path.exists() && fresh.is_file() {
                    tracing::info!(partial = %fresh.display(), "kept the new replica of an interrupted first sync; the next cycle resumes it");
                    continue;
                }
                match std::fs::remove_file(&fresh) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("remove {}", fresh.display())),
                }
            }
            remove_dir(&staging_dir(&config, &prot.name))
        })
        .await
}

pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", dir.display())),
    }
}
