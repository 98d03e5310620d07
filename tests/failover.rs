//! Failover fences the old primary; metrics reflect cycles.

mod support;

use std::process::Command;
use std::time::Instant;

use lifeboat::api::{FailoverReport, SiteStatus};
use support::*;

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn after_failover_the_old_primary_is_refused_and_the_replica_is_untouched() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20)],
        ..Default::default()
    });
    pair.sync();
    let at_failover = pair.replica_hashes();
    let (ok, out, err) = cli(&[
        "failover",
        "--config",
        pair.dr.config.to_str().unwrap(),
        "--protection",
        PROT,
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let report: FailoverReport = serde_json::from_str(&out).unwrap();
    assert_eq!(report.recovered_gen, Some(1));
    assert_eq!(report.epoch, 2);
    assert!(!report.already_failed_over);

    scatter_writes(&pair.volume("v1"), 30, pair.chunk_size, 3);
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("fenced") && err.contains("epoch 2"), "{err}");
    assert_eq!(
        pair.replica_hashes(),
        at_failover,
        "the replica changed after failover"
    );

    // Both sides say why, in text and JSON.
    let (ok, out, _) = cli(&[
        "status",
        "--config",
        pair.primary.config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(ok);
    let p: SiteStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(p.protections[0].role, "fenced");
    assert!(
        p.protections[0]
            .stopped_because
            .as_deref()
            .unwrap()
            .contains("failed over"),
        "{p:?}"
    );
    let d = pair.dr.status();
    assert_eq!(d.protections[0].role, "failed-over");
    assert!(
        d.protections[0]
            .last_refusal
            .as_ref()
            .unwrap()
            .message
            .contains("refused replication from primary"),
        "{d:?}"
    );
    let (_, text, _) = cli(&["status", "--config", pair.dr.config.to_str().unwrap()]);
    assert!(
        text.contains("failed-over") && text.contains("replication stopped"),
        "{text}"
    );

    // A fenced primary stays fenced across restarts.
    let mut pair = pair;
    pair.primary.stop();
    pair.primary.start();
    assert!(pair.try_sync().unwrap_err().contains("fenced"));
    // Failing over again is reported, not repeated.
    let (ok, out, _) = cli(&[
        "failover",
        "--config",
        pair.dr.config.to_str().unwrap(),
        "--protection",
        PROT,
    ]);
    assert!(ok);
    assert!(out.contains("already failed over"), "{out}");
}

#[test]
fn failover_works_with_the_dr_daemon_stopped() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 4 << 20)],
        ..Default::default()
    });
    pair.sync();
    pair.dr.stop();
    let (ok, out, err) = cli(&[
        "failover",
        "--config",
        pair.dr.config.to_str().unwrap(),
        "--protection",
        PROT,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("recovered gen 1"), "{out}");
    assert!(err.contains("not reachable"), "{err}");
    pair.dr.start();
    assert!(pair.try_sync().unwrap_err().contains("fenced"));
}

#[test]
fn metrics_reflect_a_cycle() {
    let started = Instant::now();
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20)],
        ..Default::default()
    });
    let r = pair.sync();
    let p = pair.primary.metrics();
    let sel = |name: &str| format!("{name}{{protection=\"{PROT}\"}}");
    assert_eq!(
        metric(&p, &sel("lifeboat_sent_bytes_total")),
        Some(r.chunk_bytes_sent as f64),
        "{p}"
    );
    assert_eq!(
        metric(&p, &sel("lifeboat_scanned_bytes_total")),
        Some((8 << 20) as f64)
    );
    assert_eq!(
        metric(&p, &sel("lifeboat_changed_bytes_total")),
        Some((8 << 20) as f64)
    );
    assert_eq!(
        metric(&p, &sel("lifeboat_chunks_sent_total")),
        Some(r.chunks_sent as f64)
    );
    assert_eq!(metric(&p, &sel("lifeboat_epoch")), Some(1.0));
    assert_eq!(metric(&p, &sel("lifeboat_consistent_gen")), Some(1.0));
    assert_eq!(
        metric(&p, "lifeboat_peer_connected{peer=\"dr\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &p,
            &format!("lifeboat_cycles_total{{protection=\"{PROT}\",result=\"ok\"}}")
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &p,
            &format!("lifeboat_cycle_phase_seconds{{phase=\"transfer\",protection=\"{PROT}\"}}")
        )
        .is_some(),
        "{p}"
    );
    let d = pair.dr.metrics();
    let rpo = metric(&d, &sel("lifeboat_rpo_seconds")).expect("RPO gauge at the DR site");
    assert!(
        rpo >= 0.0 && rpo <= started.elapsed().as_secs_f64(),
        "rpo {rpo}"
    );
    assert_eq!(
        metric(&d, &sel("lifeboat_rpo_target_seconds")),
        Some(7200.0)
    );
    assert!(
        metric(&d, &sel("lifeboat_received_bytes_total")).unwrap() >= r.chunk_bytes_sent as f64
    );
    for line in p.lines().chain(d.lines()).filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("lifeboat_"), "foreign metric {line}");
        assert!(!line.contains("PRIVATE KEY"), "secret in metrics");
    }
    let health = pair.primary.client().get_text("/healthz").unwrap();
    assert_eq!(health.trim(), "ok");
}

#[test]
fn a_failing_pre_command_takes_no_snapshot_and_says_which_command() {
    let pair = Pair::new(PairOptions {
        primary_protection: "pre = [\"echo database busy >&2; exit 3\"]",
        ..Default::default()
    });
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("exited with 3") && err.contains("database busy"),
        "{err}"
    );
    let st = pair.primary.status();
    assert_eq!(
        st.protections[0].last_error.as_ref().unwrap().kind.as_str(),
        "hook"
    );
    assert!(
        !pair.snapshot(1, "v1").exists(),
        "a snapshot was taken after a failed pre command"
    );
    assert_eq!(pair.dr.status().protections[0].consistent_gen, None);
}
