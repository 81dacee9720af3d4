//! The HTTP edge of `/v1/projects`, `/v1/projects/{name}/members`, `/v1/users` and
//! `/v1/api-keys`: parse, call the work ([`super::projects`], [`super::users`],
//! [`super::keys`]), map errors; nothing else.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use socket_http::ApiError;

use crate::auth::keys::{Binding, Caller, Project, User};
use crate::json::JsonBody;
use crate::state::AppState;

use super::command::{
    CreateApiKey, CreateApiKeyCommand, CreateProject, CreateProjectCommand, CreateUser, CreateUserCommand, RoleRequest,
};
use super::keys::{ApiKeyInfo, KeyCreated};
use super::{access, keys, projects, users};

type AppS = State<Arc<AppState>>;

#[utoipa::path(get, path = "/v1/projects", tag = "identity",
    responses((status = 200, description = "The projects the caller has a role in (all, for administrators)", body = Vec<Project>)))]
pub async fn list_projects(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Project>>, ApiError> {
    Ok(Json(projects::list(&state, &caller).await?))
}

#[utoipa::path(post, path = "/v1/projects", tag = "identity", request_body = CreateProject,
    responses((status = 201, body = Project), (status = 409, description = "The name is taken", body = crate::openapi::ErrorResponse)))]
pub async fn create_project(
    State(state): AppS,
    JsonBody(req): JsonBody<CreateProject>,
) -> Result<(StatusCode, Json<Project>), ApiError> {
    let req = CreateProjectCommand::try_from(req)?;
    Ok((StatusCode::CREATED, Json(projects::create(&state, req).await?)))
}

#[utoipa::path(get, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show_project(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(access::visible_project(&state, &caller, &name).await?))
}

#[utoipa::path(delete, path = "/v1/projects/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted, with its role bindings"), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "It still holds resources, or it is `default`", body = crate::openapi::ErrorResponse)))]
pub async fn delete_project(State(state): AppS, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    projects::delete(&state, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/projects/{name}/members", tag = "identity", params(("name" = String, Path)),
    responses((status = 200, body = Vec<Binding>), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn list_members(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Binding>>, ApiError> {
    Ok(Json(projects::members(&state, &caller, &name).await?))
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
    Ok(Json(projects::set_member(&state, &caller, &name, &user, req).await?))
}

#[utoipa::path(delete, path = "/v1/projects/{name}/members/{user}", tag = "identity",
    params(("name" = String, Path), ("user" = String, Path)),
    responses((status = 204, description = "The user has no role in the project any more"), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn remove_member(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((name, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    projects::remove_member(&state, &caller, &name, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/users", tag = "identity", responses((status = 200, body = Vec<User>)))]
pub async fn list_users(State(state): AppS) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(users::list(&state).await?))
}

#[utoipa::path(post, path = "/v1/users", tag = "identity", request_body = CreateUser,
    responses((status = 201, body = User), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn create_user(
    State(state): AppS,
    JsonBody(req): JsonBody<CreateUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let req = CreateUserCommand::try_from(req)?;
    Ok((StatusCode::CREATED, Json(users::create(&state, req).await?)))
}

#[utoipa::path(delete, path = "/v1/users/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted, with its roles; its keys stop working"), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "Deleting oneself", body = crate::openapi::ErrorResponse)))]
pub async fn delete_user(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    users::delete(&state, &caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "identity",
    responses((status = 200, description = "The caller's keys (every key, for administrators)", body = Vec<ApiKeyInfo>)))]
pub async fn list_keys(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiError> {
    Ok(Json(keys::list(&state, &caller).await?))
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "identity", request_body = CreateApiKey,
    responses((status = 201, description = "The key, shown this once", body = KeyCreated), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn create_key(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<KeyCreated>), ApiError> {
    let req = CreateApiKeyCommand::try_from(req)?;
    Ok((StatusCode::CREATED, Json(keys::create(&state, &caller, req).await?)))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "identity", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked: it stops working at once"), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "The key making the request", body = crate::openapi::ErrorResponse)))]
pub async fn revoke_key(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    keys::revoke(&state, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
