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
