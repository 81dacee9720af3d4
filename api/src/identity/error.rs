//! What goes wrong with projects, users, role bindings and API keys, and the one place
//! it becomes the public error envelope (`From<&IdentityError> for ApiError`; the
//! handlers in [`crate::identity::http`] use it through `?`).

use socket_http::ApiError;

use crate::model::NameError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The request fails a check of its own (a role, a key's name or lifetime).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Missing, or not visible to the caller (a project one is not in).
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// Changing a project's members takes an administrator of it.
    #[error("permission members.write denied: user {user} is not an admin of project {project}")]
    NotProjectAdmin { user: String, project: String },
    /// Only hearth administrators make keys for other users.
    #[error(
        "permission api-keys.write denied: only hearth administrators make keys for other users, and user {0} is not one"
    )]
    KeysForOthers(String),
    #[error("the default project cannot be deleted")]
    DefaultProject,
    /// A project is deleted only once it holds nothing.
    #[error("project {name:?} still holds {vms} VMs, {volumes} volumes and {networks} networks: delete them first")]
    ProjectNotEmpty {
        name: String,
        vms: usize,
        volumes: usize,
        networks: usize,
    },
    #[error("a user cannot delete themselves")]
    DeletingSelf,
    /// Revoking the key the request was made with would lock the caller out.
    #[error("this is the key the request was made with: revoke it with another key, so you are not locked out")]
    RevokingOwnKey,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<&IdentityError> for ApiError {
    fn from(e: &IdentityError) -> Self {
        use IdentityError::*;
        let message = e.to_string();
        match e {
            Invalid(_) => ApiError::unprocessable(message),
            InvalidName(e) => ApiError::from(e),
            NotFound { .. } => ApiError::not_found(message),
            AlreadyExists { .. } | DefaultProject | DeletingSelf | RevokingOwnKey => ApiError::conflict(message),
            NotProjectAdmin { project, .. } => ApiError::forbidden(message)
                .with_details(serde_json::json!({"permission": "members.write", "project": project})),
            KeysForOthers(_) => {
                ApiError::forbidden(message).with_details(serde_json::json!({"permission": "api-keys.write"}))
            }
            ProjectNotEmpty {
                vms, volumes, networks, ..
            } => ApiError::conflict(message)
                .with_details(serde_json::json!({"vms": vms, "volumes": volumes, "networks": networks})),
            Store(e) => crate::envelope::of_store(e),
        }
    }
}

crate::envelope::by_value!(IdentityError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_error_has_its_public_status_and_code() {
        let s = String::from;
        let table = [
            (
                IdentityError::Invalid(s("expires_in_days 0: use 1 to 3650")),
                422,
                "invalid",
            ),
            (
                IdentityError::InvalidName(NameError {
                    kind: "user",
                    name: s("Bob"),
                }),
                422,
                "invalid",
            ),
            (
                IdentityError::NotFound {
                    kind: "project",
                    name: s("lab"),
                },
                404,
                "not_found",
            ),
            (
                IdentityError::AlreadyExists {
                    kind: "user",
                    name: s("bob"),
                },
                409,
                "conflict",
            ),
            (
                IdentityError::NotProjectAdmin {
                    user: s("bob"),
                    project: s("lab"),
                },
                403,
                "forbidden",
            ),
            (IdentityError::KeysForOthers(s("bob")), 403, "forbidden"),
            (IdentityError::DefaultProject, 409, "conflict"),
            (
                IdentityError::ProjectNotEmpty {
                    name: s("lab"),
                    vms: 1,
                    volumes: 0,
                    networks: 2,
                },
                409,
                "conflict",
            ),
            (IdentityError::DeletingSelf, 409, "conflict"),
            (IdentityError::RevokingOwnKey, 409, "conflict"),
            (
                IdentityError::Store(StoreError::Unavailable(s("etcd is down"))),
                503,
                "unavailable",
            ),
        ];
        crate::envelope::assert_public(table);
        let refused = ApiError::from(IdentityError::NotProjectAdmin {
            user: s("bob"),
            project: s("lab"),
        });
        assert_eq!(
            refused.body.details,
            Some(serde_json::json!({"permission": "members.write", "project": "lab"}))
        );
    }
}
