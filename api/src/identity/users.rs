//! Users: listing, creating, and deleting one with its roles (its keys stop working).

use crate::auth::keys::{key_key, user_key, ApiKeyRecord, Binding, Caller, User};
use crate::identity::command::CreateUserCommand;
use crate::identity::error::IdentityError;
use crate::model::validate_name;
use crate::state::AppState;
use crate::store;

use super::access::{create_only, not_found};

pub async fn list(state: &AppState) -> Result<Vec<User>, IdentityError> {
    Ok(store::list_json::<User>(state.store.as_ref(), "users/")
        .await?
        .into_iter()
        .map(|(u, _)| u)
        .collect())
}

pub async fn create(state: &AppState, req: CreateUserCommand) -> Result<User, IdentityError> {
    let u = User {
        name: req.name,
        admin: req.admin,
        created_at_ms: vmm_manager::spec::now_ms(),
    };
    create_only(state, &user_key(&u.name), &u, "user", &u.name).await?;
    Ok(u)
}

/// Deletes user `name` (never the caller), its role bindings, and revokes its keys.
pub async fn delete(state: &AppState, caller: &Caller, name: &str) -> Result<(), IdentityError> {
    validate_name("user", name)?;
    if name == caller.user {
        return Err(IdentityError::DeletingSelf);
    }
    let s = state.store.as_ref();
    if s.get(&user_key(name)).await?.is_none() {
        return Err(not_found("user", name));
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
    s.delete(&user_key(name)).await?;
    Ok(())
}
