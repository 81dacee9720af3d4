//! API keys: listing the caller's (every key, for administrators), making one (shown
//! once), and revoking one.

use serde::Serialize;

use crate::auth::keys::{issue_key, key_key, user_key, ApiKeyRecord, Caller};
use crate::identity::command::CreateApiKeyCommand;
use crate::identity::error::IdentityError;
use crate::state::AppState;
use crate::store;

use super::access::not_found;

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

/// The caller's keys (every key, for administrators).
pub async fn list(state: &AppState, caller: &Caller) -> Result<Vec<ApiKeyInfo>, IdentityError> {
    Ok(store::list_json::<ApiKeyRecord>(state.store.as_ref(), "api-keys/")
        .await?
        .iter()
        .filter(|(k, _)| caller.admin || k.user == caller.user)
        .map(|(k, _)| ApiKeyInfo::from(k))
        .collect())
}

/// Makes a key for the caller, or (administrators only) for another user.
pub async fn create(state: &AppState, caller: &Caller, req: CreateApiKeyCommand) -> Result<KeyCreated, IdentityError> {
    let user = req.user.unwrap_or_else(|| caller.user.clone());
    if user != caller.user && !caller.admin {
        return Err(IdentityError::KeysForOthers(caller.user.clone()));
    }
    if state.store.get(&user_key(&user)).await?.is_none() {
        return Err(not_found("user", &user));
    }
    let expires = req.lifetime_ms.map(|ms| vmm_manager::spec::now_ms() + ms);
    let (rec, key) = issue_key(state.store.as_ref(), &user, &req.name, expires).await?;
    Ok(KeyCreated {
        info: ApiKeyInfo::from(&rec),
        key,
    })
}

/// Revokes key `id` (`hth_<id>_` or the id alone): it stops working at once. Other
/// users' keys are invisible to non-administrators, and the key making the request
/// cannot revoke itself.
pub async fn revoke(state: &AppState, caller: &Caller, id: &str) -> Result<(), IdentityError> {
    let id = id.trim_start_matches("hth_").trim_end_matches('_').to_string();
    let found = if id.bytes().all(|b| b.is_ascii_alphanumeric()) && !id.is_empty() {
        store::get_json::<ApiKeyRecord>(state.store.as_ref(), &key_key(&id)).await?
    } else {
        None
    };
    let Some((mut rec, rev)) = found.filter(|(k, _)| caller.admin || k.user == caller.user) else {
        return Err(not_found("API key", &id));
    };
    if rec.id == caller.key_id {
        return Err(IdentityError::RevokingOwnKey);
    }
    if rec.revoked_at_ms.is_none() {
        rec.revoked_at_ms = Some(vmm_manager::spec::now_ms());
        state
            .store
            .compare_and_swap(&key_key(&id), Some(rev), store::encode(&rec))
            .await?;
    }
    Ok(())
}
