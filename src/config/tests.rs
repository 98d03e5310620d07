use super::*;

const GOOD: &str = r#"
[site]
name = "primary"
role = "primary"
state_dir = "state"
[tls]
ca = "certs/ca.pem"
cert = "certs/primary.pem"
key = "certs/primary.key"
[peer]
address = "127.0.0.1:7420"
server_name = "dr"
[[protection]]
name = "pg"
interval = "30s"
chunk_size = "64KiB"
[[protection.volume]]
name = "data"
path = "/srv/pg.img"
"#;

#[test]
fn good_config_resolves_relative_paths_and_defaults() {
    let c = parse(GOOD, Path::new("/etc/lifeboat/primary.toml")).unwrap();
    assert_eq!(c.state_dir, Path::new("/etc/lifeboat/state"));
    let p = &c.protections[0];
    assert_eq!(p.interval, Duration::from_secs(30));
    assert_eq!(p.rpo_target, Duration::from_secs(60));
    assert_eq!(p.chunk_size, 65536);
    assert_eq!(p.snapshot_dir, Path::new("/etc/lifeboat/state/snapshots"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let bad = GOOD
        .replace("\"30s\"", "\"soon\"")
        .replace("\"64KiB\"", "\"3KiB\"")
        .replace("role = \"primary\"", "role = \"leader\"");
    let err = parse(&bad, Path::new("x.toml")).unwrap_err();
    let keys = err.keys();
    assert!(
        keys.contains(&"protection[0].interval".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"protection[0].chunk_size".to_string()),
        "{keys:?}"
    );
    assert!(keys.contains(&"site.role".to_string()), "{keys:?}");
}

/// A DR config in a temporary directory, with `volumes` as (protection, path) pairs.
fn dr_config(dir: &Path, volumes: &[(&str, &str)]) -> PathBuf {
    let mut text = String::from(
        "[site]\nname = \"dr\"\nrole = \"dr\"\nstate_dir = \"state\"\n[tls]\nca = \"ca.pem\"\ncert = \"dr.pem\"\nkey = \"dr.key\"\n",
    );
    for (prot, path) in volumes {
        text += &format!("[[protection]]\nname = \"{prot}\"\n[[protection.volume]]\nname = \"v\"\npath = \"{path}\"\n");
    }
    let file = dir.join("dr.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn a_replica_named_twice_is_refused_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dr_config(
        dir.path(),
        &[("a", "replicas/r.img"), ("b", "replicas/../replicas/r.img")],
    );
    let err = load(&file).unwrap_err();
    assert_eq!(err.keys(), ["protection[1].volume[0].path"], "{err}");
    assert!(
        err.to_string().contains(
            "protection[1].volume[0].path: \"replicas/../replicas/r.img\" is the same file as protection[0].volume[0].path \"replicas/r.img\""
        ),
        "{err}"
    );
    // Different files are fine.
    let file = dr_config(
        dir.path(),
        &[("a", "replicas/r.img"), ("b", "replicas/s.img")],
    );
    load(&file).unwrap();
}

#[test]
fn a_replica_reached_through_a_symlink_is_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("replicas")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("replicas"), dir.path().join("link")).unwrap();
    let file = dr_config(dir.path(), &[("a", "replicas/r.img"), ("b", "link/r.img")]);
    let err = load(&file).unwrap_err();
    assert_eq!(err.keys(), ["protection[1].volume[0].path"], "{err}");
    let real = paths::resolve(&dir.path().join("replicas/r.img"));
    assert!(
        err.to_string()
            .contains(&format!("(both are {})", real.display())),
        "{err}"
    );
}

#[test]
fn a_key_open_to_others_is_a_problem_for_run_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dr_config(dir.path(), &[("a", "replicas/r.img")]);
    let key = dir.path().join("dr.key");
    std::fs::write(&key, "not a key").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = load_for_run(&file).unwrap_err();
    assert_eq!(err.keys(), ["tls.key"], "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{} has mode 0640", key.display())),
        "{msg}"
    );
    assert!(msg.contains("expected 0600 or stricter"), "{msg}");
    // Commands that only read the config's values still work.
    load(&file).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    load_for_run(&file).unwrap();
}

#[test]
fn the_default_keeps_a_day_at_the_interval_and_keep_for_fills_its_window() {
    let keep = |lines: &str| {
        let text = GOOD.replace("interval = \"30s\"", lines);
        let p = parse(&text, Path::new("/etc/lifeboat/dr.toml")).unwrap();
        let k = p.protections[0].keep;
        (k.count, k.window.map(|w| w.as_secs()), k.by_default)
    };
    let day = Some(24 * 3600);
    // Every cycle of the day, or one an hour when that is too many.
    // The newest 12 whole, and over the day every cycle or one an hour.
    assert_eq!(keep("interval = \"2h\""), (24, day, true));
    assert_eq!(keep("interval = \"1h\""), (36, day, true));
    assert_eq!(keep("interval = \"30s\""), (36, day, true));
    assert_eq!(keep("keep = 5"), (5, None, false));
    assert_eq!(
        keep("keep_for = \"1h\"\ninterval = \"30s\""),
        (120, Some(3600), false)
    );
    assert_eq!(keep("keep_for = \"30d\""), (1000, Some(30 * 86400), false));
    assert_eq!(
        keep("keep = 24\nkeep_for = \"48h\""),
        (24, Some(48 * 3600), false)
    );
    let text = GOOD.replace("chunk_size = \"64KiB\"", "apply_delay = \"15m\"");
    let p = parse(&text, Path::new("/etc/lifeboat/dr.toml")).unwrap();
    assert_eq!(p.protections[0].apply_delay, Some(Duration::from_secs(900)));
    // Every point of the delay (30 at 30 s) and two more stay whole.
    assert_eq!(p.protections[0].keep.recent, 32);
}
