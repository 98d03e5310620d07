//! A cycle stream at the DR site, the shell around [`super::machine`]: admit the primary,
//! take the protection's lock, finish what a previous cycle committed, answer `Prepared`,
//! then feed each message to the machine and do what it says. The group commit, its redo
//! and the acknowledgement happen under the lock; a failed cycle's staging is freed under
//! it too.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::machine::{self, Action, Receiving, Staged};
use super::{check, hashes, stage};
use crate::config::Protection;
use crate::engine::chunk::Geometry;
use crate::ids::{Epoch, Gen, Point, VolumeName};
use crate::metrics::ErrorKind;
use crate::net::wire::{FrameReader, FrameWriter, Msg, Refusal};
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::{CycleMsg, CycleStart, VolumeMsg};
use crate::replicate::recovery;
use crate::site::dr::{Dr, JoinedStream, Locked};
use crate::store::schema::{RECORD_VERSION, SCRATCH};
use crate::store::{ProtectionRecord, StagedVolume};
use crate::volume::replica;

/// How long a new cycle waits for a superseded one to let go of the protection.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// The next frame, unless the cycle was superseded, the site is failing over or shutting
/// down.
async fn next_frame(
    r: &mut FrameReader,
    token: &CancellationToken,
    what: &'static str,
) -> Result<Msg, ReceiveError> {
    tokio::select! {
        m = r.expect(what) => Ok(m?),
        _ = token.cancelled() => Err(superseded()),
    }
}

fn superseded() -> ReceiveError {
    ReceiveError::link(anyhow::anyhow!(
        "cycle superseded by a newer attempt, a failover or shutdown"
    ))
}

pub async fn run(
    dr: &Arc<Dr>,
    protection: &str,
    epoch: Epoch,
    w: &mut FrameWriter,
    r: &mut FrameReader,
    stop: &CancellationToken,
) -> Result<(), ReceiveError> {
    let Some(prot) = dr.config.protection(protection).cloned() else {
        return Err(ReceiveError::refuse(Refusal::UnknownProtection(
            protection.to_string(),
        )));
    };
    let lock = dr.lock_of(protection).expect("a lock per protection");
    // Refuse a stale or fenced peer before it can disturb anything in flight.
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(ReceiveError::store)?;
    machine::admit_peer(&rec, dr.configured_primary(), lock.failing_over(), epoch)?;
    let token = lock.supersede(stop);
    let locked = tokio::select! {
        l = lock.lock_within(LOCK_WAIT) => l.ok_or_else(|| ReceiveError::refuse(Refusal::Busy))?,
        _ = token.cancelled() => return Err(superseded()),
    };
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(ReceiveError::store)?;
    machine::admit_peer(&rec, dr.configured_primary(), locked.failing_over(), epoch)?;
    // A gen committed but not yet applied (an apply that failed) is finished first.
    recovery::finish_pending(dr, &locked, &prot)
        .await
        .map_err(ReceiveError::io)?;
    let rec = dr
        .store
        .record(&prot.name)
        .await
        .map_err(ReceiveError::store)?;
    checks(dr, &locked, &prot, &rec).await?;
    let rec = locked
        .raise_epoch(dr, epoch)
        .await
        .map_err(ReceiveError::store)?;
    w.send(&Msg::Prepared {
        epoch: rec.epoch,
        point: rec.point.as_ref().map(|p| p.point),
        repair: rec.repair.keys().map(|v| v.to_string()).collect(),
    })
    .await?;
    let msg = tokio::select! {
        m = r.next() => match m? { Some(m) => m, None => return Ok(()) },
        _ = token.cancelled() => return Ok(()),
    };
    let start = CycleStart::try_from(msg)
        .map_err(|kind| ReceiveError::protocol(format!("expected Cycle, got {kind}")))?;
    let repair = rec.repair.keys().cloned().collect();
    let mut machine = Receiving::start(&prot, rec.point.clone(), repair, start)?;
    let span = tracing::info_span!("gen", gen = %machine.point().gen);
    recovery::discard_staging(dr, &locked, machine.group())
        .await
        .map_err(ReceiveError::io)?;
    let result = receive(dr, &locked, &rec, &mut machine, w, r, &token)
        .instrument(span)
        .await;
    if result.is_err() {
        // Free the failed gen's staging now (a full disk wants its space back), under the
        // same lock; a committed gen's logs are kept for its redo.
        if let Err(e) = recovery::discard_staging(dr, &locked, machine.group()).await {
            tracing::warn!(error = %format!("{e:#}"), "could not discard the failed gen's staging");
        }
    }
    result
}

/// Before anything of the cycle is taken: a fence beside the replicas (the store forgot a
/// failover) refuses it as failed over; replicas changed outside lifeboat fail it, named,
/// and are marked for repair by the next cycle.
async fn checks(
    dr: &Dr,
    locked: &Locked<'_>,
    prot: &Protection,
    rec: &ProtectionRecord,
) -> Result<(), ReceiveError> {
    if prot.csi().is_some() {
        // Replica PVCs are not files this daemon can stat; their recovery points are
        // snapshots, which nothing writes after they are cut.
        return Ok(());
    }
    let group = check::group(prot, rec);
    let r = rec.clone();
    let (fence, damaged) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((check::fences(&group)?, check::damaged(&group, &r)))
    })
    .await
    .map_err(ReceiveError::io)?
    .map_err(ReceiveError::io)?;
    if let Some(f) = fence {
        let rec = locked
            .restore_fence(dr, f)
            .await
            .map_err(ReceiveError::store)?;
        return Err(machine::failed_over(&rec));
    }
    if !damaged.is_empty() {
        dr.metrics
            .replica_check_failures
            .with_label_values(&[prot.name.as_str()])
            .inc_by(damaged.len() as u64);
        let what = damaged.values().cloned().collect::<Vec<_>>().join("; ");
        locked
            .mark_repair(dr, damaged)
            .await
            .map_err(ReceiveError::store)?;
        return Err(ReceiveError::Refused {
            refusal: Refusal::ReplicaDamaged(what),
            kind: ErrorKind::Replica,
        });
    }
    Ok(())
}

/// From `Cycle` to `Committed`. Movers (Kubernetes mode) join with a stream per volume
/// while the cycle stream waits for `Commit`; their volumes are received side by side.
async fn receive(
    dr: &Arc<Dr>,
    locked: &Locked<'_>,
    rec: &ProtectionRecord,
    machine: &mut Receiving,
    w: &mut FrameWriter,
    r: &mut FrameReader,
    token: &CancellationToken,
) -> Result<(), ReceiveError> {
    let point = machine.point();
    let name = machine.group().name.clone();
    let lock = dr.lock_of(name.as_str()).expect("a lock per protection");
    let mut joins = lock.open_joins(point.cycle);
    let _closed = CloseJoins(lock, point.cycle);
    let mut joined = FuturesUnordered::new();
    let mut attempt = 0u32;
    let mut attempts: HashMap<VolumeName, (u32, CancellationToken)> = HashMap::new();
    loop {
        if locked.failing_over() {
            return Err(machine::failed_over(rec));
        }
        let msg = tokio::select! {
            m = next_frame(r, token, "Commit") => m?,
            Some(js) = joins.recv() => {
                match machine.join(&js.volume, js.chunk_size) {
                    Ok(Action::ServeHashes { volume, path, chunk_size, known }) => {
                        // A newer attempt of a volume in flight (its Job's retry after the
                        // mover died unseen) supersedes the older stream.
                        attempt += 1;
                        let stop = token.child_token();
                        if let Some((_, old)) = attempts.insert(volume.clone(), (attempt, stop.clone())) {
                            old.cancel();
                        }
                        let plan = JoinPlan { volume, path, chunk_size, known, attempt };
                        joined.push(joined_volume(dr, locked, point, plan, js, stop));
                    }
                    Ok(_) => unreachable!("a join is answered with its hashes"),
                    Err(e) => refuse_join(js, &e).await,
                }
                continue;
            }
            Some((volume, tried, result)) = joined.next(), if !joined.is_empty() => {
                // A superseded attempt's end says nothing about the volume.
                if attempts.get(&volume).is_some_and(|(a, _)| *a == tried) {
                    attempts.remove(&volume);
                    match result {
                        Ok((base_gen, staged)) => machine.joined_staged(volume, base_gen, staged),
                        Err(e) => {
                            tracing::warn!(volume = %volume, error = %e, "a mover's volume failed; its Job may retry it");
                            machine.join_failed(volume.as_str());
                        }
                    }
                }
                continue;
            }
        };
        let msg = CycleMsg::try_from(msg).map_err(|kind| machine.unexpected(kind))?;
        match machine.handle(msg)? {
            Action::ServeHashes {
                volume,
                path,
                chunk_size,
                known,
            } => {
                let gen =
                    hashes::serve_hashes(dr, &name, &volume, path, chunk_size, known, w).await?;
                machine.hashes_served(volume, gen);
            }
            Action::Receive {
                volume,
                replica,
                geometry,
                base_gen,
            } => {
                let span = tracing::info_span!("volume", volume = %volume);
                let staged = receive_volume(
                    dr, locked, point, &volume, replica, geometry, base_gen, None, r, token,
                )
                .instrument(span)
                .await?;
                machine.staged(staged);
            }
            Action::Next => {}
            Action::Commit { commit, manifests } => {
                if locked.failing_over() {
                    return Err(machine::failed_over(rec));
                }
                if token.is_cancelled() {
                    // A newer attempt took over; only a real failover may tell a primary it
                    // is fenced.
                    return Err(ReceiveError::protocol(
                        "this cycle was superseded by a newer attempt",
                    ));
                }
                let commit = locked
                    .commit_group(dr, commit, manifests)
                    .await
                    .map_err(ReceiveError::store)?;
                recovery::redo_commit(dr, locked, machine.group(), commit)
                    .await
                    .map_err(ReceiveError::io)?;
                tracing::info!("consistent point advanced");
                w.send(&Msg::Committed { point }).await?;
                w.finish();
                if machine.group().kubernetes.is_some() {
                    dr.request_standby(&name);
                }
                return Ok(());
            }
        }
    }
}

/// Closes the cycle to movers when it ends, however it ends.
struct CloseJoins<'a>(&'a crate::site::dr::ProtectionLock, crate::ids::CycleId);

impl Drop for CloseJoins<'_> {
    fn drop(&mut self) {
        self.0.close_joins(self.1);
    }
}

/// What a joined volume's stream is served with (the machine's `ServeHashes`).
struct JoinPlan {
    volume: VolumeName,
    path: PathBuf,
    chunk_size: u32,
    known: Option<Gen>,
    attempt: u32,
}

async fn refuse_join(mut js: JoinedStream, e: &ReceiveError) {
    tracing::warn!(volume = %js.volume, error = %e, "refused a mover's stream");
    let _ = js.w.send(&Msg::Refused(e.told())).await;
    js.w.finish();
    js.r.stop();
}

/// One mover's volume: this site's hashes of it, then its chunks into staging; the mover
/// is told once the volume is durably staged.
async fn joined_volume<'a>(
    dr: &'a Arc<Dr>,
    locked: &'a Locked<'_>,
    point: Point,
    plan: JoinPlan,
    mut js: JoinedStream,
    stop: CancellationToken,
) -> (VolumeName, u32, Result<(Gen, Staged), ReceiveError>) {
    let (volume, attempt) = (plan.volume.clone(), plan.attempt);
    let span = tracing::info_span!("mover", volume = %volume, attempt);
    let result = async {
        let gen = hashes::serve_hashes(
            dr,
            locked.name(),
            &plan.volume,
            plan.path.clone(),
            plan.chunk_size,
            plan.known,
            &mut js.w,
        )
        .await?;
        let (size, chunk_size) = match next_frame(&mut js.r, &stop, "Begin").await? {
            Msg::Begin {
                volume: v,
                size,
                chunk_size,
            } if v == plan.volume.as_str() && chunk_size == plan.chunk_size => (size, chunk_size),
            Msg::Begin { volume: v, .. } => {
                return Err(ReceiveError::protocol(format!(
                    "a mover joined with volume {} at chunk size {} but began {v}",
                    plan.volume, plan.chunk_size
                )))
            }
            other => {
                return Err(ReceiveError::protocol(format!(
                    "expected Begin from the mover of {}, got {}",
                    plan.volume,
                    other.kind()
                )))
            }
        };
        let staged = receive_volume(
            dr,
            locked,
            point,
            &plan.volume,
            plan.path,
            Geometry::new(size, chunk_size),
            gen,
            Some(plan.attempt),
            &mut js.r,
            &stop,
        )
        .await?;
        js.w.send(&Msg::Staged {
            volume: plan.volume.to_string(),
            root: staged.record.root,
        })
        .await?;
        js.w.finish();
        Ok((gen, staged))
    }
    .instrument(span);
    // Superseded (or the cycle ended): dropped wherever it waits, hashes included.
    let result = tokio::select! {
        r = result => r,
        _ = stop.cancelled() => Err(superseded()),
    };
    if let Err(e) = &result {
        let _ = js.w.send(&Msg::Refused(e.told())).await;
        js.w.finish();
        js.r.stop();
    }
    (volume, attempt, result)
}

/// Receives one volume's chunks into its staging log (or a fresh replica) and records it
/// as staged.
#[allow(clippy::too_many_arguments)]
async fn receive_volume(
    dr: &Arc<Dr>,
    locked: &Locked<'_>,
    point: Point,
    volume: &VolumeName,
    replica: PathBuf,
    geometry: Geometry,
    base_gen: Gen,
    attempt: Option<u32>,
    r: &mut FrameReader,
    token: &CancellationToken,
) -> Result<Staged, ReceiveError> {
    // No replica and no base: every chunk comes, so build the replica itself beside its
    // path instead of a log to copy later. Not for a mover's attempt: a superseded one
    // may still be writing while its successor starts, so each has a log of its own.
    let csi = dr
        .config
        .protection(locked.name().as_str())
        .is_some_and(|p| p.csi().is_some());
    let fresh = attempt.is_none() && !csi && {
        let (p, v, path) = (locked.name().clone(), volume.clone(), replica.clone());
        dr.store
            .run(move |s| {
                let exists = std::fs::symlink_metadata(&path).is_ok();
                // A resync onto no replica diffs against the hashes of what an interrupted
                // first sync left in the new replica (scratch): it goes on building that.
                Ok(!exists && (base_gen == SCRATCH || !s.has_index(&p, &v, base_gen)))
            })
            .await
            .map_err(ReceiveError::store)?
    };
    let log = if fresh {
        replica::fresh_path(&replica)
    } else {
        recovery::staging_dir(&dr.config, locked.name())
            .join(format!("{}-{}", point.gen, point.cycle))
            .join(match attempt {
                Some(a) => format!("{volume}.{a}.log"),
                None => format!("{volume}.log"),
            })
    };
    let target = stage::Target {
        log: log.clone(),
        replica: (!csi).then_some(replica),
        fresh,
        min_free: dr.config.min_free_space,
    };
    let (tx, rx) = mpsc::channel::<VolumeMsg>(32);
    let (store, p, v) = (
        dr.store.blocking().clone(),
        locked.name().clone(),
        volume.clone(),
    );
    let gen = point.gen;
    let span = tracing::Span::current();
    let stager = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        stage::stage(&store, &p, &v, gen, base_gen, geometry, &target, rx)
    });
    let reading: Result<(), ReceiveError> = async {
        loop {
            // The stager may stop on its own (a chunk failed verification): answer at once
            // rather than when the peer sends its next frame.
            let frame = tokio::select! {
                f = next_frame(r, token, "End") => f?,
                _ = tx.closed() => return Ok(()),
            };
            let msg = VolumeMsg::try_from(frame).map_err(|kind| {
                ReceiveError::protocol(format!("unexpected {kind} while receiving volume {volume}"))
            })?;
            let end = matches!(msg, VolumeMsg::End { .. });
            if tx.send(msg).await.is_err() || end {
                return Ok(()); // the stager stopped (its error says why) or the volume is complete
            }
        }
    }
    .await;
    drop(tx);
    let record = stager.await.map_err(ReceiveError::io)?;
    reading?;
    let record = record?;
    let staged = StagedVolume {
        v: RECORD_VERSION,
        cycle: point.cycle.0,
        log: log.clone(),
        record: record.clone(),
        fresh,
    };
    locked
        .record_staged(dr, gen, volume.clone(), staged)
        .await
        .map_err(ReceiveError::store)?;
    Ok(Staged { log, record, fresh })
}
