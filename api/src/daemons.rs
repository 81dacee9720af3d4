//! The four daemons as the api sees them: their names, their health, and how their
//! errors become the api's.

use std::time::Duration;

use axum::http::StatusCode;
use socket_http::{ApiError, Client, ClientError};

use crate::state::AppState;

pub const DAEMONS: [&str; 4] = ["vmm-manager", "netd", "blockd", "imaged"];

/// Whether each daemon answers its health endpoint (within 2 s).
pub async fn daemon_health(state: &AppState) -> Vec<(&'static str, bool)> {
    let mut out = Vec::new();
    for d in DAEMONS {
        let client = Client::to(state.config.endpoint(d)).with_timeout(Duration::from_secs(2));
        out.push((d, client.get::<serde_json::Value>("/health").await.is_ok()));
    }
    out
}

/// The error codes the public API answers with that a daemon's answer can become.
/// Everything else a daemon says is mapped (see [`upstream`]), never passed through:
/// a daemon's protocol can change without changing the public API.
pub const PUBLIC_DAEMON_CODES: &[(u16, &str)] = &[
    (404, "not_found"),
    (409, "conflict"),
    (409, "unsupported"),
    (422, "invalid"),
    (422, "hypervisor_unavailable"),
    (422, "checksum_mismatch"),
    (422, "not_a_disk_image"),
    (422, "source_error"),
    (422, "source_missing"),
    (422, "unsupported_format"),
    (500, "host_error"),
    (502, "source_unreachable"),
    (502, "vmm_error"),
    (502, "daemon_error"),
    (503, "unavailable"),
    (507, "insufficient_storage"),
];

/// Turns a daemon client error into an API error, deliberately:
///
/// - a refusal the user caused (404, 409, 422, 507) and a failure of what the daemon
///   drives (a VMM, a download, the host) keep their status and code when the pair is
///   one of [`PUBLIC_DAEMON_CODES`]; the message is the daemon's, which names the
///   resource;
/// - a daemon that refused the api's own request (400, 401, 403, 405, 413…) is the
///   api's fault: 500 `internal`;
/// - a daemon that cannot reach its own dependencies (503), or cannot be reached, is
///   503 `unavailable`;
/// - anything else a daemon answers is 502 `daemon_error`, its message kept.
pub fn upstream(e: ClientError) -> ApiError {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            details,
        } => {
            let known = PUBLIC_DAEMON_CODES
                .iter()
                .any(|(s, c)| *s == status.as_u16() && *c == code);
            let mut err = if known {
                ApiError::new(status, &code, message)
            } else if status == StatusCode::SERVICE_UNAVAILABLE {
                ApiError::unavailable(message)
            } else if status.is_client_error() && !matches!(status.as_u16(), 404 | 409 | 422) {
                tracing::error!(%status, code, "a daemon refused the api's request: {message}");
                return ApiError::internal(format!(
                    "a daemon refused the api's request ({status} {code}): {message}"
                ));
            } else if status == StatusCode::NOT_FOUND {
                ApiError::not_found(message)
            } else if status == StatusCode::CONFLICT {
                ApiError::conflict(message)
            } else if status == StatusCode::UNPROCESSABLE_ENTITY {
                ApiError::unprocessable(message)
            } else {
                ApiError::new(StatusCode::BAD_GATEWAY, "daemon_error", message)
            };
            // Details are structured data the daemon chose to show (a VM's state, a
            // pool's free bytes): kept for the refusals the user caused.
            if status.is_client_error() || status == StatusCode::INSUFFICIENT_STORAGE {
                err.body.details = details;
            }
            err
        }
        other => ApiError::unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(status: u16, code: &str) -> ApiError {
        upstream(ClientError::Api {
            status: StatusCode::from_u16(status).expect("status"),
            code: code.into(),
            message: "the daemon's words".into(),
            details: Some(serde_json::json!({"free": 1})),
        })
    }

    #[test]
    fn daemon_errors_are_mapped_not_passed_through() {
        for (status, code) in PUBLIC_DAEMON_CODES {
            let e = said(*status, code);
            assert_eq!((e.status.as_u16(), e.body.code.as_str()), (*status, *code));
            assert_eq!(e.body.message, "the daemon's words");
        }
        // A code the public API does not document becomes its status's public code.
        assert_eq!(said(409, "port_taken").body.code, "conflict");
        assert_eq!(said(422, "bad_mac").body.code, "invalid");
        assert_eq!(said(404, "no_such_tap").body.code, "not_found");
        // The api's own bad request is the api's fault, not the user's.
        for status in [400, 401, 403, 405, 413] {
            let e = said(status, "bad_request");
            assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR, "{status}");
            assert_eq!(e.body.code, "internal");
            assert!(e.body.details.is_none());
        }
        let e = said(500, "panic");
        assert_eq!(
            (e.status, e.body.code.as_str()),
            (StatusCode::BAD_GATEWAY, "daemon_error")
        );
        assert!(e.body.details.is_none(), "a daemon's internals are not shown");
        assert_eq!(said(503, "store_down").body.code, "unavailable");
        assert_eq!(
            said(507, "insufficient_storage").body.details,
            Some(serde_json::json!({"free": 1}))
        );
        let gone = upstream(ClientError::Connect {
            endpoint: "/run/hearth/netd.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
