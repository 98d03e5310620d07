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

/// Scrubbing a pass a second at up to 1 GiB/s: the tests' volumes take milliseconds.
const SCRUB_FAST: &str = "scrub_every = \"1s\"\nscrub_rate = \"1GiB/s\"";

fn scrub_metric(pair: &Pair, name: &str) -> f64 {
    metric(
        &pair.dr.metrics(),
        &format!("{name}{{protection=\"{PROT}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn verify_and_the_scrub_of_clean_replicas_report_nothing_while_cycles_run() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20)],
        dr_protection: SCRUB_FAST.into(),
        ..Default::default()
    });
    pair.sync();
    std::thread::scope(|s| {
        let cycles = s.spawn(|| {
            // Until the scrub has read the replica three times over, between and after
            // cycles that rewrite it.
            for i in 0..200 {
                pair.change_all(30, 100 + i);
                pair.sync();
                if i >= 4
                    && scrub_metric(&pair, "lifeboat_scrub_read_bytes_total") > (24 << 20) as f64
                {
                    break;
                }
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
    assert!(scrub_metric(&pair, "lifeboat_scrub_read_bytes_total") > (24 << 20) as f64);
    assert_eq!(scrub_metric(&pair, "lifeboat_verify_failures_total"), 0.0);
    assert!(scrub_metric(&pair, "lifeboat_scrub_last_clean_timestamp_seconds") > 0.0);
    let st = pair.dr.status();
    assert!(st.protections[0].degraded.is_empty());
    assert!(st.protections[0].last_clean_scrub_ms.is_some(), "{st:?}");
    let (ok, text, _) = pair.dr.cli(&["status"]);
    assert!(ok && text.contains("last clean scrub:"), "{text}");
}

#[test]
fn the_background_scrub_finds_bytes_flipped_in_a_replica_and_the_next_cycle_repairs_them() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20), ("v2", 4 << 20)],
        dr_protection: SCRUB_FAST.into(),
        ..Default::default()
    });
    pair.sync();
    // A clean pass first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while scrub_metric(&pair, "lifeboat_scrub_last_clean_timestamp_seconds") == 0.0 {
        assert!(std::time::Instant::now() < deadline, "no clean scrub pass");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Bytes flipped out of band in chunk 5 of v1's replica (a chunk no cycle changes).
    let f = OpenOptions::new()
        .write(true)
        .open(pair.replica("v1"))
        .unwrap();
    f.write_all_at(b"bit rot", 5 * 65536 + 17).unwrap();
    drop(f);
    while scrub_metric(&pair, "lifeboat_verify_failures_total") == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the scrub did not find it"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = pair.dr.status();
    let degraded = &st.protections[0].degraded;
    assert!(
        degraded.len() == 1
            && degraded[0].contains("v1")
            && degraded[0].contains("scrub found 65536 bytes")
            && degraded[0].contains("(5, 5)"),
        "{st:?}"
    );
    let log = pair.dr.log_text();
    assert!(
        log.contains("scrub: replica differs from the DR index"),
        "{log}"
    );
    // The next cycle resends the chunk; the pass after it is clean again.
    let c = pair.sync();
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(c.gen));
    let repaired_at = lifeboat::ids::now_ms() as f64 / 1000.0;
    while scrub_metric(&pair, "lifeboat_scrub_last_clean_timestamp_seconds") < repaired_at {
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(60),
            "no clean pass after the repair"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(scrub_metric(&pair, "lifeboat_verify_failures_total"), 1.0);
}

/// A pair keeping `keep` recovery points at the DR site, its replicas (and so its points)
/// on XFS.
fn keeping(keep: usize) -> (Pair, relay::Xfs) {
    keeping_with(&format!("keep = {keep}"))
}

/// As [`keeping`], with these lines in the DR site's `[[protection]]`.
fn keeping_with(lines: &str) -> (Pair, relay::Xfs) {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 4 << 20), ("v2", 2 << 20)],
        start: false,
        dr_protection: lines.into(),
        ..Default::default()
    });
    let d = pair.dir.path().to_path_buf();
    let xfs = relay::Xfs::mount(&d.join("xfs.img"), &d.join("xfs"), 512 << 20).unwrap();
    std::fs::remove_dir(d.join("replicas")).unwrap();
    std::fs::create_dir(d.join("xfs/replicas")).unwrap();
    std::os::unix::fs::symlink(d.join("xfs/replicas"), d.join("replicas")).unwrap();
    pair.start();
    (pair, xfs)
}

/// The gens of the point directories under `root`, in order.
fn point_dirs(root: &std::path::Path) -> Vec<u64> {
    let mut dirs: Vec<u64> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    dirs.sort();
    dirs
}

/// blake3 of point `gen`'s v1 and v2.
fn point_hashes(root: &std::path::Path, gen: u64) -> Vec<String> {
    ["v1", "v2"]
        .iter()
        .map(|v| b3(&root.join(gen.to_string()).join(format!("{v}.img"))))
        .collect()
}

#[test]
fn file_replicas_keep_k_reflink_points_a_held_one_survives_and_failover_recovers_the_oldest() {
    let (mut pair, _xfs) = keeping(5);
    let cli = |pair: &Pair, args: &[&str]| {
        let args = [args, &["--protection", PROT]].concat();
        let (ok, out, err) = pair.dr.cli(&args);
        (ok, out + &err)
    };
    // What each gen holds, as the primary had it when the cycle cut it.
    let mut held_by_gen = std::collections::BTreeMap::new();
    for i in 0..8u64 {
        if i > 0 {
            pair.change_all(6, 70 + i);
        }
        let gen = pair.sync().gen;
        held_by_gen.insert(gen, pair.volume_hashes());
        if i == 1 {
            let (ok, text) = cli(&pair, &["hold", "--gen", &gen.to_string()]);
            assert!(ok, "{text}");
        }
    }
    let gens: Vec<u64> = held_by_gen.keys().copied().collect();
    let held = gens[1];
    // Five points: the held one, older than the rest, survives pruning beside the newest
    // four.
    let kept: Vec<u64> = pair.dr.status().protections[0].points.clone();
    let mut want: Vec<u64> = vec![held];
    want.extend(&gens[gens.len() - 4..]);
    assert_eq!(kept, want, "held gen {held} and the newest four (keep = 5)");
    // Each point's files equal the primary's volumes at its gen, by blake3.
    let root = pair.dir.path().join("replicas/.lifeboat-points").join(PROT);
    for g in &kept {
        let files = point_hashes(&root, *g);
        assert_eq!(files, held_by_gen[g], "point {g}");
    }
    // Nothing else is left in the points' directory.
    let dirs = point_dirs(&root);
    assert_eq!(dirs, kept);
    // A point damaged out of band is named by verify --gen (and not marked: a point is
    // not repaired); another point verifies clean.
    let damaged = kept[2];
    let f = OpenOptions::new()
        .write(true)
        .open(root.join(damaged.to_string()).join("v2.img"))
        .unwrap();
    f.write_all_at(b"ransom note", 65536 * 3 + 5).unwrap();
    drop(f);
    let (ok, r) = verify(&pair, &["--gen", &damaged.to_string()]);
    let v2 = r.volumes.iter().find(|v| v.volume == "v2").unwrap();
    assert!(
        !ok && v2.divergent == [(3, 3)] && !r.marked_for_repair,
        "{r:?}"
    );
    assert_eq!(r.gen, damaged);
    let (ok, r) = verify(&pair, &["--gen", &kept[3].to_string()]);
    assert!(
        ok && r.volumes.iter().all(|v| v.divergent.is_empty()),
        "{r:?}"
    );
    let (ok, _, err) = pair
        .dr
        .cli(&["verify", "--protection", PROT, "--gen", "9999"]);
    assert!(
        !ok && err.contains("gen 9999") && err.contains("not a kept recovery point"),
        "{err}"
    );

    let (ok, text) = cli(&pair, &["points"]);
    assert!(
        ok && text.contains(&held.to_string()) && text.contains("held"),
        "{text}"
    );
    // Released, the held point goes with the next cycle.
    let (ok, text) = cli(&pair, &["release", "--gen", &held.to_string()]);
    assert!(ok, "{text}");
    pair.change_all(6, 99);
    let last = pair.sync().gen;
    held_by_gen.insert(last, pair.volume_hashes());
    let kept: Vec<u64> = pair.dr.status().protections[0].points.clone();
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert!(!kept.contains(&held) && !root.join(held.to_string()).exists());
    // A gen that is not kept is refused, naming the kept ones.
    pair.primary.kill9();
    let (ok, text) = cli(&pair, &["failover", "--gen", &held.to_string()]);
    assert!(
        !ok && text.contains("not a retained recovery point"),
        "{text}"
    );
    // Failover to the oldest kept point: the replicas hold that gen's data.
    let oldest = kept[0];
    let (ok, text) = cli(&pair, &["failover", "--gen", &oldest.to_string()]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("recovery point {oldest}")), "{text}");
    assert_eq!(pair.replica_hashes(), held_by_gen[&oldest]);
}

#[test]
fn by_default_points_are_kept_and_apply_delay_makes_an_older_one_the_failover_default() {
    // No keep: the default keeps a day's worth (the newest 12 whole) on XFS.
    let (mut pair, _xfs) = keeping_with("apply_delay = \"3s\"");
    let cli = |pair: &Pair, args: &[&str]| {
        let args = [args, &["--protection", PROT]].concat();
        let (ok, out, err) = pair.dr.cli(&args);
        (ok, out + &err)
    };
    let mut by_gen = std::collections::BTreeMap::new();
    let first = pair.sync().gen;
    by_gen.insert(first, pair.volume_hashes());
    std::thread::sleep(std::time::Duration::from_secs(4));
    for i in 0..2 {
        pair.change_all(6, 400 + i);
        let gen = pair.sync().gen;
        by_gen.insert(gen, pair.volume_hashes());
    }
    let (ok, json) = cli(&pair, &["points", "--output", "json"]);
    assert!(ok, "{json}");
    let r: lifeboat::api::PointsReport = serde_json::from_str(&json).unwrap();
    let gens: Vec<u64> = r.points.iter().map(|p| p.gen).collect();
    assert_eq!(gens, by_gen.keys().copied().collect::<Vec<_>>(), "{r:?}");
    // The default is the newest point at least 3 s old (the ages are the report's own).
    let want = r
        .points
        .iter()
        .rev()
        .find(|p| p.age_seconds >= 3.0)
        .map_or(first, |p| p.gen);
    assert_eq!(r.failover_default, Some(want), "{r:?}");
    assert_ne!(
        want,
        *gens.last().unwrap(),
        "the newest is younger than the delay"
    );
    let (_, text) = cli(&pair, &["points"]);
    assert!(text.contains("(apply_delay)"), "{text}");
    // A failover (the primary gone) recovers that point unless told --latest.
    pair.primary.kill9();
    let (ok, text) = cli(&pair, &["failover", "--dry-run", "--latest"]);
    assert!(ok && !text.contains("recovery point"), "{text}");
    let (ok, text) = cli(&pair, &["failover"]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("recovery point {want}")), "{text}");
    assert_eq!(pair.replica_hashes(), by_gen[&want]);
}

#[test]
fn a_dr_daemon_killed_after_cutting_a_point_files_finishes_it_whole_at_restart() {
    let (mut pair, _xfs) = keeping(3);
    let mut by_gen = std::collections::BTreeMap::new();
    for i in 0..2 {
        pair.change_all(6, 200 + i);
        let gen = pair.sync().gen;
        by_gen.insert(gen, pair.volume_hashes());
    }
    // Killed after the point's files are cut, before the point is recorded.
    pair.change_all(6, 210);
    pair.dr.stop();
    pair.dr.failpoint = Some("dr-point-cut".into());
    pair.dr.start();
    let client = pair.primary.client();
    let pending = std::thread::spawn(move || {
        client
            .post::<lifeboat::api::CycleReport>(&format!("/v1/protections/{PROT}/sync"))
            .map_err(|e| format!("{e:#}"))
    });
    pair.dr.wait_failpoint();
    pair.dr.kill9();
    assert!(
        pending.join().unwrap().is_err(),
        "no acknowledgement was sent"
    );
    pair.dr.failpoint = None;
    pair.dr.start();
    // The restart's redo finished the committed gen and its point.
    let status = pair.dr.status();
    let gen = status.protections[0].consistent_gen.unwrap();
    by_gen.insert(gen, pair.volume_hashes());
    assert_eq!(status.protections[0].points, vec![1, 2, 3]);
    for _ in 0..3 {
        pair.change_all(6, 300 + by_gen.len() as u64);
        let gen = pair.sync().gen;
        by_gen.insert(gen, pair.volume_hashes());
    }
    let kept = pair.dr.status().protections[0].points.clone();
    assert_eq!(kept, vec![4, 5, 6]);
    let root = pair.dir.path().join("replicas/.lifeboat-points").join(PROT);
    let dirs = point_dirs(&root);
    assert_eq!(dirs, kept, "only the kept points' files remain");
    for g in &kept {
        let files = point_hashes(&root, *g);
        assert_eq!(files, by_gen[g], "point {g}");
    }
}

#[test]
fn keeping_points_of_replicas_on_a_file_system_without_reflink_refuses_to_start_naming_it_and_the_default_keeps_the_newest(
) {
    let pair = Pair::new(PairOptions {
        start: false,
        dr_protection: "keep = 3".into(),
        ..Default::default()
    });
    let dir = pair.dir.path().join("replicas");
    if lifeboat::volume::points::probe(&dir).is_ok() {
        return; // this temp dir shares extents: nothing to refuse
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(["run", "--config"])
        .arg(&pair.dr.config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the DR daemon started with keep = 3 on a file system without reflink");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("keep = 3")
            && err.contains("needs a file system that shares extents")
            && err.contains(&dir.display().to_string()),
        "{err}"
    );
    // The default (a day's worth) falls back to the newest point there, saying why.
    let pair = Pair::new(PairOptions::default());
    let gen = pair.sync().gen;
    let log = pair.dr.log_text();
    assert!(
        log.contains("only the newest recovery point is kept")
            && log.contains(&pair.dir.path().join("replicas").display().to_string()),
        "{log}"
    );
    let st = pair.dr.status();
    assert_eq!(st.protections[0].consistent_gen, Some(gen));
    assert!(!pair.dir.path().join("replicas/.lifeboat-points").exists());
}

/// `lifeboat drill --check CHECK` at the DR site, in a thread (the check may wait for
/// the test).
fn drill_in_background(
    pair: &Pair,
    check: String,
) -> std::thread::JoinHandle<std::process::Output> {
    let config = pair.dr.config.clone();
    std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_lifeboat"))
            .args(["drill", "--protection", PROT, "--check", &check, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
}

#[test]
fn a_drill_checks_a_copy_of_the_point_while_gens_commit_and_leaves_nothing() {
    let (pair, _xfs) = keeping(3);
    let gen1 = pair.sync().gen;
    let at_gen1 = pair.volume_hashes();
    let out = pair.dir.path().join("drill-out");
    std::fs::create_dir(&out).unwrap();
    let go = out.join("go");
    // The check copies what it sees, writes into its copy, then waits for the test.
    let check = format!(
        "cp \"$LIFEBOAT_DRILL_VOLUME_V1\" {o}/v1.seen && echo gen=$LIFEBOAT_DRILL_GEN > {o}/env && printf DRILL | dd of=\"$LIFEBOAT_DRILL_VOLUME_V1\" conv=notrunc 2>/dev/null && while [ ! -e {go} ]; do sleep 0.05; done; echo checked",
        o = out.display(),
        go = go.display()
    );
    let drill = drill_in_background(&pair, check);
    let seen = out.join("v1.seen");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !out.join("env").exists() {
        assert!(std::time::Instant::now() < deadline, "the check never ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Replication goes on while the check runs: two gens commit.
    for seed in [41, 42] {
        pair.change_all(8, seed);
        pair.sync();
    }
    assert_eq!(
        pair.dr.status().protections[0].consistent_gen,
        Some(gen1 + 2)
    );
    std::fs::write(&go, b"").unwrap();
    let o = drill.join().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && text.contains("PASSED"), "{text}");
    assert!(
        text.contains("recovery time measured") && text.contains("| checked"),
        "{text}"
    );
    // The check saw gen 1's data (the newest point when the drill began).
    assert_eq!(b3(&seen), at_gen1[0]);
    assert_eq!(
        std::fs::read_to_string(out.join("env")).unwrap().trim(),
        format!("gen={gen1}")
    );
    // Its write reached no replica, point or primary volume.
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let root = pair.dir.path().join("replicas/.lifeboat-points").join(PROT);
    assert_eq!(point_hashes(&root, gen1), at_gen1);
    let mut head = [0u8; 5];
    for f in [pair.volume("v1"), pair.replica("v1")] {
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&f).unwrap(), &mut head, 0)
            .unwrap();
        assert_ne!(&head, b"DRILL", "{}", f.display());
    }
    // Nothing of the drill is left, and it is on record.
    let drills = pair.dir.path().join("replicas/.lifeboat-drills").join(PROT);
    assert_eq!(std::fs::read_dir(&drills).unwrap().count(), 0);
    let m = pair.dr.metrics();
    assert_eq!(
        metric(
            &m,
            &format!("lifeboat_drills_total{{protection=\"{PROT}\",result=\"passed\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            &format!("lifeboat_drill_last_success_timestamp_seconds{{protection=\"{PROT}\"}}")
        )
        .unwrap()
            > 0.0
    );

    // A failing check fails the drill (exit 1), and leaves nothing either.
    let (ok, out, err) = pair.dr.cli(&[
        "drill",
        "--protection",
        PROT,
        "--gen",
        &(gen1 + 1).to_string(),
        "--check",
        "echo broken; exit 3",
    ]);
    assert!(
        !ok && out.contains("FAILED") && out.contains("check exited 3") && out.contains("| broken"),
        "{out}{err}"
    );
    assert_eq!(std::fs::read_dir(&drills).unwrap().count(), 0);
    // A gen that is not kept is named.
    let (ok, out, err) = pair.dr.cli(&["drill", "--protection", PROT, "--gen", "99"]);
    assert!(!ok && (out + &err).contains("not a kept recovery point"));
}

#[test]
fn a_dr_daemon_killed_during_a_drill_sweeps_its_copies_at_restart() {
    let (mut pair, _xfs) = keeping(2);
    pair.sync();
    let go = pair.dir.path().join("go");
    let check = format!("while [ ! -e {} ]; do sleep 0.05; done", go.display());
    let drill = drill_in_background(&pair, check);
    let drills = pair.dir.path().join("replicas/.lifeboat-drills").join(PROT);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(&drills).map_or(0, |d| d.count()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the drill never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pair.dr.kill9();
    std::fs::write(&go, b"").unwrap();
    let o = drill.join().unwrap();
    assert!(
        !o.status.success(),
        "the drill cannot end without its daemon"
    );
    pair.dr.start();
    assert_eq!(
        std::fs::read_dir(&drills).unwrap().count(),
        0,
        "the restart swept the copies"
    );
    // Replication goes on (once the primary has noticed the old connection is gone).
    pair.change_all(4, 77);
    let synced = (0..5).any(|_| pair.try_sync().is_ok());
    assert!(synced);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}
