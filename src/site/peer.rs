//! The primary's link to its DR site: one QUIC connection, made on demand, checked for the
//! lifeboat ALPN and a compatible protocol version before any cycle uses it. After a TLS
//! reload the next caller gets a new connection made with the new material; cycles still on
//! the old one finish there, and it closes when the last of them lets go. If the DR site
//! refuses the new material, cycles fail rather than stay on the old connection, which
//! would hide a broken rotation until that connection drops.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::REFINE_AUTO_BELOW;
use crate::net::limit::RateLimit;
use crate::net::quic;
use crate::net::wire::{FrameReader, FrameWriter, Msg, SiteRole, WireError, PROTOCOL_VERSION};
use crate::site::Shared;

/// How soon the link watcher tries again after the DR site went away.
const RETRY: Duration = Duration::from_secs(3);

pub struct PeerLink {
    endpoint: quinn::Endpoint,
    address: SocketAddr,
    server_name: String,
    /// The client config for new connections (replaced by a TLS reload).
    client: quic::ClientSlot,
    /// The connection and the client config generation it was made with.
    conn: Mutex<Option<(quinn::Connection, u64)>>,
    /// The pair's bandwidth cap, shared by every cycle's streams.
    pub limit: Option<Arc<RateLimit>>,
}

impl PeerLink {
    pub fn new(
        endpoint: quinn::Endpoint,
        client: quic::ClientSlot,
        address: SocketAddr,
        server_name: String,
        max_bandwidth: Option<u64>,
    ) -> Self {
        PeerLink {
            endpoint,
            address,
            server_name,
            client,
            conn: Mutex::new(None),
            limit: max_bandwidth.map(|b| Arc::new(RateLimit::new(b))),
        }
    }

    /// Whether `refine = "auto"` refines on this link: yes unless the pair's bandwidth cap
    /// says the link is at least [`REFINE_AUTO_BELOW`]. A congestion-window estimate is no
    /// guide on short round trips, and refinement measured faster even on a 5 Gbit/s
    /// loopback path, because it cuts the DR site's staging writes as much as the wire.
    pub fn auto_refine(&self) -> bool {
        self.limit
            .as_ref()
            .is_none_or(|l| l.bytes_per_sec() < REFINE_AUTO_BELOW)
    }

    /// The live connection, connecting (and saying hello) if there is none.
    pub async fn connection(&self, site: &Shared) -> Result<quinn::Connection> {
        let mut guard = self.conn.lock().await;
        let (generation, client) = self.client.current();
        if let Some((c, made_with)) = guard.as_ref() {
            if c.close_reason().is_none() && *made_with == generation {
                return Ok(c.clone());
            }
        }
        site.peer_connected.store(false, Ordering::Relaxed);
        let what = || format!("connect to DR site {} ({})", self.address, self.server_name);
        let connecting = self
            .endpoint
            .connect_with(client, self.address, &self.server_name)
            .with_context(what)?;
        let conn = tokio::time::timeout(Duration::from_secs(15), connecting)
            .await
            .map_err(|_| anyhow!("no answer within 15s"))
            .with_context(what)?
            .with_context(what)?;
        if !quic::negotiated_lifeboat(&conn) {
            conn.close(1u32.into(), b"alpn");
            bail!(
                "{}: the peer did not agree on the lifeboat protocol (ALPN)",
                what()
            );
        }
        let (send, recv) = conn.open_bi().await.with_context(what)?;
        let mut w = FrameWriter::new(send);
        let mut r = FrameReader::new(recv);
        w.send(&Msg::Hello {
            version: PROTOCOL_VERSION,
            site: site.config.site_name.clone(),
            role: SiteRole::Primary,
        })
        .await
        .with_context(what)?;
        let ack = r.expect("HelloAck").await.map_err(|e| closed(&conn, e));
        match ack.with_context(what)? {
            Msg::HelloAck {
                role: SiteRole::Primary,
                site: peer,
                ..
            } => bail!(
                "{}: site {peer} says it is a primary too: one of the two sites is configured with the wrong role",
                what()
            ),
            Msg::HelloAck { version, site: peer, .. } if version == PROTOCOL_VERSION => {
                tracing::info!(peer = %peer, address = %self.address, "connected to DR site");
            }
            Msg::HelloAck { version, .. } => bail!(
                "{}: the peer speaks protocol version {version}, this site {PROTOCOL_VERSION}; upgrade both sites to the same lifeboat release",
                what()
            ),
            Msg::Refused(r) => bail!("{}: {r}", what()),
            other => bail!("{}: peer answered the hello with {}", what(), other.kind()),
        }
        w.finish();
        site.peer_connected.store(true, Ordering::Relaxed);
        *guard = Some((conn.clone(), generation));
        Ok(conn)
    }

    /// Keeps the link up between cycles, and `peer_connected` true to it: a DR site that
    /// dies shows as disconnected once its keep-alives stop (the idle timeout), without
    /// waiting for a cycle, and one that comes back is reconnected within [`RETRY`].
    pub async fn watch(&self, site: &Shared, stop: CancellationToken) {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = self.connection(site) => c,
            };
            match conn {
                Ok(c) => tokio::select! {
                    _ = stop.cancelled() => return,
                    reason = c.closed() => {
                        site.peer_connected.store(false, Ordering::Relaxed);
                        tracing::info!(%reason, "the connection to the DR site is down");
                    }
                },
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "DR site not reachable"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Drops the connection after an error so the next cycle reconnects.
    pub async fn reset(&self) {
        if let Some((c, _)) = self.conn.lock().await.take() {
            c.close(0u32.into(), b"reset");
        }
    }
}

/// A stream error, with the connection's close reason when the peer closed it: a TLS
/// alert (an expired or unknown certificate) arrives that way after the handshake looked
/// done to this side.
fn closed(conn: &quinn::Connection, e: WireError) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => anyhow::anyhow!(
            "{e}: the DR site closed the connection: {reason}{}",
            tls_alert(&reason)
        ),
        None => e.into(),
    }
}

/// What a TLS alert in a QUIC close says about this site's certificate.
fn tls_alert(reason: &quinn::ConnectionError) -> &'static str {
    let code = match reason {
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        _ => return "",
    };
    // QUIC carries a TLS alert as crypto error 0x100 + alert.
    match code.checked_sub(0x100) {
        Some(45) => " (the DR site says this site's certificate has expired: renew it with `lifeboat certs`)",
        Some(44) => " (the DR site says this site's certificate was revoked)",
        Some(42) | Some(46) => " (the DR site did not accept this site's certificate)",
        Some(48) => " (the DR site does not know this site's CA: both sites need the pair's ca.pem)",
        _ => "",
    }
}
