//! Replication over an emulated WAN (the relay in `support::relay`): the acceptance cases
//! of a cycle (initial sync, incremental, kill -9, failover fencing) at 50 ms RTT with 1%
//! loss, jitter and reordering, and a 30 s partition in the middle of a transfer. Replicas
//! are exact by blake3 at every consistent point, never torn in between.

mod support;

use std::time::{Duration, Instant};

use support::relay::Link;
use support::*;

fn over_wan(volumes: Vec<(&'static str, u64)>, link: Link) -> Pair {
    let pair = Pair::new(PairOptions {
        volumes,
        relay: true,
        ..Default::default()
    });
    pair.relay.as_ref().unwrap().set_link(link);
    pair
}

fn lossy() -> Link {
    Link {
        jitter: Duration::from_millis(3),
        reorder: 0.01,
        duplicate: 0.005,
        ..Link::wan(Duration::from_millis(50), 0.01)
    }
}

fn sync_in_background(
    pair: &Pair,
) -> std::thread::JoinHandle<Result<lifeboat::api::CycleReport, String>> {
    let client = pair.primary.client();
    std::thread::spawn(move || {
        client
            .post::<lifeboat::api::CycleReport>(&format!("/v1/protections/{PROT}/sync"))
            .map_err(|e| format!("{e:#}"))
    })
}

#[test]
fn initial_incremental_and_a_killed_primary_over_50ms_rtt_with_1pct_loss_are_exact() {
    let mut pair = over_wan(vec![("v1", 3 << 20), ("v2", 1 << 20)], lossy());
    let r = pair.sync();
    assert_eq!(r.gen, 1);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    pair.change_all(30, 5);
    let r = pair.sync();
    assert_eq!(r.gen, 2);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let (up, down) = pair.relay.as_ref().unwrap().dropped();
    assert!(up > 0 && down > 0, "the link lost nothing: {up} {down}");

    // kill -9 of the primary in the middle of a cycle over the lossy link.
    let gen2 = pair.replica_hashes();
    pair.change_all(30, 9);
    pair.primary.stop();
    pair.primary.failpoint = Some("primary-sending:v2".into());
    pair.primary.start();
    let pending = sync_in_background(&pair);
    pair.primary.wait_failpoint();
    pair.primary.kill9();
    assert!(pending.join().unwrap().is_err());
    assert_eq!(pair.replica_hashes(), gen2, "a cut cycle tore the replicas");
    pair.primary.failpoint = None;
    pair.primary.start();
    let r = pair.sync();
    assert_eq!(r.gen, 3);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());

    // Failover fences the old primary over the same link.
    let (ok, _, err) = pair.dr.cli(&["failover", "--protection", PROT]);
    assert!(ok, "{err}");
    pair.change_all(5, 11);
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("fenced"), "{err}");
    assert_ne!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn a_30s_partition_mid_transfer_leaves_the_replicas_whole_and_the_next_cycle_completes() {
    let pair = over_wan(
        vec![("v1", 24 << 20)],
        Link {
            rate: Some(4 << 20),
            ..Link::wan(Duration::from_millis(50), 0.0)
        },
    );
    pair.sync();
    let gen1 = pair.replica_hashes();
    // Rewrite the volume whole, so the cycle takes several seconds at the cap.
    random_file(&pair.volume("v1"), 24 << 20, 77);
    let relay = pair.relay.as_ref().unwrap();
    let start = relay.forwarded();
    let pending = sync_in_background(&pair);
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.forwarded() < start + (4 << 20) {
        assert!(Instant::now() < deadline, "the cycle never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.partition_for(Duration::from_secs(30));
    // Longer than the idle timeout: the cycle ends with the connection.
    let r = pending.join().unwrap();
    assert!(r.is_err(), "{r:?}");
    assert_eq!(pair.replica_hashes(), gen1, "a cut cycle tore the replica");
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    // After the heal, the next cycle completes (the scheduler's retry, or this sync).
    while relay.is_cut() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = pair.sync();
    assert!(r.gen >= 2, "{r:?}");
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

/// A first sync of a 256 MiB volume cut at 60% of its bytes (and, with `kill_dr`, the DR
/// daemon killed there); returns the chunk bytes the resumed cycle sent.
fn resumed_after_cut_at_60pct(kill_dr: bool) -> u64 {
    const SIZE: u64 = 256 << 20;
    let mut pair = over_wan(vec![("v1", SIZE)], Link::default());
    let relay = pair.relay.as_ref().unwrap();
    relay.cut_after(SIZE * 6 / 10);
    let pending = sync_in_background(&pair);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !relay.is_cut() {
        assert!(Instant::now() < deadline, "the first sync never got to 60%");
        std::thread::sleep(Duration::from_millis(10));
    }
    if kill_dr {
        pair.dr.kill9();
    }
    assert!(
        pending.join().unwrap().is_err(),
        "the cut cycle cannot commit"
    );
    assert!(
        !pair.replica("v1").exists(),
        "no replica before the group commit"
    );
    pair.relay.as_ref().unwrap().restore();
    if kill_dr {
        pair.dr.start();
    }
    let r = pair.sync();
    assert_eq!(r.gen, 1);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    eprintln!(
        "resumed first sync: {} chunk bytes of {SIZE} sent",
        r.chunk_bytes_sent
    );
    r.chunk_bytes_sent
}

/// At most about 45% of the volume after a cut at 60% (the chunks in flight at the cut
/// are sent again).
fn at_most_45pct(sent: u64) {
    assert!(
        sent <= (256 << 20) * 45 / 100,
        "the resumed sync sent {sent} bytes of 256 MiB"
    );
}

#[test]
fn a_first_sync_cut_at_60pct_resumes_and_sends_less_than_half_of_the_volume() {
    at_most_45pct(resumed_after_cut_at_60pct(false));
}

#[test]
fn a_first_sync_resumes_after_the_dr_daemon_is_killed_at_60pct() {
    at_most_45pct(resumed_after_cut_at_60pct(true));
}

#[test]
fn path_mtu_discovery_stays_within_a_1280_byte_path_that_drops_larger_datagrams() {
    // 1280 bytes of IPv6 less 48 of headers: larger probes vanish without an ICMP answer.
    let pair = over_wan(
        vec![("v1", 8 << 20)],
        Link {
            mtu: Some(1232),
            ..Link::wan(Duration::from_millis(10), 0.0)
        },
    );
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    pair.change_all(40, 3);
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let (up, _) = pair.relay.as_ref().unwrap().dropped();
    assert!(
        up > 0,
        "no datagram was larger than the path: discovery never probed"
    );
}
