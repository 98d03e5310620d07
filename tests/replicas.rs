//! DR replicas that cannot silently go missing: a replica deleted, truncated, replaced by a
//! directory or written outside lifeboat fails the next cycle naming it, shows the
//! protection degraded (status, /readyz, a metric) and is repaired by the cycle after, by
//! hash exchange, to equal the primary's snapshot. A committed gen whose staging log was
//! lost is finished or handed to repair, never retried forever.

mod support;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use support::*;

/// A pair at gen 1 (two volumes), and the change that happens to v1's replica.
fn damaged_after(damage: impl FnOnce(&std::path::Path)) -> Pair {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 4 << 20), ("v2", 2 << 20)],
        ..Default::default()
    });
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    damage(&pair.replica("v1"));
    pair
}

/// The next cycle fails naming v1 and what was found; the site is degraded until the one
/// after repairs it, which then equals the primary's snapshot.
fn fails_then_repairs(pair: &Pair, found: &str) {
    pair.change_all(5, 11);
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("replica v1") && err.contains(found),
        "the refusal names the replica and what changed: {err}"
    );
    let st = pair.dr.status();
    let degraded = &st.protections[0].degraded;
    assert!(
        degraded.len() == 1 && degraded[0].contains("replica v1") && degraded[0].contains(found),
        "{degraded:?}"
    );
    let ready = pair.dr.client().get_text("/readyz").unwrap();
    assert!(
        ready.starts_with("not ready:") && ready.contains("degraded"),
        "{ready}"
    );
    let m = pair.dr.metrics();
    assert_eq!(
        metric(
            &m,
            &format!("lifeboat_replica_check_failures_total{{protection=\"{PROT}\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            &format!("lifeboat_errors_total{{kind=\"replica\",protection=\"{PROT}\"}}")
        ),
        Some(1.0)
    );
    // The replicas are still what they were: nothing was staged onto the damage.
    let report = pair.sync();
    let v1 = report.volumes.iter().find(|v| v.name == "v1").unwrap();
    assert!(v1.resync, "v1 is repaired by hash exchange");
    let v2 = report.volumes.iter().find(|v| v.name == "v2").unwrap();
    assert!(!v2.resync, "an undamaged replica is not resynced");
    let gen = report.gen;
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(gen));
    assert!(pair.dr.status().protections[0].degraded.is_empty());
    assert_eq!(pair.dr.client().get_text("/readyz").unwrap(), "ready\n");
}

#[test]
fn a_deleted_replica_fails_the_next_cycle_and_is_rebuilt_by_the_one_after() {
    let pair = damaged_after(|r| std::fs::remove_file(r).unwrap());
    fails_then_repairs(&pair, "it is gone");
}

#[test]
fn a_truncated_replica_fails_the_next_cycle_and_is_repaired() {
    let pair = damaged_after(|r| {
        OpenOptions::new()
            .write(true)
            .open(r)
            .unwrap()
            .set_len(2 << 20)
            .unwrap()
    });
    fails_then_repairs(&pair, "its size changed from 4194304 to 2097152 bytes");
}

#[test]
fn a_replica_replaced_by_a_directory_is_moved_aside_and_rebuilt() {
    let pair = damaged_after(|r| {
        std::fs::remove_file(r).unwrap();
        std::fs::create_dir(r).unwrap();
        std::fs::write(r.join("keep-me"), b"operator data").unwrap();
    });
    fails_then_repairs(&pair, "it is a directory now");
    // Nothing that was at the path is lost: it was moved aside.
    let aside: Vec<_> = std::fs::read_dir(pair.dir.path().join("replicas"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("v1.img.lifeboat-displaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(aside[0].join("keep-me")).unwrap(),
        b"operator data"
    );
}

#[test]
fn bytes_flipped_in_a_chunk_the_primary_does_not_change_are_found_and_repaired() {
    let pair = damaged_after(|r| {
        // A chunk far from any the primary will write next.
        std::thread::sleep(std::time::Duration::from_millis(20));
        OpenOptions::new()
            .write(true)
            .open(r)
            .unwrap()
            .write_all_at(b"not lifeboat's bytes", 3 << 20)
            .unwrap()
    });
    fails_then_repairs(&pair, "it was written after the last commit");
}

#[test]
fn a_committed_gen_whose_staging_log_is_lost_is_repaired_not_retried_forever() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 4 << 20), ("v2", 2 << 20)],
        ..Default::default()
    });
    pair.sync();
    pair.change_all(40, 5);
    // Gen 2 commits, and the DR site dies before applying it; then its staging is lost
    // (the write-back of its file system never happened).
    pair.dr.stop();
    pair.dr.failpoint = Some("dr-committed".into());
    pair.dr.start();
    let ctl = pair.primary.control.clone();
    let sync = std::thread::spawn(move || {
        lifeboat::api::Client::at(&ctl)
            .post::<serde_json::Value>(&format!("/v1/protections/{PROT}/sync"))
            .is_ok()
    });
    pair.dr.wait_failpoint();
    pair.dr.kill9();
    let _ = sync.join();
    std::fs::remove_dir_all(pair.dr.state_dir.join("staging")).unwrap();
    pair.dr.failpoint = None;
    pair.dr.start();
    // The restart did not loop on the lost log: the site is up, at gen 1, degraded, and
    // says which volume could not be finished.
    let st = pair.dr.status();
    assert_eq!(st.protections[0].consistent_gen, Some(1));
    let degraded = st.protections[0].degraded.join("; ");
    assert!(
        degraded.contains("gen 2 could not be finished")
            && degraded.contains("staging log of volume v1"),
        "{degraded}"
    );
    assert!(pair
        .dr
        .client()
        .get_text("/readyz")
        .unwrap()
        .contains("degraded"));
    // The next cycle resyncs the gen's volumes by hash exchange.
    let report = pair.sync();
    assert!(
        report.volumes.iter().all(|v| v.resync),
        "{:?}",
        report.volumes
    );
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(report.gen));
    assert!(pair.dr.status().protections[0].degraded.is_empty());
}

#[test]
fn a_fifo_or_a_dev_null_volume_fails_the_cycle_at_once_by_name() {
    let pair = Pair::new(PairOptions::default());
    pair.sync();
    let v1 = pair.volume("v1");
    std::fs::remove_file(&v1).unwrap();
    let ok = std::process::Command::new("mkfifo")
        .arg(&v1)
        .status()
        .unwrap();
    assert!(ok.success());
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("is a FIFO") && err.contains("v1.img"), "{err}");
    std::fs::remove_file(&v1).unwrap();
    std::os::unix::fs::symlink("/dev/null", &v1).unwrap();
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("is a character device"), "{err}");
    // The replica was never touched.
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
}

#[test]
fn a_volume_that_shrinks_to_nothing_is_a_question_for_the_operator_not_a_truncation() {
    let pair = Pair::new(PairOptions::default());
    pair.sync();
    let before = pair.replica_hashes();
    OpenOptions::new()
        .write(true)
        .open(pair.volume("v1"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("volume v1") && err.contains("is empty now but had 8388608 bytes at gen 1"),
        "{err}"
    );
    assert_eq!(pair.replica_hashes(), before);
}

#[test]
fn a_killed_dr_site_shows_as_disconnected_without_a_cycle() {
    let mut pair = Pair::new(PairOptions::default());
    pair.sync();
    let gauge = "lifeboat_peer_connected{peer=\"dr\"}";
    assert_eq!(metric(&pair.primary.metrics(), gauge), Some(1.0));
    pair.dr.kill9();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(&pair.primary.metrics(), gauge) != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "still shown connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // And connected again once it is back, still without a cycle.
    pair.dr.start();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(&pair.primary.metrics(), gauge) != Some(1.0) {
        assert!(std::time::Instant::now() < deadline, "not reconnected");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn verify(pair: &Pair, extra: &[&str]) -> (bool, lifeboat::api::VerifyReport) {
    let args = [&["verify", "--protection", PROT, "--output", "json"], extra].concat();
    let (ok, text, err) = pair.dr.cli(&args);
    let report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}{err}"));
    (ok, report)
}

#[test]
fn verify_names_the_chunk_ranges_flipped_in_a_replica_and_the_next_cycle_repairs_them() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20), ("v2", 4 << 20)],
        ..Default::default()
    });
    pair.sync();
    let (ok, clean) = verify(&pair, &[]);
    assert!(
        ok && clean.volumes.iter().all(|v| v.divergent.is_empty()),
        "{clean:?}"
    );
    // Flip bytes in chunk 3, across chunks 10 and 11, and in chunk 40 of v1's replica
    // (chunk 40 the primary also changes next).
    let replica = pair.replica("v1");
    let f = OpenOptions::new().write(true).open(&replica).unwrap();
    for off in [3 * 65536 + 100, 10 * 65536 + 65530, 40 * 65536 + 7] {
        f.write_all_at(b"not lifeboat's bytes", off).unwrap();
    }
    drop(f);
    // Report only first: named by range, nothing marked.
    let (ok, r) = verify(&pair, &["--no-repair"]);
    assert!(!ok);
    let v1 = r.volumes.iter().find(|v| v.volume == "v1").unwrap();
    assert_eq!(v1.divergent, vec![(3, 3), (10, 11), (40, 40)], "{r:?}");
    assert_eq!(v1.divergent_bytes, 4 * 65536);
    assert!(!r.marked_for_repair);
    let v2 = r.volumes.iter().find(|v| v.volume == "v2").unwrap();
    assert!(v2.divergent.is_empty());
    // Then marked; the next cycle resends what differs and the replica is the primary's.
    let (_, r) = verify(&pair, &[]);
    assert!(r.marked_for_repair);
    {
        let f = OpenOptions::new()
            .write(true)
            .open(pair.volume("v1"))
            .unwrap();
        f.write_all_at(&[9u8; 4096], 40 * 65536).unwrap();
    }
    let c = pair.sync();
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(c.gen));
    let (ok, r) = verify(&pair, &[]);
    assert!(
        ok && r.volumes.iter().all(|v| v.divergent.is_empty()),
        "{r:?}"
    );
}

#[test]
fn verify_of_clean_replicas_reports_nothing_while_cycles_run() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20)],
        ..Default::default()
    });
    pair.sync();
    std::thread::scope(|s| {
        let cycles = s.spawn(|| {
            for i in 0..4 {
                pair.change_all(30, 100 + i);
                pair.sync();
            }
        });
        let mut runs = 0;
        while !cycles.is_finished() || runs < 2 {
            let (ok, r) = verify(&pair, &["--no-repair"]);
            assert!(
                ok && r.volumes.iter().all(|v| v.divergent.is_empty()),
                "{r:?}"
            );
            runs += 1;
        }
        cycles.join().unwrap();
    });
}
