//! A site's daemon: the shared context and the pieces that act on it. The primary runs the
//! [`scheduler`], whose cycles the [`sender`] carries to the peer over a [`peer`] link; the
//! DR site runs the [`receiver`]; both run [`recovery`] at start and serve [`control`].

pub mod control;
pub mod daemon;
pub mod failover;
pub mod mirror;
pub mod peer;
pub mod planned;
pub mod receiver;
pub mod recovery;
pub mod scheduler;
pub mod sender;
pub mod status;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;

use crate::config::{Config, Protection, Role};
use crate::ids::now_ms;
use crate::metrics::{ErrorKind, Metrics};
use crate::store::{ProtectionRecord, Store};
use status::{ErrorReport, Live, PeerStatus, ProtectionStatus, SiteStatus, VolumeStatus};

/// Per-protection coordination at the DR site: one cycle or failover at a time.
#[derive(Default)]
pub struct ProtectionGuard {
    pub lock: tokio::sync::Mutex<()>,
    /// Set first by failover so a cycle in transfer gives up the lock quickly.
    pub failing_over: AtomicBool,
    /// Cancels the cycle in flight: a newer attempt from the primary supersedes it (after
    /// a kill -9 the old connection would otherwise hold the lock until its idle timeout).
    pub current: std::sync::Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl ProtectionGuard {
    /// Cancels the cycle in flight (if any) and registers a new one.
    pub fn supersede(&self) -> tokio_util::sync::CancellationToken {
        let token = tokio_util::sync::CancellationToken::new();
        if let Some(old) = self
            .current
            .lock()
            .expect("guard lock")
            .replace(token.clone())
        {
            old.cancel();
        }
        token
    }

    pub fn cancel_current(&self) {
        if let Some(old) = self.current.lock().expect("guard lock").take() {
            old.cancel();
        }
    }
}

pub struct Site {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Metrics,
    pub live: Live,
    pub guards: HashMap<String, Arc<ProtectionGuard>>,
    pub peer_connected: AtomicBool,
    pub ready: AtomicBool,
    /// Kubernetes mode: the client for this site's cluster.
    pub kube: Option<kube::Client>,
    /// DR, Kubernetes mode: one standby apply at a time per site.
    pub mirror_lock: tokio::sync::Mutex<()>,
}

/// An error with the kind that becomes its metric label.
#[derive(Debug)]
pub struct KindError {
    pub kind: ErrorKind,
    pub error: anyhow::Error,
}

impl std::fmt::Display for KindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

pub trait WithKind<T> {
    fn kind(self, kind: ErrorKind) -> Result<T, KindError>;
}

impl<T, E: Into<anyhow::Error>> WithKind<T> for Result<T, E> {
    fn kind(self, kind: ErrorKind) -> Result<T, KindError> {
        self.map_err(|e| KindError {
            kind,
            error: e.into(),
        })
    }
}

impl Site {
    pub fn new(config: Config, store: Store) -> Site {
        let guards = config
            .protections
            .iter()
            .map(|p| (p.name.to_string(), Arc::default()))
            .collect();
        let metrics = Metrics::new();
        for p in &config.protections {
            metrics
                .rpo_target_seconds
                .with_label_values(&[p.name.as_str()])
                .set(p.rpo_target.as_secs_f64());
        }
        Site {
            config,
            store: Arc::new(store),
            metrics,
            live: Live::default(),
            guards,
            peer_connected: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            kube: None,
            mirror_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// A site with its Kubernetes client when the config has Kubernetes protections.
    pub async fn open(config: Config, store: Store) -> Result<Site> {
        let kube = match &config.kubernetes {
            Some(k) => Some(crate::k8s::connect(k).await?),
            None => None,
        };
        let mut site = Site::new(config, store);
        site.kube = kube;
        Ok(site)
    }

    /// A protection by name, or an error listing the ones this site has.
    pub fn protection(&self, name: &str) -> Result<&Protection> {
        self.config.protection(name).ok_or_else(|| {
            let names: Vec<_> = self
                .config
                .protections
                .iter()
                .map(|p| p.name.to_string())
                .collect();
            anyhow::anyhow!(
                "no protection named {name:?}; this site has: {}",
                names.join(", ")
            )
        })
    }

    /// A Kubernetes protection's selection, or an error saying it is not one.
    pub fn kube_protection(&self, name: &str) -> Result<&crate::k8s::KubeProtection> {
        self.protection(name)?
            .kubernetes
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("protection {name} is not a Kubernetes protection"))
    }

    /// The Kubernetes client, or an error naming the protection that needs it.
    pub fn kube(&self, prot: &str) -> Result<&kube::Client> {
        self.kube.as_ref().ok_or_else(|| {
            anyhow::anyhow!("protection {prot} is a Kubernetes protection but this site has no Kubernetes client")
        })
    }

    pub fn guard(&self, prot: &str) -> Option<Arc<ProtectionGuard>> {
        self.guards.get(prot).cloned()
    }

    pub fn record(&self, prot: &str) -> Result<ProtectionRecord> {
        Ok(self.store.protection(prot)?.unwrap_or_default())
    }

    pub fn note_error(&self, prot: &str, e: &KindError) {
        self.metrics.error(prot, e.kind);
        let report = ErrorReport {
            kind: e.kind,
            message: format!("{:#}", e.error),
            at_ms: now_ms(),
        };
        self.live.update(prot, |l| l.last_error = Some(report));
    }

    fn protection_status(&self, p: &Protection) -> ProtectionStatus {
        let name = p.name.as_str();
        let rec = self.record(name).unwrap_or_default();
        let live = self.live.get(name);
        let point = rec.point.as_ref().map(|r| r.point);
        let (role, stopped_because) = match (&self.config.role, &rec.failed_over, &rec.fenced) {
            (_, Some(f), _) => (
                "failed-over",
                Some(format!(
                    "failed over at epoch {} (recovered gen {}); replication from the old primary is refused",
                    rec.epoch,
                    f.gen.map_or("none".into(), |g| g.to_string())
                )),
            ),
            (_, _, Some(f)) => ("fenced", Some(f.message.clone())),
            (Role::Primary, _, _) => ("primary", None),
            (Role::Dr, _, _) => ("dr", None),
        };
        let volumes = volume_statuses(p, &rec);
        let kubernetes = live
            .kubernetes
            .clone()
            .or_else(|| p.kubernetes.as_ref().map(|_| status::KubeStatus::default()));
        ProtectionStatus {
            name: name.to_string(),
            role: role.to_string(),
            epoch: rec.epoch.0,
            consistent_gen: point.map(|p| p.gen.0),
            consistent_taken_at_ms: point.map(|p| p.taken_at_ms),
            consistent_age_seconds: point.map(|p| age_seconds(p.taken_at_ms)),
            rpo_target_seconds: p.rpo_target.as_secs_f64(),
            activity: if live.activity.is_empty() {
                "idle".into()
            } else {
                Live::describe(&live)
            },
            last_cycle: live.last_cycle,
            last_error: live.last_error,
            stopped_because,
            last_refusal: live.last_refusal,
            volumes,
            kubernetes,
        }
    }

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

    /// Refreshes gauges that depend on the clock, then renders all metrics.
    pub fn render_metrics(&self) -> String {
        for p in &self.config.protections {
            let name = p.name.as_str();
            let Ok(rec) = self.record(name) else { continue };
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
pub fn volume_statuses(p: &Protection, rec: &ProtectionRecord) -> Vec<VolumeStatus> {
    let p = match &rec.point {
        Some(pt) => p.with_volumes(pt.volumes.keys().map(String::as_str)),
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
                path: v.path.display().to_string(),
                size: vr.map(|r| r.size),
                root: vr.map(|r| r.root.to_string()),
            }
        })
        .collect()
}

pub fn age_seconds(taken_at_ms: u64) -> f64 {
    now_ms().saturating_sub(taken_at_ms) as f64 / 1000.0
}
