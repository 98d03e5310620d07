//! A site's state, by role. [`Shared`] is what every role has (config, state store, metrics,
//! live status, the Kubernetes client); [`primary::Primary`] adds the link to the DR site,
//! [`dr::Dr`] the per-protection locks that only their holder can commit or fail over
//! with. [`status`] builds what `status` and `/metrics` show from them; [`peer`] is the
//! primary's QUIC link.

pub mod dr;
pub mod peer;
pub mod primary;
pub mod status;

use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, Context, Result};

use crate::api::ErrorReport;
use crate::config::{Config, Protection};
use crate::ids::{now_ms, Gen, ProtectionName};
use crate::k8s::bundle::Bundle;
use crate::metrics::{ErrorKind, Metrics};
use crate::store::{StateStore, Store};
use status::Live;

/// What both roles share.
pub struct Shared {
    pub config: Config,
    pub store: StateStore,
    pub metrics: Metrics,
    pub live: Live,
    /// Kubernetes mode: the client for this site's cluster.
    pub kube: Option<kube::Client>,
    /// Start-up recovery is done and the role's tasks run.
    pub ready: AtomicBool,
    /// The primary's QUIC connection to the DR site is up.
    pub peer_connected: AtomicBool,
    /// Bumped when a failback turns a protection around here: the schedulers look again
    /// at which way each of their protections goes.
    pub turns: tokio::sync::watch::Sender<u64>,
}

/// A protection name that is not in this site's config.
#[derive(Debug, thiserror::Error)]
#[error("no protection named {name:?}; this site has: {}", have.join(", "))]
pub struct UnknownProtection {
    pub name: String,
    pub have: Vec<String>,
}

impl Shared {
    pub fn new(config: Config, store: Store) -> Shared {
        let metrics = Metrics::new();
        for p in &config.protections {
            metrics
                .rpo_target_seconds
                .with_label_values(&[p.name.as_str()])
                .set(p.rpo_target.as_secs_f64());
        }
        Shared {
            config,
            store: StateStore::new(store),
            metrics,
            live: Live::default(),
            kube: None,
            ready: AtomicBool::new(false),
            peer_connected: AtomicBool::new(false),
            turns: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The shared state with its Kubernetes client when the config has Kubernetes
    /// protections.
    pub async fn open(config: Config, store: Store) -> Result<Shared> {
        let kube = match &config.kubernetes {
            Some(k) => Some(crate::k8s::connect(k).await?),
            None => None,
        };
        let mut shared = Shared::new(config, store);
        shared.kube = kube;
        Ok(shared)
    }

    /// The bundle committed with `gen`. Reads the store: call it on a blocking thread.
    pub fn bundle(&self, prot: &ProtectionName, gen: Gen) -> Result<Bundle> {
        let store = self.store.blocking();
        let bytes = store.manifests(prot, gen)?.ok_or_else(|| {
            let kept = store
                .manifest_gens(prot)
                .unwrap_or_default()
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            anyhow!("no manifest bundle of gen {gen} for protection {prot} (kept: {kept})")
        })?;
        Bundle::decode(&bytes).with_context(|| format!("manifest bundle of gen {gen}"))
    }

    /// A protection by name, or an error listing the ones this site has.
    /// This site's configured role is the primary: it sends each protection until a
    /// failback turns one around (see [`crate::store::turn`]).
    pub fn configured_primary(&self) -> bool {
        self.config.role == crate::config::Role::Primary
    }

    /// Whether this site sends `rec`'s protection now.
    pub fn sends(&self, rec: &crate::store::ProtectionRecord) -> bool {
        rec.sends(self.configured_primary())
    }

    /// Tells the schedulers a protection turned around.
    pub fn turned(&self) {
        self.turns.send_modify(|n| *n += 1);
    }

    pub fn protection(&self, name: &str) -> Result<&Protection, UnknownProtection> {
        self.config
            .protection(name)
            .ok_or_else(|| UnknownProtection {
                name: name.to_string(),
                have: self
                    .config
                    .protections
                    .iter()
                    .map(|p| p.name.to_string())
                    .collect(),
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

    /// Counts an error of `prot` and shows it in `status` as the last error.
    pub fn note_error(&self, prot: &str, kind: ErrorKind, message: String) {
        self.metrics.error(prot, kind);
        let report = ErrorReport {
            kind,
            message,
            at_ms: now_ms(),
        };
        self.live.update(prot, |l| l.last_error = Some(report));
    }

    /// Counts a replication attempt this DR site refused and shows it in `status`.
    pub fn note_refusal(&self, prot: &str, kind: ErrorKind, message: String) {
        self.metrics.error(prot, kind);
        let report = ErrorReport {
            kind,
            message,
            at_ms: now_ms(),
        };
        self.live.update(prot, |l| l.last_refusal = Some(report));
    }
}
