//! Failover at the DR site (local mode): stop taking replication for the protection, make
//! sure the replicas sit at the consistent point, raise the epoch so the old primary is
//! refused, and report what was recovered and how old it is.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use crate::config::Role;
use crate::ids::{now_ms, Epoch};
use crate::site::recovery;
use crate::site::status::FailoverReport;
use crate::site::{age_seconds, volume_statuses, Site};
use crate::store::{Batch, FailoverRecord};

pub async fn failover(site: &Arc<Site>, name: &str) -> Result<FailoverReport> {
    let started = Instant::now();
    if site.config.role != Role::Dr {
        bail!(
            "failover runs at the DR site; {} is the primary site",
            site.config.site_name
        );
    }
    let prot = site.config.protection(name).cloned().ok_or_else(|| {
        let names: Vec<_> = site
            .config
            .protections
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        anyhow!(
            "no protection named {name:?}; this site has: {}",
            names.join(", ")
        )
    })?;
    let guard = site.guard(name).expect("guard per protection");
    let was_failing = guard.failing_over.swap(true, Ordering::SeqCst);
    guard.cancel_current();
    let result = async {
        let _lock = guard.lock.lock().await;
        let (store, config, p) = (site.store.clone(), site.config.clone(), prot.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            recovery::finish_pending(&store, &config, &p)?;
            recovery::discard_staging(&store, &config, &p)
        })
        .await??;
        let mut rec = site.record(name)?;
        let already = rec.failed_over.is_some();
        if !already {
            rec.epoch = Epoch(rec.epoch.0 + 1);
            rec.failed_over = Some(FailoverRecord {
                at_ms: now_ms(),
                gen: rec.point.as_ref().map(|p| p.point.gen),
                snapshot_taken_at_ms: rec.point.as_ref().map(|p| p.point.taken_at_ms),
            });
            let mut b = Batch::default();
            b.put_protection(name, &rec);
            site.store.write(b, true)?;
        }
        let point = rec.point.as_ref().map(|p| p.point);
        let replicas = volume_statuses(&prot, &rec);
        let seconds = started.elapsed().as_secs_f64();
        site.metrics.failover_seconds.with_label_values(&[name]).set(seconds);
        tracing::warn!(protection = name, epoch = %rec.epoch, gen = ?point.map(|p| p.gen), "failed over: this site no longer accepts replication for the protection");
        Ok(FailoverReport {
            protection: name.to_string(),
            epoch: rec.epoch.0,
            recovered_gen: point.map(|p| p.gen.0),
            snapshot_taken_at_ms: point.map(|p| p.taken_at_ms),
            age_seconds: point.map(|p| age_seconds(p.taken_at_ms)),
            replicas,
            already_failed_over: already,
            seconds,
        })
    }
    .await;
    if result.is_err() && !was_failing {
        guard.failing_over.store(false, Ordering::SeqCst);
    }
    result
}
