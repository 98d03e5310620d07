//! The control API over HTTP: `/metrics`, `/healthz`, `/readyz`, and the JSON status,
//! sync, failover, failback, manifests and quiesce endpoints that the CLI calls (their types are in
//! [`crate::api`]). It binds to loopback by default. Each error answers with the status
//! code of its cause: 404 for an unknown protection or a request for the other role, 409
//! for a state conflict (fenced, nothing to recover), 502 when the peer or the cluster
//! failed, 500 for this site's own storage.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::api::{ApiError, FailoverOptions, Level};
use crate::daemon::auth::{self, Caller, Callers};
use crate::daemon::scheduler::SyncRequest;
use crate::lifecycle::{failover, planned, reprotect, standby};
use crate::metrics::ErrorKind;
use crate::site::dr::Dr;
use crate::site::primary::Primary;
use crate::site::Shared;

/// What the endpoints reach: the site, its receiving half (a DR site, or a primary with
/// `[listen]`, which receives a protection after a failback) and its sending half (a
/// primary, or a DR site with `[peer]`) with each protection's scheduler.
#[derive(Clone)]
pub struct RoleCtx {
    pub shared: Arc<Shared>,
    pub dr: Option<Arc<Dr>>,
    pub primary: Option<Arc<Primary>>,
    pub syncs: Arc<HashMap<String, mpsc::Sender<SyncRequest>>>,
}

impl RoleCtx {
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

fn err(code: StatusCode, error: String, kind: Option<ErrorKind>) -> Response {
    (code, Json(ApiError { error, kind })).into_response()
}

/// 404 naming the protection and what this site can do with it.
fn not_here(shared: &Shared, name: &str, wants: &str) -> Response {
    let msg = match shared.protection(name) {
        Ok(_) => format!("{name}: {wants}"),
        Err(e) => e.to_string(),
    };
    err(StatusCode::NOT_FOUND, msg, None)
}

/// This site's receiving half, for the endpoints that read replicas and recovery points;
/// else the 404 naming what `wants` (a site that sends the protection has none to read).
async fn receiving<'a>(c: &'a RoleCtx, name: &str, wants: &str) -> Result<&'a Arc<Dr>, Response> {
    let Some(dr) = &c.dr else {
        return Err(not_here(c.shared(), name, wants));
    };
    if let Ok(p) = c.shared.protection(name) {
        let sends = c
            .shared
            .store
            .record(&p.name)
            .await
            .is_ok_and(|r| c.shared.sends(&r));
        if sends {
            let why = format!(
                "{wants}; this site sends the protection now (its volumes are the application's)"
            );
            return Err(not_here(c.shared(), name, &why));
        }
    }
    Ok(dr)
}

/// The routes, behind [`auth::guard`] with `callers`.
pub fn router(ctx: RoleCtx, callers: Arc<Callers>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/protections/{name}/sync", post(sync))
        .route("/v1/protections/{name}/failover", post(failover_now))
        .route("/v1/protections/{name}/manifests", get(manifests))
        .route("/v1/protections/{name}/quiesce", post(quiesce))
        .route("/v1/protections/{name}/reprotect", post(reprotect_now))
        .route("/v1/protections/{name}/failback", post(failback_now))
        .route("/v1/protections/{name}/points", get(points_list))
        .route("/v1/protections/{name}/verify", post(verify_now))
        .route("/v1/protections/{name}/drills", post(drill_start))
        .route("/v1/protections/{name}/drills/{id}/end", post(drill_end))
        .route(
            "/v1/protections/{name}/points/{gen}/{action}",
            post(points_hold),
        )
        .layer(axum::middleware::from_fn_with_state(callers, auth::guard))
        .with_state(ctx)
}

async fn metrics(State(c): State<RoleCtx>) -> Response {
    let shared = c.shared().clone();
    match tokio::task::spawn_blocking(move || shared.render_metrics()).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

/// Ready or not for anyone (the kubelet's probe); why not only for a `read` caller.
async fn readyz(State(c): State<RoleCtx>, caller: Option<Extension<Caller>>) -> Response {
    let shared = c.shared().clone();
    let told = caller.is_some_and(|Extension(c)| c.level >= Level::Read);
    match tokio::task::spawn_blocking(move || shared.not_ready()).await {
        Ok(None) => "ready\n".into_response(),
        Ok(Some(why)) if told => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
        }
        Ok(Some(_)) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn status(State(c): State<RoleCtx>) -> Response {
    let shared = c.shared().clone();
    match tokio::task::spawn_blocking(move || shared.status()).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

fn shutting_down() -> Response {
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        "the daemon is shutting down".into(),
        None,
    )
}

async fn sync(State(c): State<RoleCtx>, Path(name): Path<String>) -> Response {
    let Some(tx) = c.syncs.get(&name) else {
        return not_here(
            c.shared(),
            &name,
            "it is replicated from the other site; run sync at the primary",
        );
    };
    let (reply, rx) = oneshot::channel();
    if tx.send(SyncRequest { reply }).await.is_err() {
        return shutting_down();
    }
    match rx.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => {
            let code = match e.kind {
                ErrorKind::Fenced => StatusCode::CONFLICT,
                ErrorKind::Store | ErrorKind::Io => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_GATEWAY,
            };
            err(code, e.message, Some(e.kind))
        }
        Err(_) => shutting_down(),
    }
}

async fn failover_now(
    State(c): State<RoleCtx>,
    Path(name): Path<String>,
    Query(opts): Query<FailoverOptions>,
) -> Response {
    let Some(dr) = &c.dr else {
        let site = &c.shared().config.site_name;
        return err(
            StatusCode::CONFLICT,
            failover::FailoverError::WrongSite(site.clone()).to_string(),
            None,
        );
    };
    match failover::failover(dr, &name, &opts).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            let code = StatusCode::from_u16(e.http_status()).expect("valid status");
            err(code, e.to_string(), e.metric_label())
        }
    }
}

#[derive(Deserialize)]
struct ManifestQuery {
    gen: Option<u64>,
    #[serde(default)]
    standby: bool,
    /// Secret data too (admin callers); without it Secrets come without `data`.
    #[serde(default)]
    secrets: bool,
}

/// A gen's DR-ready manifests (the consistent gen's by default), for `lifeboat export`.
async fn manifests(
    State(c): State<RoleCtx>,
    Path(name): Path<String>,
    Query(q): Query<ManifestQuery>,
    caller: Option<Extension<Caller>>,
) -> Response {
    // The guard's table reads the raw query; this is the decoded one (`secr%65ts=true`).
    let level = caller.map(|Extension(c)| c.level);
    if q.secrets && level < Some(Level::Admin) {
        return err(
            StatusCode::FORBIDDEN,
            "forbidden: manifests with Secret data need level admin".into(),
            None,
        );
    }
    match standby::export(c.shared(), &name, q.gen, q.standby, q.secrets).await {
        Ok(m) => Json(m).into_response(),
        Err(e) => err(StatusCode::NOT_FOUND, format!("{e:#}"), None),
    }
}

#[derive(Deserialize)]
struct VerifyQuery {
    /// Mark divergent volumes for repair (the default).
    #[serde(default = "yes")]
    repair: bool,
    /// A kept recovery point's files instead of the replicas.
    gen: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Re-reads the replicas against the DR index (DR site).
async fn verify_now(
    State(c): State<RoleCtx>,
    Path(name): Path<String>,
    Query(q): Query<VerifyQuery>,
) -> Response {
    let dr = match receiving(&c, &name, "verify runs at the DR site, on its replicas").await {
        Ok(dr) => dr,
        Err(r) => return r,
    };
    answer(crate::lifecycle::verify::verify(dr, &name, q.repair, q.gen).await)
}

#[derive(Deserialize)]
struct DrillQuery {
    gen: Option<u64>,
    /// Kubernetes mode: how long the drill's workloads may take to become ready.
    #[serde(default = "default_ready_timeout")]
    ready_timeout_secs: u64,
}

fn default_ready_timeout() -> u64 {
    600
}

/// Clones a recovery point for a drill (DR site).
async fn drill_start(
    State(c): State<RoleCtx>,
    Path(name): Path<String>,
    Query(q): Query<DrillQuery>,
) -> Response {
    let dr = match receiving(
        &c,
        &name,
        "drills run at the DR site, on its recovery points",
    )
    .await
    {
        Ok(dr) => dr,
        Err(r) => return r,
    };
    answer(
        crate::lifecycle::drill::start(
            dr,
            &name,
            q.gen,
            std::time::Duration::from_secs(q.ready_timeout_secs),
        )
        .await,
    )
}

#[derive(Deserialize)]
struct DrillEndQuery {
    /// The check's result; absent when a kept drill is removed (nothing is recorded).
    passed: Option<bool>,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    keep: bool,
}

/// Ends a drill: records its result, removes its copies (unless kept).
async fn drill_end(
    State(c): State<RoleCtx>,
    Path((name, id)): Path<(String, String)>,
    Query(q): Query<DrillEndQuery>,
) -> Response {
    let dr = match receiving(
        &c,
        &name,
        "drills run at the DR site, on its recovery points",
    )
    .await
    {
        Ok(dr) => dr,
        Err(r) => return r,
    };
    answer(crate::lifecycle::drill::end(dr, &name, &id, q.passed, q.seconds, q.keep).await)
}

/// A lifecycle call's report, or its error with the status the error names.
fn answer<T: serde::Serialize, E: Statused>(r: Result<T, E>) -> Response {
    match r {
        Ok(r) => Json(r).into_response(),
        Err(e) => err(
            StatusCode::from_u16(e.http_status()).expect("valid status"),
            e.to_string(),
            None,
        ),
    }
}

/// Errors of the lifecycle calls, each knowing its HTTP status.
trait Statused: std::fmt::Display {
    fn http_status(&self) -> u16;
}

macro_rules! statused {
    ($($t:ty),*) => {$(
        impl Statused for $t {
            fn http_status(&self) -> u16 {
                <$t>::http_status(self)
            }
        }
    )*};
}
statused!(
    crate::lifecycle::verify::VerifyError,
    crate::lifecycle::points::PointsError,
    crate::lifecycle::drill::DrillError
);

/// The DR site's recovery points of a protection.
async fn points_list(State(c): State<RoleCtx>, Path(name): Path<String>) -> Response {
    let dr = match receiving(&c, &name, "recovery points are kept at the DR site").await {
        Ok(dr) => dr,
        Err(r) => return r,
    };
    answer(crate::lifecycle::points::list(dr, &name).await)
}

/// Pins (`hold`) or unpins (`release`) a recovery point against pruning.
async fn points_hold(
    State(c): State<RoleCtx>,
    Path((name, gen, action)): Path<(String, u64, String)>,
) -> Response {
    let dr = match receiving(&c, &name, "recovery points are kept at the DR site").await {
        Ok(dr) => dr,
        Err(r) => return r,
    };
    let held = match action.as_str() {
        "hold" => true,
        "release" => false,
        other => {
            return err(
                StatusCode::NOT_FOUND,
                format!("unknown point action {other:?}; expected hold or release"),
                None,
            )
        }
    };
    answer(crate::lifecycle::points::hold(dr, &name, gen, held).await)
}

/// Re-protect after a failover, at either site.
async fn reprotect_now(State(c): State<RoleCtx>, Path(name): Path<String>) -> Response {
    if let Err(e) = c.shared().protection(&name) {
        return err(StatusCode::NOT_FOUND, e.to_string(), None);
    }
    let done = match &c.dr {
        Some(dr) if !c.shared.configured_primary() => reprotect::dr(dr, &name).await,
        _ => reprotect::primary(&c.shared, &name).await,
    };
    match done {
        Ok(done) => Json(done).into_response(),
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e:#}"),
            Some(ErrorKind::Store),
        ),
    }
}

/// Failback, at the old primary: the peer sends the protection from now on.
async fn failback_now(State(c): State<RoleCtx>, Path(name): Path<String>) -> Response {
    if let Err(e) = c.shared().protection(&name) {
        return err(StatusCode::NOT_FOUND, e.to_string(), None);
    }
    let site = &c.shared.config.site_name;
    let (Some(primary), Some(dr)) = (&c.primary, &c.dr) else {
        return err(
            StatusCode::CONFLICT,
            format!("site {site} needs [peer] and [listen] for a failback: it asks the peer to send, and receives from it; failback runs at the site the protection failed over from"),
            None,
        );
    };
    match crate::lifecycle::failback::failback(primary, dr, &name).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => err(StatusCode::CONFLICT, format!("{e:#}"), None),
    }
}

/// Planned failover, at the primary: scale the protection's workloads to zero.
async fn quiesce(State(c): State<RoleCtx>, Path(name): Path<String>) -> Response {
    let Some(primary) = &c.primary else {
        return not_here(c.shared(), &name, "quiesce runs at the primary");
    };
    match planned::quiesce(primary, &name).await {
        Ok(done) => Json(done).into_response(),
        Err(e) => err(
            StatusCode::BAD_GATEWAY,
            format!("{e:#}"),
            Some(ErrorKind::Kubernetes),
        ),
    }
}
