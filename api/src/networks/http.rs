//! The `/v1/networks` routes: parse, call, map errors.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use socket_http::ApiError;

use crate::auth::keys::Caller;
use crate::daemons::upstream;
use crate::intents;
use crate::json::JsonBody;
use crate::model::{host_name, VmRecord};
use crate::state::AppState;
use crate::store;

use super::command::{CreateNetwork, CreateNetworkCommand};
use super::error::NetworkError;
use super::view::NetworkStatus;
use super::work::{key, owned, remove};

type AppS = State<Arc<AppState>>;

#[utoipa::path(post, path = "/v1/networks", tag = "networks", params(crate::openapi::ProjectParam, crate::openapi::IdempotencyKey), request_body = CreateNetwork,
    responses((status = 201, body = NetworkStatus), (status = 409, description = "The name is taken or the subnet overlaps", body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn create(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateNetwork>,
) -> Result<Response, ApiError> {
    let project = caller.project.as_str();
    let req = CreateNetworkCommand::try_from(req)?;
    let spec = req.to_netd(project);
    if state.store.get(&key(project, &req.name)).await?.is_some() {
        return Err(NetworkError::AlreadyExists(req.name).into());
    }
    let (st, record) = (state.clone(), key(project, &req.name));
    let status = intents::run(
        &state,
        intents::Kind::Network,
        project,
        &req.name,
        "create",
        async move {
            let status = st.netd.ensure_network(&spec).await.map_err(upstream)?;
            if let Err(e) = st.store.put(&record, store::encode(&spec)).await {
                let _ = st.netd.delete_network(&spec.name).await;
                return Err(NetworkError::from(e));
            }
            Ok(status)
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(NetworkStatus::seen_in(project, status))).into_response())
}

#[utoipa::path(get, path = "/v1/networks", tag = "networks", params(crate::openapi::ProjectParam), responses((status = 200, body = Vec<NetworkStatus>)))]
pub async fn list(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<NetworkStatus>>, ApiError> {
    let project = caller.project.as_str();
    let prefix = format!("networks/{project}/");
    let mine: std::collections::BTreeSet<String> = state
        .store
        .list(&prefix)
        .await?
        .into_iter()
        .map(|(k, _)| host_name(project, &k[prefix.len()..]))
        .collect();
    Ok(Json(
        state
            .netd
            .networks()
            .await
            .map_err(upstream)?
            .into_iter()
            .filter(|n| mine.contains(&n.spec.name))
            .map(|n| NetworkStatus::seen_in(project, n))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, body = NetworkStatus), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<NetworkStatus>, ApiError> {
    if !owned(&state, &caller.project, &name).await? {
        return Err(NetworkError::NotFound(name).into());
    }
    let status = state
        .netd
        .network(&host_name(&caller.project, &name))
        .await
        .map_err(upstream)?;
    Ok(Json(NetworkStatus::seen_in(&caller.project, status)))
}

#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 204, description = "Deleted, or did not exist"), (status = 409, description = "VMs are attached", body = crate::openapi::ErrorResponse)))]
pub async fn delete(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let project = caller.project.as_str();
    if !owned(&state, project, &name).await? {
        return Err(NetworkError::NotFound(name).into());
    }
    let vms: Vec<String> = store::list_json::<VmRecord>(state.store.as_ref(), "vms/")
        .await?
        .into_iter()
        .filter(|(vm, _)| vm.project == project && vm.nics.iter().any(|n| n.network == name))
        .map(|(vm, _)| vm.name)
        .collect();
    if !vms.is_empty() {
        return Err(NetworkError::InUse { name, vms }.into());
    }
    let (st, p, n) = (state.clone(), project.to_string(), name.clone());
    intents::run(&state, intents::Kind::Network, project, &name, "delete", async move {
        remove(&st, &p, &n).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
