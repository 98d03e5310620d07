//! RBAC for the test API server, with a real kube-apiserver's rules: request attributes from
//! method and URL (upstream `RequestInfoFactory`), the RBAC authorizer's rule matching and
//! binding resolution (`rbac.go`, `rule.go`), the storage-layer checks on Roles and
//! RoleBindings (`bind`/`escalate`, else "holds every permission it grants",
//! `escalation_check.go`, `policybased/storage.go`), and the exact 401/403 bodies
//! (`responsewriters.Forbidden`, `apierrors.NewForbidden`).
//!
//! Identity is a bearer token mapped to a user and groups. `system:masters` bypasses RBAC and
//! the escalation checks, as upstream's privileged-group authorizer and `EscalationAllowed`.
//!
//! What it does not model: `aggregationRule` on ClusterRoles (aggregated roles such as the
//! real `view` are seeded with their rules written out), impersonation, the Node and webhook
//! authorizers, `/watch/` path prefixes (deprecated), ServiceAccount token expiry, selectors
//! other than an exact `metadata.name` in field selectors (authorization by selector), and
//! the RBAC reason text beyond role-resolution errors.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    pub fn service_account(ns: &str, name: &str) -> User {
        User {
            name: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        }
    }

    pub fn admin() -> User {
        User {
            name: "test-admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        }
    }

    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What is asked (upstream `authorizer.AttributesRecord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub verb: String,
    pub resource_request: bool,
    pub path: String,
    pub group: String,
    pub resource: String,
    pub sub: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Attrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.resource_request {
            return write!(f, "{} path {}", self.verb, self.path);
        }
        let g = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {g}/{}", self.verb, self.resource)?;
        if !self.sub.is_empty() {
            write!(f, "/{}", self.sub)?;
        }
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        if self.namespace.is_empty() {
            write!(f, " at the cluster scope")
        } else {
            write!(f, " in namespace {}", self.namespace)
        }
    }
}

/// The attributes of a request, as upstream's `RequestInfoFactory` makes them.
pub fn request_info(method: &str, path: &str, query: &[(String, String)]) -> Attrs {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => &[],
    };
    let group = match segs.as_slice() {
        ["apis", g, _, ..] => g.to_string(),
        _ => String::new(),
    };
    let mut a = Attrs {
        verb: method.to_ascii_lowercase(),
        resource_request: false,
        path: path.to_string(),
        group: String::new(),
        resource: String::new(),
        sub: String::new(),
        namespace: String::new(),
        name: String::new(),
    };
    if rest.is_empty() {
        return a;
    }
    a.resource_request = true;
    a.group = group;
    a.verb = match method {
        "POST" => "create",
        "GET" | "HEAD" => "get",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        other => {
            return Attrs {
                verb: other.to_ascii_lowercase(),
                ..a
            }
        }
    }
    .into();
    let mut parts = rest;
    if parts[0] == "namespaces" && parts.len() > 1 {
        a.namespace = parts[1].to_string();
        // `/namespaces/{ns}` is the Namespace itself (in its own namespace); `status` and
        // `finalize` are its subresources.
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts = &parts[2..];
        }
    }
    a.resource = parts[0].to_string();
    a.name = parts.get(1).map(|s| s.to_string()).unwrap_or_default();
    a.sub = parts.get(2).map(|s| s.to_string()).unwrap_or_default();
    let q = |k: &str| {
        query
            .iter()
            .find(|(qk, _)| qk == k)
            .map(|(_, v)| v.as_str())
    };
    if a.name.is_empty() {
        match a.verb.as_str() {
            "get" if matches!(q("watch"), Some("true" | "1")) => a.verb = "watch".into(),
            "get" => a.verb = "list".into(),
            "delete" => a.verb = "deletecollection".into(),
            _ => {}
        }
        if matches!(a.verb.as_str(), "list" | "watch") {
            // A field selector that requires exactly one name authorizes that name.
            if let Some(f) = q("fieldSelector") {
                let terms: Vec<&str> = f.split(',').collect();
                if let [one] = terms.as_slice() {
                    if let Some(n) = one.strip_prefix("metadata.name=") {
                        a.name = n.trim_start_matches('=').to_string();
                    }
                }
            }
        }
    }
    a
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyRule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub resource_names: Vec<String>,
    #[serde(rename = "nonResourceURLs")]
    pub non_resource_urls: Vec<String>,
}

impl PolicyRule {
    /// Upstream `RuleAllows`.
    pub fn allows(&self, a: &Attrs) -> bool {
        let has = |l: &[String], v: &str| l.iter().any(|x| x == "*" || x == v);
        if !has(&self.verbs, &a.verb) {
            return false;
        }
        if !a.resource_request {
            return self.non_resource_urls.iter().any(|u| {
                u == "*"
                    || *u == a.path
                    || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
            });
        }
        let resource = if a.sub.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.sub)
        };
        has(&self.api_groups, &a.group)
            && self.resources.iter().any(|r| {
                r == "*" || *r == resource || (!a.sub.is_empty() && *r == format!("*/{}", a.sub))
            })
            && (self.resource_names.is_empty() || self.resource_names.contains(&a.name))
    }

    /// Upstream's `CompactString`, as the escalation error lists missing rules.
    fn compact(&self) -> String {
        let q = |l: &[String]| {
            l.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut parts = Vec::new();
        if !self.api_groups.is_empty() {
            parts.push(format!("APIGroups:[{}]", q(&self.api_groups)));
        }
        if !self.resources.is_empty() {
            parts.push(format!("Resources:[{}]", q(&self.resources)));
        }
        if !self.resource_names.is_empty() {
            parts.push(format!("ResourceNames:[{}]", q(&self.resource_names)));
        }
        if !self.non_resource_urls.is_empty() {
            parts.push(format!("NonResourceURLs:[{}]", q(&self.non_resource_urls)));
        }
        parts.push(format!("Verbs:[{}]", q(&self.verbs)));
        format!("{{{}}}", parts.join(", "))
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Subject {
    kind: String,
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleRef {
    #[serde(default)]
    pub api_group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone)]
struct Binding {
    namespace: String,
    subjects: Vec<Subject>,
    role_ref: RoleRef,
}

/// Where a rule comes from: (kind, namespace, name, index in `rules`).
pub type RuleId = (String, String, String, usize);

/// The RBAC objects of a server, read from its stored objects.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    cluster_roles: BTreeMap<String, Vec<PolicyRule>>,
    roles: BTreeMap<(String, String), Vec<PolicyRule>>,
    bindings: Vec<Binding>,
}

fn rules_of(v: &Value) -> Vec<PolicyRule> {
    serde_json::from_value(v["rules"].clone()).unwrap_or_default()
}

impl Policy {
    pub fn from_objects<'a>(objects: impl Iterator<Item = &'a Value>) -> Policy {
        let mut p = Policy::default();
        for v in objects {
            if v["apiVersion"] != format!("{RBAC_GROUP}/v1").as_str() {
                continue;
            }
            let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            match v["kind"].as_str() {
                Some("ClusterRole") => {
                    p.cluster_roles.insert(name, rules_of(v));
                }
                Some("Role") => {
                    p.roles.insert((ns, name), rules_of(v));
                }
                Some("ClusterRoleBinding") | Some("RoleBinding") => {
                    let (Ok(subjects), Ok(role_ref)) = (
                        serde_json::from_value(v["subjects"].clone()).or_else(|_| {
                            if v["subjects"].is_null() {
                                Ok(Vec::new())
                            } else {
                                Err(())
                            }
                        }),
                        serde_json::from_value::<RoleRef>(v["roleRef"].clone()),
                    ) else {
                        continue;
                    };
                    let namespace = if v["kind"] == "RoleBinding" {
                        ns
                    } else {
                        String::new()
                    };
                    p.bindings.push(Binding {
                        namespace,
                        subjects,
                        role_ref,
                    });
                }
                _ => {}
            }
        }
        p
    }

    /// Every rule of a (Cluster)Role, with where it comes from.
    pub fn rule_ids(&self) -> Vec<(RuleId, PolicyRule)> {
        let mut out = Vec::new();
        for (name, rules) in &self.cluster_roles {
            for (i, r) in rules.iter().enumerate() {
                out.push((
                    ("ClusterRole".into(), String::new(), name.clone(), i),
                    r.clone(),
                ));
            }
        }
        for ((ns, name), rules) in &self.roles {
            for (i, r) in rules.iter().enumerate() {
                out.push((("Role".into(), ns.clone(), name.clone(), i), r.clone()));
            }
        }
        out
    }

    /// The same policy without one rule (for checking that the rule is needed).
    pub fn without(&self, id: &RuleId) -> Policy {
        let mut p = self.clone();
        let rules = match id.0.as_str() {
            "ClusterRole" => p.cluster_roles.get_mut(&id.2),
            _ => p.roles.get_mut(&(id.1.clone(), id.2.clone())),
        };
        if let Some(r) = rules {
            if id.3 < r.len() {
                r.remove(id.3);
            }
        }
        p
    }

    /// The rules of a role reference, or upstream's not-found error text.
    fn resolve(&self, r: &RoleRef, ns: &str) -> Result<&Vec<PolicyRule>, String> {
        match r.kind.as_str() {
            "ClusterRole" => self
                .cluster_roles
                .get(&r.name)
                .ok_or_else(|| format!("clusterrole.{RBAC_GROUP} {:?} not found", r.name)),
            _ => self
                .roles
                .get(&(ns.to_string(), r.name.clone()))
                .ok_or_else(|| format!("role.{RBAC_GROUP} {:?} not found", r.name)),
        }
    }

    /// Every rule that applies to `u` in `ns` (cluster-wide bindings, then the namespace's
    /// RoleBindings), and the role-resolution errors met on the way.
    pub fn rules_for(&self, u: &User, ns: &str) -> (Vec<&PolicyRule>, Vec<String>) {
        let applies = |s: &Subject| match s.kind.as_str() {
            "User" => s.name == u.name,
            "Group" => u.groups.contains(&s.name),
            "ServiceAccount" => {
                u.name == format!("system:serviceaccount:{}:{}", s.namespace, s.name)
            }
            _ => false,
        };
        let mut rules = Vec::new();
        let mut errs = Vec::new();
        for b in &self.bindings {
            let in_scope = b.namespace.is_empty() || (!ns.is_empty() && b.namespace == ns);
            if !in_scope || !b.subjects.iter().any(applies) {
                continue;
            }
            match self.resolve(&b.role_ref, &b.namespace) {
                // Non-resource URLs count only through ClusterRoleBindings.
                Ok(rs) => rules.extend(
                    rs.iter()
                        .filter(|r| b.namespace.is_empty() || r.non_resource_urls.is_empty()),
                ),
                Err(e) => errs.push(e),
            }
        }
        (rules, errs)
    }

    /// The RBAC authorizer: allowed, or the reason (empty unless a role did not resolve).
    pub fn authorize(&self, u: &User, a: &Attrs) -> Result<(), String> {
        if u.is_master() {
            return Ok(());
        }
        let (rules, errs) = self.rules_for(u, &a.namespace);
        if rules.iter().any(|r| r.allows(a)) {
            return Ok(());
        }
        Err(match errs.as_slice() {
            [] => String::new(),
            [one] => format!("RBAC: {one}"),
            many => format!("RBAC: [{}]", many.join(", ")),
        })
    }

    /// The rules of `wanted` that `u` does not hold in `ns`, one atom per rule (upstream
    /// `ConfirmNoEscalation`'s "covers").
    pub fn not_held(&self, u: &User, ns: &str, wanted: &[PolicyRule]) -> Vec<PolicyRule> {
        if u.is_master() {
            return Vec::new();
        }
        let (owner, _) = self.rules_for(u, ns);
        let mut missing = Vec::new();
        for w in wanted {
            let mut atoms: BTreeSet<(String, String, String, String)> = BTreeSet::new();
            let names = if w.resource_names.is_empty() {
                vec![String::new()]
            } else {
                w.resource_names.clone()
            };
            for g in &w.api_groups {
                for r in &w.resources {
                    for v in &w.verbs {
                        for n in &names {
                            atoms.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                        }
                    }
                }
            }
            for (g, r, v, n) in atoms {
                let covered = owner.iter().any(|o| {
                    let has = |l: &[String], x: &str| l.iter().any(|y| y == "*" || y == x);
                    let res = o.resources.iter().any(|or| {
                        or == "*"
                            || *or == r
                            || r.split_once('/')
                                .is_some_and(|(_, sub)| *or == format!("*/{sub}"))
                    });
                    has(&o.verbs, &v)
                        && has(&o.api_groups, &g)
                        && res
                        && (o.resource_names.is_empty()
                            || (!n.is_empty() && o.resource_names.contains(&n)))
                });
                if !covered {
                    missing.push(PolicyRule {
                        verbs: vec![v],
                        api_groups: vec![g],
                        resources: vec![r],
                        resource_names: if n.is_empty() { vec![] } else { vec![n] },
                        non_resource_urls: vec![],
                    });
                }
            }
        }
        missing
    }

    /// The storage-layer check of a Role, ClusterRole or (Cluster)RoleBinding being written:
    /// `escalate` (roles) or `bind` (bindings, on the referenced role), else every permission
    /// granted must be held. The bind/escalate attributes and the rules that must otherwise be
    /// held are returned with the outcome, for the request log.
    pub fn check_rbac_write(
        &self,
        u: &User,
        kind: &str,
        ns: &str,
        name: &str,
        obj: &Value,
    ) -> (Attrs, Vec<PolicyRule>, Result<(), Box<Response>>) {
        let mut a = Attrs {
            verb: String::new(),
            resource_request: true,
            path: String::new(),
            group: RBAC_GROUP.into(),
            resource: String::new(),
            sub: String::new(),
            namespace: ns.to_string(),
            name: String::new(),
        };
        let (resource, wanted) = match kind {
            "Role" | "ClusterRole" => {
                a.verb = "escalate".into();
                a.resource = if kind == "Role" {
                    "roles"
                } else {
                    "clusterroles"
                }
                .into();
                a.name = name.to_string();
                (a.resource.clone(), rules_of(obj))
            }
            _ => {
                let resource = if kind == "RoleBinding" {
                    "rolebindings"
                } else {
                    "clusterrolebindings"
                };
                let Ok(r) = serde_json::from_value::<RoleRef>(obj["roleRef"].clone()) else {
                    return (
                        a,
                        vec![],
                        Err(Box::new(invalid(resource, name, "roleRef: Required value"))),
                    );
                };
                a.verb = "bind".into();
                a.group = r.api_group.clone();
                a.resource = if r.kind == "ClusterRole" {
                    "clusterroles"
                } else {
                    "roles"
                }
                .into();
                a.name = r.name.clone();
                match self.resolve(&r, ns) {
                    Ok(rs) => (resource.to_string(), rs.clone()),
                    Err(_) if self.authorize(u, &a).is_ok() => (resource.to_string(), vec![]),
                    Err(_) => {
                        let what = if r.kind == "ClusterRole" {
                            "clusterroles"
                        } else {
                            "roles"
                        };
                        return (
                            a,
                            vec![],
                            Err(Box::new(status(
                                404,
                                "NotFound",
                                format!("{what}.{RBAC_GROUP} {:?} not found", r.name),
                                json!({"name": r.name, "group": RBAC_GROUP, "kind": what}),
                            ))),
                        );
                    }
                }
            }
        };
        if self.authorize(u, &a).is_ok() {
            return (a, wanted, Ok(()));
        }
        let missing = self.not_held(u, ns, &wanted);
        if missing.is_empty() {
            return (a, wanted, Ok(()));
        }
        let lines: Vec<String> = missing.iter().map(PolicyRule::compact).collect();
        let groups: Vec<String> = u.groups.iter().map(|g| format!("{g:?}")).collect();
        let reason = format!(
            "user {:?} (groups=[{}]) is attempting to grant RBAC permissions not currently held:\n{}",
            u.name,
            groups.join(" "),
            lines.join("\n")
        );
        let gr = Attrs {
            resource,
            group: RBAC_GROUP.into(),
            name: name.to_string(),
            ..a.clone()
        };
        (a, wanted, Err(Box::new(forbidden_in_handler(&gr, &reason))))
    }
}

/// One authorization decision, kept for replay: the attributes, and for bind/escalate the
/// rules that holding would have allowed instead.
#[derive(Debug, Clone)]
pub struct Check {
    pub user: User,
    pub attrs: Attrs,
    pub or_holds: Option<Vec<PolicyRule>>,
    /// Made inside the handler (a creating apply's `create`, bind/escalate), whose 403 is
    /// `NewForbidden` with the reason alone, not the filter's "User … cannot …".
    pub in_handler: bool,
    pub allowed: bool,
}

impl Check {
    /// Whether `policy` allows what this check asked.
    pub fn allowed_by(&self, policy: &Policy) -> bool {
        policy.authorize(&self.user, &self.attrs).is_ok()
            || self.or_holds.as_ref().is_some_and(|w| {
                policy
                    .not_held(&self.user, &self.attrs.namespace, w)
                    .is_empty()
            })
    }
}

fn status(code: u16, reason: &str, message: String, details: Value) -> Response {
    let mut body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    if !details.is_null() {
        body["details"] = details;
    }
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn invalid(resource: &str, name: &str, what: &str) -> Response {
    status(
        422,
        "Invalid",
        format!("{resource}.{RBAC_GROUP} {name:?} is invalid: {what}"),
        Value::Null,
    )
}

pub fn unauthorized() -> Response {
    status(401, "Unauthorized", "Unauthorized".into(), Value::Null)
}

/// Upstream `apierrors.NewForbidden(gr, name, err)`.
fn new_forbidden(a: &Attrs, err: &str) -> Response {
    let message = if !a.resource_request {
        format!("forbidden: {err}")
    } else {
        let gr = if a.group.is_empty() {
            a.resource.clone()
        } else {
            format!("{}.{}", a.resource, a.group)
        };
        if a.name.is_empty() {
            format!("{gr} is forbidden: {err}")
        } else {
            format!("{gr} {:?} is forbidden: {err}", a.name)
        }
    };
    let mut details = json!({});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.group.is_empty() {
        details["group"] = json!(a.group);
    }
    if !a.resource.is_empty() {
        details["kind"] = json!(a.resource);
    }
    status(403, "Forbidden", message, details)
}

/// The authorization filter's 403 (upstream `responsewriters.Forbidden`).
pub fn forbidden(u: &User, a: &Attrs, reason: &str) -> Response {
    let msg = forbidden_message(u, a);
    let err = if reason.is_empty() {
        msg
    } else {
        format!("{msg}: {reason}")
    };
    new_forbidden(a, &err)
}

/// Upstream `forbiddenMessage`: who cannot do what, where.
pub fn forbidden_message(u: &User, a: &Attrs) -> String {
    if !a.resource_request {
        format!("User {:?} cannot {} path {:?}", u.name, a.verb, a.path)
    } else {
        let resource = if a.sub.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.sub)
        };
        let scope = if a.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {:?}", a.namespace)
        };
        format!(
            "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            u.name, a.verb, a.group
        )
    }
}

/// A 403 from inside a handler (upstream `withAuthorization` for a creating apply, and the
/// RBAC storage's escalation check): `NewForbidden` with the reason alone.
pub fn forbidden_in_handler(a: &Attrs, reason: &str) -> Response {
    new_forbidden(a, reason)
}

/// The bootstrap roles every cluster has that the tests rely on: `system:discovery` bound to
/// all authenticated users, and `view` with its aggregated rules written out (trimmed to the
/// kinds the test server serves).
pub fn bootstrap() -> Vec<Value> {
    vec![
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:discovery"},
            "rules": [{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:discovery"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:discovery"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "view"},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps", "persistentvolumeclaims", "pods",
                    "services", "serviceaccounts"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets",
                    "replicasets"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": ["get", "list", "watch"]}]}),
    ]
}

/// Every rule of the shipped lifeboat roles at a site (and the documented custom-resource
/// rule) is needed: the site's recorded decisions of a run, re-authorized without that
/// rule, deny some request. Returns the failures, each naming the rule.
pub fn unneeded_rules(site: &str, api: &super::kubeapi::KubeApi) -> Vec<String> {
    let policy = api.policy();
    let checks = api.checks();
    // The daemon's account and the movers' (which a SnapshotMetadata sidecar authorizes).
    let sa = |c: &&Check| {
        c.user
            .name
            .starts_with("system:serviceaccount:lifeboat:lifeboat")
    };
    let denied: Vec<String> = checks
        .iter()
        .filter(sa)
        .filter(|c| !c.allowed)
        .map(|c| c.attrs.to_string())
        .collect();
    assert!(
        denied.is_empty(),
        "{site}: the shipped RBAC denied {denied:?}"
    );
    let mut out = Vec::new();
    for (id, rule) in policy.rule_ids() {
        if !id.2.starts_with("lifeboat") {
            continue;
        }
        let without = policy.without(&id);
        // A denial by the authorization filter if there is one: its 403 says who cannot do
        // what, where. Otherwise a write refused inside the handler (bind/escalate).
        let denied: Vec<_> = checks
            .iter()
            .filter(sa)
            .filter(|c| !c.allowed_by(&without))
            .collect();
        if let Some(c) = denied.iter().find(|c| c.in_handler) {
            if !denied.iter().any(|c| !c.in_handler) {
                eprintln!(
                    "{site}: without {} {}[{}] {rule:?}: refused inside the handler: {}",
                    id.0, id.2, id.3, c.attrs
                );
                continue;
            }
        }
        match denied.into_iter().find(|c| !c.in_handler) {
            Some(c) => {
                // The 403 a real server gives names the verb, the resource and the scope.
                let msg = forbidden_message(&c.user, &c.attrs);
                let res = if c.attrs.sub.is_empty() {
                    c.attrs.resource.clone()
                } else {
                    format!("{}/{}", c.attrs.resource, c.attrs.sub)
                };
                let scope = if c.attrs.namespace.is_empty() {
                    "at the cluster scope".to_string()
                } else {
                    format!("in the namespace \"{}\"", c.attrs.namespace)
                };
                assert!(
                    msg.contains(&format!("cannot {} resource \"{res}\"", c.attrs.verb))
                        && msg.contains(&scope),
                    "{msg}"
                );
                eprintln!(
                    "{site}: without {} {}[{}] {rule:?}: {msg}",
                    id.0, id.2, id.3
                );
            }
            None => out.push(format!(
                "{site}: {} {} rule {} {rule:?} is never needed by the run",
                id.0, id.2, id.3
            )),
        }
    }
    out
}
