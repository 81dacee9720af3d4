//! `/v1/api-keys`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Serialize;
use socket_http::ApiError;

use crate::auth::keys::{issue_key, key_key, user_key, ApiKeyRecord, Caller};
use crate::json::JsonBody;
use crate::state::AppState;
use crate::store;

use super::access::not_found;
use super::command::{CreateApiKey, CreateApiKeyCommand};

type AppS = State<Arc<AppState>>;

/// An API key as listed: never the secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub user: String,
    /// `hth_<id>_`: how the key starts.
    pub prefix: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
}

impl From<&ApiKeyRecord> for ApiKeyInfo {
    fn from(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            user: k.user.clone(),
            prefix: format!("hth_{}_", k.id),
            created_at_ms: k.created_at_ms,
            expires_at_ms: k.expires_at_ms,
            revoked_at_ms: k.revoked_at_ms,
        }
    }
}

/// A new key as `POST /v1/api-keys` answers: the only time the secret is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyCreated {
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The whole key. Store it now: only its hash is kept.
    pub key: String,
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "identity",
    responses((status = 200, description = "The caller's keys (every key, for administrators)", body = Vec<ApiKeyInfo>)))]
pub async fn list_keys(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiError> {
    Ok(Json(
        store::list_json::<ApiKeyRecord>(state.store.as_ref(), "api-keys/")
            .await?
            .iter()
            .filter(|(k, _)| caller.admin || k.user == caller.user)
            .map(|(k, _)| ApiKeyInfo::from(k))
            .collect(),
    ))
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "identity", request_body = CreateApiKey,
    responses((status = 201, description = "The key, shown this once", body = KeyCreated), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn create_key(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<KeyCreated>), ApiError> {
    let req = CreateApiKeyCommand::try_from(req)?;
    let user = req.user.unwrap_or_else(|| caller.user.clone());
    if user != caller.user && !caller.admin {
        return Err(ApiError::forbidden(format!(
            "permission api-keys.write denied: only hearth administrators make keys for other users, and user {} is not one",
            caller.user
        ))
        .with_details(serde_json::json!({"permission": "api-keys.write"})));
    }
    if state.store.get(&user_key(&user)).await?.is_none() {
        return Err(not_found("user", &user));
    }
    let expires = req.lifetime_ms.map(|ms| vmm_manager::spec::now_ms() + ms);
    let (rec, key) = issue_key(state.store.as_ref(), &user, &req.name, expires).await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            info: ApiKeyInfo::from(&rec),
            key,
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "identity", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked: it stops working at once"), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "The key making the request", body = crate::openapi::ErrorResponse)))]
pub async fn revoke_key(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = id.trim_start_matches("hth_").trim_end_matches('_').to_string();
    let found = if id.bytes().all(|b| b.is_ascii_alphanumeric()) && !id.is_empty() {
        store::get_json::<ApiKeyRecord>(state.store.as_ref(), &key_key(&id)).await?
    } else {
        None
    };
    // Other users' keys are invisible to non-administrators.
    let Some((mut rec, rev)) = found.filter(|(k, _)| caller.admin || k.user == caller.user) else {
        return Err(not_found("API key", &id));
    };
    if rec.id == caller.key_id {
        return Err(ApiError::conflict(
            "this is the key the request was made with: revoke it with another key, so you are not locked out",
        ));
    }
    if rec.revoked_at_ms.is_none() {
        rec.revoked_at_ms = Some(vmm_manager::spec::now_ms());
        state
            .store
            .compare_and_swap(&key_key(&id), Some(rev), store::encode(&rec))
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
