//! Intent markers for the mutations that answer at once (network create and delete,
//! volume create and delete): before touching a daemon the handler writes
//! `intents/<kind>/<project>/<name>` (create-only, so two such changes of one name
//! cannot overlap: the second gets 409), and removes it only when everything is done.
//! A marker found at start belongs to a request a crash cut short, whose client never
//! got its answer: the reconciler removes that network or volume completely (from the
//! daemon and the store), so it is either whole, with no marker, or gone.
//!
//! [`run`] does the work in a task of its own, so a client that hangs up mid-request
//! cannot leave a marker behind in a running api, and handlers check that a name is
//! free before they take the marker, so a marker never stands for something an earlier
//! request made. A marker names the api process that wrote it, so the periodic pass
//! leaves alone the changes this process is making.

use std::future::Future;
use std::sync::Arc;

use socket_http::ApiError;

use crate::state::AppState;
use crate::store::{self, StateStore, StoreError};

/// What a marker is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Network,
    Volume,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Network => "network",
            Kind::Volume => "volume",
        }
    }
}

fn key(kind: Kind, project: &str, name: &str) -> String {
    format!("intents/{}/{project}/{name}", kind.as_str())
}

/// Runs `work` holding the marker for `action` on `kind` `name`, to completion in a
/// task of its own even when the request that started it goes away. For the handlers:
/// answers with the public error (`work`'s, converted), 409 when another change of it
/// holds the marker.
pub async fn run<T, E>(
    state: &Arc<AppState>,
    kind: Kind,
    project: &str,
    name: &str,
    action: &'static str,
    work: impl Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
    ApiError: From<E>,
{
    let (state, project, name) = (state.clone(), project.to_string(), name.to_string());
    tokio::spawn(async move {
        hold(&state, kind, &project, &name, action, work)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "{} {name:?} is being created or deleted by another request; retry when it is done",
                    kind.as_str()
                ))
            })
    })
    .await
    .map_err(|e| ApiError::internal(format!("the {} {action} did not finish: {e}", kind.as_str())))?
}

/// Whether a change of `kind` `name` is in progress or was cut short (its marker is
/// there): such a volume must not be attached meanwhile.
pub async fn pending(store: &dyn StateStore, kind: Kind, project: &str, name: &str) -> Result<bool, StoreError> {
    Ok(store.get(&key(kind, project, name)).await?.is_some())
}

/// Runs `work` holding the marker (create-only: two changes of one name cannot
/// overlap), in the caller's task, and removes the marker when `work` is done. `None`
/// when another change holds the marker.
pub async fn hold<T, E: From<StoreError>>(
    state: &AppState,
    kind: Kind,
    project: &str,
    name: &str,
    action: &'static str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<Option<T>, E> {
    let key = key(kind, project, name);
    let value = store::encode(&serde_json::json!({
        "action": action,
        "at_ms": vmm_manager::spec::now_ms(),
        "instance": state.instance,
    }));
    match state.store.compare_and_swap(&key, None, value).await {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let out = work.await;
    state.store.delete(&key).await?;
    out.map(Some)
}

/// The markers no change of this process (`instance`) holds: those a crash left.
/// (kind, project, name, action).
pub async fn left_over(
    store: &dyn StateStore,
    instance: &str,
) -> Result<Vec<(Kind, String, String, String)>, StoreError> {
    Ok(store
        .list("intents/")
        .await?
        .into_iter()
        .filter_map(|(k, v)| {
            let holder = serde_json::from_slice::<serde_json::Value>(&v.value).ok()?;
            if holder["instance"] == instance {
                return None;
            }
            let mut parts = k.splitn(4, '/').skip(1);
            let kind = match parts.next()? {
                "network" => Kind::Network,
                "volume" => Kind::Volume,
                _ => return None,
            };
            let action = holder["action"].as_str().unwrap_or_default().to_string();
            Some((kind, parts.next()?.to_string(), parts.next()?.to_string(), action))
        })
        .collect())
}

/// Removes the marker of `kind` `name` once the reconciler dealt with it.
pub async fn clear(store: &dyn StateStore, kind: Kind, project: &str, name: &str) -> Result<(), StoreError> {
    store.delete(&key(kind, project, name)).await?;
    Ok(())
}
