//! Mutual TLS between the pair: an untrusted peer is refused in both directions and nothing
//! is written; a plaintext or wrong-ALPN client gets nothing.

mod support;

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn use_foreign_certs(pair: &Pair, site: &str) {
    let evil = pair.dir.path().join("evil");
    lifeboat::net::tls::generate(&evil, &[site.to_string()], &[]).unwrap();
    let cfg = if site == "primary" {
        &pair.primary.config
    } else {
        &pair.dr.config
    };
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("certs/", "evil/");
    std::fs::write(cfg, text).unwrap();
}

#[test]
fn a_primary_with_a_certificate_from_another_ca_is_refused_and_nothing_is_written() {
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    use_foreign_certs(&pair, "primary");
    pair.start();
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("connect to DR site"), "{err}");
    assert!(
        !pair.replica("v1").exists(),
        "a replica was written for an untrusted peer"
    );
    assert_eq!(pair.dr.status().protections[0].consistent_gen, None);
    let m = pair.dr.metrics();
    assert!(
        metric(&m, "lifeboat_errors_total{kind=\"tls\",protection=\"\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

#[test]
fn a_dr_site_with_a_certificate_from_another_ca_is_refused_by_the_primary() {
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    use_foreign_certs(&pair, "dr");
    pair.start();
    let err = pair.try_sync().unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(!pair.replica("v1").exists());
    let st = pair.primary.status();
    assert_eq!(
        st.protections[0].last_error.as_ref().unwrap().kind.as_str(),
        "peer"
    );
    assert_eq!(st.protections[0].consistent_gen, None);
}

#[test]
fn plaintext_datagrams_get_no_answer() {
    let pair = Pair::new(PairOptions::default());
    let port = pair.quic_port;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    sock.send_to(b"GET / HTTP/1.1\r\nHost: dr\r\n\r\n", ("127.0.0.1", port))
        .unwrap();
    sock.send_to(&[0u8; 1200], ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "the QUIC port answered plaintext"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on TCP there"
    );
    // The daemon is unharmed.
    pair.sync();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_client_with_the_wrong_alpn_gets_no_connection() {
    let pair = Pair::new(PairOptions::default());
    let port = pair.quic_port;
    let files = lifeboat::net::tls::TlsFiles {
        ca: pair.dir.path().join("certs/ca.pem"),
        cert: pair.dir.path().join("certs/primary.pem"),
        key: pair.dir.path().join("certs/primary.key"),
    };
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    for alpn in [Some(b"h3".to_vec()), None] {
        let mut tls = lifeboat::net::tls::client_config(&files).unwrap();
        tls.alpn_protocols = alpn.iter().cloned().collect();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let outcome = async {
            let conn = ep.connect(addr, "dr").unwrap().await?;
            // With no ALPN the handshake may finish, but the server closes at once.
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"hello?").await?;
            let mut buf = [0u8; 16];
            let n = recv.read(&mut buf).await?;
            anyhow::Ok(n)
        };
        let r = tokio::time::timeout(Duration::from_secs(20), outcome)
            .await
            .expect("server neither answered nor closed");
        assert!(r.is_err(), "alpn {alpn:?} got data: {r:?}");
    }
    assert!(!pair.replica("v1").exists());
}
