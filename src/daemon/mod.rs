//! `lifeboat run`: opens the state store, finishes or discards what a previous run left in
//! flight, starts the role's tasks ([`scheduler`] at the primary; the receiver and the
//! standby manifests at the DR site) and the [`control`] API, and on SIGINT or SIGTERM
//! shuts down in ordered stages, each with a time budget:
//!
//! 1. stop taking work: no new peer connection or stream, no new cycle (immediate);
//! 2. cancel the cycles and streams in flight (a cycle stream frees its staging);
//! 3. drain background work (standby applies, snapshot removal);
//! 4. close the QUIC endpoint;
//! 5. stop the control API, last, so status answers until the end.
//!
//! Crash safety does not depend on any of it: a kill -9 costs only re-transfer. SIGHUP
//! reloads the TLS material ([`tls_reload`]); [`dirs`] makes the daemon's directories
//! private first; [`auth`] says who may call the control API.

pub mod auth;
pub mod control;
pub mod dirs;
pub mod scheduler;
pub mod tls_reload;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Role};
use crate::net::{quic, tls};
use crate::replicate::{receive, recovery};
use crate::site::dr::Dr;
use crate::site::peer::PeerLink;
use crate::site::primary::Primary;
use crate::site::Shared;
use crate::store::Store;
use control::RoleCtx;

/// One shutdown stage: what it waits for and how long it may take.
struct Stage {
    name: &'static str,
    budget: Duration,
}

const CANCEL: Stage = Stage {
    name: "cancel cycles and streams",
    budget: Duration::from_secs(5),
};
const DRAIN: Stage = Stage {
    name: "drain background work",
    budget: Duration::from_secs(5),
};
const CLOSE: Stage = Stage {
    name: "close the QUIC endpoint",
    budget: Duration::from_secs(2),
};
const CONTROL: Stage = Stage {
    name: "stop the control API",
    budget: Duration::from_secs(2),
};

impl Stage {
    /// Waits for `done` within the budget; logs how it went.
    async fn run(&self, done: impl std::future::Future<Output = ()>) {
        let started = Instant::now();
        match tokio::time::timeout(self.budget, done).await {
            Ok(()) => tracing::info!(
                stage = self.name,
                ms = started.elapsed().as_millis() as u64,
                "shutdown stage done"
            ),
            Err(_) => tracing::warn!(
                stage = self.name,
                budget_ms = self.budget.as_millis() as u64,
                "shutdown stage exceeded its budget; going on (state is crash-safe)"
            ),
        }
    }
}

/// The daemon's tokens, one per shutdown stage that cancels something.
struct Tokens {
    /// Stage 1: accept nothing new.
    accept: CancellationToken,
    /// Stage 2: cycles and streams in flight.
    cycles: CancellationToken,
    /// Stage 3: background tasks take no new work (an apply in progress finishes).
    background: CancellationToken,
    /// Stage 5: the control API.
    control: CancellationToken,
}

pub async fn run(mut config: Config) -> Result<()> {
    dirs::prepare(&mut config)?;
    let callers = Arc::new(auth::Callers::load(&config.control_clients)?);
    let db = config.state_dir.join("db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db)).await??;
    let shared = Arc::new(Shared::open(config, store).await?);
    let tokens = Tokens {
        accept: CancellationToken::new(),
        cycles: CancellationToken::new(),
        background: CancellationToken::new(),
        control: CancellationToken::new(),
    };
    // Cycles and streams, and background work, each drained in their own stage.
    let work = TaskTracker::new();
    let background = TaskTracker::new();
    let is_dr = shared.config.role == Role::Dr;
    // The receiving half: a DR site, or a primary with [listen], which receives a
    // protection once a failback turned it around.
    let dr = match (is_dr, shared.config.listen) {
        (true, _) | (false, Some(_)) => Some(Arc::new(Dr::new(shared.clone()))),
        (false, None) => None,
    };
    let mut server = None;
    if let Some(dr) = &dr {
        recovery::recover_dr(dr)
            .await
            .context("recover what the previous run left in flight")?;
        for p in &dr.config.protections {
            let swept = crate::lifecycle::drill::sweep(dr, p)
                .await
                .with_context(|| format!("remove what unfinished drills of {} left", p.name));
            match swept {
                // A drill's objects in the cluster wait for the next start (or `lifeboat
                // drill --end`) when the API server does not answer; files never do.
                Err(e) if p.csi().is_some() => {
                    tracing::error!(protection = %p.name, error = %format!("{e:#}"), "drill sweep")
                }
                r => r?,
            }
        }
        if is_dr {
            dr_tasks(dr, &tokens, &background).await?;
        }
        let addr = shared.config.listen.context("a DR site needs [listen]")?;
        let ep = quic::server_endpoint(addr, tls::server_config(&shared.config.tls)?)?;
        tracing::info!(address = %ep.local_addr()?, "listening for the peer (QUIC)");
        let stops = receive::Stops {
            accept: tokens.accept.clone(),
            streams: tokens.cycles.clone(),
        };
        work.spawn(receive::serve(dr.clone(), ep.clone(), stops, work.clone()));
        server = Some(ep);
    }
    // The sending half: a primary, or a DR site with [peer], which sends a protection once
    // a failback turned it around.
    let mut client = None;
    let mut syncs = HashMap::new();
    let mut primary = None;
    if let Some(peer) = shared.config.peer.clone() {
        recovery::recover_primary(&shared)
            .await
            .context("recover what the previous run left in flight")?;
        let tls = tls::client_config(&shared.config.tls)?;
        let slot = quic::ClientSlot::new(quic::client_config(tls.clone())?);
        let ep = quic::client_endpoint(peer.address, tls)?;
        let link = PeerLink::new(
            ep.clone(),
            slot.clone(),
            peer.address,
            peer.server_name.clone(),
            peer.max_bandwidth,
        );
        let p = Arc::new(Primary::new(shared.clone(), link, background.clone()));
        if !is_dr {
            let (p, stop) = (p.clone(), tokens.accept.clone());
            work.spawn(async move { p.peer.watch(&p, stop).await });
        }
        let stops = scheduler::Stops {
            start: tokens.accept.clone(),
            cycles: tokens.cycles.clone(),
        };
        for prot in &shared.config.protections {
            let (tx, rx) = mpsc::channel(16);
            syncs.insert(prot.name.to_string(), tx);
            work.spawn(scheduler::run(p.clone(), prot.clone(), rx, stops.clone()));
        }
        client = Some((ep, slot));
        primary = Some(p);
    }
    let ctx = RoleCtx {
        shared: shared.clone(),
        dr,
        primary,
        syncs: Arc::new(syncs),
    };
    let tls_side = tls_reload::Side {
        server: server.clone(),
        client: client.as_ref().map(|(_, slot)| slot.clone()),
    };
    let endpoints: Vec<quinn::Endpoint> =
        server.into_iter().chain(client.map(|(ep, _)| ep)).collect();
    tls_reload::start(
        shared.clone(),
        tls_side,
        tokens.background.clone(),
        &background,
    )?;
    let listener = tokio::net::TcpListener::bind(shared.config.control)
        .await
        .with_context(|| format!("bind the control API to {}", shared.config.control))?;
    tracing::info!(
        address = %listener.local_addr()?,
        auth = if callers.is_open() { "off (loopback)" } else { "bearer tokens" },
        "control API: /metrics /healthz /readyz /v1/status"
    );
    let app = control::router(ctx, callers);
    let stop_control = tokens.control.clone();
    let control_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop_control.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    shared.ready.store(true, Ordering::Relaxed);
    tracing::info!(site = %shared.config.site_name, role = %shared.config.role, "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: no new peer, stream or cycle");
    shared.ready.store(false, Ordering::Relaxed);
    tokens.accept.cancel();
    tokens.cycles.cancel();
    work.close();
    CANCEL.run(work.wait()).await;
    tokens.background.cancel();
    background.close();
    DRAIN.run(background.wait()).await;
    for ep in &endpoints {
        ep.close(0u32.into(), b"shutdown");
    }
    CLOSE
        .run(async {
            for ep in &endpoints {
                ep.wait_idle().await;
            }
        })
        .await;
    tokens.control.cancel();
    CONTROL
        .run(async {
            let _ = control_task.await;
        })
        .await;
    Ok(())
}

/// The DR site's own tasks: drill metrics from 0, committed CSI gens finished, standby
/// manifests applied, replicas scrubbed.
async fn dr_tasks(dr: &Arc<Dr>, tokens: &Tokens, background: &TaskTracker) -> Result<()> {
    for p in dr.config.protections.iter().filter(|p| p.csi().is_none()) {
        // Counters from 0, so "no drill ever passed" is a series an alert can see.
        for result in ["passed", "failed"] {
            dr.metrics
                .drills
                .with_label_values(&[p.name.as_str(), result])
                .inc_by(0);
        }
    }
    // Cancelled by shutdown is safe: the redo is idempotent and runs again.
    let (d, stop) = (dr.clone(), tokens.background.clone());
    background.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = recovery::recover_csi(d) => {}
        }
    });
    // A gen committed before a restart may not have had its manifests applied.
    for p in dr
        .config
        .protections
        .iter()
        .filter(|p| p.kubernetes.is_some())
    {
        dr.request_standby(&p.name);
    }
    for p in dr
        .config
        .protections
        .iter()
        .filter(|p| p.csi().is_none() && p.scrub.is_some())
    {
        background.spawn(crate::lifecycle::scrub::run(
            dr.clone(),
            p.clone(),
            tokens.background.clone(),
        ));
    }
    background.spawn(crate::lifecycle::standby::run(
        dr.clone(),
        tokens.background.clone(),
    ));
    Ok(())
}
