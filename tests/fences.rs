//! Fences that survive a lost state store, re-protect, and the identity of the peer: a DR
//! site that failed over refuses the old primary even after its state store is gone (the
//! fence lives beside the replicas), keeping the new primary's writes; the documented
//! re-protect then replicates in the original direction again. A peer with the DR site's
//! own certificate, or one that says it is a DR site too, is refused with both names.

mod support;

use std::process::Command;

use lifeboat::net::quic;
use lifeboat::net::tls::{client_config, TlsFiles};
use lifeboat::net::wire::{FrameReader, FrameWriter, Msg, Refusal, SiteRole, PROTOCOL_VERSION};
use support::*;

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_fence_beside_the_replicas_outlives_the_dr_state_store_and_reprotect_lifts_it() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 4 << 20)],
        ..Default::default()
    });
    pair.sync();
    let dr_cfg = pair.dr.config.to_str().unwrap().to_string();
    let (ok, out) = cli(&["failover", "--config", &dr_cfg, "--protection", PROT]);
    assert!(ok, "{out}");
    assert!(pair
        .dir
        .path()
        .join("replicas/v1.img.lifeboat-fence")
        .exists());
    // The application runs at the DR site now and writes to what were the replicas.
    scatter_writes(&pair.replica("v1"), 20, pair.chunk_size, 9);
    let new_primary = pair.replica_hashes();

    // The DR site's state store is lost (a disk replaced, a volume restored).
    pair.dr.stop();
    std::fs::remove_dir_all(pair.dr.state_dir.join("db")).unwrap();
    pair.dr.start();
    // The old primary comes back and tries: every cycle is refused with the fence's
    // reason, and it stops replicating.
    scatter_writes(&pair.volume("v1"), 20, pair.chunk_size, 10);
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("failed over") && err.contains("epoch 2"),
        "{err}"
    );
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("fenced"), "{err}");
    assert_eq!(
        pair.replica_hashes(),
        new_primary,
        "the new primary's writes are intact"
    );
    let st = pair.dr.status();
    assert_eq!(
        st.protections[0].role, "failed-over",
        "the store learned the fence back"
    );
    let ready = pair.primary.client().get_text("/readyz").unwrap();
    assert!(
        ready.starts_with("not ready:") && ready.contains("fenced"),
        "{ready}"
    );

    // Re-protect, at both sites (the DR site's with its daemon down, on the store).
    pair.dr.stop();
    let (ok, out) = cli(&["reprotect", "--config", &dr_cfg, "--protection", PROT]);
    assert!(ok && out.contains("removed the fence"), "{out}");
    pair.dr.start();
    let pcfg = pair.primary.config.to_str().unwrap().to_string();
    let (ok, out) = cli(&["reprotect", "--config", &pcfg, "--protection", PROT]);
    assert!(ok && out.contains("lifted the fence"), "{out}");
    assert!(!pair
        .dir
        .path()
        .join("replicas/v1.img.lifeboat-fence")
        .exists());
    // Replication in the original direction again: the replicas equal the primary.
    let report = pair.sync();
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(report.gen));
    let st = pair.primary.status();
    assert_eq!(st.protections[0].role, "primary");
    assert_eq!(
        st.protections[0].epoch, 2,
        "the primary took the DR site's epoch"
    );
    pair.change_all(10, 12);
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

/// Says hello to the pair's DR site with `cert` claiming `role`; returns its answer, or
/// why the connection was closed.
async fn hello_as(pair: &Pair, cert: &str, role: SiteRole) -> Result<Msg, String> {
    let d = pair.dir.path();
    let files = TlsFiles {
        ca: d.join("certs/ca.pem"),
        cert: d.join(format!("certs/{cert}.pem")),
        key: d.join(format!("certs/{cert}.key")),
    };
    let addr = format!("127.0.0.1:{}", pair.quic_port).parse().unwrap();
    let ep = quic::client_endpoint(addr, client_config(&files).unwrap()).unwrap();
    let conn = ep.connect(addr, "dr").unwrap().await.unwrap();
    let (s, r) = conn.open_bi().await.unwrap();
    let (mut w, mut r) = (FrameWriter::new(s), FrameReader::new(r));
    let sent = w
        .send(&Msg::Hello {
            version: PROTOCOL_VERSION,
            site: "intruder".into(),
            role,
        })
        .await;
    let answer = match sent {
        Ok(_) => r.expect("HelloAck").await,
        Err(e) => Err(e),
    };
    answer.map_err(|e| match conn.close_reason() {
        Some(reason) => reason.to_string(),
        None => e.to_string(),
    })
}

/// The refusal's text, from the refusal frame or from the close that carries it.
fn refused(answer: Result<Msg, String>) -> String {
    match answer {
        Ok(Msg::Refused(Refusal::WrongPeer(m))) => m,
        Err(reason) => reason,
        Ok(other) => panic!("accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_with_the_dr_sites_own_certificate_or_role_is_refused_by_name() {
    let pair = tokio::task::spawn_blocking(|| Pair::new(PairOptions::default()))
        .await
        .unwrap();
    let m = refused(hello_as(&pair, "dr", SiteRole::Primary).await);
    assert!(
        m.contains("site intruder presented the certificate of site dr"),
        "{m}"
    );
    let m = refused(hello_as(&pair, "primary", SiteRole::Dr).await);
    assert!(
        m.contains("site intruder says it is a dr site, as this site (dr) is"),
        "{m}"
    );
    assert!(matches!(
        hello_as(&pair, "primary", SiteRole::Primary).await,
        Ok(Msg::HelloAck {
            role: SiteRole::Dr,
            ..
        })
    ));
    tokio::task::spawn_blocking(move || {
        pair.sync();
        assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    })
    .await
    .unwrap();
}
