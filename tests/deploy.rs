//! deploy/kubernetes: the Kustomize overlays.
//!
//! Each overlay (`deploy/kubernetes/primary`, `deploy/kubernetes/dr`) is rendered in a copy
//! of the tree whose `tls/` `lifeboat certs --kubernetes` filled and whose `tokens/` hold
//! fresh tokens: by `kubectl kustomize` where kubectl is on PATH, and always by the small
//! renderer in tests/support/kustomize.rs (where both run they must make the same objects).
//! Every object parses into its Kubernetes type (unknown fields are errors); the
//! ServiceMonitor and PrometheusRule are checked field by field. The pieces agree: the
//! config in the ConfigMap is one lifeboat accepts with the overlay's role, the Deployment
//! mounts every file it names (TLS, tokens, state, volumes), the Services select the pods and
//! reach their ports, the NetworkPolicy admits only the site's ports, Prometheus scrapes with
//! the token of a read-level caller. Without its TLS files an overlay does not render, so a
//! re-apply never replaces the real Secret with an empty one. (The image: tests/image.rs.)

#[path = "support/kustomize.rs"]
mod kustomize;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use lifeboat::config::{Config, Role as SiteRole};
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Deserialises into the Kubernetes type and fails on any field the type does not have
/// (a field the type dropped is missing when serialised again).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, at: &str) -> T {
    let v: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{at}: {}: {e}", kustomize::id(doc)));
    assert_subset(doc, &serde_json::to_value(&v).unwrap(), at, "");
    v
}

fn assert_subset(doc: &Value, back: &Value, at: &str, path: &str) {
    match (doc, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let Some(bv) = b.get(k) else {
                    panic!("{at}: {path}/{k} is not a field of the Kubernetes type");
                };
                assert_subset(v, bv, at, &format!("{path}/{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, at, &format!("{path}/{i}"));
            }
        }
        _ => {}
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A copy of deploy/kubernetes (never the checkout's own tls/ or tokens/), with each
/// overlay's TLS files made by `lifeboat certs --kubernetes` when `tls`, and its token
/// files when `tokens`.
fn tree(tls: bool, tokens: bool) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    copy_dir(
        &repo().join("deploy/kubernetes"),
        &t.path().join("kubernetes"),
    );
    if tls {
        let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
            .args(["certs", "--out"])
            .arg(t.path().join("certs"))
            .arg("--kubernetes")
            .arg(t.path().join("kubernetes"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "lifeboat certs --kubernetes: {out:?}");
        assert!(text.contains("secretGenerator"), "{text}");
    }
    if tokens {
        for site in ["primary", "dr"] {
            let dir = t.path().join("kubernetes").join(site).join("tokens");
            std::fs::create_dir_all(&dir).unwrap();
            for caller in ["prometheus", "oncall"] {
                let token: String = (0..32)
                    .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
                    .collect();
                std::fs::write(dir.join(caller), token + "\n").unwrap();
            }
        }
    }
    t
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if e.file_type().unwrap().is_dir() {
            if name == "tls" || name == "tokens" {
                continue;
            }
            copy_dir(&e.path(), &to.join(&name));
        } else {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// The overlay's objects: the renderer's, checked against `kubectl kustomize` where
/// kubectl exists (both render, with the same objects, or both refuse).
fn render(dir: &Path) -> Result<Vec<Value>, String> {
    let ours = kustomize::render(dir).map(|r| r.objects);
    let Some(kubectl) = on_path("kubectl") else {
        eprintln!(
            "no kubectl on PATH: {} rendered by tests/support/kustomize.rs only",
            dir.display()
        );
        return ours;
    };
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    let theirs: Result<Vec<Value>, String> = if out.status.success() {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
        // kustomize folds long Secret values over lines, which base64 decoding skips.
        let mut docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        for d in docs.iter_mut().filter(|d| d["kind"] == "Secret") {
            for v in d["data"]
                .as_object_mut()
                .into_iter()
                .flat_map(|m| m.values_mut())
            {
                let s: String = v.as_str().unwrap_or_default().split_whitespace().collect();
                *v = Value::String(s);
            }
        }
        Ok(docs)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    match (&ours, &theirs) {
        (Ok(a), Ok(b)) => {
            let (a, b) = (kustomize::by_id(a), kustomize::by_id(b));
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{}: the renderer's objects (left) are not kubectl kustomize's",
                dir.display()
            );
            for (id, o) in &a {
                assert_eq!(o, &b[id], "{}: {id} differs from kubectl kustomize's", dir.display());
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!(
            "{}: kubectl kustomize and the renderer disagree on whether it renders: renderer {:?}, kubectl {:?}",
            dir.display(),
            ours.as_ref().map(|o| o.len()),
            theirs.as_ref().map(|o| o.len())
        ),
    }
    ours
}

/// The overlay's objects by kind, each parsed into its type.
fn parse_all(objects: &[Value], at: &str) -> BTreeMap<String, Vec<Value>> {
    let mut kinds: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for o in objects {
        let kind = o["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: no kind in {o}"));
        match kind {
            "Namespace" => drop(typed::<Namespace>(o, at)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(o, at)),
            "ClusterRole" => drop(typed::<ClusterRole>(o, at)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(o, at)),
            "Role" => drop(typed::<Role>(o, at)),
            "RoleBinding" => drop(typed::<RoleBinding>(o, at)),
            "ConfigMap" => drop(typed::<ConfigMap>(o, at)),
            "Secret" => drop(typed::<Secret>(o, at)),
            "Deployment" => drop(typed::<Deployment>(o, at)),
            "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(o, at)),
            "Service" => drop(typed::<Service>(o, at)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(o, at)),
            "ServiceMonitor" | "PrometheusRule" => {
                assert_eq!(o["apiVersion"], "monitoring.coreos.com/v1", "{at}: {o}");
            }
            other => panic!("{at}: unexpected kind {other}"),
        }
        kinds.entry(kind.to_string()).or_default().push(o.clone());
    }
    kinds
}

fn one<'a>(kinds: &'a BTreeMap<String, Vec<Value>>, kind: &str, at: &str) -> &'a Value {
    match kinds.get(kind).map(Vec::as_slice) {
        Some([o]) => o,
        other => panic!(
            "{at}: expected one {kind}, found {}",
            other.map_or(0, <[_]>::len)
        ),
    }
}

fn named<'a>(kinds: &'a BTreeMap<String, Vec<Value>>, kind: &str, name: &str) -> Option<&'a Value> {
    kinds
        .get(kind)?
        .iter()
        .find(|o| o["metadata"]["name"] == name)
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("a selector");
    !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v)
}

/// Where the pod has the volume that holds `file`: the mount path under which it lies, and
/// the volume's source.
fn mount_of<'a>(pod: &'a Value, file: &Path) -> (PathBuf, &'a Value) {
    let c = &pod["containers"][0];
    let m = items(&c["volumeMounts"])
        .iter()
        .filter(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{} is on no volume the Deployment mounts", file.display()));
    let volume = items(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap_or_else(|| panic!("mount {} has no volume", m["name"]));
    (PathBuf::from(m["mountPath"].as_str().unwrap()), volume)
}

/// `file` is a key of a Secret the overlay renders, mounted at its directory; returns the
/// Secret's name.
fn secret_file(kinds: &BTreeMap<String, Vec<Value>>, pod: &Value, file: &Path, at: &str) -> String {
    let (dir, volume) = mount_of(pod, file);
    assert_eq!(
        file.parent(),
        Some(dir.as_path()),
        "{at}: {} is not a key of its volume",
        file.display()
    );
    let name = volume["secret"]["secretName"].as_str().unwrap_or_else(|| {
        panic!(
            "{at}: {} is not on a Secret volume: {volume}",
            file.display()
        )
    });
    let secret = named(kinds, "Secret", name).unwrap_or_else(|| panic!("{at}: no Secret {name}"));
    let key = file.file_name().unwrap().to_str().unwrap();
    let data = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{at}: Secret {name} has no key {key}"));
    assert!(!data.is_empty(), "{at}: Secret {name} key {key} is empty");
    name.to_string()
}

fn admitted(np: &Value) -> Vec<(u64, String)> {
    let mut ports: Vec<(u64, String)> = items(&np["spec"]["ingress"])
        .iter()
        .flat_map(|r| items(&r["ports"]))
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    ports.sort();
    ports
}

/// Everything one overlay must hold together.
fn check_site(site: &str, role: SiteRole, dir: &Path, objects: &[Value]) -> Config {
    let at = format!("deploy/kubernetes/{site}");
    let kinds = parse_all(objects, &at);

    // The config: the ConfigMap holds the overlay's lifeboat.toml, which lifeboat accepts,
    // with this overlay's role, at the path the container is started with.
    let deployment = one(&kinds, "Deployment", &at);
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = items(&c["args"])
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = PathBuf::from(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
    let (config_dir, volume) = mount_of(pod, &config_path);
    assert_eq!(config_path.parent(), Some(config_dir.as_path()));
    let cm_name = volume["configMap"]["name"]
        .as_str()
        .expect("the config from a ConfigMap");
    let cm = named(&kinds, "ConfigMap", cm_name)
        .unwrap_or_else(|| panic!("{at}: no ConfigMap {cm_name}"));
    let toml = cm["data"][config_path.file_name().unwrap().to_str().unwrap()]
        .as_str()
        .unwrap_or_else(|| panic!("{at}: ConfigMap {cm_name} has no {}", config_path.display()));
    assert_eq!(
        toml,
        std::fs::read_to_string(dir.join("lifeboat.toml")).unwrap()
    );
    // The example peer name need not resolve on a test machine (as in tests/config.rs).
    let resolvable = toml.replace("dr.example.internal", "127.0.0.1");
    let cfg =
        lifeboat::config::parse(&resolvable, &config_path).unwrap_or_else(|e| panic!("{at}: {e}"));
    assert_eq!(cfg.role, role, "{at}: the config's role");
    // The name certs --kubernetes put in the overlay's certificate.
    assert_eq!(cfg.site_name, site, "{at}: the site's name");
    assert!(
        cfg.protections.iter().all(|p| p.kubernetes.is_some()),
        "{at}: Kubernetes mode"
    );

    // Every file the config names is on a volume the overlay makes.
    let mut secrets = Vec::new();
    for f in [&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key] {
        secrets.push(secret_file(&kinds, pod, f, &at));
    }
    assert!(
        secrets.iter().all(|s| s == "lifeboat-tls"),
        "{at}: TLS from {secrets:?}"
    );
    assert!(!cfg.control.ip().is_loopback() && !cfg.control_clients.is_empty());
    for client in &cfg.control_clients {
        assert_eq!(
            secret_file(&kinds, pod, &client.token_file, &at),
            "lifeboat-control-tokens"
        );
    }
    let (_, state) = mount_of(pod, &cfg.state_dir);
    let claim = state["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("state on a PVC");
    assert!(
        named(&kinds, "PersistentVolumeClaim", claim).is_some(),
        "{at}: no PVC {claim}"
    );
    for p in &cfg.protections {
        let kp = p.kubernetes.as_ref().unwrap();
        if kp.csi.is_some() {
            // The CSI path: movers read the data; the daemon's pod has no hostPath.
            assert!(
                items(&pod["volumes"])
                    .iter()
                    .all(|v| v["hostPath"].is_null()),
                "{at}: a hostPath volume in a CSI site's Deployment"
            );
            continue;
        }
        let pattern = &kp.volume_path;
        let fixed: String = pattern.chars().take_while(|c| *c != '{').collect();
        let (_, v) = mount_of(pod, Path::new(&fixed));
        assert!(
            v["hostPath"].is_object(),
            "{at}: volume_path {pattern} on {v}"
        );
    }
    // Every Secret the overlay makes is a generated one with every value filled.
    for s in kinds.get("Secret").into_iter().flatten() {
        let data = s["data"]
            .as_object()
            .unwrap_or_else(|| panic!("{at}: {s} has no data"));
        assert!(
            !data.is_empty() && data.values().all(|v| v != ""),
            "{at}: an empty Secret {s}"
        );
    }

    // Ports: the control port everywhere; the peer port only where the config listens.
    let ports: Vec<(u64, String, String)> = items(&c["ports"])
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            (
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap().to_string(),
                name,
            )
        })
        .collect();
    let mut want = vec![(
        u64::from(cfg.control.port()),
        "TCP".to_string(),
        "control".to_string(),
    )];
    if let Some(l) = cfg.listen {
        want.push((u64::from(l.port()), "UDP".into(), "peer".into()));
    }
    assert_eq!(ports, want, "{at}: the container's ports");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], "control");
    }
    assert_eq!(pod["serviceAccountName"], "lifeboat");

    // Services select the Deployment's pods and reach named container ports.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let mut udp_services = 0;
    for s in kinds.get("Service").into_iter().flatten() {
        assert!(
            selects(&s["spec"]["selector"], pod_labels),
            "{at}: {} selects no daemon pod",
            kustomize::id(s)
        );
        for p in items(&s["spec"]["ports"]) {
            let target = p["targetPort"].as_str().unwrap();
            let hit = ports.iter().find(|(_, _, n)| n == target);
            let hit = hit.unwrap_or_else(|| {
                panic!(
                    "{at}: {} targets no container port {target}",
                    kustomize::id(s)
                )
            });
            assert_eq!(p["protocol"], hit.1.as_str());
            if hit.1 == "UDP" {
                udp_services += 1;
                assert_eq!(
                    s["spec"]["type"], "LoadBalancer",
                    "{at}: the peer port from outside"
                );
            }
        }
    }
    assert_eq!(
        udp_services,
        usize::from(cfg.listen.is_some()),
        "{at}: peer Services"
    );

    // The NetworkPolicy selects the daemon and admits exactly the ports it serves.
    let np = one(&kinds, "NetworkPolicy", &at);
    assert!(selects(
        &np["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    let mut want: Vec<(u64, String)> = want.into_iter().map(|(p, proto, _)| (p, proto)).collect();
    want.sort();
    assert_eq!(admitted(np), want, "{at}: the NetworkPolicy's ports");
    let expected: &[(u64, &str)] = match role {
        SiteRole::Dr => &[(7420, "UDP"), (7421, "TCP")],
        SiteRole::Primary => &[(7421, "TCP")],
    };
    let expected: Vec<(u64, String)> = expected.iter().map(|(p, s)| (*p, s.to_string())).collect();
    assert_eq!(
        admitted(np),
        expected,
        "{at}: only 7420/UDP (DR) and 7421/TCP"
    );

    // Prometheus: the ServiceMonitor scrapes the control port's /metrics with the token of
    // a read-level caller.
    let sm = one(&kinds, "ServiceMonitor", &at);
    assert_eq!(
        sm["metadata"]["namespace"],
        deployment["metadata"]["namespace"]
    );
    let scraped: Vec<&Value> = kinds["Service"]
        .iter()
        .filter(|s| {
            selects(
                &sm["spec"]["selector"]["matchLabels"],
                &s["metadata"]["labels"],
            )
        })
        .collect();
    assert_eq!(
        scraped.len(),
        1,
        "{at}: the ServiceMonitor selects {} Services",
        scraped.len()
    );
    let [ep] = items(&sm["spec"]["endpoints"]) else {
        panic!("{at}: one endpoint")
    };
    assert_eq!(ep["path"], "/metrics");
    let port = items(&scraped[0]["spec"]["ports"])
        .iter()
        .find(|p| p["name"] == ep["port"]);
    let port = port.unwrap_or_else(|| panic!("{at}: the Service has no port {}", ep["port"]));
    assert_eq!(port["targetPort"], "control");
    assert!(ep.get("bearerTokenSecret").is_none() && ep.get("bearerTokenFile").is_none());
    assert_eq!(ep["authorization"]["type"], "Bearer");
    let cred = &ep["authorization"]["credentials"];
    let secret =
        named(&kinds, "Secret", cred["name"].as_str().unwrap()).expect("the token's Secret");
    assert_eq!(secret["metadata"]["namespace"], sm["metadata"]["namespace"]);
    let key = cred["key"].as_str().unwrap();
    assert!(
        secret["data"][key].is_string(),
        "{at}: no key {key} in {}",
        cred["name"]
    );
    let caller = cfg
        .control_clients
        .iter()
        .find(|c| c.token_file.file_name().unwrap() == key)
        .unwrap_or_else(|| panic!("{at}: no [[control.client]] reads the token {key}"));
    assert_eq!(
        caller.level,
        lifeboat::api::Level::Read,
        "{at}: Prometheus reads only"
    );

    // The PrometheusRule is deploy/alerts.yaml.
    let alerts: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("deploy/alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        one(&kinds, "PrometheusRule", &at)["spec"]["groups"],
        alerts["groups"]
    );

    // The service account is bound: cluster-wide at the DR site, in every protected
    // namespace at the primary.
    // The daemon's account; at the primary also the movers' (for changed block tracking),
    // which holds no API token and nothing but `get` on the movers' snapshots.
    let accounts = kinds.get("ServiceAccount").map_or(0, Vec::len);
    assert_eq!(
        accounts,
        if role == SiteRole::Primary { 2 } else { 1 },
        "{at}"
    );
    let sa = named(&kinds, "ServiceAccount", "lifeboat")
        .unwrap_or_else(|| panic!("{at}: no ServiceAccount lifeboat"));
    if role == SiteRole::Primary {
        let mover = named(&kinds, "ServiceAccount", "lifeboat-mover")
            .unwrap_or_else(|| panic!("{at}: no ServiceAccount lifeboat-mover"));
        assert_eq!(mover["automountServiceAccountToken"], false, "{at}");
        let role = named(&kinds, "ClusterRole", "lifeboat-mover").expect("its role");
        assert_eq!(
            role["rules"],
            serde_json::json!([{"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"], "verbs": ["get"]}]),
            "{at}"
        );
    }
    let binds_sa = |b: &Value| {
        items(&b["subjects"]).iter().any(|s| {
            s["kind"] == "ServiceAccount"
                && s["name"] == sa["metadata"]["name"]
                && s["namespace"] == sa["metadata"]["namespace"]
        })
    };
    // Bound somewhere: the DR site cluster-wide (PersistentVolumes), the primary only per
    // protected namespace (checked below).
    let bound = ["ClusterRoleBinding", "RoleBinding"]
        .iter()
        .flat_map(|k| kinds.get(*k).into_iter().flatten())
        .any(&binds_sa);
    assert!(bound, "{at}: no binding for the service account");
    if role == SiteRole::Primary {
        for p in &cfg.protections {
            for ns in &p.kubernetes.as_ref().unwrap().namespaces {
                let bound = kinds
                    .get("RoleBinding")
                    .into_iter()
                    .flatten()
                    .any(|b| b["metadata"]["namespace"] == ns.as_str() && binds_sa(b));
                assert!(bound, "{at}: the config protects {ns}, where no RoleBinding grants the service account");
            }
        }
    }
    cfg
}

#[test]
fn both_overlays_render_and_every_object_parses_and_fits_the_config() {
    let t = tree(true, true);
    let mut configs = Vec::new();
    for (site, role) in [("primary", SiteRole::Primary), ("dr", SiteRole::Dr)] {
        let dir = t.path().join("kubernetes").join(site);
        let objects = render(&dir).unwrap_or_else(|e| panic!("{site}: {e}"));
        configs.push(check_site(site, role, &dir, &objects));
        // The TLS Secret holds exactly the files certs --kubernetes wrote.
        let tls = objects
            .iter()
            .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == "lifeboat-tls")
            .unwrap();
        for key in lifeboat::net::tls::OVERLAY_TLS_FILES {
            let file = std::fs::read(dir.join("tls").join(key)).unwrap();
            assert_eq!(
                tls["data"][key],
                kustomize::base64(&file).as_str(),
                "{site}: {key}"
            );
        }
        let key = dir.join("tls/site.key");
        assert!(
            lifeboat::net::tls::loose_key(&key).is_none(),
            "{site}: site.key is 0600"
        );
        let cert = String::from_utf8(std::fs::read(dir.join("tls/site.pem")).unwrap()).unwrap();
        let ours =
            std::fs::read_to_string(t.path().join("certs").join(format!("{site}.pem"))).unwrap();
        assert_eq!(cert, ours, "{site}: its own certificate");
    }

    // The two configs are one pair: the primary dials the DR site's listener by its name,
    // the DR site admits the primary's, and both hold the same protections.
    let (p, d) = (&configs[0], &configs[1]);
    let peer = p.peer.as_ref().expect("the primary's [peer]");
    assert!(p.listen.is_none(), "the primary listens");
    assert_eq!(peer.server_name, d.site_name);
    assert_eq!(d.listen_peer.as_deref(), Some(p.site_name.as_str()));
    assert_eq!(Some(peer.address.port()), d.listen.map(|l| l.port()));
    let names =
        |c: &Config| -> Vec<String> { c.protections.iter().map(|p| p.name.to_string()).collect() };
    assert_eq!(names(p), names(d), "the sites' protections");
}

#[test]
fn an_overlay_without_its_tls_or_token_files_renders_nothing_so_no_secret_is_blanked() {
    // Nothing in the repository is key material or a placeholder for it.
    for path in manifest_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        for d in docs {
            assert_ne!(
                d["kind"],
                "Secret",
                "{}: a Secret in the repository",
                path.display()
            );
        }
    }
    for (tls, tokens) in [(false, true), (true, false), (false, false)] {
        let t = tree(tls, tokens);
        for site in ["primary", "dr"] {
            let dir = t.path().join("kubernetes").join(site);
            let err = render(&dir).err().unwrap_or_else(|| {
                panic!("{site} rendered without its files (tls {tls}, tokens {tokens})")
            });
            let missing = if tls { "tokens/" } else { "tls/" };
            assert!(err.contains(missing), "{site}: {err}");
        }
    }
    // A second certs --kubernetes never replaces an overlay's files.
    let t = tree(true, true);
    let again = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(["certs", "--out"])
        .arg(t.path().join("certs2"))
        .arg("--kubernetes")
        .arg(t.path().join("kubernetes"))
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "certs --kubernetes overwrote an overlay's files"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
}

#[test]
fn certs_kubernetes_refuses_a_directory_without_the_overlays_before_making_anything() {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(["certs", "--out"])
        .arg(t.path().join("certs"))
        .arg("--kubernetes")
        .arg(t.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kustomization.yaml"),
        "{out:?}"
    );
    assert!(
        !t.path().join("certs").exists(),
        "made a CA for overlays that are not there"
    );
}

/// Every YAML file under deploy/kubernetes but the git-ignored tls/ and tokens/.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap();
            if p.is_dir() {
                if name != "tls" && name != "tokens" {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("deploy/kubernetes"), &mut out);
    out.sort();
    out
}

#[test]
fn every_file_under_deploy_kubernetes_is_part_of_an_overlay() {
    let t = tree(true, true);
    let root = std::fs::canonicalize(t.path().join("kubernetes")).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for site in ["primary", "dr"] {
        let r = kustomize::render(&root.join(site)).unwrap();
        used.extend(
            r.files
                .iter()
                .map(|f| f.strip_prefix(&root).unwrap().to_path_buf()),
        );
    }
    for f in manifest_files() {
        let rel = f.strip_prefix(repo().join("deploy/kubernetes")).unwrap();
        assert!(
            used.contains(rel),
            "deploy/kubernetes/{} is in no overlay",
            rel.display()
        );
    }
    for site in ["primary", "dr"] {
        assert!(used.contains(&Path::new(site).join("lifeboat.toml")));
    }
}

#[test]
fn the_prometheus_rule_holds_exactly_the_groups_of_alerts_yaml() {
    let read = |p: &str| -> Value {
        serde_saphyr::from_str(&std::fs::read_to_string(repo().join(p)).unwrap()).unwrap()
    };
    let alerts = read("deploy/alerts.yaml");
    let rule = read("deploy/kubernetes/monitoring/prometheusrule.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "deploy/kubernetes/monitoring/prometheusrule.yaml's spec.groups must be deploy/alerts.yaml's groups"
    );
    let rules = items(&alerts["groups"][0]["rules"]);
    assert!(!rules.is_empty());
    for r in rules {
        assert!(r["expr"].as_str().unwrap().contains("lifeboat_"), "{r}");
    }
}
