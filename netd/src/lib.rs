//! netd's service. This first cut serves its health endpoint on its Unix socket; the
//! resources it will own are described in DESIGN.md.

use axum::Router;

/// The HTTP routes netd serves on its Unix socket.
pub fn router() -> Router {
    socket_http::server::health_router("netd")
}
