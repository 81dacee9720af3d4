//! The `/v1/databases` routes: parse, call, map errors.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use socket_http::ApiError;
use vmm_manager::spec::VmAction;

use super::command::{CreateDatabase, CreateDatabaseCommand, ResetPassword, UpdateDatabase};
use super::error::DatabaseError;
use super::record::{find, list as list_records, Database, DbPhase};
use crate::auth::keys::Caller;
use crate::json::{JsonBody, Query};
use crate::model::Operation;
use crate::state::AppState;

type AppS = State<Arc<AppState>>;

/// What a create or delete answers: its operation, and the database.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatabaseAccepted {
    pub operation: Operation,
    pub database: Database,
}

fn accepted(operation: Operation, database: Database) -> Response {
    (StatusCode::ACCEPTED, Json(DatabaseAccepted { operation, database })).into_response()
}

#[utoipa::path(post, path = "/v1/databases", tag = "databases", params(crate::openapi::ProjectParam, crate::openapi::IdempotencyKey), request_body = CreateDatabase,
    responses((status = 202, description = "Accepted: the operation that makes the database; the answer holds the password, shown only this once", body = DatabaseAccepted),
      (status = 409, description = "The name is taken", body = crate::openapi::ErrorResponse),
      (status = 422, description = "Unknown version or extension, too little memory, a bad size, a parameter not on the list", body = crate::openapi::ErrorResponse),
      (status = 507, description = "The data volume does not fit in the storage pool", body = crate::openapi::ErrorResponse)))]
pub async fn create(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateDatabase>,
) -> Result<Response, ApiError> {
    let cmd = CreateDatabaseCommand::try_from(req)?;
    let (op, db) = super::create::begin(&state, &caller.project, cmd).await?;
    Ok(accepted(op, db))
}

#[utoipa::path(get, path = "/v1/databases", tag = "databases", params(crate::openapi::ProjectParam), responses((status = 200, body = Vec<Database>)))]
pub async fn list(State(state): AppS, Extension(caller): Extension<Caller>) -> Result<Json<Vec<Database>>, ApiError> {
    let mut out = Vec::new();
    for rec in list_records(&state, &caller.project).await? {
        let vm_state = super::change::vm_state(&state, &rec).await;
        out.push(Database::of(&rec, vm_state.as_deref()));
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/databases/{name}", tag = "databases", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, body = Database), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Database>, ApiError> {
    let (rec, _) = find(&state, &caller.project, &name).await?;
    let vm_state = super::change::vm_state(&state, &rec).await;
    Ok(Json(Database::of(&rec, vm_state.as_deref())))
}

#[utoipa::path(get, path = "/v1/databases/{name}/ca.pem", tag = "databases", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, description = "The CA certificate that signed the server's (PEM): `sslrootcert` for `sslmode=verify-full`", content_type = "application/x-pem-file", body = String),
      (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn ca_pem(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    find(&state, &caller.project, &name).await?;
    let ca = super::pki::ca(&state).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        ca.cert_pem,
    )
        .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct DeleteQuery {
    /// Keep the data volume (`db-NAME-data`): a new database or VM can use it later.
    #[serde(default)]
    keep_volume: bool,
}

#[utoipa::path(delete, path = "/v1/databases/{name}", tag = "databases", params(("name" = String, Path), DeleteQuery, crate::openapi::ProjectParam),
    responses((status = 202, description = "Accepted: the operation that removes the VM, its port and seed, and the data volume unless kept", body = DatabaseAccepted),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, description = "It is still being created", body = crate::openapi::ErrorResponse)))]
pub async fn delete(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let (rec, rev) = find(&state, &caller.project, &name).await?;
    let (op, db) = super::delete::begin(&state, rec, rev, q.keep_volume).await?;
    Ok(accepted(op, db))
}

#[utoipa::path(patch, path = "/v1/databases/{name}", tag = "databases", params(("name" = String, Path), crate::openapi::ProjectParam), request_body = UpdateDatabase,
    responses((status = 200, description = "Changed: storage grown online, networks and parameters applied (reloaded, or restarted where a parameter needs it), vCPUs and memory with a restart", body = Database),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn update(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<UpdateDatabase>,
) -> Result<Json<Database>, ApiError> {
    let (rec, rev) = find(&state, &caller.project, &name).await?;
    Ok(Json(super::change::update(&state, rec, rev, req).await?))
}

#[utoipa::path(post, path = "/v1/databases/{name}/reset-password", tag = "databases", params(("name" = String, Path), crate::openapi::ProjectParam), request_body = ResetPassword,
    responses((status = 200, description = "The database with its new password, shown only this once", body = Database),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn reset_password(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ResetPassword>,
) -> Result<Json<Database>, ApiError> {
    let (rec, rev) = find(&state, &caller.project, &name).await?;
    Ok(Json(
        super::change::reset_password(&state, rec, rev, req.password).await?,
    ))
}

#[utoipa::path(post, path = "/v1/databases/{name}/rotate-certificate", tag = "databases", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, description = "The database with its new server certificate (same CA), loaded by a running server without a restart", body = Database),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse), (status = 504, body = crate::openapi::ErrorResponse)))]
pub async fn rotate_certificate(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Database>, ApiError> {
    let (rec, rev) = find(&state, &caller.project, &name).await?;
    Ok(Json(super::change::rotate_certificate(&state, rec, rev).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogsQuery {
    /// How many lines from the end (default 200).
    lines: Option<usize>,
}

#[utoipa::path(get, path = "/v1/databases/{name}/logs", tag = "databases", params(("name" = String, Path), LogsQuery, crate::openapi::ProjectParam),
    responses((status = 200, description = "The end of PostgreSQL's log", content_type = "text/plain", body = String),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn logs(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let (rec, _) = find(&state, &caller.project, &name).await?;
    let lines = super::change::logs(&state, &rec, q.lines.unwrap_or(200).clamp(1, 10_000)).await?;
    let mut text = lines.join("\n");
    text.push('\n');
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseAction {
    Start,
    Stop,
    Restart,
}

#[utoipa::path(post, path = "/v1/databases/{name}/{action}", tag = "databases",
    params(("name" = String, Path), ("action" = inline(DatabaseAction), Path), crate::openapi::ProjectParam),
    responses((status = 202, description = "Accepted: the VM's operation", body = crate::model::Accepted),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn action(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let vm_action = match action.as_str() {
        "start" => VmAction::Start,
        "stop" => VmAction::Stop,
        "restart" => VmAction::Reboot,
        other => {
            return Err(ApiError::not_found(format!(
                "no database action {other:?}: start, stop or restart"
            )))
        }
    };
    let (rec, _) = find(&state, &caller.project, &name).await?;
    if rec.phase != DbPhase::Ready {
        return Err(DatabaseError::Busy {
            name: rec.name,
            phase: format!("{:?}", rec.phase).to_lowercase(),
            action: "start, stop or restart it",
        }
        .into());
    }
    crate::vms::http::act(&state, &caller.project, &rec.vm_name, vm_action, false).await
}
