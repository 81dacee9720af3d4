//! The `/v1/hosts` routes (administrators only): parse, call, map errors.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use hearth_placement::Resources;
use socket_http::ApiError;

use super::error::HostError;
use super::record::{self, HostRecord};
use super::schedule::{host_of, needs};
use super::view::Host;
use crate::model::VmRecord;
use crate::state::AppState;
use crate::store;

type AppS = State<Arc<AppState>>;

/// Every host with what is placed on it.
async fn hosts(state: &AppState, only: Option<&str>) -> Result<Vec<Host>, HostError> {
    let alive = record::alive(state.store.as_ref()).await?;
    let leader = record::leader(state.store.as_ref()).await?.map(|l| l.host);
    let vms = store::list_json::<VmRecord>(state.store.as_ref(), "vms/").await?;
    let mut out = Vec::new();
    for h in record::list(state.store.as_ref()).await? {
        if only.is_some_and(|n| n != h.name) {
            continue;
        }
        let mut used = Resources::default();
        let mut names = Vec::new();
        for (vm, _) in vms.iter().filter(|(vm, _)| host_of(state, vm) == h.name) {
            let n = needs(vm);
            used.vcpus += n.vcpus;
            used.memory_mib += n.memory_mib;
            used.disk_bytes += n.disk_bytes;
            names.push(format!("{}/{}", vm.project, vm.name));
        }
        let (is_alive, leads) = (alive.contains(&h.name), leader.as_deref() == Some(h.name.as_str()));
        out.push(Host::new(h, is_alive, leads, used, names));
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", responses((status = 200, body = Vec<Host>)))]
pub async fn list(State(state): AppS) -> Result<Json<Vec<Host>>, ApiError> {
    Ok(Json(hosts(&state, None).await?))
}

#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(State(state): AppS, Path(name): Path<String>) -> Result<Json<Host>, ApiError> {
    hosts(&state, Some(&name))
        .await?
        .pop()
        .map(Json)
        .ok_or_else(|| HostError::NotFound(name).into())
}

/// `cordon` (takes no new VMs; keeps its own), `uncordon`, or `drain`: cordon, then
/// move every VM that keeps nothing on the host to other hosts (cold: stopped, made
/// elsewhere, started again if it ran; live migration is not built yet). A drain
/// answers `202` with its operation, whose progress at the end lists what moved and
/// what stayed and why.
#[utoipa::path(post, path = "/v1/hosts/{name}/{action}", tag = "hosts",
    params(("name" = String, Path), ("action" = String, Path, description = "cordon, uncordon or drain")),
    responses((status = 200, body = Host), (status = 202, description = "Draining", body = super::view::Draining),
        (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn action(
    State(state): AppS,
    Path((name, action)): Path<(String, String)>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let cordoned = match action.as_str() {
        "cordon" | "drain" => true,
        "uncordon" => false,
        _ => return Err(HostError::UnknownAction(action).into()),
    };
    let found = store::update_json::<HostRecord>(state.store.as_ref(), &record::key(&name), |h| {
        let changed = h.cordoned != cordoned;
        h.cordoned = cordoned;
        changed
    })
    .await?;
    if !found && record::get(state.store.as_ref(), &name).await?.is_none() {
        return Err(HostError::NotFound(name).into());
    }
    if found {
        tracing::info!(host = %name, cordoned, "host {}ed", if cordoned { "cordon" } else { "uncordon" });
        state
            .events
            .emit("host", "", serde_json::json!({"name": name, "cordoned": cordoned}));
    }
    if action != "drain" {
        return Ok(show(State(state), Path(name)).await?.into_response());
    }
    let op = state.ops.start("default", "host.drain", "host", &name).await?;
    let (task_state, op_id, host) = (state.clone(), op.id.clone(), name.clone());
    tokio::spawn(async move {
        let ops = &task_state.ops;
        let drained = super::evacuate::drain(&task_state, &host, &op_id).await;
        let stayed: Vec<String> = drained.stayed.iter().map(|(vm, why)| format!("{vm} ({why})")).collect();
        let summary = format!(
            "moved: {}; stayed: {}",
            if drained.moved.is_empty() {
                "none".to_string()
            } else {
                drained.moved.join(", ")
            },
            if stayed.is_empty() {
                "none".to_string()
            } else {
                stayed.join(", ")
            }
        );
        ops.succeed_saying(&op_id, &summary).await;
    });
    let host = hosts(&state, Some(&name))
        .await?
        .pop()
        .ok_or_else(|| HostError::NotFound(name.clone()))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(super::view::Draining { operation: op, host }),
    )
        .into_response())
}

/// Forgets a host that is gone for good: refused while its api runs or VMs are
/// placed on it.
#[utoipa::path(delete, path = "/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path)),
    responses((status = 204, description = "Forgotten"), (status = 404, body = crate::openapi::ErrorResponse),
        (status = 409, description = "Its api runs, or it holds VMs", body = crate::openapi::ErrorResponse)))]
pub async fn delete(State(state): AppS, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let Some(host) = hosts(&state, Some(&name)).await?.pop() else {
        return Err(HostError::NotFound(name).into());
    };
    if !host.vms.is_empty() {
        return Err(HostError::HoldsVms { name, vms: host.vms }.into());
    }
    if record::alive(state.store.as_ref()).await?.contains(&name) {
        return Err(HostError::Running(name).into());
    }
    state.store.delete(&record::key(&name)).await?;
    tracing::warn!(host = %name, "host forgotten");
    Ok(StatusCode::NO_CONTENT)
}

/// A single-use token that lets a new machine join the cluster (`hearth host join`).
#[utoipa::path(post, path = "/v1/hosts/join-tokens", tag = "hosts", request_body = super::join::JoinTokenRequest,
    responses((status = 201, body = super::join::JoinToken), (status = 409, description = "The cluster's store is embedded", body = crate::openapi::ErrorResponse),
        (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn join_token(
    State(state): AppS,
    headers: http::HeaderMap,
    crate::json::JsonBody(req): crate::json::JsonBody<super::join::JoinTokenRequest>,
) -> Result<(StatusCode, Json<super::join::JoinToken>), ApiError> {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| state.config.listen.to_string());
    let token = super::join::make_token(&state, req, &format!("http://{host}")).await?;
    Ok((StatusCode::CREATED, Json(token)))
}

/// Admits a new host with a join token (no API key: the token is the credential) and
/// answers with the cluster's store.
#[utoipa::path(post, path = "/v1/hosts/join", tag = "hosts", request_body = super::join::JoinRequest,
    responses((status = 200, body = super::join::Joined), (status = 401, description = "The token is unknown, used up or expired", body = crate::openapi::ErrorResponse),
        (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn join(
    State(state): AppS,
    crate::json::JsonBody(req): crate::json::JsonBody<super::join::JoinRequest>,
) -> Result<Json<super::join::Joined>, ApiError> {
    Ok(Json(super::join::join(&state, req).await?))
}
