//! The control API over HTTP: `/metrics`, `/healthz`, `/readyz`, and the JSON status, sync
//! and failover endpoints that the CLI calls. It binds to loopback by default; it carries no
//! secrets.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::ErrorKind;
use crate::site::scheduler::SyncRequest;
use crate::site::{failover, Site};

/// The body of every error answer.
#[derive(Serialize, Deserialize, Debug)]
pub struct ApiError {
    pub error: String,
    pub kind: Option<ErrorKind>,
}

#[derive(Clone)]
struct Ctx {
    site: Arc<Site>,
    syncs: Arc<HashMap<String, mpsc::Sender<SyncRequest>>>,
}

fn err(code: StatusCode, error: String, kind: Option<ErrorKind>) -> Response {
    (code, Json(ApiError { error, kind })).into_response()
}

pub fn router(site: Arc<Site>, syncs: HashMap<String, mpsc::Sender<SyncRequest>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/protections/{name}/sync", post(sync))
        .route("/v1/protections/{name}/failover", post(failover_now))
        .route("/v1/protections/{name}/manifests", get(manifests))
        .route("/v1/protections/{name}/quiesce", post(quiesce))
        .with_state(Ctx {
            site,
            syncs: Arc::new(syncs),
        })
}

async fn metrics(State(c): State<Ctx>) -> Response {
    let site = c.site.clone();
    match tokio::task::spawn_blocking(move || site.render_metrics()).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn readyz(State(c): State<Ctx>) -> Response {
    if c.site.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "recovering\n").into_response()
    }
}

async fn status(State(c): State<Ctx>) -> Response {
    let site = c.site.clone();
    match tokio::task::spawn_blocking(move || site.status()).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn sync(State(c): State<Ctx>, Path(name): Path<String>) -> Response {
    let Some(tx) = c.syncs.get(&name) else {
        let msg = if c.site.config.protection(&name).is_some() {
            format!("{name} is replicated from the other site; run sync at the primary")
        } else {
            format!("no protection named {name:?} at this site")
        };
        return err(StatusCode::NOT_FOUND, msg, None);
    };
    let (reply, rx) = oneshot::channel();
    if tx.send(SyncRequest { reply }).await.is_err() {
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down".into(),
            None,
        );
    }
    match rx.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => {
            let code = if e.kind == ErrorKind::Fenced {
                StatusCode::CONFLICT
            } else {
                StatusCode::BAD_GATEWAY
            };
            err(code, e.message, Some(e.kind))
        }
        Err(_) => err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down".into(),
            None,
        ),
    }
}

async fn failover_now(
    State(c): State<Ctx>,
    Path(name): Path<String>,
    Query(opts): Query<failover::FailoverOptions>,
) -> Response {
    match failover::failover(&c.site, &name, &opts).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => err(StatusCode::CONFLICT, format!("{e:#}"), None),
    }
}

#[derive(Deserialize)]
struct ManifestQuery {
    gen: Option<u64>,
    #[serde(default)]
    standby: bool,
}

/// A gen's DR-ready manifests (the consistent gen's by default), for `lifeboat export`.
async fn manifests(
    State(c): State<Ctx>,
    Path(name): Path<String>,
    Query(q): Query<ManifestQuery>,
) -> Response {
    match crate::site::mirror::export(&c.site, &name, q.gen, q.standby) {
        Ok(m) => Json(m).into_response(),
        Err(e) => err(StatusCode::NOT_FOUND, format!("{e:#}"), None),
    }
}

/// Planned failover, at the primary: scale the protection's workloads to zero.
async fn quiesce(State(c): State<Ctx>, Path(name): Path<String>) -> Response {
    match crate::site::planned::quiesce(&c.site, &name).await {
        Ok(done) => Json(done).into_response(),
        Err(e) => err(
            StatusCode::CONFLICT,
            format!("{e:#}"),
            Some(ErrorKind::Kubernetes),
        ),
    }
}
