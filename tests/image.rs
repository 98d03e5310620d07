//! The image deploy/ runs: the root Dockerfile is checked statically everywhere (a Rust
//! builder with clang building the locked release binary Cargo.toml names, a slim runtime
//! with that binary alone as a non-root user, a .dockerignore keeping build output and key
//! material out, the tag deploy/ runs is the crate's version), and built and run where
//! docker or podman answers `info` (unless LIFEBOAT_SKIP_IMAGE_BUILD is set).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// One instruction of a Dockerfile: the keyword in capitals and the rest, continuation
/// lines joined.
fn dockerfile(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut line = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('#') || (t.is_empty() && line.is_empty()) {
            continue;
        }
        line.push_str(t.trim_end_matches('\\'));
        line.push(' ');
        if !t.ends_with('\\') {
            let (kw, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
            out.push((kw.to_uppercase(), rest.trim().to_string()));
            line.clear();
        }
    }
    out
}

fn builder() -> Option<&'static str> {
    if std::env::var_os("LIFEBOAT_SKIP_IMAGE_BUILD").is_some() {
        return None;
    }
    ["docker", "podman"].into_iter().find(|b| {
        on_path(b).is_some()
            && Command::new(b)
                .arg("info")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    })
}

#[test]
fn the_dockerfile_builds_the_crates_binary_into_an_image_that_runs_as_non_root() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let bin = manifest["bin"][0]["name"].as_str().unwrap();
    let version = manifest["package"]["version"].as_str().unwrap();
    let image = format!("ghcr.io/lifeboat-dr/lifeboat:{version}");

    // The image deploy/ runs is this crate's version, and the Dockerfile says how to make it.
    let deployment =
        std::fs::read_to_string(repo().join("deploy/kubernetes/base/deployment.yaml")).unwrap();
    assert!(
        deployment.contains(&format!("image: {image}")),
        "deploy/ runs another image than {image}"
    );
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        text.contains(&format!("build -t {image} .")),
        "the Dockerfile's header names {image}"
    );

    // Stages: a Rust builder with clang that builds the locked release binary, then a slim
    // runtime with that binary alone, run as a user other than root.
    let ins = dockerfile(&text);
    let froms: Vec<usize> = (0..ins.len()).filter(|i| ins[*i].0 == "FROM").collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {ins:?}");
    let (builder_from, runtime) = (&ins[froms[0]].1, &ins[froms[1] + 1..]);
    let (base, name) = builder_from
        .split_once(" AS ")
        .expect("a named builder stage");
    assert!(
        base.contains("rust:"),
        "the builder is a Rust image: {base}"
    );
    let building = &ins[froms[0] + 1..froms[1]];
    let run = |needle: &str| {
        building
            .iter()
            .any(|(k, r)| k == "RUN" && r.contains(needle))
    };
    assert!(
        run("apt-get install") && run(" clang ") && run("libclang-dev"),
        "clang for RocksDB"
    );
    assert!(
        run("cargo build --release --locked"),
        "a locked release build"
    );
    assert!(
        run(&format!("target/release/{bin} ")),
        "the builder takes target/release/{bin}"
    );
    let runtime_base = &ins[froms[1]].1;
    assert!(
        runtime_base.contains("distroless/cc") || runtime_base.contains("debian:bookworm-slim"),
        "a slim runtime: {runtime_base}"
    );
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, r)| r)
        .collect();
    let [copy] = copies.as_slice() else {
        panic!("the runtime copies one thing: {copies:?}")
    };
    let parts: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(
        parts.first(),
        Some(&format!("--from={name}").as_str()),
        "{copy}"
    );
    assert_eq!(
        Path::new(parts[1]).file_name().unwrap(),
        bin,
        "the binary Cargo.toml names"
    );
    assert!(
        runtime.iter().all(|(k, _)| k != "RUN" && k != "ADD"),
        "binary only: {runtime:?}"
    );
    let entry = runtime
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entry.1).unwrap();
    assert_eq!(entry[0], parts[2], "ENTRYPOINT is the copied binary");
    let users: Vec<&String> = runtime
        .iter()
        .filter(|(k, _)| k == "USER")
        .map(|(_, r)| r)
        .collect();
    let [user] = users.as_slice() else {
        panic!("one USER in the runtime stage")
    };
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0" && !uid.is_empty(),
        "USER {user} is root"
    );
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for p in [
        "target/",
        "deploy/kubernetes/*/tls/",
        "deploy/kubernetes/*/tokens/",
    ] {
        assert!(
            ignore.lines().any(|l| l.trim() == p),
            ".dockerignore lacks {p}"
        );
    }

    // Built where a builder answers (a release build of RocksDB: many minutes).
    let Some(b) = builder() else {
        eprintln!("no docker or podman answering `info` (or LIFEBOAT_SKIP_IMAGE_BUILD set): the Dockerfile was checked, not built");
        return;
    };
    let tag = format!("lifeboat-test:{}", std::process::id());
    let built = Command::new(b)
        .args(["build", "-t", &tag, "."])
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(built.success(), "{b} build failed");
    let ran = Command::new(b)
        .args(["run", "--rm", &tag, "--version"])
        .output()
        .unwrap();
    assert!(ran.status.success(), "{ran:?}");
    assert!(
        String::from_utf8_lossy(&ran.stdout).contains(version),
        "{ran:?}"
    );
    let who = Command::new(b)
        .args(["image", "inspect", "-f", "{{.Config.User}}", &tag])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&who.stdout).trim(), user.as_str());
    let _ = Command::new(b).args(["rmi", &tag]).status();
}
