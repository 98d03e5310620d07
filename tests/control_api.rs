//! The control API authenticates its callers: with `[[control.client]]` configured, a call
//! without a known bearer token gets 401, a caller below the level a call needs gets 403,
//! and neither changes anything (epoch, replicas, the consistent gen). The CLI sends the
//! token of `--token-file`, or with `--config` the config's own admin token. A
//! non-loopback control address without callers, and a token file open to others, are
//! refused by `check-config`.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use support::{Pair, PairOptions, PROT};

const READ: &str = "read-token-9f8e7d6c5b4a39281706";
const OPERATE: &str = "operate-token-1a2b3c4d5e6f7a8b9c0d";
const ADMIN: &str = "admin-token-0f1e2d3c4b5a69788796";

const CALLERS: [(&str, &str, &str); 3] = [
    ("prometheus", "read", READ),
    ("ci", "operate", OPERATE),
    ("oncall", "admin", ADMIN),
];

/// The three callers, as a config's tail; their token files `PREFIX-NAME.token` are
/// relative to the config's directory.
fn callers(prefix: &str) -> String {
    let mut tail = String::new();
    for (name, level, _) in CALLERS {
        tail += &format!(
            "\n[[control.client]]\nname = \"{name}\"\nlevel = \"{level}\"\ntoken_file = \"{prefix}-{name}.token\"\n"
        );
    }
    tail
}

/// Writes the callers' token files for `prefix` into `dir`, 0600.
fn write_tokens(dir: &Path, prefix: &str) {
    for (name, _, token) in CALLERS {
        let file = dir.join(format!("{prefix}-{name}.token"));
        fs::write(&file, format!("{token}\n")).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// One raw HTTP call: the status code and the body.
fn call(method: &str, addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let mut req = match method {
        "GET" => ureq::http::Request::get(url),
        _ => ureq::http::Request::post(url),
    };
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = agent.run(req.body(()).unwrap()).unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

fn lifeboat(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .env_remove("LIFEBOAT_TOKEN_FILE")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn authenticated_pair() -> Pair {
    let mut pair = Pair::new(PairOptions {
        start: false,
        primary_tail: callers("p"),
        dr_tail: callers("d"),
        ..Default::default()
    });
    write_tokens(pair.dir.path(), "p");
    write_tokens(pair.dir.path(), "d");
    pair.primary.token = Some(ADMIN.into());
    pair.dr.token = Some(ADMIN.into());
    pair.start();
    pair
}

#[test]
fn calls_without_a_token_or_below_their_level_are_refused_and_change_nothing() {
    let pair = authenticated_pair();
    pair.sync();
    let (p, d) = (pair.primary.control.as_str(), pair.dr.control.as_str());
    let before = pair.dr.status().protections[0].clone();
    let replicas = pair.replica_hashes();

    let manifests = format!("/v1/protections/{PROT}/manifests?secrets=true");
    let state_changing = [
        ("POST", p, format!("/v1/protections/{PROT}/sync")),
        ("POST", p, format!("/v1/protections/{PROT}/quiesce")),
        ("POST", d, format!("/v1/protections/{PROT}/failover")),
        ("POST", d, format!("/v1/protections/{PROT}/reprotect")),
        ("POST", p, format!("/v1/protections/{PROT}/reprotect")),
        ("GET", d, manifests.clone()),
    ];
    for (m, addr, path) in &state_changing {
        for token in [None, Some("not-a-token-anyone-has-0000")] {
            let (code, body) = call(m, addr, path, token);
            assert_eq!(code, 401, "{m} {path} with {token:?}: {body}");
            assert!(body.contains("unauthenticated"), "{body}");
        }
    }
    // Reading needs a token too; the probes do not.
    for path in ["/metrics", "/v1/status"] {
        assert_eq!(call("GET", d, path, None).0, 401, "{path}");
        assert_eq!(call("GET", d, path, Some(READ)).0, 200, "{path}");
    }
    assert_eq!(call("GET", d, "/healthz", None), (200, "ok\n".into()));
    assert_eq!(call("GET", d, "/readyz", None), (200, "ready\n".into()));

    // Wrong level: 403 naming the caller, its level and the level needed.
    let (code, body) = call(
        "POST",
        p,
        &format!("/v1/protections/{PROT}/sync"),
        Some(READ),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("caller \\\"prometheus\\\" has level read; this request needs operate"),
        "{body}"
    );
    for (m, addr, path) in &state_changing[1..] {
        for token in [READ, OPERATE] {
            let (code, body) = call(m, addr, path, Some(token));
            assert_eq!(code, 403, "{m} {path}: {body}");
            assert!(body.contains("this request needs admin"), "{body}");
        }
    }

    // Asking for Secrets with the query percent-encoded is the same request.
    for q in ["secr%65ts=true", "secrets=%74rue"] {
        let path = format!("/v1/protections/{PROT}/manifests?{q}");
        let (code, body) = call("GET", d, &path, Some(READ));
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("need level admin"), "{body}");
    }

    // Nothing changed at either site.
    let after = pair.dr.status().protections[0].clone();
    assert_eq!(
        (after.epoch, after.consistent_gen, after.role.as_str()),
        (before.epoch, before.consistent_gen, before.role.as_str())
    );
    assert_eq!(pair.replica_hashes(), replicas);
    assert_eq!(pair.primary.status().protections[0].epoch, before.epoch);

    // The right levels work: operate syncs, admin fails over (a dry run).
    let (code, body) = call(
        "POST",
        p,
        &format!("/v1/protections/{PROT}/sync"),
        Some(OPERATE),
    );
    assert_eq!(code, 200, "{body}");
    let dry = format!("/v1/protections/{PROT}/failover?dry_run=true");
    let (code, body) = call("POST", d, &dry, Some(ADMIN));
    assert_eq!(code, 200, "{body}");
    assert_eq!(pair.dr.status().protections[0].epoch, before.epoch);

    // Each state-changing call is logged once with its caller; refusals name theirs;
    // no token reaches a log.
    let plog = pair.primary.log_text();
    let dlog = pair.dr.log_text();
    let sync_calls = plog
        .lines()
        .filter(|l| l.contains("control call") && !l.contains("refused") && l.contains("caller=ci"))
        .count();
    assert_eq!(sync_calls, 1, "{plog}");
    assert!(
        dlog.lines().any(|l| l.contains("control call")
            && l.contains("caller=oncall")
            && l.contains("status=200")),
        "{dlog}"
    );
    assert!(dlog.contains("control call refused"), "{dlog}");
    for token in [READ, OPERATE, ADMIN, "not-a-token-anyone-has-0000"] {
        assert!(
            !plog.contains(token) && !dlog.contains(token),
            "a token reached a log"
        );
    }
}

#[test]
fn readyz_says_why_only_to_a_caller_with_a_token() {
    let pair = authenticated_pair();
    pair.sync();
    // After a failover the old primary's next cycle is fenced: not ready, for a reason.
    let (code, body) = call(
        "POST",
        &pair.dr.control,
        &format!("/v1/protections/{PROT}/failover"),
        Some(ADMIN),
    );
    assert_eq!(code, 200, "{body}");
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("fenced"), "{err}");
    let p = pair.primary.control.as_str();
    let (code, body) = call("GET", p, "/readyz", None);
    assert_eq!((code, body.as_str()), (503, "not ready\n"));
    let (code, body) = call("GET", p, "/readyz", Some(READ));
    assert_eq!(code, 503);
    assert!(
        body.starts_with("not ready: ") && body.contains("fenced"),
        "{body}"
    );
}

#[test]
fn the_cli_sends_the_token_of_its_file_or_of_its_config() {
    let pair = authenticated_pair();
    let p = pair.primary.control.clone();
    let sync = ["sync", "--control", &p, "--protection", PROT];

    let (ok, _, err) = lifeboat(&sync, &[]);
    assert!(!ok, "sync without a token succeeded");
    assert!(err.contains("unauthenticated"), "{err}");

    let dir = pair.dir.path().to_path_buf();
    let read = tempfile::NamedTempFile::new_in(&dir).unwrap();
    fs::write(read.path(), READ).unwrap();
    let read_path = read.path().to_str().unwrap();
    let (ok, _, err) = lifeboat(&[&sync[..], &["--token-file", read_path]].concat(), &[]);
    assert!(!ok);
    assert!(err.contains("this request needs operate"), "{err}");
    // Status needs only read, from the flag or the environment.
    let (ok, out, err) = lifeboat(&["status", "--control", &p, "--token-file", read_path], &[]);
    assert!(ok, "{err}");
    assert!(out.contains(PROT), "{out}");
    let (ok, _, err) = lifeboat(
        &["status", "--control", &p],
        &[("LIFEBOAT_TOKEN_FILE", read_path)],
    );
    assert!(ok, "{err}");

    // --config: the config's admin token, so the operator at the site needs no flag.
    let cfg = pair.primary.config.to_str().unwrap();
    let (ok, out, err) = lifeboat(&["sync", "--config", cfg, "--protection", PROT], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("gen 1"), "{out}");
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());

    let (ok, _, err) = lifeboat(
        &[&sync[..], &["--token-file", "/nonexistent/token"]].concat(),
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("--token-file: cannot read /nonexistent/token"),
        "{err}"
    );
}

#[test]
fn check_config_refuses_an_open_api_off_loopback_and_loose_or_shared_tokens() {
    let pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    let cfg = pair.dr.config.clone();
    let text = fs::read_to_string(&cfg).unwrap();
    let open = text.replacen("address = \"127.0.0.1:", "address = \"0.0.0.0:", 2);
    // The first [listen] address stays loopback; the control address is the second.
    let open = open.replacen("address = \"0.0.0.0:", "address = \"127.0.0.1:", 1);
    fs::write(&cfg, &open).unwrap();
    let path = cfg.to_str().unwrap();
    let (ok, _, err) = lifeboat(&["check-config", path], &[]);
    assert!(!ok);
    assert!(
        err.contains("control.address: 0.0.0.0:")
            && err.contains("is not a loopback address and no [[control.client]] is configured"),
        "{err}"
    );

    let dir = pair.dir.path();
    write_tokens(dir, "d");
    fs::write(&cfg, format!("{open}{}", callers("d"))).unwrap();
    let (ok, out, err) = lifeboat(&["check-config", path], &[]);
    assert!(ok, "{err}");
    assert!(out.contains(": ok"), "{out}");

    let token = dir.join("d-ci.token");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = lifeboat(&["check-config", path], &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "control.client[1].token_file: {} has mode 0644, open to group or others",
            token.display()
        )),
        "{err}"
    );
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();

    fs::write(&token, ADMIN).unwrap();
    let (ok, _, err) = lifeboat(&["check-config", path], &[]);
    assert!(!ok);
    assert!(
        err.contains(
            "control.client[2].token_file: holds the same token as control.client[1].token_file"
        ),
        "{err}"
    );
    fs::write(&token, "short").unwrap();
    let (ok, _, err) = lifeboat(&["check-config", path], &[]);
    assert!(!ok);
    assert!(err.contains("does not hold a token"), "{err}");
    let (ok, _, err) = lifeboat(&["run", "--config", path], &[]);
    assert!(!ok);
    assert!(err.contains("control.client[1].token_file"), "{err}");
}
