//! Drills of file replicas at the DR site (local and host-path mode), while replication
//! goes on: a recovery point (the newest by default, `--gen N` for a kept older one) is
//! cloned into `.lifeboat-drills/<protection>/<id>/` beside the replicas, by reflink (a
//! copy, after a free-space check, where the file system cannot share extents). Only the
//! clone holds the protection's lock, for the newest point's replicas, which a cycle
//! rewrites; a kept point's files never change. The check runs in the caller's process
//! (`lifeboat drill --check`), with the caller's rights, never the daemon's; the caller
//! then ends the drill, which removes the copies (unless kept) and records the result
//! (`lifeboat_drill_*`). Nothing a drill writes reaches a replica, a point or the primary:
//! the copies share no blocks anyone writes through. A daemon that dies mid-drill sweeps
//! the copies at its next start (all but kept drills).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use crate::api::{DrillEnded, DrillStarted};
use crate::config::Protection;
use crate::ids::{now_ms, Gen, VolumeName};
use crate::site::dr::Dr;

const DIR: &str = ".lifeboat-drills";
/// In a kept drill's directory: the startup sweep leaves it.
const KEPT: &str = "KEPT";

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("{0}")]
    NotHere(String),
    #[error("{0}")]
    NotKept(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl DrillError {
    pub fn http_status(&self) -> u16 {
        match self {
            DrillError::NotHere(_) | DrillError::NotKept(_) => 404,
            DrillError::Busy(_) => 409,
            DrillError::Failed(_) => 500,
        }
    }
}

/// The drill directory of `id` beside `replica`.
fn dir_of(replica: &Path, protection: &str, id: &str) -> PathBuf {
    roots(replica, protection).join(id)
}

fn roots(replica: &Path, protection: &str) -> PathBuf {
    replica
        .parent()
        .unwrap_or(Path::new("."))
        .join(DIR)
        .join(protection)
}

fn drill_id_ok(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

/// The file replicas of `prot` (its volumes, and host-path ones of `volumes`).
fn replicas(prot: &Protection, volumes: &[VolumeName]) -> Vec<(VolumeName, PathBuf)> {
    prot.with_volumes(volumes.iter().map(|v| v.as_str()))
        .volumes
        .into_iter()
        .filter(|v| volumes.contains(&v.name))
        .map(|v| (v.name, v.path))
        .collect()
}

/// Clones `src` to `dest`: reflink, else a copy when the file system has room for it.
fn clone_or_copy(src: &Path, dest: &Path) -> Result<&'static str> {
    match crate::volume::points::clone_file(src, dest) {
        Ok(()) => return Ok("reflink"),
        Err(e) => tracing::debug!(error = %format!("{e:#}"), "no reflink for the drill; copying"),
    }
    let size = std::fs::metadata(src)?.len();
    let dir = dest.parent().unwrap_or(Path::new("."));
    let free = free_bytes(dir)?;
    if free < size.saturating_add(64 << 20) {
        return Err(anyhow!(
            "a drill copy of {} needs {size} bytes in {}, which has {free} free (and cannot share extents: XFS with reflink or btrfs would make the copy free)",
            src.display(),
            dir.display()
        ));
    }
    std::fs::copy(src, dest)
        .with_context(|| format!("copy {} to {}", src.display(), dest.display()))?;
    Ok("copy")
}

fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Starts a drill of `name`: clones point `gen` (default the newest) and says where.
pub async fn start(
    dr: &Dr,
    name: &str,
    gen: Option<u64>,
    ready_timeout: std::time::Duration,
) -> Result<DrillStarted, DrillError> {
    let started = Instant::now();
    let prot = dr
        .protection(name)
        .map_err(|e| DrillError::NotHere(e.to_string()))?
        .clone();
    if prot.csi().is_some() {
        return super::drill_kube::start(dr, &prot, gen, ready_timeout).await;
    }
    let lock = dr.lock_of(name).expect("a lock per protection");
    let locked = lock.lock().await;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(DrillError::Failed)?;
    let newest = rec.point.clone().ok_or_else(|| {
        DrillError::NotKept(format!("protection {name} has no consistent point yet"))
    })?;
    let chosen = gen.map(Gen).unwrap_or(newest.point.gen);
    // The newest point is the replicas themselves (under the lock); an older one its files.
    let sources: Vec<(VolumeName, PathBuf)> = if chosen == newest.point.gen {
        let vols: Vec<VolumeName> = newest.volumes.keys().cloned().collect();
        replicas(&prot, &vols)
    } else {
        match rec.recovery_point(chosen).filter(|p| !p.files.is_empty()) {
            Some(p) => p.files.clone().into_iter().collect(),
            None => {
                return Err(DrillError::NotKept(format!(
                    "gen {chosen} of protection {name} is not a kept recovery point (kept: {})",
                    rec.kept_points_text()
                )));
            }
        }
    };
    // Each copy goes beside its replica (host-path ones included), on its file system: a
    // reflink needs one, and `end` and the start-up sweep look there.
    let vols: Vec<VolumeName> = sources.iter().map(|(v, _)| v.clone()).collect();
    let replica_of: BTreeMap<VolumeName, PathBuf> = replicas(&prot, &vols).into_iter().collect();
    let id = format!("{}-{}", chosen.0, now_ms());
    let (name2, id2) = (prot.name.to_string(), id.clone());
    let copied = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut files = BTreeMap::new();
        let mut method = "reflink";
        for (v, src) in &sources {
            let replica = replica_of.get(v).unwrap_or(src);
            let dir = dir_of(replica, &name2, &id2);
            crate::volume::create_private_dir(&dir)
                .with_context(|| format!("create {}", dir.display()))?;
            let file = src
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(v.as_str()));
            let dest = dir.join(file);
            if clone_or_copy(src, &dest)? == "copy" {
                method = "copy";
            }
            files.insert(v.to_string(), dest.display().to_string());
        }
        Ok((files, method))
    })
    .await
    .map_err(|e| DrillError::Failed(e.into()))?;
    drop(locked);
    let (files, method) = match copied {
        Ok(x) => x,
        Err(e) => {
            let paths = replica_paths(dr, &prot).await.unwrap_or_default();
            let _ = end_blocking(prot.name.as_str(), &paths, &id, false);
            return Err(DrillError::Failed(
                e.context("clone the recovery point for the drill"),
            ));
        }
    };
    tracing::info!(protection = name, gen = %chosen, id, method, "drill started");
    Ok(DrillStarted {
        protection: name.to_string(),
        id,
        gen: chosen.0,
        files,
        method: method.into(),
        clone_seconds: started.elapsed().as_secs_f64(),
        namespaces: Default::default(),
        steps: Vec::new(),
        problems: Vec::new(),
        not_ready: Vec::new(),
    })
}

/// Removes drill `id`'s copies beside `replicas` (or marks them kept).
fn end_blocking(
    protection: &str,
    replicas: &[PathBuf],
    id: &str,
    keep: bool,
) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = replicas
        .iter()
        .map(|r| dir_of(r, protection, id))
        .filter(|d| d.exists())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        if keep {
            std::fs::write(d.join(KEPT), b"kept by lifeboat drill --keep\n")?;
        } else {
            std::fs::remove_dir_all(d).with_context(|| format!("remove {}", d.display()))?;
        }
    }
    Ok(dirs)
}

/// The replica paths of `prot`'s consistent point (host-path ones included).
async fn replica_paths(dr: &Dr, prot: &Protection) -> Result<Vec<PathBuf>> {
    let rec = dr.store.record(&prot.name).await?;
    let vols: Vec<VolumeName> = rec
        .point
        .map(|p| p.volumes.keys().cloned().collect())
        .unwrap_or_default();
    let mut out: Vec<PathBuf> = replicas(prot, &vols).into_iter().map(|(_, p)| p).collect();
    out.extend(prot.volumes.iter().map(|v| v.path.clone()));
    Ok(out)
}

/// Ends drill `id` of `name`: records the caller's result and removes the copies (kept
/// with `keep`).
pub async fn end(
    dr: &Dr,
    name: &str,
    id: &str,
    passed: Option<bool>,
    seconds: f64,
    keep: bool,
) -> Result<DrillEnded, DrillError> {
    let prot = dr
        .protection(name)
        .map_err(|e| DrillError::NotHere(e.to_string()))?
        .clone();
    if !drill_id_ok(id) {
        return Err(DrillError::NotKept(format!(
            "{id:?} is not a drill id (GEN-MILLISECONDS)"
        )));
    }
    let dirs = if prot.csi().is_some() {
        super::drill_kube::end(dr, &prot, id, keep)
            .await?
            .into_iter()
            .map(|ns| PathBuf::from(format!("namespace {ns}")))
            .collect()
    } else {
        let paths = replica_paths(dr, &prot).await.map_err(DrillError::Failed)?;
        let (p, i) = (prot.name.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || end_blocking(&p, &paths, &i, keep))
            .await
            .map_err(|e| DrillError::Failed(e.into()))?
            .map_err(DrillError::Failed)?
    };
    if dirs.is_empty() {
        return Err(DrillError::NotKept(format!(
            "no drill {id} of protection {name} is running"
        )));
    }
    let m = &dr.metrics;
    let result = match passed {
        Some(true) => "passed",
        Some(false) => "failed",
        None => "removed",
    };
    if passed.is_some() {
        m.drills.with_label_values(&[name, result]).inc();
    }
    if passed == Some(true) {
        m.drill_last_success
            .with_label_values(&[name])
            .set(now_ms() as f64 / 1000.0);
        m.drill_seconds.with_label_values(&[name]).set(seconds);
    }
    tracing::info!(protection = name, id, result, seconds, keep, "drill ended");
    Ok(DrillEnded {
        id: id.to_string(),
        removed: !keep,
        kept: if keep {
            dirs.iter().map(|d| d.display().to_string()).collect()
        } else {
            Vec::new()
        },
    })
}

/// Start-up: removes what drills a killed daemon (or caller) left, but kept ones.
pub async fn sweep(dr: &Dr, prot: &Protection) -> Result<()> {
    if prot.csi().is_some() {
        return super::drill_kube::sweep(dr, prot).await;
    }
    let paths = replica_paths(dr, prot).await?;
    let name = prot.name.to_string();
    tokio::task::spawn_blocking(move || {
        let mut seen: Vec<PathBuf> = paths.iter().map(|p| roots(p, &name)).collect();
        seen.sort();
        seen.dedup();
        for r in seen {
            for e in std::fs::read_dir(&r).into_iter().flatten().flatten() {
                let d = e.path();
                if d.is_dir() && !d.join(KEPT).exists() {
                    tracing::info!(dir = %d.display(), "removing what an unfinished drill left");
                    std::fs::remove_dir_all(&d)
                        .with_context(|| format!("remove {}", d.display()))?;
                }
            }
        }
        Ok(())
    })
    .await?
}
