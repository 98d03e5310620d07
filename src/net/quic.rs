//! QUIC endpoints for the pair: the DR site listens, the primary connects. Mutual TLS comes
//! from [`crate::net::tls`]; this module only tunes transport and checks ALPN. The configs
//! can be replaced while the endpoint runs (a TLS reload): the server's through
//! [`Endpoint::set_server_config`], the client's through a [`ClientSlot`].

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, TokioRuntime, TransportConfig, VarInt};

use crate::net::wire::ALPN;

/// Flow-control windows sized for a fast LAN/WAN: 64 MiB covers 10 Gbit/s at 50 ms RTT.
/// A peer silent for 10 s (five missed keep-alives) is dead: a kill -9 sends no close, so
/// this bounds how long a cycle waits on a vanished site.
fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("10 s fits")));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.stream_receive_window(VarInt::from_u32(32 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(64));
    Arc::new(t)
}

/// Socket buffers of 16 MiB. At a few Gbit/s the kernel's default (about 200 KiB) fills
/// in a millisecond whenever the receiving daemon is off the CPU, and every dropped
/// datagram is sent again and halves the congestion window. Root (or CAP_NET_ADMIN) may
/// exceed net.core.rmem_max; otherwise the kernel caps the size there.
fn tune_socket(socket: &std::net::UdpSocket) {
    use std::os::unix::io::AsRawFd;
    let size: libc::c_int = 16 << 20;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// The DR site's QUIC config over `tls`.
pub fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls).context("QUIC server TLS config")?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The primary's QUIC config over `tls`.
pub fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(tls).context("QUIC client TLS config")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The client config new connections use, replaceable while they run. Its generation
/// grows with each replacement, so a link can tell that its connection was made with
/// material that has since been reloaded.
#[derive(Clone)]
pub struct ClientSlot(Arc<RwLock<(u64, quinn::ClientConfig)>>);

impl ClientSlot {
    pub fn new(cfg: quinn::ClientConfig) -> Self {
        ClientSlot(Arc::new(RwLock::new((0, cfg))))
    }

    /// The generation and the config for a new connection.
    pub fn current(&self) -> (u64, quinn::ClientConfig) {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, cfg: quinn::ClientConfig) {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        *slot = (slot.0 + 1, cfg);
    }
}

pub fn server_endpoint(addr: SocketAddr, tls: rustls::ServerConfig) -> Result<Endpoint> {
    let cfg = server_config(tls)?;
    let socket = std::net::UdpSocket::bind(addr)
        .with_context(|| format!("listen for peers on UDP {addr}"))?;
    tune_socket(&socket);
    Endpoint::new(
        EndpointConfig::default(),
        Some(cfg),
        socket,
        Arc::new(TokioRuntime),
    )
    .with_context(|| format!("listen for peers on UDP {addr}"))
}

pub fn client_endpoint(peer: SocketAddr, tls: rustls::ClientConfig) -> Result<Endpoint> {
    let cfg = client_config(tls)?;
    let bind: SocketAddr = if peer.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let socket =
        std::net::UdpSocket::bind(bind).context("bind UDP socket for the peer connection")?;
    tune_socket(&socket);
    let mut ep = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(TokioRuntime),
    )
    .context("bind UDP socket for the peer connection")?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// True when the handshake agreed on the lifeboat ALPN; a client that offered none could
/// otherwise complete a handshake.
pub fn negotiated_lifeboat(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN)
}
