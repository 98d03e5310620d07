//! kill -9 at chosen points: the DR replicas of a group stay at one consistent point, and
//! the next cycle completes.

mod support;

use std::time::Duration;

use lifeboat::api::CycleReport;
use support::*;

fn group_options() -> PairOptions {
    PairOptions {
        volumes: vec![("v1", 16 << 20), ("v2", 16 << 20), ("v3", 16 << 20)],
        // Incremental gens travel as block patches, so the redo of patches is what a kill
        // during apply tests.
        primary_protection: "refine = \"on\"",
        ..Default::default()
    }
}

fn group() -> Pair {
    Pair::new(group_options())
}

fn change_all(pair: &Pair, seed: u64) {
    for (i, v) in pair.volumes.iter().enumerate() {
        scatter_writes(&pair.volume(v), 60, pair.chunk_size, seed + i as u64);
    }
}

/// Starts a sync in the background; it is expected to fail when a site is killed.
fn sync_in_background(pair: &Pair) -> std::thread::JoinHandle<Result<CycleReport, String>> {
    let client = pair.primary.client();
    std::thread::spawn(move || {
        client
            .post::<CycleReport>(&format!("/v1/protections/{PROT}/sync"))
            .map_err(|e| format!("{e:#}"))
    })
}

#[test]
fn replicas_stay_at_the_previous_gen_when_the_dr_daemon_is_killed_mid_transfer() {
    let mut pair = group();
    pair.sync();
    let gen1 = pair.replica_hashes();
    assert_eq!(gen1, pair.snapshot_hashes(1));
    change_all(&pair, 20);

    pair.dr.stop();
    pair.dr.failpoint = Some("dr-staging:v2".into());
    pair.dr.start();
    let pending = sync_in_background(&pair);
    pair.dr.wait_failpoint();
    pair.dr.kill9();
    assert_eq!(
        pair.replica_hashes(),
        gen1,
        "replicas changed while gen 2 was only staged"
    );
    assert!(pending.join().unwrap().is_err());

    pair.dr.failpoint = None;
    pair.dr.start();
    assert_eq!(
        pair.replica_hashes(),
        gen1,
        "restart must discard the staged gen"
    );
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    let r = pair.sync();
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(r.gen));
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn replicas_stay_at_the_previous_gen_when_the_primary_is_killed_mid_transfer() {
    let mut pair = group();
    pair.sync();
    let gen1 = pair.replica_hashes();
    change_all(&pair, 30);

    pair.primary.stop();
    pair.primary.failpoint = Some("primary-sending:v2".into());
    pair.primary.start();
    let pending = sync_in_background(&pair);
    pair.primary.wait_failpoint();
    pair.primary.kill9();
    assert!(pending.join().unwrap().is_err());
    assert_eq!(pair.replica_hashes(), gen1);

    pair.primary.failpoint = None;
    pair.primary.start();
    // The DR site still holds the dead connection's cycle; the new attempt supersedes it.
    let r = pair.sync();
    assert_eq!(r.gen, 2);
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(2));
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn a_gen_committed_before_a_kill_during_apply_is_finished_at_restart() {
    let mut pair = group();
    pair.sync();
    change_all(&pair, 40);
    let gen2 = pair.volume_hashes(); // the volumes are not written again, so gen 2 equals them

    pair.dr.stop();
    pair.dr.failpoint = Some("dr-applying:v2".into());
    pair.dr.start();
    let pending = sync_in_background(&pair);
    pair.dr.wait_failpoint();
    pair.dr.kill9();
    assert!(
        pending.join().unwrap().is_err(),
        "no acknowledgement was sent"
    );

    pair.dr.failpoint = None;
    pair.dr.start();
    assert_eq!(
        pair.replica_hashes(),
        gen2,
        "the committed gen is redone at restart"
    );
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(2));
    // The primary never saw the acknowledgement; it learns the DR site committed gen 2
    // and continues incrementally from it.
    std::thread::sleep(Duration::from_millis(10));
    let r = pair.sync();
    assert_eq!(r.gen, 3);
    assert!(r.volumes.iter().all(|v| !v.resync), "{r:?}");
    assert_eq!(r.chunk_bytes_sent, 0);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

/// Replica files of the pair and anything lifeboat left beside them.
fn replica_dir_listing(pair: &Pair) -> Vec<String> {
    let dir = pair
        .replica(&pair.volumes[0])
        .parent()
        .unwrap()
        .to_path_buf();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_first_sync_killed_mid_transfer_leaves_no_replica_and_resumes_its_partial_one() {
    // The first full sync writes each replica whole beside its path (no staging log);
    // until the group commit nothing may appear under the replica's name.
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..group_options()
    });
    pair.dr.failpoint = Some("dr-staging:v2".into());
    pair.start();
    let pending = sync_in_background(&pair);
    pair.dr.wait_failpoint();
    let during = replica_dir_listing(&pair);
    assert!(
        during.contains(&"v1.img.lifeboat-new".to_string()),
        "v1 is built beside its path: {during:?}"
    );
    pair.dr.kill9();
    assert!(pending.join().unwrap().is_err());
    assert!(
        !during.iter().any(|n| n.ends_with(".img")),
        "no replica may exist before the group commit: {during:?}"
    );

    pair.dr.failpoint = None;
    pair.dr.start();
    // The new replicas stay beside their paths, for the next first sync to resume; none
    // is a replica until the group commit.
    let after = replica_dir_listing(&pair);
    assert!(
        after.iter().all(|n| n.ends_with(".img.lifeboat-new")) && !after.is_empty(),
        "restart keeps only the new replicas being built: {after:?}"
    );
    assert_eq!(pair.dr.status().protections[0].consistent_gen, None);
    let r = pair.sync();
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(r.gen));
    assert_eq!(
        replica_dir_listing(&pair),
        vec!["v1.img", "v2.img", "v3.img"]
    );
}

#[test]
fn a_first_sync_committed_before_a_kill_during_install_is_finished_at_restart() {
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..group_options()
    });
    pair.dr.failpoint = Some("dr-applying:v2".into());
    pair.start();
    let pending = sync_in_background(&pair);
    pair.dr.wait_failpoint();
    pair.dr.kill9();
    assert!(pending.join().unwrap().is_err());
    // v1 was renamed into place, v2 and v3 not yet.
    assert_eq!(
        replica_dir_listing(&pair),
        vec!["v1.img", "v2.img.lifeboat-new", "v3.img.lifeboat-new"]
    );

    pair.dr.failpoint = None;
    pair.dr.start();
    assert_eq!(
        replica_dir_listing(&pair),
        vec!["v1.img", "v2.img", "v3.img"]
    );
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(1));
    let r = pair.sync();
    assert_eq!(r.gen, 2);
    assert_eq!(r.chunk_bytes_sent, 0);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}
