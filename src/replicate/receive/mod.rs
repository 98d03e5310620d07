//! The DR site's half of the protocol. Pure rules: [`machine`] (a cycle, from `Cycle` to
//! `Commit`) and [`intake`] (one volume's chunks). Shells: this module accepts the
//! primary's connections and streams and reports how each ended; [`cycle`] drives a cycle
//! stream; [`stage`] writes verified chunks to staging; [`hashes`] answers hash requests
//! (resync) and refinement streams.

pub mod check;
pub mod cycle;
mod fetch;
pub mod hashes;
pub mod intake;
#[cfg(test)]
mod intake_tests;
pub mod machine;
#[cfg(test)]
mod machine_tests;
pub mod stage;
mod turn;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::ids::Epoch;
use crate::metrics::ErrorKind;
use crate::net::identity;
use crate::net::quic::negotiated_lifeboat;
use crate::net::wire::{FrameReader, FrameWriter, Msg, Refusal, SiteRole, PROTOCOL_VERSION};
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::Opening;
use crate::site::dr::Dr;

/// How long a cycle may take to end by itself once shutdown cancelled it.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The receiver's two shutdown signals: stop taking new connections and streams, then
/// end the streams in flight.
#[derive(Clone)]
pub struct Stops {
    pub accept: CancellationToken,
    pub streams: CancellationToken,
}

/// Accepts peer connections until told to stop accepting.
pub async fn serve(dr: Arc<Dr>, endpoint: quinn::Endpoint, stops: Stops, tracker: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = stops.accept.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let (dr, stops2, t2) = (dr.clone(), stops.clone(), tracker.clone());
        tracker.spawn(async move { connection(dr, incoming, stops2, t2).await });
    }
}

async fn connection(dr: Arc<Dr>, incoming: quinn::Incoming, stops: Stops, tracker: TaskTracker) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "refused a peer connection (TLS handshake failed)");
            dr.metrics.error("", ErrorKind::Tls);
            return;
        }
    };
    if !negotiated_lifeboat(&conn) {
        tracing::warn!(%remote, "refused a peer that did not negotiate the lifeboat ALPN");
        dr.metrics.error("", ErrorKind::Tls);
        conn.close(1u32.into(), b"lifeboat ALPN required");
        return;
    }
    let (peer, kind) = tokio::select! {
        h = hello(&dr, &conn) => match h {
            Ok(p) => p,
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(%remote, error = %why, "peer hello failed");
                // The reason travels in the close too: the refusal frame may not make it
                // out before the connection goes.
                let reason: String = why.chars().take(900).collect();
                conn.close(2u32.into(), reason.as_bytes());
                return;
            }
        },
        _ = stops.accept.cancelled() => return,
    };
    match kind {
        PeerKind::Primary => tracing::info!(%remote, peer = %peer, "primary connected"),
        PeerKind::Writer => tracing::debug!(%remote, "a writer Job connected"),
    }
    loop {
        let (send, recv) = tokio::select! {
            _ = stops.accept.cancelled() => {
                conn.close(0u32.into(), b"shutting down");
                return;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => { tracing::info!(%remote, reason = %e, "primary disconnected"); return }
            },
        };
        let (dr, peer, token) = (dr.clone(), peer.clone(), stops.streams.clone());
        tracker.spawn(async move {
            let (w, r) = (FrameWriter::new(send), FrameReader::new(recv));
            match kind {
                PeerKind::Primary => stream(&dr, &peer, w, r, &token).await,
                PeerKind::Writer => fetch::serve(&dr, w, r, &token).await,
            }
        });
    }
}

/// Who connected: the primary (its daemon or a mover), or one of this site's own writer
/// Jobs (this site's certificate, saying it is a DR site).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerKind {
    Primary,
    Writer,
}

async fn hello(dr: &Dr, conn: &quinn::Connection) -> anyhow::Result<(String, PeerKind)> {
    let (send, recv) = conn.accept_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    let Msg::Hello {
        version,
        site: peer,
        role,
    } = r.expect("Hello").await?
    else {
        anyhow::bail!("expected Hello");
    };
    let kind = match check_peer(dr, conn, &peer, role) {
        Ok(k) => k,
        Err(why) => {
            let _ = w.send(&Msg::Refused(Refusal::WrongPeer(why.clone()))).await;
            w.finish();
            anyhow::bail!(why);
        }
    };
    w.send(&Msg::HelloAck {
        version: PROTOCOL_VERSION,
        site: dr.config.site_name.clone(),
        role: SiteRole::Dr,
    })
    .await?;
    w.finish();
    anyhow::ensure!(
        version == PROTOCOL_VERSION,
        "peer {peer} speaks protocol version {version}, this site {PROTOCOL_VERSION}"
    );
    Ok((peer, kind))
}

/// Whether the connecting site may replicate here: it says it is a primary, and its
/// certificate is not this site's own and is the configured primary's. A DR site's own
/// certificate saying it is a DR site is one of its writer Jobs (they may only fetch).
fn check_peer(
    dr: &Dr,
    conn: &quinn::Connection,
    peer: &str,
    role: SiteRole,
) -> Result<PeerKind, String> {
    let ours = &dr.config.site_name;
    if role == SiteRole::Dr && peer == ours.as_str() && identity::peer_is(conn, ours) {
        return Ok(PeerKind::Writer);
    }
    if role != SiteRole::Primary {
        return Err(format!(
            "site {peer} says it is a {role} site, as this site ({ours}) is: one of the two is configured with the wrong role"
        ));
    }
    if identity::peer_is(conn, ours) {
        return Err(format!(
            "site {peer} presented the certificate of site {ours}, this site's own: only the peer's certificate may replicate here"
        ));
    }
    if let Some(expected) = &dr.config.listen_peer {
        if !identity::peer_is(conn, expected) {
            return Err(format!(
                "site {peer} presented a certificate that is not for site {expected} ([listen] peer); only {expected} may replicate here"
            ));
        }
    }
    Ok(PeerKind::Primary)
}

/// One stream from the primary: a cycle or a refinement stream, by its first message.
/// However it ends, the primary is told why when it was refused, and the error is
/// counted and logged here, once.
async fn stream(
    dr: &Arc<Dr>,
    peer: &str,
    mut w: FrameWriter,
    mut r: FrameReader,
    stop: &CancellationToken,
) {
    let opening = tokio::select! {
        m = r.next() => m,
        _ = stop.cancelled() => return,
    };
    let opening = match opening.map(|m| m.map(Opening::try_from)) {
        Ok(Some(Ok(o))) => o,
        Ok(None) => return,
        Ok(Some(Err(kind))) => {
            let refusal = Refusal::Invalid(format!("expected Prepare, got {kind}"));
            let _ = w.send(&Msg::Refused(refusal)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(peer, error = %e, "bad first frame on a stream");
            return;
        }
    };
    match opening {
        Opening::Prepare { protection, epoch } => {
            let span = tracing::info_span!("receive", protection = %protection, %epoch);
            // At shutdown a cycle ends at its next frame and frees its staging; one busy in
            // a blocking step (a replica scan, a redo) is dropped after a grace period, as
            // a kill would (the redo finishes at the next start).
            let grace = async {
                stop.cancelled().await;
                tokio::time::sleep(STOP_GRACE).await;
            };
            let result = tokio::select! {
                r = cycle::run(dr, &protection, epoch, &mut w, &mut r, stop).instrument(span.clone()) => r,
                _ = grace => Err(ReceiveError::link(anyhow::anyhow!("shutting down"))),
            };
            let known = dr.config.protection(&protection).is_some();
            let label = if known { protection.as_str() } else { "" };
            match result {
                Ok(()) => {
                    dr.metrics
                        .received_bytes
                        .with_label_values(&[label])
                        .inc_by(r.bytes);
                }
                Err(e) => {
                    span.in_scope(|| ended(dr, label, peer, epoch, &e));
                    let _ = w.send(&Msg::Refused(e.told())).await;
                    w.finish();
                    r.stop();
                }
            }
        }
        Opening::Join {
            protection,
            cycle,
            volume,
            chunk_size,
        } => {
            let to = dr.lock_of(&protection).and_then(|l| l.join(cycle));
            let js = crate::site::dr::JoinedStream {
                volume,
                chunk_size,
                w,
                r,
            };
            match to {
                // The cycle owns the stream now, and answers it.
                Some(tx) => {
                    if let Err(back) = tx.send(js).await {
                        refuse_late_join(back.0, &protection, cycle).await;
                    }
                }
                None => refuse_late_join(js, &protection, cycle).await,
            }
        }
        Opening::Failback { protection } => {
            turn::answer(dr, peer, &protection, &mut w).await;
        }
        Opening::Fetch { .. } | Opening::Verify { .. } => {
            let why = "only this site's own writer and reader Jobs may fetch staging logs or send a replica's hashes".to_string();
            tracing::warn!(peer, "{why}");
            let _ = w.send(&Msg::Refused(Refusal::WrongPeer(why))).await;
            w.finish();
        }
        Opening::Refine {
            protection,
            volume,
            size,
            chunk_size,
        } => {
            let result = tokio::select! {
                r = hashes::serve_block_hashes(dr, &protection, &volume, size, chunk_size, &mut w, &mut r) => r,
                _ = stop.cancelled() => Err(ReceiveError::link(anyhow::anyhow!("shutting down"))),
            };
            if let Err(e) = result {
                // Like a cycle, a refused refinement stream tells the primary why.
                if matches!(e, ReceiveError::Refused { .. }) {
                    let _ = w.send(&Msg::Refused(e.told())).await;
                }
                w.finish();
                r.stop();
                tracing::warn!(peer, protection, volume, error = %e, "refinement stream failed");
            }
        }
    }
}

/// A mover joined a cycle that is not running (ended, superseded, or never here).
async fn refuse_late_join(
    mut js: crate::site::dr::JoinedStream,
    protection: &str,
    cycle: crate::ids::CycleId,
) {
    let why = format!(
        "no cycle {cycle} of protection {protection:?} is running at this site (it ended or was superseded)"
    );
    tracing::warn!(volume = %js.volume, "{why}");
    let _ = js.w.send(&Msg::Refused(Refusal::Invalid(why))).await;
    js.w.finish();
    js.r.stop();
}

/// Counts and reports how a cycle stream failed; `label` is empty for a protection this
/// site does not have (counted, but no status to show it in).
fn ended(dr: &Dr, label: &str, peer: &str, epoch: Epoch, e: &ReceiveError) {
    let kind = e.metric_label();
    match e {
        ReceiveError::Refused { refusal, .. } => {
            tracing::warn!(peer, %refusal, "refused a replication cycle");
        }
        other => tracing::warn!(peer, error = %other, "replication cycle failed"),
    }
    if label.is_empty() {
        dr.metrics.error(label, kind);
    } else if let ReceiveError::Refused { refusal, .. } = e {
        let message = format!("refused replication from {peer} (epoch {epoch}): {refusal}");
        dr.note_refusal(label, kind, message);
    } else {
        dr.note_error(label, kind, e.to_string());
    }
}
