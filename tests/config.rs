//! Every example config parses; every malformed config names the offending key.

use std::path::Path;

use lifeboat::config::{parse, ConfigError};

const BASE: &str = r#"
[site]
name = "primary"
role = "primary"
state_dir = "state"
[tls]
ca = "ca.pem"
cert = "p.pem"
key = "p.key"
[peer]
address = "127.0.0.1:7420"
server_name = "dr"
[[protection]]
name = "pg"
interval = "30s"
[[protection.volume]]
name = "data"
path = "/srv/data.img"
"#;

#[test]
fn the_example_configs_parse() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Example host names need not resolve on a test machine.
            let text = text.replace("dr.example.internal", "127.0.0.1");
            parse(&text, &path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn the_base_config_of_the_table_is_valid() {
    parse(BASE, Path::new("/etc/lifeboat/p.toml")).unwrap();
}

#[test]
fn every_malformed_config_gets_an_error_naming_its_key() {
    // (change to BASE, key that the error must name)
    let table: &[(&str, &str, &str)] = &[
        ("interval = \"30s\"", "interval = \"fortnightly\"", "protection[0].interval"),
        ("interval = \"30s\"", "interval = \"0s\"", "protection[0].interval"),
        ("interval = \"30s\"", "interval = \"30s\"\nrpo_target = \"soon\"", "protection[0].rpo_target"),
        ("interval = \"30s\"", "interval = \"30s\"\nchunk_size = \"3KiB\"", "protection[0].chunk_size"),
        ("interval = \"30s\"", "interval = \"30s\"\nchunk_size = \"1GiB\"", "protection[0].chunk_size"),
        ("interval = \"30s\"", "interval = \"30s\"\nchunk_size = \"lots\"", "protection[0].chunk_size"),
        ("interval = \"30s\"", "interval = \"30s\"\nsnapshot = \"magic\"", "protection[0].snapshot"),
        ("interval = \"30s\"", "interval = \"30s\"\ncompression = \"max\"", "protection[0].compression"),
        ("interval = \"30s\"", "interval = \"30s\"\nrefine = \"sometimes\"", "protection[0].refine"),
        ("server_name = \"dr\"", "server_name = \"dr\"\nmax_bandwidth = \"fast\"", "peer.max_bandwidth"),
        ("server_name = \"dr\"", "server_name = \"dr\"\nmax_bandwidth = \"0\"", "peer.max_bandwidth"),
        ("interval = \"30s\"", "interval = \"30s\"\npre = [\"\"]", "protection[0].pre[0]"),
        ("interval = \"30s\"", "interval = \"30s\"\nhook_timeout = \"-1s\"", "protection[0].hook_timeout"),
        ("role = \"primary\"", "role = \"leader\"", "site.role"),
        ("name = \"primary\"", "name = \"pri mary\"", "site.name"),
        ("state_dir = \"state\"", "state_dir = \"\"", "site.state_dir"),
        ("address = \"127.0.0.1:7420\"", "address = \"nowhere\"", "peer.address"),
        ("server_name = \"dr\"", "server_name = \"\"", "peer.server_name"),
        ("[peer]\naddress = \"127.0.0.1:7420\"\nserver_name = \"dr\"\n", "", "peer"),
        ("name = \"pg\"", "name = \"pg/../etc\"", "protection[0].name"),
        ("name = \"data\"", "name = \"\"", "protection[0].volume[0].name"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[[protection.volume]]\nname = \"data\"\npath = \"/srv/other.img\"", "protection[0].volume[1].name"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[[protection.volume]]\nname = \"wal\"\npath = \"/srv/data.img\"", "protection[0].volume[1].path"),
        ("[[protection.volume]]\nname = \"data\"\npath = \"/srv/data.img\"\n", "", "protection[0].volume"),
        ("[peer]", "[control]\naddress = \"localhost:notaport\"\n[peer]", "control.address"),
        // The control API: open only on loopback; callers well formed.
        ("[peer]", "[control]\naddress = \"0.0.0.0:7421\"\n[peer]", "control.address"),
        ("[peer]", "[control]\naddress = \"10.1.2.3:7421\"\n[peer]", "control.address"),
        ("[peer]", "[control]\naddress = \"0.0.0.0:7421\"\n[[control.client]]\nname = \"oncall\"\nlevel = \"root\"\ntoken_file = \"t\"\n[peer]", "control.client[0].level"),
        ("[peer]", "[control]\naddress = \"127.0.0.1:7421\"\n[[control.client]]\nname = \"\"\nlevel = \"read\"\ntoken_file = \"t\"\n[peer]", "control.client[0].name"),
        ("[peer]", "[control]\naddress = \"127.0.0.1:7421\"\n[[control.client]]\nname = \"a\"\nlevel = \"read\"\ntoken_file = \"t\"\n[[control.client]]\nname = \"a\"\nlevel = \"admin\"\ntoken_file = \"u\"\n[peer]", "control.client[1].name"),
        ("[peer]", "[control]\naddress = \"127.0.0.1:7421\"\n[[control.client]]\nname = \"a\"\nlevel = \"read\"\ntoken_file = \"\"\n[peer]", "control.client[0].token_file"),
        ("interval = \"30s\"", "interval = \"30s\"\npre_rule = \"/nonexistent/rule.yaml\"", "protection[0].pre_rule"),
        // Kubernetes mode (the volume list may then be empty).
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\n[protection.kubernetes.mover]\nconcurrency = 0", "protection[0].kubernetes.mover.concurrency"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nsnapshot_timeout = \"soon\"", "protection[0].kubernetes.snapshot_timeout"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\n[kubernetes]\nmax_movers = 0", "kubernetes.max_movers"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\n[protection.kubernetes.mover]\nstuck_after = \"0s\"", "protection[0].kubernetes.mover.stuck_after"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nvolume_path = \"/srv/x.img\"", "protection[0].kubernetes.volume_path"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = []\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.namespaces"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"Prod_1\"]\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.namespaces[0]"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nselector = \"app in cassandra\"\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.selector"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nnamespace_map = { prod = \"DR!\" }\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.namespace_map.prod"),
        // A drill namespace must be a name, and not a protected namespace itself.
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\ndrill_namespace = \"{namespace}_drill\"\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.drill_namespace"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\", \"test\"]\ndrill_namespace = \"test\"\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.drill_namespace"),
        ("interval = \"30s\"", "interval = \"30s\"\nkeep = 0", "protection[0].keep"),
        ("interval = \"30s\"", "interval = \"30s\"\nkeep_for = \"a week\"", "protection[0].keep_for"),
        ("interval = \"30s\"", "interval = \"30s\"\napply_delay = \"0s\"", "protection[0].apply_delay"),
        ("interval = \"30s\"", "interval = \"30s\"\nscrub_every = \"nightly\"", "protection[0].scrub_every"),
        ("interval = \"30s\"", "interval = \"30s\"\nscrub_rate = \"fast\"", "protection[0].scrub_rate"),
        ("interval = \"30s\"", "interval = \"30s\"\nscrub_rate = \"0MiB/s\"", "protection[0].scrub_rate"),
        // Three points 30 s apart reach back 1 minute, not 15.
        ("interval = \"30s\"", "interval = \"30s\"\nkeep = 3\napply_delay = \"15m\"", "protection[0].apply_delay"),
        ("interval = \"30s\"", "interval = \"30s\"\nkeep_for = \"10m\"\napply_delay = \"15m\"", "protection[0].apply_delay"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nvolume_path = \"/v/{pvc}\"\nvolume_node = \"node-a\"", "protection[0].kubernetes.volume_node"),
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nresource_modifiers = \"/nonexistent.yaml\"\nvolume_path = \"/v/{pvc}\"", "protection[0].kubernetes.resource_modifiers"),
        ("interval = \"30s\"", "interval = \"30s\"\npre = [\"sync\"]\n[protection.kubernetes]\nnamespaces = [\"prod\"]\nvolume_path = \"/v/{pvc}\"", "protection[0].pre"),
        // One place named twice (see same_place_errors_name_both_keys for the other key).
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[[protection]]\nname = \"pg2\"\n[[protection.volume]]\nname = \"data\"\npath = \"/srv/x/../data.img\"", "protection[1].volume[0].path"),
        ("state_dir = \"state\"", "state_dir = \"state\"\nstaging_dir = \"./state\"", "site.staging_dir"),
        ("interval = \"30s\"", "interval = \"30s\"\nsnapshot_dir = \"state/x/../staging\"", "protection[0].snapshot_dir"),
        ("path = \"/srv/data.img\"", "path = \"state/.\"", "protection[0].volume[0].path"),
        ("path = \"/srv/data.img\"", "path = \"state/db/data.img\"", "protection[0].volume[0].path"),
        ("state_dir = \"state\"", "state_dir = \"/srv/data.img/state\"", "protection[0].volume[0].path"),
        ("[[protection]]\nname = \"pg\"", "[[protection]]\nname = \"pg2\"\nsnapshot_dir = \"/srv/snaps\"\n[[protection.volume]]\nname = \"data\"\npath = \"/srv/other.img\"\n[[protection]]\nname = \"pg\"\nsnapshot_dir = \"/srv/snaps/pg2\"", "protection[1].snapshot_dir"),
    ];
    for (from, to, key) in table {
        assert!(
            BASE.contains(from),
            "table row {key}: {from:?} not in the base"
        );
        let text = BASE.replacen(from, to, 1);
        match parse(&text, Path::new("bad.toml")) {
            Ok(_) => panic!("{key}: config accepted:\n{text}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    e.keys().contains(&key.to_string()),
                    "{key}: error named {:?}: {msg}",
                    e.keys()
                );
                assert!(msg.contains(key), "{msg}");
            }
        }
    }
}

/// Each same-place problem names the other key too, and what the two paths are.
#[test]
fn same_place_errors_name_both_keys() {
    // (change to BASE, key of the problem, the other key, a word of the relation)
    let table: &[(&str, &str, &str, &str, &str)] = &[
        ("path = \"/srv/data.img\"", "path = \"/srv/data.img\"\n[[protection]]\nname = \"pg2\"\n[[protection.volume]]\nname = \"data\"\npath = \"/srv/x/../data.img\"", "protection[1].volume[0].path", "protection[0].volume[0].path \"/srv/data.img\"", "\"/srv/x/../data.img\" is the same file as"),
        ("state_dir = \"state\"", "state_dir = \"state\"\nstaging_dir = \"./state\"", "site.staging_dir", "site.state_dir \"state\"", "is the same directory as"),
        ("interval = \"30s\"", "interval = \"30s\"\nsnapshot_dir = \"state/x/../staging\"", "protection[0].snapshot_dir", "site.staging_dir (default ", "is the same directory as"),
        ("path = \"/srv/data.img\"", "path = \"state/.\"", "protection[0].volume[0].path", "site.state_dir \"state\"", "is the same path as"),
        ("path = \"/srv/data.img\"", "path = \"state/db/data.img\"", "protection[0].volume[0].path", "site.state_dir \"state\"", "would be inside the state store"),
        ("state_dir = \"state\"", "state_dir = \"/srv/data.img/state\"", "protection[0].volume[0].path", "site.state_dir \"/srv/data.img/state\"", "would be around the state store /srv/data.img/state/db"),
        ("[[protection]]\nname = \"pg\"", "[[protection]]\nname = \"pg2\"\nsnapshot_dir = \"/srv/snaps\"\n[[protection.volume]]\nname = \"data\"\npath = \"/srv/other.img\"\n[[protection]]\nname = \"pg\"\nsnapshot_dir = \"/srv/snaps/pg2\"", "protection[1].snapshot_dir", "protection[0].snapshot_dir \"/srv/snaps\"", "would be inside the snapshots of protection \"pg2\""),
    ];
    for (from, to, key, other, relation) in table {
        let text = BASE.replacen(from, to, 1);
        let err = parse(&text, Path::new("bad.toml")).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{key}: {err}")
        };
        let p = problems
            .iter()
            .find(|p| p.key == *key)
            .unwrap_or_else(|| panic!("{key}: not named in {err}"));
        assert!(p.message.contains(other), "{key}: {}", p.message);
        assert!(p.message.contains(relation), "{key}: {}", p.message);
        assert_eq!(problems.len(), 1, "{key}: one problem, once: {err}");
    }
    // A snapshot_dir shared by protections is fine: each has its own subdirectory.
    let shared = BASE.replacen(
        "path = \"/srv/data.img\"",
        "path = \"/srv/data.img\"\n[[protection]]\nname = \"pg2\"\n[[protection.volume]]\nname = \"data\"\npath = \"/srv/other.img\"",
        1,
    );
    parse(&shared, Path::new("bad.toml")).unwrap();
}

#[test]
fn unknown_keys_and_wrong_types_are_named_by_the_parser() {
    for (text, key) in [
        (
            BASE.replace("interval = \"30s\"", "intervall = \"30s\""),
            "intervall",
        ),
        (
            BASE.replace("interval = \"30s\"", "interval = 30"),
            "interval",
        ),
        (BASE.replace("[tls]", "[tlss]"), "tlss"),
        (
            BASE.replace(
                "interval = \"30s\"",
                "interval = \"30s\"\nsync_on_start = \"yes\"",
            ),
            "sync_on_start",
        ),
    ] {
        let err = parse(&text, Path::new("bad.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains(key), "{key}: {err}");
    }
}

#[test]
fn several_problems_are_reported_together() {
    let text = BASE
        .replace("interval = \"30s\"", "interval = \"x\"\nchunk_size = \"y\"")
        .replace("role = \"primary\"", "role = \"z\"");
    let err = parse(&text, Path::new("bad.toml")).unwrap_err();
    assert_eq!(err.keys().len(), 3, "{err}");
}
