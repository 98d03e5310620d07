//! A small Kubernetes API server for tests: real HTTP, spoken to by the real `kube` client
//! through a generated kubeconfig. One runs per site.
//!
//! What it models: discovery (`/api`, `/apis`, resource lists), list/get/create/replace/
//! delete with resourceVersions, 404 and 409, label and `metadata.name` field selectors,
//! server-side apply (create or merge; fields the same manager applied before and no longer
//! applies are removed; bodies with managedFields, a stale resourceVersion, a missing
//! fieldManager or a kind that does not match the URL are rejected as a real server
//! rejects them), JSON merge and JSON patches, the scale subresource, watch (replayed from
//! a resourceVersion, then live), namespaces that must exist, the object rules of
//! [`super::apirules`] (names, labels, immutable fields, duplicate list-map keys in an
//! apply), authentication by bearer token and RBAC authorization of every request, exec
//! included (tests/support/rbac.rs: the daemons' kubeconfig is the ServiceAccount
//! `lifeboat/lifeboat`, fixtures go through an admin kubeconfig in `system:masters`; every
//! decision is recorded for replay), and pods/exec over websocket (channel protocol v4/v5)
//! answered by a handler the test installs, with every call recorded.
//!
//! What it does not model: field ownership between several managers (one manager's last
//! applied config is tracked; lists are replaced whole, not merged by key), admission,
//! defaulting and validation of spec values, garbage collection (a delete is immediate,
//! whatever its propagation policy), and controllers. A stand-in for
//! the workload controllers sets `status` of Deployments, StatefulSets, ReplicaSets and
//! DaemonSets to "all ready" on every write when `controllers_ready` is on, so failover's
//! wait sees what a healthy cluster would report.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as AxPath, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use lifeboat::k8s::labels::Selector;

use super::apirules;
use super::rbac::{self, Check, Policy, User};

/// The ServiceAccount the daemons' kubeconfigs authenticate as.
pub const SA_NAMESPACE: &str = "lifeboat";
pub const SA_NAME: &str = "lifeboat";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    pub scale: bool,
}

impl ResType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

fn rt(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> ResType {
    ResType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        namespaced,
        scale: matches!(kind, "Deployment" | "StatefulSet" | "ReplicaSet"),
    }
}

fn builtin_types() -> Vec<ResType> {
    vec![
        rt("", "v1", "Namespace", "namespaces", false),
        rt("", "v1", "PersistentVolume", "persistentvolumes", false),
        rt("", "v1", "Pod", "pods", true),
        rt("", "v1", "Service", "services", true),
        rt("", "v1", "ConfigMap", "configmaps", true),
        rt("", "v1", "Secret", "secrets", true),
        rt("", "v1", "ServiceAccount", "serviceaccounts", true),
        rt(
            "",
            "v1",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            true,
        ),
        rt("apps", "v1", "Deployment", "deployments", true),
        rt("apps", "v1", "StatefulSet", "statefulsets", true),
        rt("apps", "v1", "DaemonSet", "daemonsets", true),
        rt("apps", "v1", "ReplicaSet", "replicasets", true),
        rt("batch", "v1", "Job", "jobs", true),
        rt("batch", "v1", "CronJob", "cronjobs", true),
        rt("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        rt(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        rt(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        rt(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
        ),
        rt("networking.k8s.io", "v1", "Ingress", "ingresses", true),
        rt(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            true,
        ),
        rt(
            "autoscaling",
            "v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
            true,
        ),
        rt(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        ),
        rt(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
    ]
}

/// (group, plural, namespace, name)
type Key = (String, String, String, String);

/// One recorded request: method, path (without query), and for patches the content type.
#[derive(Debug, Clone)]
pub struct Request {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
}

/// One pods/exec call.
#[derive(Debug, Clone)]
pub struct ExecCall {
    pub seq: u64,
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
    pub command: Vec<String>,
}

#[derive(Clone, Default)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// How long the command "runs" before it answers.
    pub delay: Duration,
    /// After its stdout, the command waits until its stdin is closed (a background action
    /// holding a lock until lifeboat ends it).
    pub wait_for_stdin: bool,
    /// Called when the stdin of a `wait_for_stdin` command closes (what the command does
    /// after its wait, e.g. release a lock).
    pub on_stdin_closed: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Run the command as a real process instead ([`super::kubeexec`]); the fields above
    /// are then unused.
    pub run_locally: bool,
}

impl std::fmt::Debug for ExecResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecResult")
            .field("exit_code", &self.exit_code)
            .field("wait_for_stdin", &self.wait_for_stdin)
            .finish_non_exhaustive()
    }
}

pub type ExecHandler = Arc<dyn Fn(&ExecCall) -> ExecResult + Send + Sync>;

#[derive(Clone)]
struct Event {
    rv: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

pub struct ApiState {
    /// Part of every uid: two servers never hand out the same one.
    name: String,
    rv: u64,
    seq: u64,
    uid: u64,
    types: Vec<ResType>,
    objects: BTreeMap<Key, Value>,
    /// Per object: the last config applied per field manager.
    applied: HashMap<Key, HashMap<String, Value>>,
    history: Vec<Event>,
    events: broadcast::Sender<Event>,
    /// (verb, plural) pairs answered with 403 whatever RBAC says; verb "*" for all.
    pub deny: Vec<(String, String)>,
    pub requests: Vec<Request>,
    /// Bearer token -> user.
    tokens: HashMap<String, User>,
    /// Every authorization decision, in order.
    pub checks: Vec<Check>,
    pub execs: Vec<ExecCall>,
    pub controllers_ready: bool,
    exec_handler: Option<ExecHandler>,
    /// Offer exec protocol v4 only, as servers before about 1.30 do (no stdin close).
    pub exec_v4_only: bool,
    /// API groups served by an aggregated API that is down (503 for their resources).
    pub unavailable_groups: Vec<String>,
}

#[derive(Clone)]
pub struct KubeApi {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ApiState>>,
    pub kubeconfig: PathBuf,
    /// A `system:masters` user's kubeconfig, for fixtures.
    pub admin_kubeconfig: PathBuf,
    /// The daemons' bearer token (the ServiceAccount's).
    pub sa_token: String,
    client_rt: Arc<tokio::runtime::Runtime>,
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn created(v: &Value) -> Response {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn query_map(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn q<'a>(qm: &'a [(String, String)], k: &str) -> Option<&'a str> {
    qm.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

/// Fields of `prev` (what this manager applied before) that `new` no longer has are
/// removed from `out`.
fn remove_dropped(out: &mut Value, prev: &Value, new: &Value) {
    let (Some(p), Some(o)) = (prev.as_object(), out.as_object_mut()) else {
        return;
    };
    for (k, pv) in p {
        match new.get(k) {
            None => {
                o.remove(k);
            }
            Some(nv) if pv.is_object() && nv.is_object() => {
                if let Some(ov) = o.get_mut(k) {
                    remove_dropped(ov, pv, nv);
                }
            }
            _ => {}
        }
    }
}

/// Objects merge by key; anything else is replaced.
fn merge(out: &mut Value, new: &Value) {
    match (out.as_object_mut(), new.as_object()) {
        (Some(o), Some(n)) => {
            for (k, nv) in n {
                match o.get_mut(k) {
                    Some(ov) if ov.is_object() && nv.is_object() => merge(ov, nv),
                    _ => {
                        o.insert(k.clone(), nv.clone());
                    }
                }
            }
        }
        _ => *out = new.clone(),
    }
}

impl ApiState {
    /// The RBAC objects as stored now.
    fn policy(&self) -> Policy {
        Policy::from_objects(
            self.objects
                .iter()
                .filter(|(k, _)| k.0 == rbac::RBAC_GROUP)
                .map(|(_, v)| v),
        )
    }

    /// The user of a request's bearer token.
    fn authenticate(&self, headers: &HeaderMap) -> Option<User> {
        let h = headers.get("authorization")?.to_str().ok()?;
        self.tokens.get(h.strip_prefix("Bearer ")?).cloned()
    }

    /// Authorizes `a` for `u`, records the decision, and answers the filter's 403 when
    /// denied (RBAC, or the test's `deny` overlay).
    fn authorize(&mut self, u: &User, a: &rbac::Attrs) -> Result<(), Box<Response>> {
        let denied_by_test = a.resource_request
            && self
                .deny
                .iter()
                .any(|(dv, dp)| (dv == "*" || *dv == a.verb) && *dp == a.resource);
        let r = if denied_by_test {
            Err(String::new())
        } else {
            self.policy().authorize(u, a)
        };
        self.checks.push(Check {
            user: u.clone(),
            attrs: a.clone(),
            or_holds: None,
            in_handler: false,
            allowed: r.is_ok(),
        });
        r.map_err(|reason| Box::new(rbac::forbidden(u, a, &reason)))
    }

    /// The create check of a server-side apply that creates (upstream `withAuthorization`
    /// in patch.go): its 403 carries the RBAC reason alone.
    fn authorize_create(&mut self, u: &User, a: &rbac::Attrs) -> Result<(), Box<Response>> {
        let a = rbac::Attrs {
            verb: "create".into(),
            ..a.clone()
        };
        let r = self.policy().authorize(u, &a);
        self.checks.push(Check {
            user: u.clone(),
            attrs: a.clone(),
            or_holds: None,
            in_handler: true,
            allowed: r.is_ok(),
        });
        r.map_err(|reason| Box::new(rbac::forbidden_in_handler(&a, &reason)))
    }

    /// The RBAC storage's bind/escalate check on a Role or binding being written.
    fn check_rbac_write(
        &mut self,
        u: &User,
        t: &ResType,
        ns: &str,
        name: &str,
        obj: &Value,
    ) -> Result<(), Box<Response>> {
        if t.group != rbac::RBAC_GROUP {
            return Ok(());
        }
        let (attrs, wanted, r) = self.policy().check_rbac_write(u, &t.kind, ns, name, obj);
        self.checks.push(Check {
            user: u.clone(),
            attrs,
            or_holds: Some(wanted),
            in_handler: true,
            allowed: r.is_ok(),
        });
        r
    }

    fn find_type(&self, group: &str, plural: &str) -> Option<ResType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, key: Key, kind: &'static str, object: Value) {
        let e = Event {
            rv: self.rv,
            key,
            kind,
            object,
        };
        self.history.push(e.clone());
        let _ = self.events.send(e);
    }

    /// The controllers' and kubelet's stand-in: workloads report every replica ready, and
    /// a pod created without a status is Running with every container ready.
    fn settle(&self, t: &ResType, v: &mut Value) {
        if self.controllers_ready && t.group.is_empty() && t.kind == "Pod" && v["status"].is_null()
        {
            let ready: Vec<Value> = v["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| json!({"name": c["name"], "ready": true, "started": true}))
                .collect();
            v["status"] = json!({"phase": "Running", "containerStatuses": ready});
        }
        if !self.controllers_ready || t.group != "apps" {
            return;
        }
        let gen = v["metadata"]["generation"].clone();
        if t.kind == "DaemonSet" {
            let standby = v
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(|s| s.as_object())
                .is_some_and(|s| s.keys().any(|k| k.contains("standby")));
            let n = if standby { 0 } else { 1 };
            v["status"] =
                json!({"desiredNumberScheduled": n, "numberReady": n, "observedGeneration": gen});
        } else {
            let n = v["spec"]["replicas"].as_i64().unwrap_or(1);
            v["status"] = json!({"replicas": n, "readyReplicas": n, "availableReplicas": n, "observedGeneration": gen});
        }
    }

    /// Stores `v` as the new state of `key` (created when `existing` is None).
    fn store(
        &mut self,
        t: &ResType,
        key: Key,
        mut v: Value,
        existing: Option<&Value>,
        manager: &str,
        op: &str,
    ) -> Value {
        v["apiVersion"] = json!(t.api_version());
        v["kind"] = json!(t.kind);
        match existing {
            Some(old) => {
                for f in ["uid", "creationTimestamp"] {
                    v["metadata"][f] = old["metadata"][f].clone();
                }
                let mut gen = old["metadata"]["generation"].as_i64().unwrap_or(1);
                if old.get("spec") != v.get("spec") {
                    gen += 1;
                }
                v["metadata"]["generation"] = json!(gen);
                if v.get("status").is_none() {
                    if let Some(s) = old.get("status") {
                        v["status"] = s.clone();
                    }
                }
            }
            None => {
                self.uid += 1;
                v["metadata"]["uid"] = json!(format!("{}-{:06}", self.name, self.uid));
                v["metadata"]["creationTimestamp"] = json!("2026-11-24T00:00:00Z");
                v["metadata"]["generation"] = json!(1);
            }
        }
        v["metadata"]["managedFields"] = json!([{"manager": manager, "operation": op,
            "apiVersion": t.api_version(), "fieldsType": "FieldsV1", "fieldsV1": {}}]);
        self.settle(t, &mut v);
        // A write that changes nothing keeps the resourceVersion, as a real server does.
        if let Some(old) = existing {
            let mut a = old.clone();
            a["metadata"]["resourceVersion"] = Value::Null;
            let mut b = v.clone();
            b["metadata"]["resourceVersion"] = Value::Null;
            if a == b {
                return old.clone();
            }
        }
        let rv = self.next_rv();
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), v.clone());
        self.emit(
            key,
            if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            v.clone(),
        );
        v
    }
}

/// For the controller stand-ins that run beside the server as a real cluster's controllers
/// do (the CSI driver and snapshot controller, the kubelet and Job controller): they read
/// the stored objects and write their results, status included, with the events a watch
/// sees, without authorization (they are the cluster's own components).
impl ApiState {
    /// Every stored object of a type, in key order.
    pub fn list_objects(&self, group: &str, plural: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.0 == group && k.1 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn get_object(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get(&(group.into(), plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Writes `v` (its type from apiVersion and kind) as `manager`: created, or updated
    /// with a new resourceVersion when it changed.
    pub fn put(&mut self, v: Value, manager: &str) -> Value {
        let t = self
            .types
            .iter()
            .find(|t| {
                t.api_version() == v["apiVersion"].as_str().unwrap_or("") && t.kind == v["kind"]
            })
            .cloned()
            .unwrap_or_else(|| panic!("unknown type {} {}", v["apiVersion"], v["kind"]));
        let ns = if t.namespaced {
            v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string()
        } else {
            String::new()
        };
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        let key = (t.group.clone(), t.plural.clone(), ns, name);
        let old = self.objects.get(&key).cloned();
        let op = if old.is_some() { "Update" } else { "Create" };
        self.store(&t, key, v, old.as_ref(), manager, op)
    }

    /// Removes an object at once (a controller's own cleanup), with its DELETED event.
    pub fn remove(&mut self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let key = (
            group.to_string(),
            plural.to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let v = self.objects.remove(&key)?;
        self.applied.remove(&key);
        self.next_rv();
        self.emit(key, "DELETED", v.clone());
        Some(v)
    }
}

struct Target {
    t: ResType,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(st: &ApiState, path: &str) -> Result<Target, Box<Response>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => {
            return Err(Box::new(status(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            )))
        }
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some(ns.to_string()), more),
        _ => (None, rest),
    };
    let Some((plural, more)) = rest.split_first() else {
        return Err(Box::new(status(
            404,
            "NotFound",
            format!("no resource in {path}"),
        )));
    };
    let t = st.find_type(group, plural).ok_or_else(|| {
        Box::new(status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({group}/{plural})"),
        ))
    })?;
    Ok(Target {
        t,
        ns,
        name: more.first().map(|s| s.to_string()),
        sub: more.get(1).map(|s| s.to_string()),
    })
}

fn discovery(st: &ApiState, path: &str) -> Option<Value> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resources = |group: &str, version: &str| {
        let list: Vec<Value> = st
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .flat_map(|t| {
                let mut v = vec![json!({"name": t.plural, "singularName": t.kind.to_lowercase(), "namespaced": t.namespaced,
                    "kind": t.kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})];
                if t.scale {
                    v.push(json!({"name": format!("{}/scale", t.plural), "singularName": "", "namespaced": t.namespaced,
                        "kind": "Scale", "group": "autoscaling", "version": "v1", "verbs": ["get", "patch", "update"]}));
                }
                v
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    match segs.as_slice() {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        ["api", "v1"] => Some(resources("", "v1")),
        ["apis"] => {
            let mut groups: BTreeMap<String, String> = BTreeMap::new();
            for t in st.types.iter().filter(|t| !t.group.is_empty()) {
                groups.insert(t.group.clone(), t.version.clone());
            }
            let list: Vec<Value> = groups
                .iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv], "preferredVersion": gv})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}))
        }
        ["apis", g] => st.types.iter().find(|t| t.group == *g).map(|t| {
            let gv = json!({"groupVersion": format!("{g}/{}", t.version), "version": t.version});
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv], "preferredVersion": gv})
        }),
        ["apis", g, v] if st.types.iter().any(|t| t.group == *g && t.version == *v) => Some(resources(g, v)),
        _ => None,
    }
}

fn matches_selectors(v: &Value, qm: &[(String, String)]) -> bool {
    if let Some(l) = q(qm, "labelSelector") {
        match Selector::parse(l) {
            Ok(sel) if !sel.matches_json(v.pointer("/metadata/labels")) => return false,
            Err(_) => return false,
            _ => {}
        }
    }
    if let Some(f) = q(qm, "fieldSelector") {
        for term in f.split(',') {
            if let Some(name) = term.strip_prefix("metadata.name=") {
                if v["metadata"]["name"] != name {
                    return false;
                }
            }
            if let Some(ns) = term.strip_prefix("metadata.namespace=") {
                if v["metadata"]["namespace"] != ns {
                    return false;
                }
            }
        }
    }
    true
}

fn verb(method: &Method, name: bool, watch: bool) -> &'static str {
    match (method.as_str(), name) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "other",
    }
}

async fn handle(
    State(api): State<Arc<Mutex<ApiState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let qm = query_map(&query);
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut st = api.lock().unwrap();
    st.seq += 1;
    let seq = st.seq;
    st.requests.push(Request {
        seq,
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: ctype.clone(),
    });
    let Some(user) = st.authenticate(&headers) else {
        return rbac::unauthorized();
    };
    let attrs = rbac::request_info(method.as_str(), &path, &qm);
    if let Err(r) = st.authorize(&user, &attrs) {
        return *r;
    }
    if method == Method::GET {
        // An aggregated API whose backing service is down: listed, but its resources fail.
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["apis", g, _, ..] = segs.as_slice() {
            if st.unavailable_groups.iter().any(|u| u == g) {
                return status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                );
            }
        }
        if let Some(d) = discovery(&st, &path) {
            return ok(&d);
        }
    }
    let target = match parse_target(&st, &path) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let watch = q(&qm, "watch").is_some_and(|w| w == "true" || w == "1");
    let v = verb(&method, target.name.is_some(), watch);
    let t = target.t.clone();
    let ns = target.ns.clone().unwrap_or_default();
    if t.namespaced && target.ns.is_some() && v != "list" && v != "watch" && v != "get" {
        let nskey = (
            String::new(),
            "namespaces".to_string(),
            String::new(),
            ns.clone(),
        );
        if !st.objects.contains_key(&nskey) {
            return status(404, "NotFound", format!("namespaces \"{ns}\" not found"));
        }
    }
    match (method.clone(), target.name.clone(), target.sub.clone()) {
        (Method::GET, None, _) => {
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.0 == t.group && k.1 == t.plural && (target.ns.is_none() || k.2 == ns)
                })
                .map(|(_, v)| v.clone())
                .filter(|v| matches_selectors(v, &qm))
                .map(|mut v| {
                    // Real list responses leave kind and apiVersion out of items.
                    let o = v.as_object_mut().unwrap();
                    o.remove("kind");
                    o.remove("apiVersion");
                    v
                })
                .collect();
            if watch {
                let from: u64 = q(&qm, "resourceVersion")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                return watch_stream(&st, t, target.ns.clone(), qm, from);
            }
            let rv = st.rv.to_string();
            ok(
                &json!({"kind": format!("{}List", t.kind), "apiVersion": t.api_version(),
                "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        (Method::GET, Some(name), None) => {
            match st
                .objects
                .get(&(t.group.clone(), t.plural.clone(), ns.clone(), name.clone()))
            {
                Some(v) => ok(v),
                None => status(
                    404,
                    "NotFound",
                    format!("{}.{} \"{name}\" not found", t.plural, t.group),
                ),
            }
        }
        (Method::POST, None, _) => {
            let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "body is not JSON");
            };
            let Some(name) = v["metadata"]["name"].as_str().map(String::from) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            let key = (t.group.clone(), t.plural.clone(), ns.clone(), name.clone());
            if st.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{}.{} \"{name}\" already exists", t.plural, t.group),
                );
            }
            if t.namespaced {
                v["metadata"]["namespace"] = json!(ns);
            }
            if let Err(r) = st.check_rbac_write(&user, &t, &ns, &name, &v) {
                return *r;
            }
            let manager = q(&qm, "fieldManager")
                .unwrap_or("kubectl-create")
                .to_string();
            if let Err(r) = apirules::admit(&t.group, &t.kind, None, &v) {
                return status(r.0, r.1, r.2);
            }
            let out = st.store(&t, key, v, None, &manager, "Update");
            created(&out)
        }
        (Method::PUT, Some(name), sub) => {
            let key = (t.group.clone(), t.plural.clone(), ns.clone(), name.clone());
            let Some(old) = st.objects.get(&key).cloned() else {
                return status(
                    404,
                    "NotFound",
                    format!("{}.{} \"{name}\" not found", t.plural, t.group),
                );
            };
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "body is not JSON");
            };
            if v["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                return status(409, "Conflict", format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    t.plural, t.group));
            }
            let manager = q(&qm, "fieldManager")
                .unwrap_or("kubectl-replace")
                .to_string();
            if sub.as_deref() == Some("scale") {
                let mut nv = old.clone();
                nv["spec"]["replicas"] = v["spec"]["replicas"].clone();
                let out = st.store(&t, key, nv, Some(&old), &manager, "Update");
                return ok(&scale_of(&t, &out));
            }
            if let Err(r) = st.check_rbac_write(&user, &t, &ns, &name, &v) {
                return *r;
            }
            if let Err(r) = apirules::admit(&t.group, &t.kind, Some(&old), &v) {
                return status(r.0, r.1, r.2);
            }
            let out = st.store(&t, key, v, Some(&old), &manager, "Update");
            ok(&out)
        }
        (Method::GET, Some(name), Some(sub)) if sub == "scale" && t.scale => {
            match st
                .objects
                .get(&(t.group.clone(), t.plural.clone(), ns.clone(), name.clone()))
            {
                Some(v) => ok(&scale_of(&t, v)),
                None => status(
                    404,
                    "NotFound",
                    format!("{}.{} \"{name}\" not found", t.plural, t.group),
                ),
            }
        }
        (Method::PATCH, Some(name), sub) => {
            let key = (t.group.clone(), t.plural.clone(), ns.clone(), name.clone());
            let old = st.objects.get(&key).cloned();
            if ctype.starts_with("application/apply-patch") {
                let Some(manager) = q(&qm, "fieldManager").map(String::from) else {
                    return status(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch");
                };
                let text = String::from_utf8_lossy(&body);
                let applied: Value =
                    match serde_json::from_str(&text).or_else(|_| serde_saphyr::from_str(&text)) {
                        Ok(v) => v,
                        Err(e) => {
                            return status(400, "BadRequest", format!("error decoding YAML: {e}"))
                        }
                    };
                if applied
                    .pointer("/metadata/managedFields")
                    .is_some_and(|m| !m.is_null())
                {
                    return status(400, "BadRequest", "metadata.managedFields must be nil");
                }
                if applied["kind"] != t.kind.as_str()
                    || applied["apiVersion"] != t.api_version().as_str()
                {
                    return status(
                        400,
                        "BadRequest",
                        format!(
                            "the body's kind/apiVersion {}/{} does not match {}/{}",
                            applied["apiVersion"],
                            applied["kind"],
                            t.api_version(),
                            t.kind
                        ),
                    );
                }
                if applied["metadata"]["name"] != name.as_str() {
                    return status(
                        400,
                        "BadRequest",
                        "the name of the object does not match the name on the URL",
                    );
                }
                if let Some(rv) = applied
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                {
                    let current = old
                        .as_ref()
                        .and_then(|o| o["metadata"]["resourceVersion"].as_str().map(String::from));
                    if current.as_deref() != Some(rv) {
                        return status(409, "Conflict", format!(
                            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            t.plural, t.group));
                    }
                }
                if let Err(r) = apirules::apply_body(&applied) {
                    return status(r.0, r.1, r.2);
                }
                let mut applied = applied;
                if let Some(o) = applied.as_object_mut() {
                    o.remove("status");
                }
                if t.namespaced {
                    applied["metadata"]["namespace"] = json!(ns);
                }
                let prev = st.applied.get(&key).and_then(|m| m.get(&manager)).cloned();
                let merged = match &old {
                    Some(o) => {
                        let mut out = o.clone();
                        if let Some(p) = &prev {
                            remove_dropped(&mut out, p, &applied);
                        }
                        merge(&mut out, &applied);
                        out
                    }
                    None => applied.clone(),
                };
                if old.is_none() {
                    if let Err(r) = st.authorize_create(&user, &attrs) {
                        return *r;
                    }
                }
                if let Err(r) = st.check_rbac_write(&user, &t, &ns, &name, &merged) {
                    return *r;
                }
                if let Err(r) = apirules::admit(&t.group, &t.kind, old.as_ref(), &merged) {
                    return status(r.0, r.1, r.2);
                }
                st.applied
                    .entry(key.clone())
                    .or_default()
                    .insert(manager.clone(), applied);
                let out = st.store(&t, key, merged, old.as_ref(), &manager, "Apply");
                return if old.is_some() {
                    ok(&out)
                } else {
                    created(&out)
                };
            }
            let Some(old) = old else {
                return status(
                    404,
                    "NotFound",
                    format!("{}.{} \"{name}\" not found", t.plural, t.group),
                );
            };
            let Ok(p) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "patch body is not JSON");
            };
            let mut nv = if sub.as_deref() == Some("scale") {
                scale_of(&t, &old)
            } else {
                old.clone()
            };
            if ctype.starts_with("application/json-patch") {
                let Ok(patch) = serde_json::from_value::<json_patch::Patch>(p) else {
                    return status(400, "BadRequest", "not a JSON patch");
                };
                if let Err(e) = json_patch::patch(&mut nv, &patch) {
                    return status(
                        422,
                        "Invalid",
                        format!("the JSON patch does not apply: {e}"),
                    );
                }
            } else {
                json_patch::merge(&mut nv, &p);
            }
            if sub.as_deref() == Some("scale") {
                let mut o = old.clone();
                o["spec"]["replicas"] = nv["spec"]["replicas"].clone();
                nv = o;
            }
            if sub.is_none() {
                if let Err(r) = st.check_rbac_write(&user, &t, &ns, &name, &nv) {
                    return *r;
                }
            }
            let manager = q(&qm, "fieldManager")
                .unwrap_or("kubectl-patch")
                .to_string();
            if let Err(r) = apirules::admit(&t.group, &t.kind, Some(&old), &nv) {
                return status(r.0, r.1, r.2);
            }
            let out = st.store(&t, key, nv, Some(&old), &manager, "Update");
            if sub.as_deref() == Some("scale") {
                return ok(&scale_of(&t, &out));
            }
            ok(&out)
        }
        (Method::DELETE, Some(name), None) => {
            let key = (t.group.clone(), t.plural.clone(), ns.clone(), name.clone());
            match st.objects.remove(&key) {
                Some(v) => {
                    st.applied.remove(&key);
                    st.next_rv();
                    st.emit(key, "DELETED", v.clone());
                    ok(&v)
                }
                None => status(
                    404,
                    "NotFound",
                    format!("{}.{} \"{name}\" not found", t.plural, t.group),
                ),
            }
        }
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} {path} is not supported by the test API server"),
        ),
    }
}

fn scale_of(t: &ResType, v: &Value) -> Value {
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": v["metadata"]["name"], "namespace": v["metadata"]["namespace"],
                     "resourceVersion": v["metadata"]["resourceVersion"], "uid": v["metadata"]["uid"]},
        "spec": {"replicas": v["spec"]["replicas"]},
        "status": {"replicas": v["status"]["replicas"].as_i64().unwrap_or(0), "selector": ""},
        "_kind": t.kind})
}

/// Events after `from` for this type, replayed from history, then live, as JSON lines.
fn watch_stream(
    st: &ApiState,
    t: ResType,
    ns: Option<String>,
    qm: Vec<(String, String)>,
    from: u64,
) -> Response {
    let rx = st.events.subscribe();
    let past: Vec<Event> = st.history.iter().filter(|e| e.rv > from).cloned().collect();
    let timeout = q(&qm, "timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(290u64);
    let wanted = move |e: &Event| {
        e.key.0 == t.group
            && e.key.1 == t.plural
            && ns.as_ref().is_none_or(|n| *n == e.key.2)
            && matches_selectors(&e.object, &qm)
    };
    let line =
        |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object})));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let replay: Vec<Result<Bytes, std::io::Error>> = past
        .iter()
        .filter(|e| wanted(e))
        .map(|e| Ok(line(e)))
        .collect();
    let live = futures::stream::unfold((rx, wanted), move |(mut rx, wanted)| async move {
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(e)) if wanted(&e) => {
                    return Some((
                        Ok::<_, std::io::Error>(Bytes::from(format!(
                            "{}\n",
                            json!({"type": e.kind, "object": e.object})
                        ))),
                        (rx, wanted),
                    ))
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                _ => return None,
            }
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::iter(replay), live);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn exec(
    State(api): State<Arc<Mutex<ApiState>>>,
    AxPath((ns, pod)): AxPath<(String, String)>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
    // Authorization comes first, as on a real server: a request without the upgrade
    // headers gets its 401/403 too.
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let qm = query_map(query.as_deref().unwrap_or(""));
    let call = {
        let mut st = api.lock().unwrap();
        st.seq += 1;
        let seq = st.seq;
        st.requests.push(Request {
            seq,
            method: "GET".into(),
            path: uri.path().to_string(),
            query: query.clone().unwrap_or_default(),
            content_type: String::new(),
        });
        // Authorized before the upgrade and before the pod is looked up: `get pods/exec`
        // for the websocket GET, and since 1.35 `create` as well
        // (AuthorizePodWebsocketUpgradeCreatePermission).
        let Some(user) = st.authenticate(&headers) else {
            return rbac::unauthorized();
        };
        let attrs = rbac::request_info("GET", uri.path(), &qm);
        for verb in ["get", "create"] {
            let a = rbac::Attrs {
                verb: verb.into(),
                ..attrs.clone()
            };
            if let Err(r) = st.authorize(&user, &a) {
                return *r;
            }
        }
        let call = ExecCall {
            seq: st.seq,
            namespace: ns.clone(),
            pod: pod.clone(),
            container: q(&qm, "container").map(String::from),
            command: qm
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
        };
        st.execs.push(call.clone());
        let pod_exists =
            st.objects
                .contains_key(&(String::new(), "pods".into(), ns.clone(), pod.clone()));
        if !pod_exists {
            return status(404, "NotFound", format!("pods \"{pod}\" not found"));
        }
        let p = &st.objects[&(String::new(), "pods".into(), ns.clone(), pod.clone())];
        if let Err(why) = exec_allowed(p, call.container.as_deref()) {
            return status(400, "BadRequest", why);
        }
        call
    };
    let (handler, v4_only) = {
        let st = api.lock().unwrap();
        (st.exec_handler.clone(), st.exec_v4_only)
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return r.into_response(),
    };
    let protocols: &[&'static str] = if v4_only {
        &["v4.channel.k8s.io"]
    } else {
        &["v5.channel.k8s.io", "v4.channel.k8s.io"]
    };
    ws.protocols(protocols.iter().copied())
        .on_upgrade(move |socket| run_exec(socket, call, handler))
}

/// Background actions' ends are recorded through the handler's shared state by the test;
/// the server itself only traces them.
fn api_note(call: &ExecCall, what: &str) {
    eprintln!(
        "test API server: exec {} in {}/{}: {what}",
        call.seq, call.namespace, call.pod
    );
}

/// A real server's checks before an exec: a Running pod, and a container named when the
/// pod has several, one the pod has.
fn exec_allowed(pod: &Value, container: Option<&str>) -> Result<(), String> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let names: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let c = match container {
        Some(c) if names.contains(&c) => c,
        Some(c) => return Err(format!("container {c} is not valid for pod {name}")),
        None if names.len() > 1 => {
            return Err(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            ))
        }
        None => names.first().copied().unwrap_or(""),
    };
    match pod["status"]["phase"].as_str() {
        Some("Running") | None => Ok(()),
        Some(done @ ("Succeeded" | "Failed")) => Err(format!(
            "cannot exec into a container in a completed pod; current phase is {done}"
        )),
        Some(_) => Err(format!(
            "unable to upgrade connection: container not found (\"{c}\")"
        )),
    }
}

async fn run_exec(mut socket: WebSocket, call: ExecCall, handler: Option<ExecHandler>) {
    let r = match handler {
        Some(h) => h(&call),
        None => ExecResult {
            stderr: "no exec handler installed".into(),
            exit_code: 126,
            ..Default::default()
        },
    };
    if r.run_locally {
        return super::kubeexec::run_local(socket, call.command.clone()).await;
    }
    if !r.delay.is_zero() {
        tokio::time::sleep(r.delay).await;
    }
    let frame = |ch: u8, data: &[u8]| {
        let mut b = vec![ch];
        b.extend_from_slice(data);
        Message::Binary(b.into())
    };
    if !r.stdout.is_empty() {
        let _ = socket.send(frame(1, r.stdout.as_bytes())).await;
    }
    if r.wait_for_stdin {
        // Like `read -r`: a line on stdin (v4 and v5) ends the wait, as does v5's close
        // of stdin ([255, 0]); a closed socket ends the wait too.
        while let Some(Ok(m)) = socket.recv().await {
            match m {
                Message::Binary(b) if b.first() == Some(&255) => break,
                Message::Binary(b) if b.first() == Some(&0) && b.contains(&b'\n') => break,
                Message::Close(_) => return,
                _ => {}
            }
        }
        api_note(&call, "stdin closed");
        if let Some(f) = &r.on_stdin_closed {
            f();
        }
    }
    if !r.stderr.is_empty() {
        let _ = socket.send(frame(2, r.stderr.as_bytes())).await;
    }
    let status = if r.exit_code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {:?}, exit code {}", call.command, r.exit_code),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": r.exit_code.to_string()}]}})
    };
    let _ = socket.send(frame(3, status.to_string().as_bytes())).await;
    let _ = socket.send(Message::Close(None)).await;
}

impl KubeApi {
    /// Starts a server on loopback and writes its kubeconfig into `dir`.
    pub fn start(dir: &Path, name: &str) -> KubeApi {
        let (tx, _) = broadcast::channel(4096);
        let state = Arc::new(Mutex::new(ApiState {
            name: name.to_string(),
            rv: 1,
            seq: 0,
            uid: 0,
            types: builtin_types(),
            objects: BTreeMap::new(),
            applied: HashMap::new(),
            history: Vec::new(),
            events: tx,
            deny: Vec::new(),
            requests: Vec::new(),
            tokens: HashMap::new(),
            checks: Vec::new(),
            execs: Vec::new(),
            controllers_ready: true,
            exec_handler: None,
            exec_v4_only: false,
            unavailable_groups: Vec::new(),
        }));
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/api/v1/namespaces/{ns}/pods/{pod}/exec", any(exec))
            .fallback(handle)
            .with_state(state.clone());
        rt.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let write_config = |file: String, token: &str| {
            let path = dir.join(file);
            std::fs::write(
                &path,
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: http://{addr}\nusers:\n- name: {name}\n  user: {{token: {token}}}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\ncurrent-context: {name}\n"
                ),
            )
            .unwrap();
            path
        };
        let sa_token = format!("sa-{}", rand::random::<u64>());
        let admin_token = format!("admin-{}", rand::random::<u64>());
        let kubeconfig = write_config(format!("{name}.kubeconfig"), &sa_token);
        let token = sa_token.clone();
        let admin_kubeconfig = write_config(format!("{name}-admin.kubeconfig"), &admin_token);
        {
            let mut st = state.lock().unwrap();
            st.tokens
                .insert(sa_token, User::service_account(SA_NAMESPACE, SA_NAME));
            st.tokens.insert(admin_token, User::admin());
        }
        let api = KubeApi {
            addr,
            state,
            kubeconfig,
            admin_kubeconfig,
            sa_token: token,
            client_rt: rt,
        };
        // What a cluster holds before anyone writes: the bootstrap roles, and lifeboat's
        // namespace and ServiceAccount (deploy/kubernetes/base).
        let mut seed = rbac::bootstrap();
        seed.push(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SA_NAMESPACE}}),
        );
        seed.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": SA_NAME, "namespace": SA_NAMESPACE}}));
        for v in seed {
            api.seed(v);
        }
        api
    }

    /// Stores an object as etcd would hold it, without authorization (the cluster's
    /// bootstrap state, or RBAC an administrator applied).
    pub fn seed(&self, v: Value) {
        self.state.lock().unwrap().put(v, "kubectl");
    }

    /// Seeds every document of a multi-document YAML (a site's RBAC file).
    pub fn seed_yaml(&self, yaml: &str) {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
        for d in docs.into_iter().filter(|d| !d.is_null()) {
            self.seed(d);
        }
    }

    /// The workload controllers catch up (after `controllers_ready` was off): every
    /// workload reports all its replicas ready, as a watch sees.
    pub fn controllers_catch_up(&self) {
        let mut st = self.state.lock().unwrap();
        st.controllers_ready = true;
        let keys: Vec<Key> = st
            .objects
            .keys()
            .filter(|k| k.0 == "apps")
            .cloned()
            .collect();
        for key in keys {
            let Some(t) = st.find_type(&key.0, &key.1) else {
                continue;
            };
            let old = st.objects[&key].clone();
            let manager = old["metadata"]["managedFields"][0]["manager"]
                .as_str()
                .unwrap_or("kube-controller-manager")
                .to_string();
            st.store(&t, key, old.clone(), Some(&old), &manager, "Update");
        }
    }

    /// Runs `f` on the server's state under its lock (the controller stand-ins' way in).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut ApiState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Every authorization decision so far.
    pub fn checks(&self) -> Vec<Check> {
        self.state.lock().unwrap().checks.clone()
    }

    /// The RBAC objects as stored now.
    pub fn policy(&self) -> Policy {
        self.state.lock().unwrap().policy()
    }

    /// A SubjectAccessReview as a component outside the server makes one (a CSI sidecar
    /// authorizing its caller): RBAC's answer, recorded with the server's own decisions.
    pub fn subject_access_review(&self, u: &User, a: &rbac::Attrs) -> Result<(), String> {
        let mut st = self.state.lock().unwrap();
        let r = st.policy().authorize(u, a);
        st.checks.push(Check {
            user: u.clone(),
            attrs: a.clone(),
            or_holds: None,
            in_handler: false,
            allowed: r.is_ok(),
        });
        r
    }

    pub fn add_type(&self, group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) {
        self.state
            .lock()
            .unwrap()
            .types
            .push(rt(group, version, kind, plural, namespaced));
    }

    pub fn deny(&self, verb: &str, plural: &str) {
        self.state
            .lock()
            .unwrap()
            .deny
            .push((verb.into(), plural.into()));
    }

    pub fn allow_all(&self) {
        self.state.lock().unwrap().deny.clear();
    }

    /// Serves `group` (a type of it must be added) as an aggregated API that is down.
    pub fn make_unavailable(&self, group: &str) {
        self.state
            .lock()
            .unwrap()
            .unavailable_groups
            .push(group.to_string());
    }

    /// Offer exec protocol v4 only.
    pub fn exec_v4_only(&self) {
        self.state.lock().unwrap().exec_v4_only = true;
    }

    pub fn set_exec_handler(&self, h: impl Fn(&ExecCall) -> ExecResult + Send + Sync + 'static) {
        self.state.lock().unwrap().exec_handler = Some(Arc::new(h));
    }

    pub fn execs(&self) -> Vec<ExecCall> {
        self.state.lock().unwrap().execs.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// An object as stored, by (apiVersion's group, plural, namespace, name).
    pub fn get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&(group.into(), plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Every stored object of a type.
    pub fn all(&self, group: &str, plural: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == group && k.1 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every stored object in a namespace (namespaced types only).
    pub fn in_namespace(&self, ns: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.2 == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// An admin's `kube` client of this server, for the test to create fixtures as kubectl
    /// would.
    pub fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.admin_kubeconfig).unwrap();
        self.client_rt.block_on(async {
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            kube::Client::try_from(cfg).unwrap()
        })
    }

    /// A `kube` client with the daemons' identity (the ServiceAccount).
    pub fn daemon_client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        self.client_rt.block_on(async {
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            kube::Client::try_from(cfg).unwrap()
        })
    }

    /// Runs a future on the server's client runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.client_rt.block_on(f)
    }

    /// Creates objects from a multi-document YAML through the real client (POST).
    pub fn create_yaml(&self, yaml: &str) {
        let client = self.client();
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
        self.client_rt.block_on(async {
            for d in docs.into_iter().filter(|d| !d.is_null()) {
                self.create_with(&client, d).await;
            }
        });
    }

    /// A typed-by-registry client handle for `plural` of `group` (namespace ignored for
    /// cluster-scoped types).
    fn api(
        &self,
        client: kube::Client,
        group: &str,
        plural: &str,
        ns: Option<&str>,
    ) -> kube::Api<kube::api::DynamicObject> {
        let t = self
            .state
            .lock()
            .unwrap()
            .find_type(group, plural)
            .unwrap_or_else(|| panic!("unknown type {group}/{plural}"));
        let ar = kube::api::ApiResource {
            group: t.group.clone(),
            version: t.version.clone(),
            api_version: t.api_version(),
            kind: t.kind.clone(),
            plural: t.plural.clone(),
        };
        match ns {
            Some(ns) if t.namespaced => kube::Api::namespaced_with(client, ns, &ar),
            _ => kube::Api::all_with(client, &ar),
        }
    }

    async fn create_with(&self, client: &kube::Client, d: Value) {
        let (group, plural) = {
            let st = self.state.lock().unwrap();
            let t = st
                .types
                .iter()
                .find(|t| {
                    t.api_version() == d["apiVersion"].as_str().unwrap_or("")
                        && t.kind == d["kind"].as_str().unwrap_or("")
                })
                .unwrap_or_else(|| panic!("unknown type {} {}", d["apiVersion"], d["kind"]));
            (t.group.clone(), t.plural.clone())
        };
        let api = self.api(
            client.clone(),
            &group,
            &plural,
            d["metadata"]["namespace"].as_str(),
        );
        let obj: kube::api::DynamicObject = serde_json::from_value(d).unwrap();
        api.create(&Default::default(), &obj).await.unwrap();
    }

    /// Changes an object through a JSON merge patch, as `kubectl patch --type merge` would.
    pub fn merge_patch(&self, group: &str, plural: &str, ns: &str, name: &str, patch: Value) {
        let api = self.api(self.client(), group, plural, Some(ns));
        self.client_rt.block_on(async {
            api.patch(name, &Default::default(), &kube::api::Patch::Merge(patch))
                .await
                .unwrap();
        });
    }

    pub fn delete(&self, group: &str, plural: &str, ns: &str, name: &str) {
        let api = self.api(self.client(), group, plural, Some(ns));
        self.client_rt.block_on(async {
            api.delete(name, &Default::default()).await.unwrap();
        });
    }
}
