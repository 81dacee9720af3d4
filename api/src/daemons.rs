//! The four daemons as the api sees them: their names, their health, and how their
//! errors become the api's.

use std::time::Duration;

use socket_http::{ApiError, ClientError, UnixClient};

use crate::state::AppState;

pub const DAEMONS: [&str; 4] = ["vmm-manager", "netd", "blockd", "imaged"];

/// Whether each daemon answers its health endpoint (within 2 s).
pub async fn daemon_health(state: &AppState) -> Vec<(&'static str, bool)> {
    let mut out = Vec::new();
    for d in DAEMONS {
        let client = UnixClient::new(state.config.socket(d)).with_timeout(Duration::from_secs(2));
        out.push((d, client.get::<serde_json::Value>("/health").await.is_ok()));
    }
    out
}

/// Turns a daemon client error into an API error, keeping the daemon's status where
/// it is meaningful to the user.
pub fn upstream(e: ClientError) -> ApiError {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            details,
        } => {
            let mut err = ApiError::new(status, &code, message);
            err.body.details = details;
            err
        }
        other => ApiError::unavailable(other.to_string()),
    }
}
