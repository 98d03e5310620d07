//! A small Kustomize renderer: what `kubectl kustomize DIR` makes of `deploy/kubernetes/`,
//! for machines without kubectl. tests/deploy.rs runs it beside kubectl where kubectl
//! exists and requires the same objects from both, so it cannot drift from the real thing
//! unnoticed.
//!
//! It models exactly the features our kustomizations use:
//! - `resources`: YAML files (multi-document) and directories holding a `kustomization.yaml`
//!   of kind Kustomization, rendered on their own first;
//! - `components`: directories of kind Component, applied to what has been accumulated;
//! - `configMapGenerator` and `secretGenerator` entries with `name`, `namespace`, `type`
//!   (Secrets) and `files` (`key=path` or `path`); a missing file is an error, as in
//!   kustomize;
//! - `generatorOptions` with `disableNameSuffixHash: true` and `labels`;
//! - `patches` with `path` and a `target` of `kind` and `name`, holding a JSON patch
//!   (RFC 6902) written as YAML;
//! - two objects with one kind, namespace and name are an error.
//!
//! Not modelled, and refused when a kustomization uses it (any other key, a generator key
//! not listed above, a strategic-merge patch, inline patches, target selectors by label or
//! group): name prefixes and suffixes, the name-hash suffix and the reference updates it
//! needs, `namespace` and label transformers, `images`, `replacements`, `vars`, `literals`
//! and `envs` in generators, `behavior: merge/replace`, remote bases, Helm charts, and
//! kustomize's output order (callers compare objects by kind, namespace and name).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// The objects an overlay renders to, and every file the rendering read (canonical paths).
pub struct Rendered {
    pub objects: Vec<Value>,
    pub files: BTreeSet<PathBuf>,
}

pub fn render(dir: &Path) -> Result<Rendered, String> {
    let mut out = Rendered {
        objects: Vec::new(),
        files: BTreeSet::new(),
    };
    run(dir, "Kustomization", &mut out)?;
    let mut seen = BTreeSet::new();
    for o in &out.objects {
        if !seen.insert(id(o)) {
            return Err(format!("{}: {} is made twice", dir.display(), id(o)));
        }
    }
    Ok(out)
}

/// `Kind namespace/name`, how the tests name an object.
pub fn id(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "components",
    "generatorOptions",
    "configMapGenerator",
    "secretGenerator",
    "patches",
];

fn run(dir: &Path, kind: &str, out: &mut Rendered) -> Result<(), String> {
    let file = dir.join("kustomization.yaml");
    let k = read_docs(&file, out)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: empty", file.display()))?;
    let at = file.display();
    if k["kind"] != kind {
        return Err(format!(
            "{at}: kind {} where {kind} was expected",
            k["kind"]
        ));
    }
    let Some(map) = k.as_object() else {
        return Err(format!("{at}: not a mapping"));
    };
    if let Some(key) = map.keys().find(|key| !KEYS.contains(&key.as_str())) {
        return Err(format!("{at}: `{key}` is not modelled by this renderer"));
    }
    for r in strings(&k["resources"], &format!("{at}: resources"))? {
        let path = dir.join(&r);
        if path.is_dir() {
            let mut sub = Rendered {
                objects: Vec::new(),
                files: std::mem::take(&mut out.files),
            };
            run(&path, "Kustomization", &mut sub)?;
            out.files = sub.files;
            out.objects.extend(sub.objects);
        } else {
            let docs = read_docs(&path, out)?;
            out.objects
                .extend(docs.into_iter().filter(|d| !d.is_null()));
        }
    }
    for c in strings(&k["components"], &format!("{at}: components"))? {
        run(&dir.join(c), "Component", out)?;
    }
    generate(dir, &k, out)?;
    for p in k["patches"].as_array().into_iter().flatten() {
        patch(dir, p, out)?;
    }
    Ok(())
}

fn generate(dir: &Path, k: &Value, out: &mut Rendered) -> Result<(), String> {
    let at = dir.join("kustomization.yaml").display().to_string();
    let opts = &k["generatorOptions"];
    let gens = [
        ("ConfigMap", &k["configMapGenerator"]),
        ("Secret", &k["secretGenerator"]),
    ];
    if gens.iter().all(|(_, g)| g.is_null()) {
        return Ok(());
    }
    if let Some(key) = opts.as_object().and_then(|m| {
        m.keys()
            .find(|k| *k != "disableNameSuffixHash" && *k != "labels")
    }) {
        return Err(format!("{at}: generatorOptions.{key} is not modelled"));
    }
    if opts["disableNameSuffixHash"] != true {
        return Err(format!(
            "{at}: name-hash suffixes are not modelled (set generatorOptions.disableNameSuffixHash)"
        ));
    }
    for (kind, list) in gens {
        for g in list.as_array().into_iter().flatten() {
            let allowed: &[&str] = match kind {
                "Secret" => &["name", "namespace", "files", "type"],
                _ => &["name", "namespace", "files"],
            };
            if let Some(key) = g
                .as_object()
                .and_then(|m| m.keys().find(|k| !allowed.contains(&k.as_str())))
            {
                return Err(format!(
                    "{at}: {kind} generator key `{key}` is not modelled"
                ));
            }
            let mut data = Map::new();
            for f in strings(&g["files"], &format!("{at}: files"))? {
                let (key, rel) = match f.split_once('=') {
                    Some((key, rel)) => (key.to_string(), rel.to_string()),
                    None => (
                        Path::new(&f)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        f.clone(),
                    ),
                };
                let path = dir.join(&rel);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("{at}: {kind} {}: {}: {e}", g["name"], path.display()))?;
                out.files.insert(real(&path));
                let value = match kind {
                    "Secret" => Value::String(base64(&bytes)),
                    _ => Value::String(String::from_utf8(bytes).map_err(|_| {
                        format!("{at}: {rel} is not UTF-8 (binaryData is not modelled)")
                    })?),
                };
                data.insert(key, value);
            }
            let mut meta = json!({"name": g["name"]});
            if !g["namespace"].is_null() {
                meta["namespace"] = g["namespace"].clone();
            }
            if !opts["labels"].is_null() {
                meta["labels"] = opts["labels"].clone();
            }
            let mut obj = json!({"apiVersion": "v1", "kind": kind, "metadata": meta, "data": data});
            if kind == "Secret" {
                obj["type"] = g.get("type").cloned().unwrap_or_else(|| json!("Opaque"));
            }
            out.objects.push(obj);
        }
    }
    Ok(())
}

fn patch(dir: &Path, p: &Value, out: &mut Rendered) -> Result<(), String> {
    let at = dir.join("kustomization.yaml").display().to_string();
    let keys: BTreeSet<&str> = p
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    if keys != BTreeSet::from(["path", "target"]) {
        return Err(format!(
            "{at}: a patch other than path + target is not modelled: {p}"
        ));
    }
    let target = p["target"].as_object().cloned().unwrap_or_default();
    if target.keys().any(|k| k != "kind" && k != "name") {
        return Err(format!(
            "{at}: patch targets other than kind and name are not modelled"
        ));
    }
    let path = dir.join(p["path"].as_str().unwrap_or_default());
    let ops = read_docs(&path, out)?
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    if !ops.is_array() {
        return Err(format!(
            "{}: strategic-merge patches are not modelled; write a JSON patch (a list of ops)",
            path.display()
        ));
    }
    let ops: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hit = 0;
    for o in &mut out.objects {
        let matches = target.iter().all(|(k, v)| {
            if k == "kind" {
                &o["kind"] == v
            } else {
                &o["metadata"]["name"] == v
            }
        });
        if matches {
            json_patch::patch(o, &ops)
                .map_err(|e| format!("{}: {}: {e}", path.display(), id(o)))?;
            hit += 1;
        }
    }
    if hit == 0 {
        return Err(format!("{}: its target matches no object", path.display()));
    }
    Ok(())
}

fn read_docs(path: &Path, out: &mut Rendered) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    out.files.insert(real(path));
    serde_saphyr::from_multiple(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The path without `..` and symlinks, so files reached from two overlays are one.
fn real(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn strings(v: &Value, at: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{at}: {s} is not a string"))
            })
            .collect(),
        other => Err(format!("{at}: {other} is not a list")),
    }
}

/// Standard base64 with padding, as Secret `data` holds it.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The objects keyed by [`id`], to compare two renderings.
pub fn by_id(objects: &[Value]) -> BTreeMap<String, Value> {
    objects.iter().map(|o| (id(o), o.clone())).collect()
}
