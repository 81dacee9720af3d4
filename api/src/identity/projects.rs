//! Projects and their members: listing what the caller may see, creating, deleting an
//! empty project, and setting or removing a user's role in one.

use crate::auth::keys::{binding_key, project_key, user_key, Binding, Caller, Project, DEFAULT_PROJECT};
use crate::identity::command::{CreateProjectCommand, RoleCommand, RoleRequest};
use crate::identity::error::IdentityError;
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

use super::access::{administers, create_only, not_found, role_in, visible_project};

/// The projects the caller has a role in (all, for administrators).
pub async fn list(state: &AppState, caller: &Caller) -> Result<Vec<Project>, IdentityError> {
    let mut out = Vec::new();
    for (p, _) in store::list_json::<Project>(state.store.as_ref(), "projects/").await? {
        if caller.admin || role_in(state, &p.name, &caller.user).await?.is_some() {
            out.push(p);
        }
    }
    Ok(out)
}

pub async fn create(state: &AppState, req: CreateProjectCommand) -> Result<Project, IdentityError> {
    let p = Project {
        name: req.name,
        description: req.description,
        created_at_ms: vmm_manager::spec::now_ms(),
    };
    create_only(state, &project_key(&p.name), &p, "project", &p.name).await?;
    Ok(p)
}

/// Deletes a project that holds nothing any more, with its role bindings.
pub async fn delete(state: &AppState, name: &str) -> Result<(), IdentityError> {
    validate_name("project", name)?;
    if name == DEFAULT_PROJECT {
        return Err(IdentityError::DefaultProject);
    }
    if state.store.get(&project_key(name)).await?.is_none() {
        return Err(not_found("project", name));
    }
    let s = state.store.as_ref();
    let vms = store::list_json::<crate::model::VmRecord>(s, "vms/")
        .await?
        .into_iter()
        .filter(|(v, _)| v.project == name)
        .count();
    let volumes = s.list(&format!("volumes/{name}/")).await?.len();
    let networks = s.list(&format!("networks/{name}/")).await?.len();
    if vms + volumes + networks > 0 {
        return Err(IdentityError::ProjectNotEmpty {
            name: name.to_string(),
            vms,
            volumes,
            networks,
        });
    }
    for (k, _) in s.list(&format!("bindings/{name}/")).await? {
        s.delete(&k).await?;
    }
    s.delete(&project_key(name)).await?;
    Ok(())
}

/// The role bindings of a project the caller may see.
pub async fn members(state: &AppState, caller: &Caller, name: &str) -> Result<Vec<Binding>, IdentityError> {
    visible_project(state, caller, name).await?;
    Ok(
        store::list_json::<Binding>(state.store.as_ref(), &format!("bindings/{name}/"))
            .await?
            .into_iter()
            .map(|(b, _)| b)
            .collect(),
    )
}

/// Gives `user` a role in project `name`; the caller must administer it (checked
/// before the role itself).
pub async fn set_member(
    state: &AppState,
    caller: &Caller,
    name: &str,
    user: &str,
    req: RoleRequest,
) -> Result<Binding, IdentityError> {
    administers(state, caller, name).await?;
    let req = RoleCommand::try_from(req)?;
    validate_name("user", user)?;
    if state.store.get(&user_key(user)).await?.is_none() {
        return Err(not_found("user", user));
    }
    let b = Binding {
        project: name.to_string(),
        user: user.to_string(),
        role: req.role,
    };
    state.store.put(&binding_key(name, user), store::encode(&b)).await?;
    Ok(b)
}

/// Takes `user`'s role in project `name` away; the caller must administer it.
pub async fn remove_member(state: &AppState, caller: &Caller, name: &str, user: &str) -> Result<(), IdentityError> {
    administers(state, caller, name).await?;
    validate_name("user", user)?;
    state.store.delete(&binding_key(name, user)).await?;
    Ok(())
}
