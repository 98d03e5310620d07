//! TLS material reloaded without a restart. On SIGHUP the daemon reads its CA, certificate
//! and key again and uses them for new connections: the DR site for the connections it
//! accepts from then on, the primary for a new connection that its next cycle makes
//! ([`crate::site::peer`]). Connections already up keep the material they were made with.
//!
//! A reload that fails (a missing or malformed file, a key open to group or others, a key
//! that does not match the certificate) keeps the material in use, logs why by file name
//! (never a key's contents) and counts `lifeboat_tls_reloads_total{result="error"}`.
//! `lifeboat_certificate_expiry_timestamp_seconds` always shows the material in use.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::net::quic;
use crate::net::tls::{self, Expiry, TlsFiles};
use crate::site::Shared;

/// Where reloaded material goes: the listening endpoint (a DR site, or a primary with
/// `[listen]`) and the client config for new connections (a primary, or a DR site with
/// `[peer]`).
#[derive(Clone)]
pub struct Side {
    pub server: Option<quinn::Endpoint>,
    pub client: Option<quic::ClientSlot>,
}

/// Sets the expiry gauges for the material in use, and reloads it on each SIGHUP until
/// `stop`. Fails when the certificates cannot be read for their dates.
pub fn start(
    shared: Arc<Shared>,
    side: Side,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> Result<()> {
    let expiry = tls::expiry(&shared.config.tls)?;
    note_expiry(&shared.metrics, expiry);
    // Registered before the daemon says it is ready: SIGHUP's default would end it.
    let hup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
    tracker.spawn(run(shared, side, stop, hup));
    Ok(())
}

async fn run(shared: Arc<Shared>, side: Side, stop: CancellationToken, mut hup: Signal) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let (files, side2) = (shared.config.tls.clone(), side.clone());
        let result = tokio::task::spawn_blocking(move || reload(&files, &side2))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("reload task failed: {e}")));
        match result {
            Ok(expiry) => {
                note_expiry(&shared.metrics, expiry);
                shared.metrics.tls_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    cert = %shared.config.tls.cert.display(),
                    not_after = expiry.site,
                    ca_not_after = expiry.ca,
                    "TLS material reloaded; new connections use it"
                );
            }
            Err(e) => {
                shared
                    .metrics
                    .tls_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(
                    error = %format!("{e:#}"),
                    "TLS reload failed; keeping the material in use"
                );
            }
        }
    }
}

/// Builds the new config in full before it replaces the old, so a failure changes nothing.
fn reload(files: &TlsFiles, side: &Side) -> Result<Expiry> {
    let expiry = tls::expiry(files)?;
    // Both configs are built before either replaces the old.
    let server = match &side.server {
        Some(_) => Some(quic::server_config(tls::server_config(files)?)?),
        None => None,
    };
    let client = match &side.client {
        Some(_) => Some(quic::client_config(tls::client_config(files)?)?),
        None => None,
    };
    if let (Some(ep), Some(cfg)) = (&side.server, server) {
        ep.set_server_config(Some(cfg));
    }
    if let (Some(slot), Some(cfg)) = (&side.client, client) {
        slot.replace(cfg);
    }
    Ok(expiry)
}

fn note_expiry(metrics: &Metrics, e: Expiry) {
    for (label, at) in [("site", e.site), ("ca", e.ca)] {
        metrics
            .certificate_expiry
            .with_label_values(&[label])
            .set(at);
    }
}
