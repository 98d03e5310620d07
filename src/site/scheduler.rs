//! The primary's scheduler: one task per protection runs a cycle when the interval elapses
//! or when `sync` asks, retries failures with backoff, and stops for good once fenced.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Protection;
use crate::ids::now_ms;
use crate::metrics::ErrorKind;
use crate::site::peer::PeerLink;
use crate::site::sender;
use crate::site::status::{CycleReport, ErrorReport};
use crate::site::Site;

/// A request to run a cycle now; answered with the first cycle that starts after it.
pub struct SyncRequest {
    pub reply: oneshot::Sender<Result<CycleReport, ErrorReport>>,
}

fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = Duration::from_secs(1u64 << failures.min(6));
    exp.min(interval).min(Duration::from_secs(60))
}

pub async fn run(
    site: Arc<Site>,
    peer: Arc<PeerLink>,
    prot: Protection,
    mut requests: mpsc::Receiver<SyncRequest>,
    cancel: CancellationToken,
) {
    let name = prot.name.to_string();
    let mut next = if prot.sync_on_start {
        Instant::now()
    } else {
        Instant::now() + prot.interval
    };
    let mut failures = 0u32;
    loop {
        let mut pending = Vec::new();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
            req = requests.recv() => match req {
                Some(r) => pending.push(r),
                None => break,
            },
        }
        while let Ok(r) = requests.try_recv() {
            pending.push(r);
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => break,
            r = sender::run_cycle(&site, &peer, &prot) => r,
        };
        let m = &site.metrics;
        let answer = match result {
            Ok(report) => {
                failures = 0;
                next = Instant::now() + prot.interval;
                m.cycles.with_label_values(&[&name, "ok"]).inc();
                m.cycle_seconds
                    .with_label_values(&[&name])
                    .observe(report.seconds);
                for (phase, secs) in [
                    ("snapshot", report.phases.snapshot),
                    ("transfer", report.phases.transfer),
                    ("commit", report.phases.commit),
                ] {
                    m.phase_seconds.with_label_values(&[&name, phase]).set(secs);
                }
                m.freeze_seconds
                    .with_label_values(&[&name])
                    .set(report.phases.freeze);
                m.wire_bytes
                    .with_label_values(&[&name])
                    .inc_by(report.wire_bytes);
                tracing::info!(protection = %name, gen = report.gen, seconds = report.seconds, changed = report.bytes_changed, sent = report.chunk_bytes_sent, "cycle complete");
                site.live.update(&name, |l| {
                    l.last_cycle = Some(report.clone());
                    l.last_error = None;
                });
                Ok(report)
            }
            Err(e) => {
                failures += 1;
                m.cycles.with_label_values(&[&name, "error"]).inc();
                site.note_error(&name, &e);
                tracing::warn!(protection = %name, kind = e.kind.as_str(), error = %e, "cycle failed");
                if matches!(
                    e.kind,
                    ErrorKind::Peer | ErrorKind::Protocol | ErrorKind::Tls
                ) {
                    peer.reset().await;
                }
                next = if e.kind == ErrorKind::Fenced {
                    Instant::now() + Duration::from_secs(100 * 365 * 86400)
                } else {
                    Instant::now() + backoff(failures, prot.interval)
                };
                Err(ErrorReport {
                    kind: e.kind,
                    message: format!("{:#}", e.error),
                    at_ms: now_ms(),
                })
            }
        };
        site.live.activity(&name, "idle");
        for p in pending {
            let _ = p.reply.send(answer.clone());
        }
    }
}
