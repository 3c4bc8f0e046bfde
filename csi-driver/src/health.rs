//! The plugin's own health endpoint, `GET /healthz`: 200 `ok` while the
//! plugin serves (and, for the node plugin, its heartbeat is being
//! renewed and kubelet did not refuse its registration), 503 with the
//! reason otherwise. It replaces the livenessprobe sidecar, which the Go
//! module proxy here does not serve.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use crate::error::{CsiError, CsiResult};

/// Says whether the plugin is healthy, and why not.
pub type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `/healthz` on `addr` until the task is dropped; returns the bound
/// address once listening.
pub async fn serve(
    addr: SocketAddr,
    check: Check,
) -> CsiResult<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CsiError::Internal {
            detail: format!("cannot serve /healthz on {addr}: {e}"),
        })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let app = Router::new().route(
        "/healthz",
        get(move || {
            let check = check.clone();
            async move {
                match check() {
                    Ok(()) => (StatusCode::OK, "ok".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the health endpoint stopped");
        }
    });
    Ok((bound, task))
}
