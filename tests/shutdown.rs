//! SIGTERM in the middle of a transfer: the daemon goes through its shutdown stages, each
//! within its budget (the daemon logs a stage that overruns), exits 0, and the replicas stay
//! at the consistent gen; after a restart the next cycle completes. An idle daemon shuts
//! down the same way.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The stages a shutdown goes through, as the daemon logs them.
const STAGES: [&str; 4] = [
    "cancel cycles and streams",
    "drain background work",
    "close the QUIC endpoint",
    "stop the control API",
];

fn assert_clean_shutdown(site: &str, log: &str) {
    for stage in STAGES {
        assert!(
            log.lines()
                .any(|l| l.contains("shutdown stage done") && l.contains(stage)),
            "{site}: stage {stage:?} not done:\n{log}"
        );
    }
    assert!(
        !log.contains("exceeded its budget"),
        "{site}: a stage overran its budget:\n{log}"
    );
}

/// A pair at gen 1 with 24 MiB of changes for gen 2 on a 2 MiB/s link, and the sync of gen
/// 2 running: returns once the primary is sending.
fn pair_mid_transfer() -> (
    Pair,
    Vec<String>,
    std::thread::JoinHandle<Result<(), String>>,
) {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 32 << 20)],
        primary_peer: "max_bandwidth = \"2MiB/s\"",
        primary_protection: "refine = \"off\"\ncompression = \"off\"",
        ..Default::default()
    });
    pair.sync();
    let gen1 = pair.replica_hashes();
    pair.change_all(400, 7);
    let ctl = pair.primary.control.clone();
    let sync = std::thread::spawn(move || {
        lifeboat::api::Client::at(&ctl)
            .post::<serde_json::Value>(&format!("/v1/protections/{PROT}/sync"))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let activity = pair.primary.status().protections[0].activity.clone();
        if activity.contains("gen 2: volume v1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gen 2 never started sending: {activity}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Some chunks are on their way.
    std::thread::sleep(Duration::from_millis(500));
    (pair, gen1, sync)
}

#[test]
fn sigterm_of_the_primary_mid_transfer_stops_in_order_and_leaves_the_replicas_at_their_gen() {
    let (mut pair, gen1, sync) = pair_mid_transfer();
    let status = pair.primary.terminate().expect("running");
    assert!(status.success(), "primary exited with {status}");
    assert!(
        sync.join().unwrap().is_err(),
        "the cut cycle did not commit"
    );
    assert_clean_shutdown("primary", &pair.primary.log_text());
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    assert_eq!(pair.replica_hashes(), gen1, "the replicas stay at gen 1");
    pair.primary.start();
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn sigterm_of_the_dr_site_mid_transfer_stops_in_order_and_leaves_the_replicas_at_their_gen() {
    let (mut pair, gen1, sync) = pair_mid_transfer();
    let status = pair.dr.terminate().expect("running");
    assert!(status.success(), "DR site exited with {status}");
    assert!(
        sync.join().unwrap().is_err(),
        "the cut cycle did not commit"
    );
    assert_clean_shutdown("dr", &pair.dr.log_text());
    assert_eq!(pair.replica_hashes(), gen1, "the replicas stay at gen 1");
    let staging = pair.dr.state_dir.join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging left behind: {left:?}");
    pair.dr.start();
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn idle_daemons_shut_down_in_order() {
    let mut pair = Pair::new(PairOptions::default());
    pair.sync();
    for site in [&mut pair.primary, &mut pair.dr] {
        let name = site.name;
        let status = site.terminate().expect("running");
        assert!(status.success(), "{name} exited with {status}");
        assert_clean_shutdown(name, &site.log_text());
    }
}
