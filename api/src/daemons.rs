//! The four daemons as the api sees them: their names, and what their errors mean to
//! the api's callers ([`DaemonError`]). It names no module of the api that reaches the
//! state, so every resource's error can hold a [`DaemonError`].

use axum::http::StatusCode;
use socket_http::{ApiError, ClientError};

pub const DAEMONS: [&str; 4] = ["vmm-manager", "netd", "blockd", "imaged"];

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

/// A daemon's failure, as the api's callers are to see it. Made by [`upstream`]; the
/// message is the daemon's (it names the resource) unless said otherwise. `details` is
/// structured data the daemon chose to show (a VM's state, a pool's free bytes), kept
/// only for the refusals the user caused (4xx and 507); boxed, so that every error
/// holding a `DaemonError` stays small.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DaemonError {
    /// A refusal the user caused or a failure of what the daemon drives (a VMM, a
    /// download, the host) whose status and code are a pair of [`PUBLIC_DAEMON_CODES`]:
    /// both are kept.
    #[error("{message}")]
    Documented {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: Option<Box<serde_json::Value>>,
    },
    /// The daemon has no such thing (a 404 with a code of its own).
    #[error("{message}")]
    NotFound {
        message: String,
        details: Option<Box<serde_json::Value>>,
    },
    /// The thing's state refuses the change (a 409 with a code of its own).
    #[error("{message}")]
    Conflict {
        message: String,
        details: Option<Box<serde_json::Value>>,
    },
    /// The daemon finds what it was asked for invalid (a 422 with a code of its own).
    #[error("{message}")]
    Invalid {
        message: String,
        details: Option<Box<serde_json::Value>>,
    },
    /// The daemon refused the api's own request (400, 401, 403, 405, 413…): the api's
    /// fault, not the user's.
    #[error("a daemon refused the api's request ({status} {code}): {message}")]
    RefusedApi {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// The daemon cannot reach its own dependencies (its 503), or cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else the daemon answered.
    #[error("{message}")]
    Failed {
        message: String,
        details: Option<Box<serde_json::Value>>,
    },
}

/// Turns a daemon client error into a [`DaemonError`], deliberately:
///
/// - a refusal the user caused (404, 409, 422, 507) and a failure of what the daemon
///   drives (a VMM, a download, the host) keep their status and code when the pair is
///   one of [`PUBLIC_DAEMON_CODES`];
/// - other 404, 409 and 422 become their status's public code;
/// - a daemon that refused the api's own request (400, 401, 403, 405, 413…) is the
///   api's fault: 500 `internal`;
/// - a daemon that cannot reach its own dependencies (503), or cannot be reached, is
///   503 `unavailable`;
/// - anything else a daemon answers is 502 `daemon_error`, its message kept.
pub fn upstream(e: ClientError) -> DaemonError {
    let (status, code, message, details) = match e {
        ClientError::Api {
            status,
            code,
            message,
            details,
        } => (status, code, message, details),
        other => return DaemonError::Unavailable(other.to_string()),
    };
    let details = details
        .filter(|_| status.is_client_error() || status == StatusCode::INSUFFICIENT_STORAGE)
        .map(Box::new);
    if let Some((_, public)) = PUBLIC_DAEMON_CODES
        .iter()
        .find(|(s, c)| *s == status.as_u16() && *c == code)
    {
        return DaemonError::Documented {
            status,
            code: public,
            message,
            details,
        };
    }
    match status {
        StatusCode::SERVICE_UNAVAILABLE => DaemonError::Unavailable(message),
        StatusCode::NOT_FOUND => DaemonError::NotFound { message, details },
        StatusCode::CONFLICT => DaemonError::Conflict { message, details },
        StatusCode::UNPROCESSABLE_ENTITY => DaemonError::Invalid { message, details },
        s if s.is_client_error() => {
            tracing::error!(%status, code, "a daemon refused the api's request: {message}");
            DaemonError::RefusedApi { status, code, message }
        }
        _ => DaemonError::Failed { message, details },
    }
}

impl From<&DaemonError> for ApiError {
    fn from(e: &DaemonError) -> Self {
        let message = e.to_string();
        let (err, details) = match e {
            DaemonError::Documented {
                status, code, details, ..
            } => (ApiError::new(*status, code, message), details),
            DaemonError::NotFound { details, .. } => (ApiError::not_found(message), details),
            DaemonError::Conflict { details, .. } => (ApiError::conflict(message), details),
            DaemonError::Invalid { details, .. } => (ApiError::unprocessable(message), details),
            DaemonError::RefusedApi { .. } => (ApiError::internal(message), &None),
            DaemonError::Unavailable(_) => (ApiError::unavailable(message), &None),
            DaemonError::Failed { details, .. } => {
                (ApiError::new(StatusCode::BAD_GATEWAY, "daemon_error", message), details)
            }
        };
        match details {
            Some(d) => err.with_details(serde_json::Value::clone(d)),
            None => err,
        }
    }
}

crate::envelope::by_value!(DaemonError);

#[cfg(test)]
mod tests {
    use super::*;

    fn said(status: u16, code: &str) -> ApiError {
        ApiError::from(upstream(ClientError::Api {
            status: StatusCode::from_u16(status).expect("status"),
            code: code.into(),
            message: "the daemon's words".into(),
            details: Some(serde_json::json!({"free": 1})),
        }))
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
        let gone = ApiError::from(upstream(ClientError::Connect {
            endpoint: "/run/hearth/netd.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }));
        assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn each_kind_of_daemon_failure_has_its_public_status_and_code() {
        type Kind = fn(&DaemonError) -> bool;
        // (what the daemon said, what it means, the public status and code)
        let table: &[(u16, &str, Kind, u16, &str)] = &[
            (
                507,
                "insufficient_storage",
                |e| matches!(e, DaemonError::Documented { .. }),
                507,
                "insufficient_storage",
            ),
            (
                404,
                "no_such_tap",
                |e| matches!(e, DaemonError::NotFound { .. }),
                404,
                "not_found",
            ),
            (
                409,
                "port_taken",
                |e| matches!(e, DaemonError::Conflict { .. }),
                409,
                "conflict",
            ),
            (
                422,
                "bad_mac",
                |e| matches!(e, DaemonError::Invalid { .. }),
                422,
                "invalid",
            ),
            (
                400,
                "bad_request",
                |e| matches!(e, DaemonError::RefusedApi { .. }),
                500,
                "internal",
            ),
            (
                503,
                "store_down",
                |e| matches!(e, DaemonError::Unavailable(_)),
                503,
                "unavailable",
            ),
            (
                500,
                "panic",
                |e| matches!(e, DaemonError::Failed { .. }),
                502,
                "daemon_error",
            ),
        ];
        for (said_status, said_code, kind, status, code) in table {
            let e = upstream(ClientError::Api {
                status: StatusCode::from_u16(*said_status).expect("status"),
                code: said_code.to_string(),
                message: "m".into(),
                details: None,
            });
            assert!(kind(&e), "{said_status} {said_code}: {e:?}");
            let public = ApiError::from(&e);
            assert_eq!(
                (public.status.as_u16(), public.body.code.as_str()),
                (*status, *code),
                "{said_status} {said_code}"
            );
            assert_eq!(public.body.message, e.to_string());
        }
    }
}
