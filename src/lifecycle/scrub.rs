//! The DR site's background scrub: every `scrub_every`, each file replica of the consistent
//! point is re-read against the DR index, at most `scrub_rate` bytes a second. Nothing
//! else re-reads a replica between cycles, so damage done to it out of band (a bad disk,
//! an operator's write) would otherwise wait for the failover that needs it.
//!
//! It reads a slice at a time (about 8 MiB) under the protection's lock, and reads the
//! record again for each slice. So a cycle waits at most one slice, and a slice never sees
//! a replica half-applied: the apply holds the same lock, and a slice is skipped while a
//! committed gen waits to be applied, the protection is failed over (its replicas are the
//! application's now) or the volume is already marked for repair. A divergent slice is
//! named in the log, counted in `lifeboat_verify_failures_total`, and its volume marked for
//! repair: the next cycle resends what differs. A pass that found nothing is recorded
//! (`lifeboat_scrub_last_clean_timestamp_seconds`), and the schedule survives restarts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::{Protection, Scrub};
use crate::engine::chunk::Geometry;
use crate::engine::diff::BaseCursor;
use crate::engine::index::SEGMENT_CHUNKS;
use crate::engine::reread;
use crate::ids::{now_ms, VolumeName};
use crate::net::limit::RateLimit;
use crate::replicate::receive::check;
use crate::site::dr::Dr;

const SLICE_BYTES: u64 = 8 << 20;

/// How a pass ended.
enum Pass {
    /// Every volume was read: whether all were equal to the index.
    Done {
        clean: bool,
    },
    /// Not now (failed over, nothing replicated yet); try again one period later.
    Skipped,
    Stopped,
}

/// One protection's scrub, until `stop`.
pub async fn run(dr: Arc<Dr>, prot: Protection, stop: CancellationToken) {
    let Some(scrub) = prot.scrub else { return };
    let limit = RateLimit::new(scrub.rate);
    loop {
        let due = match schedule(&dr, &prot, scrub).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(protection = %prot.name, error = %format!("{e:#}"), "scrub: cannot read the state store; trying again later");
                now_ms() + 60_000
            }
        };
        let wait = Duration::from_millis(due.saturating_sub(now_ms()));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let outcome = pass(&dr, &prot, &limit, &stop).await;
        let at = now_ms();
        let clean = match outcome {
            Ok(Pass::Stopped) => return,
            Ok(Pass::Skipped) => None,
            Ok(Pass::Done { clean }) => Some(clean),
            Err(e) => {
                tracing::warn!(protection = %prot.name, error = %format!("{e:#}"), "scrub pass failed; the next one starts a period later");
                Some(false)
            }
        };
        if let Err(e) = record(&dr, &prot, at, clean).await {
            tracing::warn!(protection = %prot.name, error = %format!("{e:#}"), "could not record the scrub pass");
        }
    }
}

/// When the next pass is due: a period after the last one (or after scrubbing began,
/// which is recorded the first time so restarts do not push it back).
async fn schedule(dr: &Dr, prot: &Protection, scrub: Scrub) -> Result<u64> {
    let every = scrub.every.as_millis() as u64;
    let rec = dr.store.record(&prot.name).await?;
    if let Some(last) = rec.scrub.and_then(|s| s.last_clean_ms) {
        dr.metrics
            .scrub_last_clean
            .with_label_values(&[prot.name.as_str()])
            .set(last as f64 / 1000.0);
    }
    let since = match rec.scrub {
        Some(s) => s.last_pass_ms,
        None => {
            let now = now_ms();
            record(dr, prot, now, None).await?;
            now
        }
    };
    Ok(since + every)
}

/// Records a pass that ended at `at` (`clean`: None when it was skipped, which moves
/// only the schedule).
async fn record(dr: &Dr, prot: &Protection, at: u64, clean: Option<bool>) -> Result<()> {
    let lock = dr
        .lock_of(prot.name.as_str())
        .expect("a lock per protection");
    let _locked = lock.lock().await;
    let p = prot.name.clone();
    let clean_now = clean == Some(true);
    dr.store
        .run(move |s| s.record_scrub(&p, at, clean_now))
        .await?;
    if clean_now {
        dr.metrics
            .scrub_last_clean
            .with_label_values(&[prot.name.as_str()])
            .set(at as f64 / 1000.0);
        tracing::info!(protection = %prot.name, "scrub pass clean: every replica equals the DR index");
    }
    Ok(())
}

async fn pass(
    dr: &Dr,
    prot: &Protection,
    limit: &RateLimit,
    stop: &CancellationToken,
) -> Result<Pass> {
    let rec = dr.store.record(&prot.name).await?;
    let Some(point) = rec.point.filter(|_| rec.failed_over.is_none()) else {
        return Ok(Pass::Skipped);
    };
    let mut clean = true;
    for vol in point.volumes.keys() {
        let mut next = 0;
        loop {
            if stop.is_cancelled() {
                return Ok(Pass::Stopped);
            }
            let slice = match self::slice(dr, prot, vol, next).await? {
                Slice::Read { read, end } => {
                    clean &= read.divergent.is_empty();
                    next = end;
                    read.bytes_read
                }
                Slice::VolumeDone => break,
                Slice::Skip => return Ok(Pass::Skipped),
            };
            dr.metrics
                .scrub_bytes
                .with_label_values(&[prot.name.as_str()])
                .inc_by(slice);
            tokio::select! {
                _ = stop.cancelled() => return Ok(Pass::Stopped),
                _ = limit.take(slice) => {}
            }
        }
    }
    Ok(Pass::Done { clean })
}

enum Slice {
    Read {
        read: reread::Reread,
        end: u64,
    },
    VolumeDone,
    /// The replicas are not at a point the index describes right now.
    Skip,
}

/// Re-reads chunks `from..` (one slice) of `vol` under the lock, marking the volume for
/// repair if any differs.
async fn slice(dr: &Dr, prot: &Protection, vol: &VolumeName, from: u64) -> Result<Slice> {
    let lock = dr
        .lock_of(prot.name.as_str())
        .expect("a lock per protection");
    let _locked = lock.lock().await;
    let (rec, pending) = dr
        .store
        .step(&prot.name, |s, p| Ok((s.record(p)?, s.commits(p)?)))
        .await?;
    if rec.failed_over.is_some() || !pending.is_empty() || lock.failing_over() {
        return Ok(Slice::Skip);
    }
    let Some(point) = rec.point.as_ref() else {
        return Ok(Slice::Skip);
    };
    let (Some(vr), false) = (point.volumes.get(vol), rec.repair.contains_key(vol)) else {
        return Ok(Slice::VolumeDone);
    };
    let geometry = Geometry::new(vr.size, vr.chunk_size);
    if from >= geometry.chunk_count() {
        return Ok(Slice::VolumeDone);
    }
    let end = (from + (SLICE_BYTES / vr.chunk_size as u64).max(1)).min(geometry.chunk_count());
    let group = check::group(prot, &rec);
    let path = group
        .volume(vol.as_str())
        .map(|v| v.path.clone())
        .context("the point's volume is in the protection")?;
    let (store, p, v, gen) = (
        dr.store.blocking().clone(),
        prot.name.clone(),
        vol.clone(),
        point.point.gen,
    );
    let path_shown = path.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<reread::Reread> {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("open replica {}", path.display()))?;
        let mut cursor = BaseCursor::new(store.index_from(&p, &v, gen, from / SEGMENT_CHUNKS));
        reread::range(&file, geometry, from..end, |i| cursor.hash_at(i))
    })
    .await
    .context("scrub slice panicked")??;
    if !read.divergent.is_empty() {
        let ranges = crate::lifecycle::verify::ranges(&read.divergent);
        let bytes: u64 = read.divergent.iter().map(|&i| geometry.len(i) as u64).sum();
        tracing::error!(protection = %prot.name, volume = %vol, gen = %point.point.gen, ?ranges, bytes, "scrub: replica differs from the DR index; the next cycle repairs it");
        dr.metrics
            .verify_failures
            .with_label_values(&[prot.name.as_str()])
            .inc();
        let why = format!(
            "replica {} of volume {vol}: the scrub found {bytes} bytes in chunk range(s) {ranges:?} that differ from the DR index of gen {}",
            path_shown.display(),
            point.point.gen
        );
        let (p, v) = (prot.name.clone(), vol.clone());
        dr.store
            .run(move |s| s.mark_repair(&p, [(v, why)].into()))
            .await?;
    }
    Ok(Slice::Read { read, end })
}
