//! The shape of the source tree, checked: no import circle between the top-level modules,
//! RocksDB only behind `src/store`, and no file that has grown into two rooms.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src() -> (PathBuf, Vec<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    (root, files)
}

/// The file's text without its `#[cfg(test)] mod tests { ... }` block: tests may use any
/// module.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn top_module(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

#[test]
fn top_level_modules_import_each_other_without_a_circle() {
    let (root, files) = src();
    let uses = regex::Regex::new(r"crate::([a-z0-9_]+)").unwrap();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(top) = top_module(&root, f) else {
            continue;
        };
        let entry = deps.entry(top.clone()).or_default();
        if f.ends_with("_tests.rs") {
            continue;
        }
        for c in uses.captures_iter(&code(f)) {
            if c[1] != top {
                entry.insert(c[1].to_string());
            }
        }
    }
    // Depth-first search for a back edge, reporting the circle it closes.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in deps.get(m).into_iter().flatten() {
            if deps.contains_key(d) {
                if let Some(c) = visit(d, deps, path, done) {
                    return Some(c);
                }
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        if let Some(circle) = visit(m, &deps, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
    // The layers a newcomer reads bottom up.
    for low in ["ids", "engine", "store", "net", "k8s"] {
        for high in ["site", "replicate", "lifecycle", "daemon", "cli"] {
            assert!(
                !deps[low].contains(high),
                "{low} imports {high}, which sits above it"
            );
        }
    }
}

#[test]
fn rocksdb_is_used_only_behind_the_store() {
    let (root, files) = src();
    for f in &files {
        if f.starts_with(root.join("store")) {
            continue;
        }
        assert!(
            !code(f).contains("rocksdb::"),
            "{} uses RocksDB directly; go through crate::store",
            f.display()
        );
    }
}

#[test]
fn no_source_file_grows_past_about_500_lines() {
    let (_, files) = src();
    for f in &files {
        let n = std::fs::read_to_string(f).unwrap().lines().count();
        assert!(n <= 550, "{} has {n} lines: split it by job", f.display());
    }
}
