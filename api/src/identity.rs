//! `/v1/projects`, `/v1/projects/{name}/members`, `/v1/users` and `/v1/api-keys`.
//! The middleware in [`crate::auth`] has already checked what the route needs; these
//! handlers check what depends on the body or the path (whose key, which project).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use socket_http::ApiError;

use crate::auth::keys::{
    binding_key, issue_key, key_key, project_key, user_key, ApiKeyRecord, Binding, Caller, Project, User,
    DEFAULT_PROJECT, ROLES,
};
use crate::json::JsonBody;
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

type AppS = State<Arc<AppState>>;

/// Project names are short: hosts name project resources `<project>.<name>`.
pub const MAX_PROJECT_NAME: usize = 24;

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("{kind} {name:?} does not exist"))
}

/// Stores a new record; 409 when `key` exists already.
async fn create_only<T: Serialize>(
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

async fn role_in(state: &AppState, project: &str, user: &str) -> Result<Option<String>, ApiError> {
    Ok(
        store::get_json::<Binding>(state.store.as_ref(), &binding_key(project, user))
            .await?
            .map(|(b, _)| b.role),
    )
}

/// The project at `name` if the caller may see it (members and administrators);
/// otherwise 404, so projects one is not in stay invisible.
async fn visible_project(state: &AppState, caller: &Caller, name: &str) -> Result<Project, ApiError> {
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// 1-24 lowercase letters, digits and '-'.
    pub name: String,
    #[serde(default)]
    pub description: String,
}

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
    validate_name("project", &req.name)?;
    if req.name.len() > MAX_PROJECT_NAME {
        return Err(ApiError::unprocessable(format!(
            "project names are at most {MAX_PROJECT_NAME} characters"
        )));
    }
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// `viewer`, `member` or `admin`.
    pub role: String,
}

/// Checks that the caller administers project `name` (hearth administrators and the
/// project's own admins do).
async fn administers(state: &AppState, caller: &Caller, name: &str) -> Result<(), ApiError> {
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
    if !ROLES.contains(&req.role.as_str()) {
        return Err(ApiError::unprocessable(format!(
            "role {:?} does not exist: use one of {}",
            req.role,
            ROLES.join(", ")
        )));
    }
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    /// A hearth administrator (default false).
    #[serde(default)]
    pub admin: bool,
}

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
    validate_name("user", &req.name)?;
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
    if req.name.trim().is_empty() || req.name.len() > 64 || req.name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "a key needs a name of 1 to 64 printable characters",
        ));
    }
    let user = req.user.unwrap_or_else(|| caller.user.clone());
    if user != caller.user && !caller.admin {
        return Err(ApiError::forbidden(format!(
            "permission api-keys.write denied: only hearth administrators make keys for other users, and user {} is not one",
            caller.user
        ))
        .with_details(serde_json::json!({"permission": "api-keys.write"})));
    }
    validate_name("user", &user)?;
    if state.store.get(&user_key(&user)).await?.is_none() {
        return Err(not_found("user", &user));
    }
    let expires = match req.expires_in_days {
        None => None,
        Some(d @ 1..=3650) => Some(vmm_manager::spec::now_ms() + u64::from(d) * 86_400_000),
        Some(d) => return Err(ApiError::unprocessable(format!("expires_in_days {d}: use 1 to 3650"))),
    };
    let (rec, key) = issue_key(state.store.as_ref(), &user, req.name.trim(), expires).await?;
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
