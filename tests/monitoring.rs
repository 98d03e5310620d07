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

/// The metric names the daemon registers (src/metrics.rs), with a histogram's series.
fn registered() -> BTreeSet<String> {
    let src =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
            .unwrap();
    let name = regex::Regex::new(r#"(Histogram)?Opts::new\("(lifeboat_[a-z_]+)""#).unwrap();
    let mut out = BTreeSet::new();
    for c in name.captures_iter(&src) {
        let n = c[2].to_string();
        if c.get(1).is_some() {
            for s in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{n}{s}"));
            }
        }
        out.insert(n);
    }
    assert!(out.len() > 20, "{out:?}");
    out
}

#[test]
fn every_grafana_panel_queries_series_the_daemon_exports_in_valid_promql() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    let known = registered();
    let ident = regex::Regex::new(r"lifeboat_[a-z_]+").unwrap();
    for e in &exprs {
        let used: Vec<&str> = ident.find_iter(e).map(|m| m.as_str()).collect();
        assert!(!used.is_empty(), "{e}: queries no lifeboat series");
        for m in used {
            assert!(
                known.contains(m),
                "{e}: {m} is not a series lifeboat exports"
            );
        }
    }
    // The page covers what matters most: RPO, pending bytes, points, certificates.
    for must in [
        "lifeboat_rpo_seconds",
        "lifeboat_cycle_pending_bytes",
        "lifeboat_recovery_points",
        "lifeboat_certificate_expiry_timestamp_seconds",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(must)),
            "no panel shows {must}"
        );
    }
    // Each query parses as PromQL: promtool checks them as recording rules.
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": e}))
        .collect();
    let file = dir.path().join("dashboard-rules.json");
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Debian's `prometheus` on loopback, scraping `targets` every second and evaluating
/// `rules` every second; stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    api: lifeboat::api::client::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[&str], rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": "lifeboat", "static_configs": [{"targets": targets}]}],
        });
        std::fs::write(dir.path().join("prometheus.yml"), config.to_string()).unwrap();
        let child = Command::new("prometheus")
            .current_dir(dir.path())
            .arg("--config.file=prometheus.yml")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus: {e}; install the Debian package prometheus"));
        let p = Prometheus {
            child,
            api: lifeboat::api::client::Client::at(&format!("127.0.0.1:{port}")),
            _dir: dir,
        };
        p.until("every target up", || {
            let up = p.query("up == 1").ok()?;
            (up.len() == targets.len()).then_some(())
        });
        p
    }

    /// The instant vector of `q`, as Prometheus's HTTP API answers it (an error while it
    /// starts).
    fn query(&self, q: &str) -> anyhow::Result<Vec<Value>> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let v: Value = self.api.get(&format!("/api/v1/query?query={enc}"))?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    fn value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .ok()?
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
    }

    fn until<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_sees_the_rpo_grow_while_the_primary_is_dead_and_the_alerts_fire() {
    let mut pair = support::Pair::new(support::PairOptions {
        dr_protection: "rpo_target = \"2s\"".into(),
        ..Default::default()
    });
    pair.sync();
    // The shipped rules, with their `for` shortened so that a test sees them fire.
    let rules = std::fs::read_to_string(deploy().join("alerts.yaml")).unwrap();
    let rules = regex::Regex::new(r"for: \d+m")
        .unwrap()
        .replace_all(&rules, "for: 1s")
        .into_owned();
    let (primary, dr) = (pair.primary.control.clone(), pair.dr.control.clone());
    let prom = Prometheus::start(&[&primary, &dr], &rules);
    let firing = |alert: &str, instance: &str| {
        prom.query(&format!(
            "ALERTS{{alertname=\"{alert}\", alertstate=\"firing\", instance=\"{instance}\"}}"
        ))
        .is_ok_and(|v| v.len() == 1)
    };

    // The DR site goes down: the primary's link alert fires.
    pair.dr.kill9();
    prom.until("LifeboatPeerDisconnected fires at the primary", || {
        firing("LifeboatPeerDisconnected", &primary).then_some(())
    });
    pair.dr.start();
    pair.sync();

    // The primary dies: at the DR site the RPO keeps growing, past its target.
    pair.primary.kill9();
    let rpo = |p: &Prometheus| {
        p.value(&format!(
            "lifeboat_rpo_seconds{{instance=\"{dr}\", protection=\"{}\"}}",
            support::PROT
        ))
    };
    let first = prom.until("an RPO sample after the kill", || rpo(&prom));
    prom.until("the RPO grows while the primary is dead", || {
        rpo(&prom).filter(|r| *r >= first + 3.0)
    });
    prom.until("LifeboatRpoTargetMissed fires at the DR site", || {
        firing("LifeboatRpoTargetMissed", &dr).then_some(())
    });

    // Failover: the DR site's epoch moves on, seen by Prometheus.
    let (ok, _, err) = pair.dr.cli(&["failover", "--protection", support::PROT]);
    assert!(ok, "{err}");
    prom.until("the failed-over epoch is scraped", || {
        prom.value(&format!("lifeboat_epoch{{instance=\"{dr}\"}}"))
            .filter(|e| *e == 2.0)
    });
}
