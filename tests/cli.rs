//! The command line as a user meets it: help, config checking, certificates, and errors
//! that name what is wrong.

use std::process::Command;

fn lifeboat(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_names_every_command_and_points_new_users_at_the_demo() {
    let (code, out, _) = lifeboat(&["--help"]);
    assert_eq!(code, 0);
    for cmd in [
        "run",
        "status",
        "sync",
        "failover",
        "certs",
        "check-config",
        "demo",
    ] {
        assert!(out.contains(cmd), "--help lacks {cmd}:\n{out}");
    }
    assert!(out.contains("lifeboat demo"));
}

#[test]
fn check_config_accepts_the_examples_and_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/dr.toml")).unwrap();
    let path = dir.path().join("dr.toml");
    std::fs::write(&path, &good).unwrap();
    let (code, out, err) = lifeboat(&["check-config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (dr site"), "{out}");

    let bad = good
        .replace("rpo_target = \"2m\"", "rpo_target = \"2 fortnights\"")
        .replace("0.0.0.0:7420", "0.0.0.0:port");
    std::fs::write(&path, bad).unwrap();
    let (code, _, err) = lifeboat(&["check-config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("protection[0].rpo_target")
            && err.contains("listen.address")
            && err.contains("2 problem"),
        "{err}"
    );

    let (code, _, err) = lifeboat(&["check-config", "/nonexistent/lifeboat.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/lifeboat.toml"), "{err}");
}

#[test]
fn certs_makes_a_pair_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let (code, out, err) = lifeboat(&["certs", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("site primary") && out.contains("site dr"),
        "{out}"
    );
    for f in [
        "ca.pem",
        "ca.key",
        "primary.pem",
        "primary.key",
        "dr.pem",
        "dr.key",
    ] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    let (code, _, err) = lifeboat(&["certs", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("never overwrites"), "{err}");
    let (code, _, err) = lifeboat(&[
        "certs",
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--site",
        "bad/name",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("bad/name"), "{err}");
}

#[test]
fn commands_that_need_a_daemon_say_which_one_they_could_not_reach() {
    let (code, _, err) = lifeboat(&["status", "--control", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("not reachable at http://127.0.0.1:1"), "{err}");
    let (code, _, err) = lifeboat(&["status"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--config FILE or --control HOST:PORT"),
        "{err}"
    );
}

#[test]
fn the_demo_passes_all_its_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = lifeboat(&[
        "demo",
        "--size",
        "32MiB",
        "--cycles",
        "2",
        "--dir",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("all checks passed"), "{out}");
    assert!(
        out.contains("gen 1 in"),
        "the initial sync is not reported: {out}"
    );
    assert_eq!(out.matches("[ok]").count(), 4, "{out}");
}
