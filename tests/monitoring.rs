//! The shipped alert rules as Prometheus reads them: `promtool check rules` accepts
//! deploy/alerts.yaml, `promtool test rules` passes deploy/alerts_test.yaml, and that file
//! tests every alert (each firing, and quiet where it should be). And what the page shows
//! during a transfer: progress, pending bytes and an ETA.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}; install the Debian package prometheus (.ci/run does)")
        });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

fn yaml(name: &str) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(deploy().join(name)).unwrap()).unwrap()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_shipped_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() {
    let alerts: BTreeSet<String> = yaml("alerts.yaml")["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    let cases: Vec<Value> = yaml("alerts_test.yaml")["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap().clone())
        .collect();
    let with = |firing: bool| -> BTreeSet<String> {
        cases
            .iter()
            .filter(|c| {
                let n = c["exp_alerts"].as_array().map_or(0, |a| a.len());
                (n > 0) == firing
            })
            .map(|c| c["alertname"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(with(true), alerts, "alerts without a test that fires them");
    // A certificate alert's quiet case is the other certificate of the same test.
    let quiet: BTreeSet<String> = alerts
        .iter()
        .filter(|a| *a != "LifeboatCertificateExpiresSoon")
        .cloned()
        .collect();
    assert_eq!(
        with(false),
        quiet,
        "alerts without a test where they stay quiet"
    );
}

#[test]
fn a_running_transfer_shows_its_progress_pending_bytes_and_an_eta_then_clears() {
    let mut pair = support::Pair::new(support::PairOptions {
        volumes: vec![("v1", 16 << 20), ("v2", 16 << 20), ("v3", 16 << 20)],
        ..Default::default()
    });
    let sel = |n: &str| format!("{n}{{protection=\"{}\"}}", support::PROT);
    // Stopped in the middle of v2: v1 sent, v2 begun, v3 to come.
    pair.primary.stop();
    pair.primary.failpoint = Some("primary-sending:v2".into());
    pair.primary.start();
    let client = pair.primary.client();
    let cycle = std::thread::spawn(move || {
        client
            .post::<lifeboat::api::CycleReport>(&format!("/v1/protections/{}/sync", support::PROT))
    });
    pair.primary.wait_failpoint();
    let m = pair.primary.metrics();
    let get = |n: &str| support::metric(&m, &sel(n)).unwrap_or_else(|| panic!("{n} in\n{m}"));
    assert_eq!(get("lifeboat_cycle_running"), 1.0);
    let done = get("lifeboat_cycle_progress_bytes");
    let pending = get("lifeboat_cycle_pending_bytes");
    let total = (48u64 << 20) as f64;
    assert!(
        done >= (16 << 20) as f64 && done < (32 << 20) as f64,
        "{done}"
    );
    assert_eq!(done + pending, total);
    let eta = get("lifeboat_cycle_eta_seconds");
    assert!(eta.is_finite() && eta > 0.0, "{eta}");
    pair.primary.kill9();
    let _ = cycle.join();
    pair.primary.failpoint = None;
    pair.primary.start();
    pair.sync();
    let m = pair.primary.metrics();
    let get = |n: &str| support::metric(&m, &sel(n)).unwrap_or_else(|| panic!("{n} in\n{m}"));
    assert_eq!(get("lifeboat_cycle_running"), 0.0);
    assert_eq!(get("lifeboat_cycle_pending_bytes"), 0.0);
}
