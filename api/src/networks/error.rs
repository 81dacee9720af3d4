//! What goes wrong with networks, and the one place it becomes the public error
//! envelope (`From<&NetworkError> for ApiError`; the handlers in
//! [`crate::networks::http`] use it through `?`).

use socket_http::ApiError;

use crate::daemons::DaemonError;
use crate::model::NameError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request fails a check of its own (a subnet, a gateway, a range, VXLAN).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("network {0:?} already exists")]
    AlreadyExists(String),
    #[error("network {0:?} does not exist")]
    NotFound(String),
    /// VMs have ports on it, so it cannot go.
    #[error("network {name:?} has VMs attached: {}", vms.join(", "))]
    InUse { name: String, vms: Vec<String> },
    /// A host it is to exist on cannot be reached.
    #[error(transparent)]
    Host(#[from] crate::hosts::error::HostError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<&NetworkError> for ApiError {
    fn from(e: &NetworkError) -> Self {
        let message = e.to_string();
        match e {
            NetworkError::Invalid(_) => ApiError::unprocessable(message),
            NetworkError::InvalidName(e) => ApiError::from(e),
            NetworkError::AlreadyExists(_) => ApiError::conflict(message),
            NetworkError::NotFound(_) => ApiError::not_found(message),
            NetworkError::InUse { vms, .. } => {
                ApiError::conflict(message).with_details(serde_json::json!({ "vms": vms }))
            }
            NetworkError::Host(e) => ApiError::from(e),
            NetworkError::Daemon(e) => ApiError::from(e),
            NetworkError::Store(e) => crate::envelope::of_store(e),
        }
    }
}

crate::envelope::by_value!(NetworkError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_network_error_has_its_public_status_and_code() {
        let s = String::from;
        let table = [
            (NetworkError::Invalid(s("VNI 0 is outside 1..16777215")), 422, "invalid"),
            (
                NetworkError::InvalidName(NameError {
                    kind: "network",
                    name: s("Lab"),
                }),
                422,
                "invalid",
            ),
            (NetworkError::AlreadyExists(s("lab")), 409, "conflict"),
            (NetworkError::NotFound(s("lab")), 404, "not_found"),
            (
                NetworkError::InUse {
                    name: s("lab"),
                    vms: vec![s("web"), s("db")],
                },
                409,
                "conflict",
            ),
            (
                NetworkError::Daemon(DaemonError::Conflict {
                    message: s("subnet overlaps"),
                    details: None,
                }),
                409,
                "conflict",
            ),
            (
                NetworkError::Store(StoreError::Unavailable(s("etcd is down"))),
                503,
                "unavailable",
            ),
        ];
        crate::envelope::assert_public(table);
        let in_use = ApiError::from(NetworkError::InUse {
            name: s("lab"),
            vms: vec![s("web"), s("db")],
        });
        assert_eq!(in_use.body.message, "network \"lab\" has VMs attached: web, db");
        assert_eq!(in_use.body.details, Some(serde_json::json!({"vms": ["web", "db"]})));
    }
}
