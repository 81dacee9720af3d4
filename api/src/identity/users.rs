//! `/v1/users`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use socket_http::ApiError;

use crate::auth::keys::{key_key, user_key, ApiKeyRecord, Binding, Caller, User};
use crate::json::JsonBody;
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

use super::access::{create_only, not_found};
use super::command::{CreateUser, CreateUserCommand};

type AppS = State<Arc<AppState>>;

#[utoipa::path(get, path = "/v1/users", tag = "identity", responses((status = 200, body = Vec<User>)))]
pub async fn list_users(State(state): AppS) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(
        store::list_json::<User>(state.store.as_ref(), "users/")
            .await?
            .into_iter()
            .map(|(u, _)| u)
            .collect(),
    ))
}

#[utoipa::path(post, path = "/v1/users", tag = "identity", request_body = CreateUser,
    responses((status = 201, body = User), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn create_user(
    State(state): AppS,
    JsonBody(req): JsonBody<CreateUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let req = CreateUserCommand::try_from(req)?;
    let u = User {
        name: req.name.clone(),
        admin: req.admin,
        created_at_ms: vmm_manager::spec::now_ms(),
    };
    create_only(&state, &user_key(&u.name), &u, "user", &u.name).await?;
    Ok((StatusCode::CREATED, Json(u)))
}

#[utoipa::path(delete, path = "/v1/users/{name}", tag = "identity", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted, with its roles; its keys stop working"), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "Deleting oneself", body = crate::openapi::ErrorResponse)))]
pub async fn delete_user(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    validate_name("user", &name)?;
    if name == caller.user {
        return Err(ApiError::conflict("a user cannot delete themselves"));
    }
    let s = state.store.as_ref();
    if s.get(&user_key(&name)).await?.is_none() {
        return Err(not_found("user", &name));
    }
    for (k, v) in s.list("bindings/").await? {
        if serde_json::from_slice::<Binding>(&v.value).is_ok_and(|b| b.user == name) {
            s.delete(&k).await?;
        }
    }
    let now = vmm_manager::spec::now_ms();
    for (mut k, rev) in store::list_json::<ApiKeyRecord>(s, "api-keys/").await? {
        if k.user == name && k.revoked_at_ms.is_none() {
            k.revoked_at_ms = Some(now);
            let _ = s.compare_and_swap(&key_key(&k.id), Some(rev), store::encode(&k)).await;
        }
    }
    s.delete(&user_key(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}
