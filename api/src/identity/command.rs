//! The identity routes' request bodies as typed commands: every check the body alone
//! allows, unit-tested without a running stack. Whose key, which project and whether
//! the names exist are checked by the handlers.

use serde::Deserialize;

use crate::auth::keys::ROLES;
use crate::identity::error::IdentityError;
use crate::model::validate_name;

/// Project names are short: hosts name project resources `<project>.<name>`.
pub const MAX_PROJECT_NAME: usize = 24;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// 1-24 lowercase letters, digits and '-'.
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// A project create request that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateProjectCommand {
    pub name: String,
    pub description: String,
}

impl TryFrom<CreateProject> for CreateProjectCommand {
    type Error = IdentityError;

    fn try_from(req: CreateProject) -> Result<Self, IdentityError> {
        validate_name("project", &req.name)?;
        if req.name.len() > MAX_PROJECT_NAME {
            return Err(IdentityError::Invalid(format!(
                "project names are at most {MAX_PROJECT_NAME} characters"
            )));
        }
        Ok(Self {
            name: req.name,
            description: req.description,
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// `viewer`, `member` or `admin`.
    pub role: String,
}

/// A role that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleCommand {
    pub role: String,
}

impl TryFrom<RoleRequest> for RoleCommand {
    type Error = IdentityError;

    fn try_from(req: RoleRequest) -> Result<Self, IdentityError> {
        if !ROLES.contains(&req.role.as_str()) {
            return Err(IdentityError::Invalid(format!(
                "role {:?} does not exist: use one of {}",
                req.role,
                ROLES.join(", ")
            )));
        }
        Ok(Self { role: req.role })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    /// A hearth administrator (default false).
    #[serde(default)]
    pub admin: bool,
}

/// A user create request that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateUserCommand {
    pub name: String,
    pub admin: bool,
}

impl TryFrom<CreateUser> for CreateUserCommand {
    type Error = IdentityError;

    fn try_from(req: CreateUser) -> Result<Self, IdentityError> {
        validate_name("user", &req.name)?;
        Ok(Self {
            name: req.name,
            admin: req.admin,
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// 1 to 64 characters, to tell keys apart.
    pub name: String,
    /// Whose key (default: the caller's own; only administrators make keys for others).
    #[serde(default)]
    pub user: Option<String>,
    /// Days until the key stops working (default: never).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<u32>,
}

/// A key create request that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateApiKeyCommand {
    /// Trimmed.
    pub name: String,
    /// `None`: the caller's own.
    pub user: Option<String>,
    /// How long the key works, in milliseconds (`None`: for ever).
    pub lifetime_ms: Option<u64>,
}

impl TryFrom<CreateApiKey> for CreateApiKeyCommand {
    type Error = IdentityError;

    fn try_from(req: CreateApiKey) -> Result<Self, IdentityError> {
        if req.name.trim().is_empty() || req.name.len() > 64 || req.name.chars().any(char::is_control) {
            return Err(IdentityError::Invalid(
                "a key needs a name of 1 to 64 printable characters".into(),
            ));
        }
        if let Some(user) = &req.user {
            validate_name("user", user)?;
        }
        let lifetime_ms = match req.expires_in_days {
            None => None,
            Some(d @ 1..=3650) => Some(u64::from(d) * 86_400_000),
            Some(d) => return Err(IdentityError::Invalid(format!("expires_in_days {d}: use 1 to 3650"))),
        };
        Ok(Self {
            name: req.name.trim().to_string(),
            user: req.user,
            lifetime_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn refused<T: std::fmt::Debug>(r: Result<T, IdentityError>, says: &str) {
        let e = socket_http::ApiError::from(r.expect_err("refused"));
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.body.message.contains(says), "{:?} lacks {says:?}", e.body.message);
    }

    fn body<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("shape")
    }

    #[test]
    fn projects_users_and_roles_are_checked_without_a_stack() {
        let ok: CreateProjectCommand = body::<CreateProject>(serde_json::json!({"name": "lab"}))
            .try_into()
            .expect("valid");
        assert_eq!(ok.name, "lab");
        refused(
            CreateProjectCommand::try_from(body::<CreateProject>(serde_json::json!({"name": "a".repeat(25)}))),
            "at most 24",
        );
        refused(
            CreateProjectCommand::try_from(body::<CreateProject>(serde_json::json!({"name": "Lab"}))),
            "invalid project name",
        );
        refused(
            CreateUserCommand::try_from(body::<CreateUser>(serde_json::json!({"name": "a.b"}))),
            "invalid user name",
        );
        refused(
            RoleCommand::try_from(body::<RoleRequest>(serde_json::json!({"role": "owner"}))),
            "use one of viewer",
        );
        for role in ROLES {
            assert!(RoleCommand::try_from(body::<RoleRequest>(serde_json::json!({"role": role}))).is_ok());
        }
    }

    #[test]
    fn keys_need_a_name_a_valid_owner_and_a_lifetime_in_range() {
        let k: CreateApiKeyCommand = body::<CreateApiKey>(serde_json::json!({"name": "  ci  ", "expires_in_days": 2}))
            .try_into()
            .expect("valid");
        assert_eq!(
            (k.name.as_str(), k.user, k.lifetime_ms),
            ("ci", None, Some(2 * 86_400_000))
        );
        for bad in [
            serde_json::json!({"name": " "}),
            serde_json::json!({"name": "x".repeat(65)}),
            serde_json::json!({"name": "a\u{7}"}),
        ] {
            refused(
                CreateApiKeyCommand::try_from(body::<CreateApiKey>(bad)),
                "1 to 64 printable",
            );
        }
        for days in [0, 3651] {
            refused(
                CreateApiKeyCommand::try_from(body::<CreateApiKey>(
                    serde_json::json!({"name": "k", "expires_in_days": days}),
                )),
                "use 1 to 3650",
            );
        }
        refused(
            CreateApiKeyCommand::try_from(body::<CreateApiKey>(serde_json::json!({"name": "k", "user": "Bob"}))),
            "invalid user name",
        );
    }
}
