//! The operator's HTTP endpoints: `/metrics`, `/healthz` (the process serves) and `/readyz`
//! (the first watch list has been received, and the prober's last probe did not fail on its
//! own side).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::metrics::{Inventory, Metrics};

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server stopped with an I/O error.
    #[error("failed to serve HTTP")]
    Serve(#[source] std::io::Error),
}

impl HttpError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Serve(_) => "HttpServeFailed",
        }
    }
}

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The objects that exist (prunes series of deleted objects at scrape time).
    pub inventory: Arc<dyn Inventory>,
    /// Set once the first watch list has arrived.
    pub ready: Arc<AtomicBool>,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}

async fn metrics(State(state): State<HttpState>) -> Response {
    state.metrics.sync_inventory(state.inventory.as_ref());
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, reason = e.reason(), "failed to render metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first watch sync",
        )
            .into_response()
    } else if state.metrics.prober_blind() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the prober fails on its own side (prober_error): see rdphealth_prober_errors_total",
        )
            .into_response()
    } else {
        "ready".into_response()
    }
}
