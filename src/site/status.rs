//! What `status` and `/metrics` show: the in-memory live state per protection (activity,
//! progress, last cycle, last error) that the store does not keep, and the site's status
//! and clock-dependent gauges built from it and the records.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::api::{
    CycleReport, ErrorReport, KubeStatus, PeerStatus, ProtectionStatus, SiteStatus, VolumeStatus,
};
use crate::config::{Protection, Role};
use crate::ids::now_ms;
use crate::site::Shared;
use crate::store::ProtectionRecord;

/// In-memory state per protection that the store does not keep.
#[derive(Debug, Clone, Default)]
pub struct LiveProtection {
    pub activity: String,
    /// Bytes done of the volume in progress, and its size.
    pub progress: Option<(std::sync::Arc<std::sync::atomic::AtomicU64>, u64)>,
    /// The running cycle's transfer, from its start to the cycle's end.
    pub transfer: Option<Transfer>,
    pub last_cycle: Option<CycleReport>,
    pub last_error: Option<ErrorReport>,
    pub last_refusal: Option<ErrorReport>,
    pub kubernetes: Option<KubeStatus>,
}

/// A cycle's transfer as far as it got: what `lifeboat_cycle_pending_bytes` and the ETA
/// are computed from.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub started: std::time::Instant,
    /// Bytes of the gen's volumes to scan (all of them, changed or not).
    pub total: u64,
    /// Bytes of the volumes already sent.
    pub done: u64,
}

impl LiveProtection {
    /// Bytes of the transfer done, the volume in progress included.
    pub fn transferred(&self) -> Option<(u64, &Transfer)> {
        let t = self.transfer.as_ref()?;
        let current = self.progress.as_ref().map_or(0, |(done, size)| {
            done.load(std::sync::atomic::Ordering::Relaxed).min(*size)
        });
        Some(((t.done + current).min(t.total), t))
    }
}

#[derive(Default)]
pub struct Live {
    map: Mutex<HashMap<String, LiveProtection>>,
}

impl Live {
    pub fn update(&self, prot: &str, f: impl FnOnce(&mut LiveProtection)) {
        let mut map = self.map.lock().expect("live state lock");
        f(map.entry(prot.to_string()).or_default());
    }

    pub fn get(&self, prot: &str) -> LiveProtection {
        self.map
            .lock()
            .expect("live state lock")
            .get(prot)
            .cloned()
            .unwrap_or_default()
    }

    pub fn activity(&self, prot: &str, what: impl Into<String>) {
        let what = what.into();
        self.update(prot, |l| {
            l.activity = what;
            l.progress = None;
        });
    }

    /// The activity as shown: with the percentage of the volume in progress.
    pub fn describe(l: &LiveProtection) -> String {
        match &l.progress {
            Some((done, total)) if *total > 0 => {
                let done = done.load(std::sync::atomic::Ordering::Relaxed).min(*total);
                format!(
                    "{}: {:.0}% scanned",
                    l.activity,
                    100.0 * done as f64 / *total as f64
                )
            }
            _ => l.activity.clone(),
        }
    }
}

impl Shared {
    fn protection_status(&self, p: &Protection) -> ProtectionStatus {
        let name = p.name.as_str();
        let rec = self.store.blocking().record(&p.name).unwrap_or_default();
        let live = self.live.get(name);
        let point = rec.point.as_ref().map(|r| r.point);
        // After a failback the record's turn, not the configured role, says the direction.
        let (role, stopped_because) = match (&rec.failed_over, &rec.fenced, self.sends(&rec)) {
            (Some(f), _, false) => (
                "failed-over",
                Some(format!(
                    "failed over at epoch {} (recovered gen {}); replication from the old primary is refused",
                    rec.epoch,
                    f.gen.map_or("none".into(), |g| g.to_string())
                )),
            ),
            (_, Some(f), true) => ("fenced", Some(f.message.clone())),
            (_, _, true) => ("primary", None),
            (_, _, false) => ("dr", None),
        };
        let direction = rec.turn.as_ref().map(|t| {
            let ago = age_seconds(t.at_ms);
            let earlier: Vec<String> = t
                .earlier
                .iter()
                .flat_map(|f| f.volumes.values().map(|v| v.kept.display().to_string()))
                .collect();
            let earlier = match earlier.is_empty() {
                true => String::new(),
                false => format!("; earlier failbacks' forks kept in {}", earlier.join(", ")),
            };
            match &t.fork {
                _ if t.sends => format!(
                    "sends to {} since a failback {ago:.0}s ago (the application runs here){earlier}",
                    t.peer
                ),
                Some(f) => format!(
                    "receives from {} since a failback {ago:.0}s ago; {}{earlier}",
                    t.peer,
                    f.describe(&self.config.site_name)
                ),
                None => format!("receives from {} since a failback {ago:.0}s ago{earlier}", t.peer),
            }
        });
        let volumes = volume_statuses(p, &rec, self.config.role);
        let kubernetes = live
            .kubernetes
            .clone()
            .or_else(|| p.kubernetes.as_ref().map(|_| KubeStatus::default()));
        ProtectionStatus {
            name: name.to_string(),
            role: role.to_string(),
            epoch: rec.epoch.0,
            consistent_gen: point.map(|p| p.gen.0),
            consistent_taken_at_ms: point.map(|p| p.taken_at_ms),
            consistent_age_seconds: point.map(|p| age_seconds(p.taken_at_ms)),
            points: rec.points.iter().map(|p| p.point.point.gen.0).collect(),
            rpo_target_seconds: p.rpo_target.as_secs_f64(),
            activity: if live.activity.is_empty() {
                "idle".into()
            } else {
                Live::describe(&live)
            },
            last_cycle: live.last_cycle,
            last_error: live.last_error,
            stopped_because,
            direction,
            last_refusal: live.last_refusal,
            degraded: rec.repair.values().cloned().collect(),
            last_clean_scrub_ms: rec.scrub.and_then(|s| s.last_clean_ms),
            volumes,
            kubernetes,
        }
    }

    /// The site's status. Reads the store: call it on a blocking thread.
    pub fn status(&self) -> SiteStatus {
        SiteStatus {
            site: self.config.site_name.clone(),
            role: self.config.role.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            peer: self.config.peer.as_ref().map(|p| PeerStatus {
                address: format!("{} ({})", p.address, p.server_name),
                connected: self.peer_connected.load(Ordering::Relaxed),
            }),
            protections: self
                .config
                .protections
                .iter()
                .map(|p| self.protection_status(p))
                .collect(),
        }
    }

    /// Why this site is not ready to serve its role, if it is not: still recovering, a
    /// fenced protection (this old primary replicates nothing), or a degraded one (a DR
    /// replica under repair). Reads the store: call it on a blocking thread.
    pub fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("recovering".into());
        }
        let mut why = Vec::new();
        for p in &self.config.protections {
            match self.store.blocking().record(&p.name) {
                Ok(rec) => {
                    if let Some(f) = &rec.fenced {
                        why.push(format!("protection {} is fenced: {}", p.name, f.message));
                    }
                    if !rec.repair.is_empty() {
                        let what: Vec<&str> = rec.repair.values().map(String::as_str).collect();
                        why.push(format!(
                            "protection {} is degraded: {}",
                            p.name,
                            what.join("; ")
                        ));
                    }
                }
                Err(e) => why.push(format!("protection {}: {e:#}", p.name)),
            }
        }
        (!why.is_empty()).then(|| format!("not ready: {}", why.join("; ")))
    }

    /// Refreshes gauges that depend on the clock, then renders all metrics. Reads the
    /// store: call it on a blocking thread.
    pub fn render_metrics(&self) -> String {
        for p in &self.config.protections {
            let name = p.name.as_str();
            let Ok(rec) = self.store.blocking().record(&p.name) else {
                continue;
            };
            self.metrics
                .epoch
                .with_label_values(&[name])
                .set(rec.epoch.0 as i64);
            if let Some(pt) = rec.point.as_ref().map(|r| r.point) {
                self.metrics
                    .rpo_seconds
                    .with_label_values(&[name])
                    .set(age_seconds(pt.taken_at_ms));
                self.metrics
                    .consistent_gen
                    .with_label_values(&[name])
                    .set(pt.gen.0 as i64);
            }
            let live = self.live.get(name);
            let (running, done, pending, eta) = match live.transferred() {
                Some((done, t)) => {
                    let pending = t.total - done;
                    let rate = done as f64 / t.started.elapsed().as_secs_f64().max(0.001);
                    // No rate yet (nothing scanned): no estimate rather than infinity.
                    let eta = if done > 0 {
                        pending as f64 / rate
                    } else {
                        f64::NAN
                    };
                    (1, done, pending, eta)
                }
                None => (0, 0, 0, 0.0),
            };
            let m = &self.metrics;
            m.cycle_running.with_label_values(&[name]).set(running);
            m.cycle_progress_bytes
                .with_label_values(&[name])
                .set(done as i64);
            m.cycle_pending_bytes
                .with_label_values(&[name])
                .set(pending as i64);
            m.cycle_eta_seconds.with_label_values(&[name]).set(eta);
            if let Some(oldest) = rec.points.first() {
                self.metrics
                    .recovery_points
                    .with_label_values(&[name])
                    .set(rec.points.len() as i64);
                self.metrics
                    .oldest_point_age
                    .with_label_values(&[name])
                    .set(age_seconds(oldest.point.point.taken_at_ms));
            }
        }
        if let Some(peer) = &self.config.peer {
            self.metrics
                .peer_connected
                .with_label_values(&[&peer.server_name])
                .set(self.peer_connected.load(Ordering::Relaxed) as i64);
        }
        self.metrics.render()
    }
}

/// Each volume of `p` with its path and, at the record's point, its size and root.
pub fn volume_statuses(p: &Protection, rec: &ProtectionRecord, role: Role) -> Vec<VolumeStatus> {
    let p = match &rec.point {
        Some(pt) => p.with_volumes(pt.volumes.keys().map(|v| v.as_str())),
        None => p.clone(),
    };
    p.volumes
        .iter()
        .map(|v| {
            let vr = rec
                .point
                .as_ref()
                .and_then(|r| r.volumes.get(v.name.as_str()));
            VolumeStatus {
                name: v.name.to_string(),
                // CSI: the primary's volume is its PVC (`namespace.name`); a DR replica
                // is a PVC of the movers' namespace.
                path: match (p.csi(), role) {
                    (Some(_), Role::Primary) => {
                        format!("PVC {}", v.name.as_str().replacen('.', "/", 1))
                    }
                    (Some(csi), Role::Dr) => format!(
                        "PVC {}/{}",
                        csi.mover.namespace,
                        crate::k8s::writer_job::replica_name(p.name.as_str(), v.name.as_str())
                    ),
                    (None, _) => v.path.display().to_string(),
                },
                size: vr.map(|r| r.size),
                root: vr.map(|r| r.root.to_string()),
            }
        })
        .collect()
}

pub fn age_seconds(taken_at_ms: u64) -> f64 {
    now_ms().saturating_sub(taken_at_ms) as f64 / 1000.0
}
