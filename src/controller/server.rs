//! The operator's one HTTP port: `/metrics`, `/healthz` (liveness), `/readyz` (readiness);
//! what they answer comes from [`Health`](super::health).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
struct Shared {
    metrics: Metrics,
    health: Health,
}

/// The routes, for serving and for tests.
pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared { metrics, health })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Metrics, health: Health, shutdown: CancellationToken) {
    let app = router(metrics, health);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}

async fn metrics_text(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
}

/// 200 while the controller loops run and no watch has failed for minutes on end.
async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    match s.health.liveness() {
        Ok(message) => (StatusCode::OK, message),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// 200 once every watch has listed (or while waiting for the lease as a standby).
async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(message) => (StatusCode::OK, message),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
