//! `lifeboat verify` at the DR site: re-reads each replica of the consistent point (or the
//! files of a kept recovery point, `--gen`) and compares its chunks with the DR index of
//! that gen, naming each divergent chunk range. Divergent
//! volumes are marked for repair, so the next cycle resyncs them by hash exchange and the
//! primary resends what differs. It runs under the protection's lock, so a cycle's apply
//! is never read half-written (and waits for it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use crate::api::{VerifyReport, VolumeVerify};
use crate::config::Protection;
use crate::engine::chunk::Geometry;
use crate::engine::diff::BaseCursor;
use crate::engine::scan::{scan_file, Content, ScanOptions};
use crate::ids::{Gen, VolumeName};
use crate::replicate::receive::check;
use crate::site::dr::Dr;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    NotHere(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl VerifyError {
    pub fn http_status(&self) -> u16 {
        match self {
            VerifyError::NotHere(_) => 404,
            VerifyError::Failed(_) => 500,
        }
    }
}

/// Consecutive indices as inclusive ranges.
pub(crate) fn ranges(indices: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in indices {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == i => *last = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// The chunks of a file that differ from an index.
pub(crate) struct Divergent {
    /// Chunks read.
    pub chunks: u64,
    pub indices: Vec<u64>,
    pub bytes: u64,
}

/// Reads the file at `path` as a volume of `geometry` and compares each chunk with
/// `store`'s index of (`prot`, `vol`, `gen`); a chunk the index does not have differs.
/// Blocking.
pub(crate) fn divergent_chunks(
    store: &crate::store::Store,
    prot: &crate::ids::ProtectionName,
    vol: &VolumeName,
    gen: Gen,
    path: &std::path::Path,
    geometry: Geometry,
) -> anyhow::Result<Divergent> {
    let mut cursor = BaseCursor::new(store.index(prot, vol, gen));
    let mut indices = Vec::new();
    let progress = AtomicU64::new(0);
    let stats = scan_file(
        path,
        geometry,
        |i| cursor.hash_at(i),
        |s| {
            if !matches!(s.content, Content::Unchanged) {
                indices.push(s.index);
            }
            Ok(())
        },
        &progress,
        ScanOptions::default(),
    )?;
    let bytes = indices.iter().map(|&i| geometry.len(i) as u64).sum();
    Ok(Divergent {
        chunks: stats.chunks,
        indices,
        bytes,
    })
}

/// Verifies every replica of `name`'s consistent point; with `repair`, marks the
/// divergent volumes for the next cycle to resync. With `gen`, verifies that kept
/// recovery point's files instead (a point cannot be repaired: it is reported).
pub async fn verify(
    dr: &Dr,
    name: &str,
    repair: bool,
    gen: Option<u64>,
) -> Result<VerifyReport, VerifyError> {
    let prot = dr
        .protection(name)
        .map_err(|e| VerifyError::NotHere(e.to_string()))?
        .clone();
    if prot.csi().is_some() {
        return verify_csi(dr, &prot, repair, gen).await;
    }
    let lock = dr.lock_of(name).expect("a lock per protection");
    let _locked = lock.lock().await;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(VerifyError::Failed)?;
    let Some(point) = rec.point.clone() else {
        return Err(VerifyError::NotHere(format!(
            "protection {name} has no consistent point yet: nothing to verify"
        )));
    };
    let group = check::group(&prot, &rec);
    // The files read, and the gen whose index they are compared with.
    let (point, files): (_, BTreeMap<VolumeName, PathBuf>) = match gen {
        Some(g) if g != point.point.gen.0 => {
            let Some(p) = rec.recovery_point(Gen(g)).filter(|p| !p.files.is_empty()) else {
                return Err(VerifyError::NotHere(format!(
                    "gen {g} of protection {name} is not a kept recovery point of file replicas (kept: {})",
                    rec.kept_points_text()
                )));
            };
            (p.point.clone(), p.files.clone())
        }
        _ => {
            let files = point
                .volumes
                .keys()
                .filter_map(|v| {
                    group
                        .volume(v.as_str())
                        .map(|r| (v.clone(), r.path.clone()))
                })
                .collect();
            (point, files)
        }
    };
    let repair = repair && gen.is_none_or(|g| g == rec.point_gen().map_or(0, |p| p.0));
    dr.live
        .activity(name, format!("verify of gen {}", point.point.gen));
    let store = dr.store.blocking().clone();
    let (p, gen) = (prot.name.clone(), point.point.gen);
    let volumes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<VolumeVerify>> {
        let mut out = Vec::new();
        for (vol, vr) in &point.volumes {
            let Some(path) = files.get(vol) else {
                continue;
            };
            let geometry = Geometry::new(vr.size, vr.chunk_size);
            let d = divergent_chunks(&store, &p, vol, gen, path, geometry)?;
            out.push(VolumeVerify {
                volume: vol.to_string(),
                path: path.display().to_string(),
                chunks: d.chunks,
                divergent: ranges(&d.indices),
                divergent_bytes: d.bytes,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| VerifyError::Failed(anyhow::anyhow!("verify panicked: {e}")))?
    .map_err(VerifyError::Failed);
    dr.live.activity(name, "idle");
    finish(dr, &prot, gen, volumes?, repair).await
}

/// Counts, logs and (with `repair`) marks for the next cycle what differs.
async fn finish(
    dr: &Dr,
    prot: &Protection,
    gen: Gen,
    volumes: Vec<VolumeVerify>,
    repair: bool,
) -> Result<VerifyReport, VerifyError> {
    let name = prot.name.as_str();
    let found: BTreeMap<VolumeName, String> = volumes
        .iter()
        .filter(|v| !v.divergent.is_empty())
        .filter_map(|v| {
            let why = format!(
                "verify found {} bytes in {} chunk range(s) that differ from the DR index",
                v.divergent_bytes,
                v.divergent.len()
            );
            VolumeName::new(&v.volume).ok().map(|n| (n, why))
        })
        .collect();
    for v in volumes.iter().filter(|v| !v.divergent.is_empty()) {
        dr.metrics.verify_failures.with_label_values(&[name]).inc();
        tracing::error!(protection = name, volume = %v.volume, ranges = ?v.divergent, "replica differs from the DR index");
    }
    let marked = repair && !found.is_empty();
    if marked {
        let p = prot.name.clone();
        dr.store
            .run(move |s| s.mark_repair(&p, found))
            .await
            .map_err(VerifyError::Failed)?;
    }
    Ok(VerifyReport {
        protection: name.to_string(),
        gen: gen.0,
        volumes,
        marked_for_repair: marked,
    })
}

/// CSI replicas: a reader Job per replica PVC hashes it read-only and streams the hashes
/// to this daemon, which compares them with the DR index (under the protection's lock, so
/// no writer changes a replica meanwhile). Only the consistent point's replicas: a kept
/// point is a set of driver snapshots.
async fn verify_csi(
    dr: &Dr,
    prot: &Protection,
    repair: bool,
    gen: Option<u64>,
) -> Result<VerifyReport, VerifyError> {
    let name = prot.name.as_str();
    let csi = prot.csi().expect("a CSI protection");
    let lock = dr.lock_of(name).expect("a lock per protection");
    let _locked = lock.lock().await;
    let (rec, pending) = dr
        .store
        .step(&prot.name, |s, p| Ok((s.record(p)?, s.commits(p)?)))
        .await
        .map_err(VerifyError::Failed)?;
    let Some(point) = rec.point.clone() else {
        return Err(VerifyError::NotHere(format!(
            "protection {name} has no consistent point yet: nothing to verify"
        )));
    };
    if let Some(g) = gen.filter(|g| *g != point.point.gen.0) {
        return Err(VerifyError::NotHere(format!(
            "gen {g} of protection {name} is a recovery point of CSI snapshots; verify reads the replica PVCs of the consistent point (gen {}); a drill (`lifeboat drill --gen {g}`) proves an older point",
            point.point.gen
        )));
    }
    if let Some(c) = pending.first() {
        return Err(VerifyError::NotHere(format!(
            "gen {} of protection {name} is committed and its writers have not finished: verify once it is applied",
            c.point.point.gen
        )));
    }
    let replicas =
        crate::replicate::points::replicas(dr, prot, csi).map_err(VerifyError::Failed)?;
    let gen = point.point.gen;
    dr.live.activity(name, format!("verify of gen {gen}"));
    let mut volumes = Vec::new();
    for (vol, vr) in &point.volumes {
        let compared = lock.expect_reader(vol.as_str(), gen);
        let read = replicas
            .read(gen, vol.as_str(), vr.size, vr.chunk_size)
            .await
            .map_err(VerifyError::Failed)?;
        let compared = compared.await.map_err(|_| {
            VerifyError::Failed(anyhow::anyhow!(
                "the reader of {vol} finished but its hashes never reached this daemon"
            ))
        })?;
        let geometry = Geometry::new(vr.size, vr.chunk_size);
        let bytes = compared
            .divergent
            .iter()
            .map(|&i| geometry.len(i) as u64)
            .sum();
        volumes.push(VolumeVerify {
            volume: vol.to_string(),
            path: format!(
                "PVC {}/{}",
                csi.mover.namespace,
                crate::k8s::writer_job::replica_name(name, vol.as_str())
            ),
            chunks: read.chunks,
            divergent: ranges(&compared.divergent),
            divergent_bytes: bytes,
        });
    }
    dr.live.activity(name, "idle");
    finish(dr, prot, gen, volumes, repair).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn consecutive_chunks_make_one_range() {
        assert_eq!(
            super::ranges(&[1, 2, 3, 7, 9, 10]),
            vec![(1, 3), (7, 7), (9, 10)]
        );
        assert!(super::ranges(&[]).is_empty());
    }
}
