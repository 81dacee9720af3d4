//! What goes wrong with hosts, and the one place it becomes the public error envelope.

use socket_http::ApiError;

use crate::daemons::DaemonError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host {0:?} does not exist")]
    NotFound(String),
    #[error("host {name:?} is lost ({reason}); its VMs cannot be reached")]
    Lost { name: String, reason: String },
    #[error("host {name:?} cannot be reached from here: {why}")]
    Unreachable { name: String, why: String },
    /// Its api holds its lease: it is running.
    #[error("host {0:?} is running (its api holds its lease); stop hearth on it first")]
    Running(String),
    #[error("host {name:?} still holds VMs: {}", vms.join(", "))]
    HoldsVms { name: String, vms: Vec<String> },
    #[error("no such action {0:?}: use cordon or uncordon")]
    UnknownAction(String),
    #[error("{0}")]
    Invalid(String),
    /// The join token is unknown, used, expired or wrong.
    #[error("this join token is unknown, used up or expired")]
    BadToken,
    #[error("this cluster keeps its state in an embedded store: several hosts need etcd (--store etcd://…)")]
    EmbeddedStore,
    #[error("host {0:?} has not joined this cluster: run `hearth host join` with a token from `hearth host join-token` on one of its hosts")]
    NotAdmitted(String),
    #[error("{0} is being changed by another api; try again")]
    Busy(String),
    #[error("{0}: {1}")]
    Files(String, String),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<&HostError> for ApiError {
    fn from(e: &HostError) -> Self {
        let message = e.to_string();
        match e {
            HostError::NotFound(_) => ApiError::not_found(message),
            HostError::Lost { .. } | HostError::Unreachable { .. } => ApiError::unavailable(message),
            HostError::Running(_) | HostError::Busy(_) => ApiError::conflict(message),
            HostError::HoldsVms { vms, .. } => {
                ApiError::conflict(message).with_details(serde_json::json!({ "vms": vms }))
            }
            HostError::UnknownAction(_) => ApiError::not_found(message),
            HostError::Invalid(_) => ApiError::unprocessable(message),
            HostError::BadToken => ApiError::unauthorized(message),
            HostError::EmbeddedStore | HostError::NotAdmitted(_) => ApiError::conflict(message),
            HostError::Files(..) | HostError::Pki(_) => ApiError::internal(message),
            HostError::Daemon(e) => ApiError::from(e),
            HostError::Store(e) => crate::envelope::of_store(e),
        }
    }
}

crate::envelope::by_value!(HostError);
