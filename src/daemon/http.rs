//! The HTTP endpoint (axum): `GET /metrics` (Prometheus text), `/health` (liveness: the process
//! serves), `/ready` (200 when the stream is connected and every tier is within its RPO
//! objective, else 503 with the reasons as JSON) and `/status` (the whole state as JSON).
//! Read-only: nothing here changes what the daemon does.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{DaemonError, Shared};

/// Binds the listener (at start, so that a taken port refuses the start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| DaemonError::Listen { addr, cause })
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .with_state(shared)
}

/// Serves until `stop` is set.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let r = axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move {
            crate::stream::session::shutdown_requested(&mut stop).await;
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "the HTTP endpoint stopped");
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    s.refresh_metrics();
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        s.metrics.render(),
    )
        .into_response()
}

async fn health() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    let why = s.not_ready(crate::time::now());
    if why.is_empty() {
        Json(serde_json::json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reasons": why })),
        )
            .into_response()
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    Json(s.status()).into_response()
}
