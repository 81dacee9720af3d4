//! What the identity routes share: who may see and administer a project, and creating
//! records that must not exist yet.

use serde::Serialize;
use socket_http::ApiError;

use crate::auth::keys::{binding_key, project_key, Binding, Caller, Project};
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

/// Project names are short: hosts name project resources `<project>.<name>`.
pub const MAX_PROJECT_NAME: usize = 24;

pub(crate) fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("{kind} {name:?} does not exist"))
}

/// Stores a new record; 409 when `key` exists already.
pub(crate) async fn create_only<T: Serialize>(
    state: &AppState,
    key: &str,
    value: &T,
    kind: &str,
    name: &str,
) -> Result<(), ApiError> {
    match state.store.compare_and_swap(key, None, store::encode(value)).await {
        Ok(_) => Ok(()),
        Err(store::StoreError::Conflict { .. }) => Err(ApiError::conflict(format!("{kind} {name:?} already exists"))),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn role_in(state: &AppState, project: &str, user: &str) -> Result<Option<String>, ApiError> {
    Ok(
        store::get_json::<Binding>(state.store.as_ref(), &binding_key(project, user))
            .await?
            .map(|(b, _)| b.role),
    )
}

/// The project at `name` if the caller may see it (members and administrators);
/// otherwise 404, so projects one is not in stay invisible.
pub(crate) async fn visible_project(state: &AppState, caller: &Caller, name: &str) -> Result<Project, ApiError> {
    validate_name("project", name)?;
    let p = store::get_json::<Project>(state.store.as_ref(), &project_key(name))
        .await?
        .map(|(p, _)| p)
        .ok_or_else(|| not_found("project", name))?;
    if caller.admin || role_in(state, name, &caller.user).await?.is_some() {
        Ok(p)
    } else {
        Err(not_found("project", name))
    }
}

/// Checks that the caller administers project `name` (hearth administrators and the
/// project's own admins do).
pub(crate) async fn administers(state: &AppState, caller: &Caller, name: &str) -> Result<(), ApiError> {
    visible_project(state, caller, name).await?;
    if caller.admin || role_in(state, name, &caller.user).await?.as_deref() == Some("admin") {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "permission members.write denied: user {} is not an admin of project {name}",
            caller.user
        ))
        .with_details(serde_json::json!({"permission": "members.write", "project": name})))
    }
}
