//! `lifeboat run`: opens the state store, finishes or discards what a previous run left in
//! flight, starts the role's tasks and the control API, and shuts down in order on SIGINT
//! or SIGTERM. Crash safety does not depend on the shutdown: a kill -9 costs re-transfer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Role};
use crate::net::{quic, tls};
use crate::site::peer::PeerLink;
use crate::site::{control, receiver, recovery, scheduler, Site};
use crate::store::Store;

pub async fn run(config: Config) -> Result<()> {
    let db = config.state_dir.join("db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db)).await??;
    let site = Arc::new(Site::open(config, store).await?);
    {
        let s = site.clone();
        tokio::task::spawn_blocking(move || recovery::recover(&s.store, &s.config))
            .await?
            .context("recover what the previous run left in flight")?;
    }
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut syncs = HashMap::new();
    let endpoint = match site.config.role {
        Role::Dr => {
            let addr = site.config.listen.context("a DR site needs [listen]")?;
            let ep = quic::server_endpoint(addr, tls::server_config(&site.config.tls)?)?;
            tracing::info!(address = %ep.local_addr()?, "listening for the primary (QUIC)");
            // A gen committed before a restart may not have had its manifests applied.
            for p in site
                .config
                .protections
                .iter()
                .filter(|p| p.kubernetes.is_some())
            {
                tracker.spawn(crate::site::mirror::apply_standby(
                    site.clone(),
                    p.name.to_string(),
                ));
            }
            tracker.spawn(receiver::serve(
                site.clone(),
                ep.clone(),
                cancel.child_token(),
                tracker.clone(),
            ));
            ep
        }
        Role::Primary => {
            let peer = site.config.peer.clone().context("a primary needs [peer]")?;
            let ep = quic::client_endpoint(peer.address, tls::client_config(&site.config.tls)?)?;
            let link = Arc::new(PeerLink::new(
                ep.clone(),
                peer.address,
                peer.server_name.clone(),
                peer.max_bandwidth,
            ));
            for p in &site.config.protections {
                let (tx, rx) = mpsc::channel(16);
                syncs.insert(p.name.to_string(), tx);
                tracker.spawn(scheduler::run(
                    site.clone(),
                    link.clone(),
                    p.clone(),
                    rx,
                    cancel.child_token(),
                ));
            }
            ep
        }
    };
    let listener = tokio::net::TcpListener::bind(site.config.control)
        .await
        .with_context(|| format!("bind the control API to {}", site.config.control))?;
    tracing::info!(address = %listener.local_addr()?, "control API: /metrics /healthz /readyz /v1/status");
    let app = control::router(site.clone(), syncs);
    let shutdown = cancel.clone();
    tracker.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    site.ready.store(true, Ordering::Relaxed);
    tracing::info!(site = %site.config.site_name, role = %site.config.role, "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    site.ready.store(false, Ordering::Relaxed);
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks still running after 10s; exiting anyway (state is crash-safe)");
    }
    endpoint.close(0u32.into(), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}
