//! The operator's HTTP endpoints: `/metrics` (Prometheus text format),
//! `/healthz` (the process serves: liveness) and `/readyz` (its watches
//! started, or it stands by as a non-leader: either way it is working).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the endpoints report on.
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// Set once the process is either leading with its caches synced or
    /// standing by.
    pub ready: AtomicBool,
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    let metrics = health.clone();
    let ready = health.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = ready.clone();
                async move {
                    if r.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

/// Binds `addr` (port 0: any free port); returns the listener and the
/// address it got.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
