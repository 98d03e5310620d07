//! The primary's scheduler: one task per protection runs a cycle when the interval elapses
//! or when `sync` asks, retries failures with backoff, and once fenced stops replicating:
//! it then only answers sync requests with the fence.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::{CycleReport, ErrorReport};
use crate::config::Protection;
use crate::ids::now_ms;
use crate::metrics::ErrorKind;
use crate::replicate::error::CycleError;
use crate::replicate::send;
use crate::site::primary::Primary;

/// A request to run a cycle now; answered with the first cycle that starts after it.
pub struct SyncRequest {
    pub reply: oneshot::Sender<Result<CycleReport, ErrorReport>>,
}

/// The scheduler's two stops: no new cycle, and the cycle in flight cancelled.
#[derive(Clone)]
pub struct Stops {
    pub start: CancellationToken,
    pub cycles: CancellationToken,
}

/// Where a protection's replication stands.
enum State {
    /// Cycles run at `next`, or sooner on request.
    Running { next: Instant, failures: u32 },
    /// The DR site failed over: no cycle runs again (until a re-protect).
    Fenced(ErrorReport),
}

async fn still_fenced(primary: &Primary, prot: &Protection) -> bool {
    primary
        .store
        .record(&prot.name)
        .await
        .map_or(true, |r| r.fenced.is_some())
}

fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = Duration::from_secs(1u64 << failures.min(6));
    exp.min(interval).min(Duration::from_secs(60))
}

fn report(e: &CycleError) -> ErrorReport {
    ErrorReport {
        kind: e.metric_label(),
        message: e.to_string(),
        at_ms: now_ms(),
    }
}

pub async fn run(
    primary: Arc<Primary>,
    prot: Protection,
    mut requests: mpsc::Receiver<SyncRequest>,
    stops: Stops,
) {
    let name = prot.name.to_string();
    let first = if prot.sync_on_start {
        Instant::now()
    } else {
        Instant::now() + prot.interval
    };
    let mut state = State::Running {
        next: first,
        failures: 0,
    };
    // A request that found the fence lifted, answered by the next cycle.
    let mut deferred: Option<SyncRequest> = None;
    // A protection fenced before this start is fenced still, and shows it.
    if let Ok(rec) = primary.store.record(&prot.name).await {
        if let Some(f) = rec.fenced {
            primary.note_error(&name, ErrorKind::Fenced, f.message.clone());
            state = State::Fenced(ErrorReport {
                kind: ErrorKind::Fenced,
                message: f.message,
                at_ms: f.at_ms,
            });
        }
    }
    loop {
        let (next, failures) = match &state {
            State::Fenced(fence) => {
                let req = tokio::select! {
                    _ = stops.start.cancelled() => break,
                    r = requests.recv() => r,
                };
                match req {
                    // Re-protected since: replicate again, starting with this request.
                    Some(r) if !still_fenced(&primary, &prot).await => {
                        tracing::info!(protection = %name, "the fence was lifted; replicating again");
                        state = State::Running {
                            next: Instant::now(),
                            failures: 0,
                        };
                        let _ = deferred.insert(r);
                        continue;
                    }
                    Some(r) => {
                        primary.metrics.error(&name, ErrorKind::Fenced);
                        let _ = r.reply.send(Err(fence.clone()));
                        continue;
                    }
                    None => break,
                }
            }
            State::Running { next, failures } => (*next, *failures),
        };
        let mut pending: Vec<SyncRequest> = deferred.take().into_iter().collect();
        tokio::select! {
            _ = stops.start.cancelled() => break,
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
            _ = stops.cycles.cancelled() => break,
            r = send::run_cycle(&primary, &prot) => r,
        };
        let answer = match result {
            Ok(report) => {
                cycle_done(&primary, &name, &report);
                state = State::Running {
                    next: Instant::now() + prot.interval,
                    failures: 0,
                };
                Ok(report)
            }
            Err(e) => {
                let m = &primary.metrics;
                m.cycles.with_label_values(&[&name, "error"]).inc();
                let r = report(&e);
                primary.note_error(&name, r.kind, r.message.clone());
                tracing::warn!(protection = %name, kind = r.kind.as_str(), error = %e, "cycle failed");
                if e.resets_link() {
                    primary.peer.reset().await;
                }
                state = match e {
                    CycleError::Fenced(_) => State::Fenced(r.clone()),
                    _ => State::Running {
                        next: Instant::now() + backoff(failures + 1, prot.interval),
                        failures: failures + 1,
                    },
                };
                Err(r)
            }
        };
        primary.live.update(&name, |l| l.transfer = None);
        primary.live.activity(&name, "idle");
        for p in pending {
            let _ = p.reply.send(answer.clone());
        }
    }
}

/// A successful cycle: its metrics and its place in `status`.
fn cycle_done(primary: &Primary, name: &str, report: &CycleReport) {
    let m = &primary.metrics;
    m.cycles.with_label_values(&[name, "ok"]).inc();
    m.cycle_seconds
        .with_label_values(&[name])
        .observe(report.seconds);
    for (phase, secs) in [
        ("snapshot", report.phases.snapshot),
        ("transfer", report.phases.transfer),
        ("commit", report.phases.commit),
    ] {
        m.phase_seconds.with_label_values(&[name, phase]).set(secs);
    }
    m.freeze_seconds
        .with_label_values(&[name])
        .set(report.phases.freeze);
    m.wire_bytes
        .with_label_values(&[name])
        .inc_by(report.wire_bytes);
    tracing::info!(protection = %name, gen = report.gen, seconds = report.seconds, changed = report.bytes_changed, sent = report.chunk_bytes_sent, "cycle complete");
    primary.live.update(name, |l| {
        l.last_cycle = Some(report.clone());
        l.last_error = None;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_interval_and_a_minute() {
        let i = Duration::from_secs(30);
        let got: Vec<u64> = (1..=7).map(|f| backoff(f, i).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(9, Duration::from_secs(600)).as_secs(), 60);
    }
}
