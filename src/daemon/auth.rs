//! Who may call the control API, and for what. Callers send `Authorization: Bearer TOKEN`;
//! each configured token names a caller and its [`Level`]. The rule for each request is
//! [`need`], a pure function of method and path, so one table says what every endpoint
//! requires. With no callers configured (loopback only; `check-config` refuses the rest)
//! the API is open and every caller is "anonymous".
//!
//! Tokens are compared by their blake3 hashes, whose equality is constant-time, and never
//! logged. `/healthz` and `/readyz` stay open for the kubelet's probes, which cannot send a
//! token; `/readyz` says why it is not ready only to a `read` caller.

use std::path::Path;

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{ApiError, Level};
use crate::config::ControlClient;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone: the probes.
    Open,
    At(Level),
}

/// The level each endpoint needs. Unknown paths need `read`, so that probing for
/// endpoints tells an unauthenticated caller nothing.
pub fn need(method: &Method, path: &str, query: Option<&str>) -> Need {
    let path = path.trim_end_matches('/');
    if matches!(path, "/healthz" | "/readyz") {
        return Need::Open;
    }
    let action = path
        .strip_prefix("/v1/protections/")
        .and_then(|rest| rest.rsplit_once('/'))
        .map(|(_, action)| action);
    match (method, action) {
        (&Method::GET, Some("manifests")) if wants_secrets(query) => Need::At(Level::Admin),
        (&Method::POST, Some("sync")) => Need::At(Level::Operate),
        (&Method::POST, _) => Need::At(Level::Admin),
        _ => Need::At(Level::Read),
    }
}

/// Whether a manifests request asks for Secret data (`secrets=true`).
pub fn wants_secrets(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .any(|kv| matches!(kv, "secrets=true" | "secrets=1"))
}

/// A caller the API knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub level: Level,
}

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or one no caller has.
    Unauthenticated(&'static str),
    /// 403: a known caller below the level the request needs.
    Forbidden {
        caller: String,
        has: Level,
        needs: Level,
    },
}

/// The configured callers with their tokens' hashes.
pub struct Callers {
    tokens: Vec<(blake3::Hash, Caller)>,
}

impl Callers {
    /// Reads every client's token file.
    pub fn load(clients: &[ControlClient]) -> Result<Callers> {
        let mut tokens = Vec::new();
        for c in clients {
            let token =
                read(&c.token_file).with_context(|| format!("control client {:?}", c.name))?;
            tokens.push((
                blake3::hash(token.as_bytes()),
                Caller {
                    name: c.name.clone(),
                    level: c.level,
                },
            ));
        }
        Ok(Callers { tokens })
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller behind an `Authorization` header, if any; `None` with auth off.
    fn identify(&self, authorization: Option<&str>) -> Result<Option<Caller>, Denied> {
        if self.is_open() {
            return Ok(Some(Caller {
                name: "anonymous".into(),
                level: Level::Admin,
            }));
        }
        let Some(value) = authorization else {
            return Ok(None);
        };
        let token = value
            .strip_prefix("Bearer ")
            .ok_or(Denied::Unauthenticated(
                "expected Authorization: Bearer TOKEN",
            ))?;
        let h = blake3::hash(token.trim().as_bytes());
        // Every entry is compared, so the time taken does not say which one matched.
        let mut found = None;
        for (t, caller) in &self.tokens {
            if *t == h && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found.map(Some).ok_or(Denied::Unauthenticated(
            "the token is not one this site knows",
        ))
    }

    /// Whether a request with this `Authorization` header may do what `need` says; the
    /// caller when known (an open request may have none).
    pub fn decide(
        &self,
        need: Need,
        authorization: Option<&str>,
    ) -> Result<Option<Caller>, Denied> {
        let caller = match (self.identify(authorization), need) {
            (Err(_), Need::Open) => return Ok(None),
            (r, _) => r?,
        };
        let Need::At(needs) = need else {
            return Ok(caller);
        };
        match caller {
            None => Err(Denied::Unauthenticated("this request needs a token")),
            Some(c) if c.level < needs => Err(Denied::Forbidden {
                caller: c.name,
                has: c.level,
                needs,
            }),
            Some(c) => Ok(Some(c)),
        }
    }
}

fn read(path: &Path) -> Result<String> {
    crate::config::read_token(path).map_err(anyhow::Error::msg)
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Unauthenticated(why) => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"lifeboat\"")],
                Json(ApiError {
                    error: format!("unauthenticated: {why} (the CLI: --token-file FILE)"),
                    kind: None,
                }),
            )
                .into_response(),
            Denied::Forbidden { caller, has, needs } => (
                StatusCode::FORBIDDEN,
                Json(ApiError {
                    error: format!(
                        "forbidden: caller {caller:?} has level {has}; this request needs {needs}"
                    ),
                    kind: None,
                }),
            )
                .into_response(),
        }
    }
}

/// The middleware: lets a request through or answers 401/403, and logs every
/// state-changing call once, with the caller and the outcome.
pub async fn guard(
    State(callers): State<std::sync::Arc<Callers>>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let need = need(&method, &path, req.uri().query());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let changes = method == Method::POST;
    let caller = match callers.decide(need, authorization) {
        Ok(c) => c,
        Err(denied) => {
            let who = match &denied {
                Denied::Forbidden { caller, .. } => caller.clone(),
                Denied::Unauthenticated(_) => "unauthenticated".into(),
            };
            tracing::warn!(caller = %who, %method, %path, "control call refused: {denied:?}");
            return denied.into_response();
        }
    };
    if let Some(c) = &caller {
        req.extensions_mut().insert(c.clone());
    }
    let resp = next.run(req).await;
    if changes {
        let who = caller.map(|c| c.name).unwrap_or_default();
        tracing::info!(caller = %who, %method, %path, status = resp.status().as_u16(), "control call");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callers() -> Callers {
        let c = |name: &str, level, token: &str| {
            (
                blake3::hash(token.as_bytes()),
                Caller {
                    name: name.into(),
                    level,
                },
            )
        };
        Callers {
            tokens: vec![
                c("prometheus", Level::Read, "read-token-0123456789"),
                c("ci", Level::Operate, "operate-token-0123456789"),
                c("oncall", Level::Admin, "admin-token-0123456789"),
            ],
        }
    }

    #[test]
    fn each_endpoint_needs_its_level() {
        let table = [
            (Method::GET, "/healthz", None, Need::Open),
            (Method::GET, "/readyz", None, Need::Open),
            (Method::GET, "/metrics", None, Need::At(Level::Read)),
            (Method::GET, "/v1/status", None, Need::At(Level::Read)),
            (
                Method::GET,
                "/v1/protections/db/manifests",
                Some("standby=false"),
                Need::At(Level::Read),
            ),
            (
                Method::GET,
                "/v1/protections/db/manifests",
                Some("standby=false&secrets=true"),
                Need::At(Level::Admin),
            ),
            (
                Method::POST,
                "/v1/protections/db/sync",
                None,
                Need::At(Level::Operate),
            ),
            (
                Method::POST,
                "/v1/protections/db/failover",
                Some("dry_run=true"),
                Need::At(Level::Admin),
            ),
            (
                Method::POST,
                "/v1/protections/db/quiesce",
                None,
                Need::At(Level::Admin),
            ),
            (
                Method::POST,
                "/v1/protections/db/reprotect",
                None,
                Need::At(Level::Admin),
            ),
            (
                Method::POST,
                "/v1/protections/sync/failover",
                None,
                Need::At(Level::Admin),
            ),
            (Method::POST, "/v1/anything", None, Need::At(Level::Admin)),
            (Method::GET, "/v1/unknown", None, Need::At(Level::Read)),
        ];
        for (m, p, q, want) in table {
            assert_eq!(need(&m, p, q), want, "{m} {p}?{q:?}");
        }
    }

    #[test]
    fn no_or_unknown_token_is_unauthenticated_and_a_low_level_is_forbidden() {
        let c = callers();
        let admin = Need::At(Level::Admin);
        assert!(matches!(
            c.decide(admin, None),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            c.decide(admin, Some("Bearer nope-nope-nope-nope")),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            c.decide(admin, Some("Basic YWRtaW4=")),
            Err(Denied::Unauthenticated(_))
        ));
        assert_eq!(
            c.decide(admin, Some("Bearer operate-token-0123456789")),
            Err(Denied::Forbidden {
                caller: "ci".into(),
                has: Level::Operate,
                needs: Level::Admin
            })
        );
        let ok = c
            .decide(admin, Some("Bearer admin-token-0123456789"))
            .unwrap()
            .unwrap();
        assert_eq!(ok.name, "oncall");
        let read = c.decide(
            Need::At(Level::Operate),
            Some("Bearer read-token-0123456789"),
        );
        assert!(matches!(
            read,
            Err(Denied::Forbidden {
                has: Level::Read,
                ..
            })
        ));
    }

    #[test]
    fn probes_pass_without_a_token_and_even_with_a_bad_one() {
        let c = callers();
        assert_eq!(c.decide(Need::Open, None), Ok(None));
        assert_eq!(
            c.decide(Need::Open, Some("Bearer wrong-wrong-wrong-wrong")),
            Ok(None)
        );
        let known = c
            .decide(Need::Open, Some("Bearer read-token-0123456789"))
            .unwrap();
        assert_eq!(known.map(|k| k.level), Some(Level::Read));
    }

    #[test]
    fn with_no_callers_configured_everyone_is_admin() {
        let open = Callers { tokens: Vec::new() };
        let c = open.decide(Need::At(Level::Admin), None).unwrap().unwrap();
        assert_eq!((c.name.as_str(), c.level), ("anonymous", Level::Admin));
    }
}
