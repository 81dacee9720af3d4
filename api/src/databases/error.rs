//! What goes wrong with databases, and its public form (`From<&DatabaseError> for ApiError`).

use socket_http::ApiError;

use crate::model::NameError;
use crate::saga::error::SagaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("database {0:?} already exists")]
    AlreadyExists(String),
    #[error("database {0:?} does not exist")]
    NotFound(String),
    /// The data volume's name is another volume's.
    #[error("a volume named {0:?} already exists; a database keeps its data on a volume of its own")]
    VolumeTaken(String),
    #[error("database {name:?} is {phase}: cannot {action}")]
    Busy {
        name: String,
        phase: String,
        action: &'static str,
    },
    /// PostgreSQL did not answer the readiness query in time.
    #[error("database {name:?} did not become ready: {reason}")]
    NotReady { name: String, reason: String },
    /// The guest agent refused or could not do what was asked.
    #[error("database {name:?}: the guest agent: {reason}")]
    Agent { name: String, reason: String },
    /// A VM, volume or daemon call failed; its public error as it was.
    #[error("{}", .0.message())]
    Upstream(ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Saga(#[from] SagaError),
}

impl From<&DatabaseError> for ApiError {
    fn from(e: &DatabaseError) -> Self {
        let message = e.to_string();
        match e {
            DatabaseError::Invalid(_) => ApiError::unprocessable(message),
            DatabaseError::InvalidName(e) => ApiError::from(e),
            DatabaseError::AlreadyExists(_) | DatabaseError::VolumeTaken(_) | DatabaseError::Busy { .. } => {
                ApiError::conflict(message)
            }
            DatabaseError::NotFound(_) => ApiError::not_found(message),
            DatabaseError::NotReady { .. } => ApiError::new(http::StatusCode::GATEWAY_TIMEOUT, "not_ready", message),
            DatabaseError::Agent { .. } => ApiError::new(http::StatusCode::BAD_GATEWAY, "agent_error", message),
            DatabaseError::Upstream(e) => e.clone(),
            DatabaseError::Store(e) => crate::envelope::of_store(e),
            DatabaseError::Saga(e) => ApiError::from(e),
        }
    }
}

crate::envelope::by_value!(DatabaseError);

impl From<ApiError> for DatabaseError {
    fn from(e: ApiError) -> Self {
        DatabaseError::Upstream(e)
    }
}

impl From<crate::daemons::DaemonError> for DatabaseError {
    fn from(e: crate::daemons::DaemonError) -> Self {
        DatabaseError::Upstream(ApiError::from(&e))
    }
}

impl From<crate::vms::error::VmError> for DatabaseError {
    fn from(e: crate::vms::error::VmError) -> Self {
        DatabaseError::Upstream(ApiError::from(&e))
    }
}

impl From<crate::volumes::error::VolumeError> for DatabaseError {
    fn from(e: crate::volumes::error::VolumeError) -> Self {
        DatabaseError::Upstream(ApiError::from(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_error_has_its_public_status_and_code() {
        let s = String::from;
        crate::envelope::assert_public([
            (DatabaseError::Invalid(s("unknown version \"9\"")), 422, "invalid"),
            (DatabaseError::AlreadyExists(s("app")), 409, "conflict"),
            (DatabaseError::NotFound(s("app")), 404, "not_found"),
            (
                DatabaseError::Busy {
                    name: s("app"),
                    phase: s("creating"),
                    action: "resize it",
                },
                409,
                "conflict",
            ),
            (
                DatabaseError::NotReady {
                    name: s("app"),
                    reason: s("no answer in 600 s"),
                },
                504,
                "not_ready",
            ),
            (
                DatabaseError::Agent {
                    name: s("app"),
                    reason: s("resize2fs failed"),
                },
                502,
                "agent_error",
            ),
        ]);
    }
}
