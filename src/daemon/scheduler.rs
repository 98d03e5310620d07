//! The sending half's scheduler: one task per protection runs a cycle when the interval
//! elapses or when `sync` asks, retries failures with backoff, and once fenced stops
//! replicating: it then only answers sync requests with the fence. While the site receives
//! the protection (a DR site before a failback, a primary after one) it answers them with
//! that, and starts at once when a failback turns the protection around.

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
    /// The DR site failed over: no cycle runs again (until a re-protect or a failback).
    Fenced(ErrorReport),
    /// This site receives the protection: the peer sends it.
    Receiving(ErrorReport),
}

impl State {
    /// Why no cycle runs.
    fn why(&self) -> Option<&ErrorReport> {
        match self {
            State::Running { .. } => None,
            State::Fenced(why) | State::Receiving(why) => Some(why),
        }
    }
}

/// Where the protection stands by its record: `None` when it replicates from here.
async fn stopped(primary: &Primary, prot: &Protection) -> Option<State> {
    let rec = match primary.store.record(&prot.name).await {
        Ok(r) => r,
        Err(e) => {
            return Some(State::Fenced(ErrorReport {
                kind: ErrorKind::Store,
                message: format!("{e:#}"),
                at_ms: now_ms(),
            }))
        }
    };
    if !primary.sends(&rec) {
        let peer = rec
            .turn
            .as_ref()
            .map_or("the other site", |t| t.peer.as_str());
        return Some(State::Receiving(ErrorReport {
            kind: ErrorKind::Refused,
            message: format!(
                "this site receives protection {} from {peer}; sync runs there",
                prot.name
            ),
            at_ms: now_ms(),
        }));
    }
    rec.fenced.map(|f| {
        State::Fenced(ErrorReport {
            kind: ErrorKind::Fenced,
            message: f.message,
            at_ms: f.at_ms,
        })
    })
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
    let mut turns = primary.turns.subscribe();
    // A protection fenced before this start is fenced still, and shows it.
    if let Some(s) = stopped(&primary, &prot).await {
        if let State::Fenced(f) = &s {
            primary.note_error(&name, ErrorKind::Fenced, f.message.clone());
        }
        state = s;
    }
    loop {
        let (next, failures) = match &state {
            State::Fenced(why) | State::Receiving(why) => {
                let req = tokio::select! {
                    _ = stops.start.cancelled() => break,
                    r = requests.recv() => r,
                    // A failback here or at the peer: look again.
                    _ = turns.changed() => None,
                };
                if req.is_none() && stops.start.is_cancelled() {
                    break;
                }
                match (req, stopped(&primary, &prot).await) {
                    (req, None) => {
                        // Re-protected or turned around since: replicate again, at once.
                        tracing::info!(protection = %name, "replicating from this site again");
                        state = State::Running {
                            next: Instant::now(),
                            failures: 0,
                        };
                        deferred = req;
                        continue;
                    }
                    (Some(r), Some(now)) => {
                        if let State::Fenced(_) = now {
                            primary.metrics.error(&name, ErrorKind::Fenced);
                        }
                        let _ = r.reply.send(Err(now.why().unwrap_or(why).clone()));
                        state = now;
                        continue;
                    }
                    (None, Some(now)) => {
                        state = now;
                        continue;
                    }
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
        // A failback may have turned the protection around since the last cycle.
        if let Some(s @ State::Receiving(_)) = stopped(&primary, &prot).await {
            for p in pending {
                let _ = p.reply.send(Err(s.why().expect("stopped").clone()));
            }
            state = s;
            continue;
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = stops.cycles.cancelled() => break,
            r = send::run_cycle(&primary, &prot) => r,
        };
        let answer = match result {
            Ok(report) => {
                cycle_done(&primary, &name, &report);
                // A fixed cadence from each cycle's start, not a pause after its end: the
                // point a cycle commits is then at most an interval plus that cycle old,
                // where a pause would add the previous cycle's duration too. A cycle that
                // overran its interval is followed at once.
                state = State::Running {
                    next: started + prot.interval,
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
