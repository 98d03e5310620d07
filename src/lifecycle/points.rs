//! The DR site's recovery points as an operator sees them: `lifeboat points` lists them,
//! `hold` pins one against pruning and `release` unpins it.

use crate::api::{PointInfo, PointsReport};
use crate::config::Protection;
use crate::ids::{now_ms, Gen};
use crate::site::dr::Dr;
use crate::site::status::age_seconds;
use crate::store::{retention, ProtectionRecord};

/// Why a points call failed; the control API maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    #[error("{0}")]
    UnknownProtection(String),
    #[error("gen {gen} of protection {protection} is not a kept recovery point (kept: {kept})")]
    NotKept {
        protection: String,
        gen: u64,
        kept: String,
    },
    #[error("{0:#}")]
    Store(anyhow::Error),
}

impl PointsError {
    pub fn http_status(&self) -> u16 {
        match self {
            PointsError::UnknownProtection(_) | PointsError::NotKept { .. } => 404,
            PointsError::Store(_) => 500,
        }
    }
}

fn report(prot: &Protection, rec: &ProtectionRecord) -> PointsReport {
    let default = retention::failover_default(&rec.points, prot.apply_delay, now_ms())
        .map(|p| p.point.point.gen)
        .or(rec.point_gen());
    PointsReport {
        protection: prot.name.to_string(),
        keep: prot.keep.count,
        keep_for_seconds: prot.keep.window.map(|w| w.as_secs()),
        apply_delay_seconds: prot.apply_delay.map(|d| d.as_secs()),
        failover_default: default.map(|g| g.0),
        points: rec
            .points
            .iter()
            .map(|p| PointInfo {
                gen: p.point.point.gen.0,
                taken_at_ms: p.point.point.taken_at_ms,
                age_seconds: age_seconds(p.point.point.taken_at_ms),
                // CSI snapshots, or file clones (as large as their gen's volumes).
                volumes: p.snapshots.len() + p.files.len(),
                size_bytes: if p.files.is_empty() {
                    p.snapshots.values().map(|s| s.size).sum()
                } else {
                    p.point.volumes.values().map(|v| v.size).sum()
                },
                held: p.held,
            })
            .collect(),
    }
}

/// The points of `name`, oldest first.
pub async fn list(dr: &Dr, name: &str) -> Result<PointsReport, PointsError> {
    let prot = dr
        .protection(name)
        .map_err(|e| PointsError::UnknownProtection(e.to_string()))?;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(PointsError::Store)?;
    Ok(report(prot, &rec))
}

/// Pins (`held`) or unpins point `gen` of `name`. Waits for a running cycle of the
/// protection: its commit rewrites the same record.
pub async fn hold(dr: &Dr, name: &str, gen: u64, held: bool) -> Result<PointsReport, PointsError> {
    let prot = dr
        .protection(name)
        .map_err(|e| PointsError::UnknownProtection(e.to_string()))?;
    let lock = dr.lock_of(name).expect("a lock per protection");
    let _locked = lock.lock().await;
    let p = prot.name.clone();
    let rec = dr.store.record(&p).await.map_err(PointsError::Store)?;
    if !rec.points.iter().any(|x| x.point.point.gen == Gen(gen)) {
        let kept: Vec<String> = rec
            .points
            .iter()
            .map(|x| x.point.point.gen.to_string())
            .collect();
        return Err(PointsError::NotKept {
            protection: name.to_string(),
            gen,
            kept: if kept.is_empty() {
                "none".into()
            } else {
                kept.join(", ")
            },
        });
    }
    let rec = dr
        .store
        .run(move |s| s.hold_point(&p, Gen(gen), held))
        .await
        .map_err(PointsError::Store)?;
    tracing::info!(protection = name, gen, held, "recovery point hold changed");
    Ok(report(prot, &rec))
}
