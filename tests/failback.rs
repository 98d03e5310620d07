//! Failback and the relocate after it (local mode, two real daemons): the old primary
//! receives from the site it failed over to, resynced by hash exchange, with its own
//! writes after the last common gen reported and kept; `failover --planned` there brings
//! the application back with nothing lost, and replication goes on the original way.

mod support;

use std::collections::BTreeSet;

use lifeboat::api::{CycleReport, FailbackReport, FailoverReport};
use support::*;

/// A pair in which each site can reach the other: the primary listens too, and the DR
/// site knows the primary's address.
fn pair_both_ways() -> Pair {
    let back = free_udp();
    Pair::new(PairOptions {
        volumes: vec![("v1", 16 << 20), ("v2", 8 << 20)],
        primary_tail: format!("\n[listen]\naddress = \"127.0.0.1:{back}\"\n"),
        dr_tail: format!("\n[peer]\naddress = \"127.0.0.1:{back}\"\nserver_name = \"primary\"\n"),
        ..Default::default()
    })
}

fn dr_sync(pair: &Pair) -> Result<CycleReport, String> {
    pair.dr
        .client()
        .post::<CycleReport>(&format!("/v1/protections/{PROT}/sync"))
        .map_err(|e| format!("{e:#}"))
}

fn sent_bytes(site: &SiteProc) -> f64 {
    metric(
        &site.metrics(),
        &format!("lifeboat_sent_bytes_total{{protection=\"{PROT}\"}}"),
    )
    .unwrap_or(0.0)
}

fn json<T: serde::de::DeserializeOwned>(site: &SiteProc, args: &[&str]) -> T {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (ok, out, err) = site.cli(&all);
    assert!(
        ok,
        "lifeboat {args:?} failed: {err}\n--- {} log ---\n{}",
        site.name,
        site.log_text()
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn failback_resyncs_only_the_differences_keeps_the_fork_and_a_planned_failover_relocates() {
    let pair = pair_both_ways();
    pair.sync();
    pair.change_all(20, 1);
    assert_eq!(pair.sync().gen, 2);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());

    // The primary's site is lost for a while: fail over; the application writes at the DR
    // site, and the old primary takes writes of its own that never replicate (the fork).
    let f: FailoverReport = json(&pair.dr, &["failover", "--protection", PROT]);
    assert_eq!(f.recovered_gen, Some(2));
    let cs = pair.chunk_size;
    let mut changed = Vec::new();
    for (i, v) in pair.volumes.iter().enumerate() {
        let at_dr = scatter_writes(&pair.replica(v), 25, cs, 50 + i as u64);
        let forked = scatter_writes(&pair.volume(v), 10, cs, 70 + i as u64);
        changed.push((at_dr, forked));
    }
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("fenced") || err.contains("failed over"),
        "{err}"
    );
    let before_failback = pair.volume_hashes();

    let r: FailbackReport = json(&pair.primary, &["failback", "--protection", PROT]);
    let forked: u64 = changed.iter().map(|(_, f)| f.len() as u64).sum();
    assert_eq!(r.sender, "dr");
    assert_eq!(r.fork_gen, Some(2));
    assert_eq!(r.common_gen, Some(2));
    assert_eq!(r.discarded_chunks, forked, "{r:?}");
    assert!(
        r.done.iter().any(|l| l.starts_with(&format!(
            "{forked} chunks ({} bytes) written at primary after gen 2 are discarded",
            forked * cs
        ))),
        "{r:?}"
    );
    // The fork is kept whole, as the volumes were.
    for (v, want) in pair.volumes.iter().zip(&before_failback) {
        assert_eq!(&b3(std::path::Path::new(&r.kept[v])), want, "fork of {v}");
    }
    let (p, d) = (pair.primary.status(), pair.dr.status());
    assert_eq!(p.protections[0].role, "dr", "{p:?}");
    let dir = p.protections[0].direction.as_deref().unwrap();
    assert!(
        dir.contains("receives from dr") && dir.contains("discarded"),
        "{dir}"
    );
    assert_eq!(d.protections[0].role, "primary", "{d:?}");
    assert!(d.protections[0]
        .direction
        .as_deref()
        .unwrap()
        .contains("sends to primary"));
    // Asked again, failback changes nothing.
    let again: FailbackReport = json(&pair.primary, &["failback", "--protection", PROT]);
    assert_eq!(again.epoch, r.epoch);
    // Re-protect would restore the configured direction and drop the DR site's writes: it
    // is refused, naming the way back. The sending site has no replicas to verify.
    let (ok, _, err) = pair.primary.cli(&["reprotect", "--protection", PROT]);
    assert!(!ok && err.contains("failover --planned"), "{err}");
    let (ok, _, err) = pair.dr.cli(&["verify", "--protection", PROT]);
    assert!(!ok && err.contains("sends the protection now"), "{err}");

    // The former DR site sends: its first cycle (the scheduler may have run it already)
    // leaves the old primary's volumes equal to the application's data.
    let report = dr_sync(&pair).unwrap();
    assert!(report.gen >= 3, "{report:?}");
    assert_eq!(pair.volume_hashes(), pair.replica_hashes());
    // Only what differs travelled: the chunks changed at the DR site since the failover
    // and the divergent ones, never the volumes whole.
    let differing: u64 = changed.iter().map(|(a, b)| a.union(b).count() as u64).sum();
    let sent = sent_bytes(&pair.dr);
    assert!(sent > 0.0);
    assert!(
        sent <= 1.1 * (differing * cs) as f64,
        "failback sent {sent} chunk bytes for {differing} differing chunks of {cs}"
    );
    // A primary receiving refuses to sync itself, and says where sync runs.
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("receives protection") && err.contains("dr"),
        "{err}"
    );

    // More writes at the application's site, then the relocate: a final cycle from the DR
    // site, failover at the old primary, and the DR site fails back in turn.
    scatter_writes(&pair.replica("v1"), 15, cs, 90);
    let app = pair.replica_hashes();
    let dr_control = pair.dr.control.clone();
    let f: FailoverReport = json(
        &pair.primary,
        &[
            "failover",
            "--protection",
            PROT,
            "--planned",
            "--primary",
            &dr_control,
        ],
    );
    assert!(f.problems.is_empty(), "{f:?}");
    assert_eq!(pair.volume_hashes(), app, "the relocate lost writes");
    let last = f.steps.last().unwrap();
    assert!(
        last.what
            .contains("the old primary failed back: it receives p from now on (0 chunks"),
        "{f:?}"
    );
    let (p, d) = (pair.primary.status(), pair.dr.status());
    assert_eq!(p.protections[0].role, "primary", "{p:?}");
    assert_eq!(d.protections[0].role, "dr", "{d:?}");
    // The old primary's fork stays named after the relocate turned it to sending.
    let dir = p.protections[0].direction.as_deref().unwrap();
    assert!(dir.contains(&r.kept["v1"]), "{dir}");
    assert!(d.protections[0].epoch > r.epoch);

    // Replication goes on in the original direction.
    pair.change_all(10, 7);
    let report = pair.sync();
    assert!(report.gen > f.recovered_gen.unwrap(), "{report:?}");
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let fork_dirs: BTreeSet<_> = r
        .kept
        .values()
        .map(|k| std::path::Path::new(k).parent().unwrap().to_path_buf())
        .collect();
    assert!(
        fork_dirs.iter().all(|d| d.exists()),
        "a fork is the operator's to remove"
    );
}

#[test]
fn failback_needs_a_failed_over_peer_and_a_way_back() {
    let pair = pair_both_ways();
    pair.sync();
    // Nothing failed over: the DR site refuses, and nothing changes at either site.
    let (ok, _, err) = pair.primary.cli(&["failback", "--protection", PROT]);
    assert!(!ok);
    assert!(err.contains("not failed over"), "{err}");
    pair.change_all(5, 3);
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    // The DR site does not fail back: it receives the protection.
    let (ok, _, err) = pair.dr.cli(&["failback", "--protection", PROT]);
    assert!(!ok);
    assert!(
        err.contains("no [peer]") || err.contains("receives protection"),
        "{err}"
    );
}

/// Fails the pair over and writes at both sites; returns the old primary's volumes as
/// they were before the failback.
fn fail_over_and_fork(pair: &Pair) -> Vec<String> {
    pair.sync();
    let _: FailoverReport = json(&pair.dr, &["failover", "--protection", PROT]);
    for (i, v) in pair.volumes.iter().enumerate() {
        scatter_writes(&pair.replica(v), 25, pair.chunk_size, 10 + i as u64);
        scatter_writes(&pair.volume(v), 10, pair.chunk_size, 20 + i as u64);
    }
    pair.volume_hashes()
}

fn dr_sync_in_background(pair: &Pair) -> std::thread::JoinHandle<Result<CycleReport, String>> {
    let client = pair.dr.client();
    std::thread::spawn(move || {
        client
            .post::<CycleReport>(&format!("/v1/protections/{PROT}/sync"))
            .map_err(|e| format!("{e:#}"))
    })
}

#[test]
fn the_old_primary_killed_in_the_first_cycle_after_failback_is_never_torn_and_the_next_run_completes(
) {
    let mut pair = pair_both_ways();
    let forked = fail_over_and_fork(&pair);
    // Killed while the first cycle is only staged: its volumes stay as they were.
    pair.primary.stop();
    pair.primary.failpoint = Some("dr-staging:v2".into());
    pair.primary.start();
    let _: FailbackReport = json(&pair.primary, &["failback", "--protection", PROT]);
    let pending = dr_sync_in_background(&pair);
    pair.primary.wait_failpoint();
    pair.primary.kill9();
    let _ = pending.join().unwrap();
    assert_eq!(pair.volume_hashes(), forked, "staging touched the volumes");
    pair.primary.failpoint = None;
    pair.primary.start();
    assert_eq!(
        pair.volume_hashes(),
        forked,
        "restart must discard the staged gen"
    );

    // Killed while applying the committed gen: the restart finishes it.
    pair.primary.stop();
    pair.primary.failpoint = Some("dr-applying:v2".into());
    pair.primary.start();
    let pending = dr_sync_in_background(&pair);
    pair.primary.wait_failpoint();
    pair.primary.kill9();
    assert!(
        pending.join().unwrap().is_err(),
        "no acknowledgement was sent"
    );
    pair.primary.failpoint = None;
    pair.primary.start();
    assert_eq!(
        pair.volume_hashes(),
        pair.replica_hashes(),
        "the committed gen is redone at restart"
    );
    let r = dr_sync(&pair).unwrap();
    assert_eq!(pair.volume_hashes(), pair.replica_hashes(), "{r:?}");
    assert_eq!(pair.primary.status().protections[0].role, "dr");
}

#[test]
fn the_new_sender_killed_in_its_first_cycle_after_failback_resumes_and_completes() {
    let mut pair = pair_both_ways();
    let forked = fail_over_and_fork(&pair);
    pair.dr.stop();
    pair.dr.failpoint = Some("primary-sending:v2".into());
    pair.dr.start();
    let _: FailbackReport = json(&pair.primary, &["failback", "--protection", PROT]);
    // The turn wakes the new sender's scheduler: its first cycle stops at the failpoint.
    pair.dr.wait_failpoint();
    pair.dr.kill9();
    assert_eq!(
        pair.volume_hashes(),
        forked,
        "a cut cycle changed the volumes"
    );
    pair.dr.failpoint = None;
    pair.dr.start();
    let r = dr_sync(&pair).unwrap();
    assert_eq!(pair.volume_hashes(), pair.replica_hashes(), "{r:?}");
    let (p, d) = (pair.primary.status(), pair.dr.status());
    assert_eq!(
        (
            p.protections[0].role.as_str(),
            d.protections[0].role.as_str()
        ),
        ("dr", "primary")
    );
}
