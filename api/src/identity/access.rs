//! What the identity routes share: who may see and administer a project, and creating
//! records that must not exist yet.

use serde::Serialize;

use crate::auth::keys::{binding_key, project_key, Binding, Caller, Project};
use crate::identity::error::IdentityError;
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

pub(crate) fn not_found(kind: &'static str, name: &str) -> IdentityError {
    IdentityError::NotFound {
        kind,
        name: name.to_string(),
    }
}

/// Stores a new record; [`IdentityError::AlreadyExists`] when `key` exists already.
pub(crate) async fn create_only<T: Serialize>(
    state: &AppState,
    key: &str,
    value: &T,
    kind: &'static str,
    name: &str,
) -> Result<(), IdentityError> {
    match state.store.compare_and_swap(key, None, store::encode(value)).await {
        Ok(_) => Ok(()),
        Err(store::StoreError::Conflict { .. }) => Err(IdentityError::AlreadyExists {
            kind,
            name: name.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn role_in(state: &AppState, project: &str, user: &str) -> Result<Option<String>, IdentityError> {
    Ok(
        store::get_json::<Binding>(state.store.as_ref(), &binding_key(project, user))
            .await?
            .map(|(b, _)| b.role),
    )
}

/// The project at `name` if the caller may see it (members and administrators);
/// otherwise not found, so projects one is not in stay invisible.
pub(crate) async fn visible_project(state: &AppState, caller: &Caller, name: &str) -> Result<Project, IdentityError> {
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
pub(crate) async fn administers(state: &AppState, caller: &Caller, name: &str) -> Result<(), IdentityError> {
    visible_project(state, caller, name).await?;
    if caller.admin || role_in(state, name, &caller.user).await?.as_deref() == Some("admin") {
        Ok(())
    } else {
        Err(IdentityError::NotProjectAdmin {
            user: caller.user.clone(),
            project: name.to_string(),
        })
    }
}
