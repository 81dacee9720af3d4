//! `/v1/projects` and `/v1/projects/{name}/members`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use socket_http::ApiError;

use crate::auth::keys::{binding_key, project_key, user_key, Binding, Caller, Project, DEFAULT_PROJECT};
use crate::json::JsonBody;
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

use super::access::{administers, create_only, not_found, role_in, visible_project};
use super::command::{CreateProject, CreateProjectCommand, RoleCommand, RoleRequest};

type AppS = State<Arc<AppState>>;

#[utoipa::path(get, path = "/v1/projects", tag = "identity",
    responses((status = 200, description = "The projects the caller has a role in (all, for administrators)", body = Vec<Project>)))]
pub async fn list_projects(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Project>>, ApiError> {
    let mut out = Vec::new();
    for (p, _) in store::list_json::<Project>(state.store.as_ref(), "projects/").await? {
        if caller.admin || role_in(&state, &p.name, &caller.user).await?.is_some() {
            out.push(p);
        }
    }
    Ok(Json(out))
}

#[utoipa::path(post, path = "/v1/projects", tag = "identity", request_body = CreateProject,
    responses((status = 201, body = Project), (status = 409, description = "The name is taken", body = crate::openapi::ErrorResponse)))]
pub async fn create_project(
    State(state): AppS,
    JsonBody(req): JsonBody<CreateProject>,
) -> Result<(StatusCode, Json<Project>), ApiError> {
    let req = CreateProjectCommand::try_from(req)?;
    let p = Project {
        name: req.name.clone(),
        description: req.description,
        created_at_ms: vmm_manager::spec::now_ms(),
    };
    create_only(&state, &project_key(&p.name), &p, "project", &p.name).await?;
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(get, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show_project(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(visible_project(&state, &caller, &name).await?))
}

#[utoipa::path(delete, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted, with its role bindings"), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "It still holds resources, or it is `default`", body = crate::openapi::ErrorResponse)))]
pub async fn delete_project(State(state): AppS, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    validate_name("project", &name)?;
    if name == DEFAULT_PROJECT {
        return Err(ApiError::conflict("the default project cannot be deleted"));
    }
    if state.store.get(&project_key(&name)).await?.is_none() {
        return Err(not_found("project", &name));
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
        return Err(ApiError::conflict(format!(
            "project {name:?} still holds {vms} VMs, {volumes} volumes and {networks} networks: delete them first"
        ))
        .with_details(serde_json::json!({"vms": vms, "volumes": volumes, "networks": networks})));
    }
    for (k, _) in s.list(&format!("bindings/{name}/")).await? {
        s.delete(&k).await?;
    }
    s.delete(&project_key(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/projects/{name}/members", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Vec<Binding>), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn list_members(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Binding>>, ApiError> {
    visible_project(&state, &caller, &name).await?;
    Ok(Json(
        store::list_json::<Binding>(state.store.as_ref(), &format!("bindings/{name}/"))
            .await?
            .into_iter()
            .map(|(b, _)| b)
            .collect(),
    ))
}

#[utoipa::path(put, path = "/v1/projects/{name}/members/{user}", tag = "identity",
    params(("name" = String, Path), ("user" = String, Path)), request_body = RoleRequest,
    responses((status = 200, description = "The user's role in the project, set", body = Binding), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn set_member(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((name, user)): Path<(String, String)>,
    JsonBody(req): JsonBody<RoleRequest>,
) -> Result<Json<Binding>, ApiError> {
    administers(&state, &caller, &name).await?;
    let req = RoleCommand::try_from(req)?;
    validate_name("user", &user)?;
    if state.store.get(&user_key(&user)).await?.is_none() {
        return Err(not_found("user", &user));
    }
    let b = Binding {
        project: name.clone(),
        user: user.clone(),
        role: req.role,
    };
    state.store.put(&binding_key(&name, &user), store::encode(&b)).await?;
    Ok(Json(b))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/members/{user}", tag = "identity",
    params(("name" = String, Path), ("user" = String, Path)),
    responses((status = 204, description = "The user has no role in the project any more"), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn remove_member(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((name, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    administers(&state, &caller, &name).await?;
    validate_name("user", &user)?;
    state.store.delete(&binding_key(&name, &user)).await?;
    Ok(StatusCode::NO_CONTENT)
}
