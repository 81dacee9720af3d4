//! `/v1/networks`: create, list, show, delete. netd does the work; the api records the
//! network (so it knows which exist even while netd is down) and refuses to delete a
//! network that VMs are attached to.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use netd::network::{IpRange, NetworkSpec, NetworkStatus, VxlanSpec};
use serde::Deserialize;
use socket_http::ApiError;

use crate::auth::keys::Caller;
use crate::daemons::upstream;
use crate::intents;
use crate::json::JsonBody;
use crate::model::{host_name, name_in_project, VmRecord};
use crate::state::AppState;
use crate::store;

type AppS = State<Arc<AppState>>;

/// `POST /v1/networks` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    pub name: String,
    /// e.g. `10.50.0.0/24`
    pub subnet: String,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Ipv4, example = "10.77.0.2")]
    pub gateway: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub range: Option<IpRange>,
    /// Serve DHCP (dnsmasq) with IPAM's reservations (default true).
    #[serde(default = "yes")]
    pub dhcp: bool,
    /// Masquerade traffic leaving the network through the host (default false).
    #[serde(default)]
    pub nat: bool,
    #[serde(default)]
    pub vxlan: Option<VxlanSpec>,
}

fn yes() -> bool {
    true
}

pub const DEFAULT_NETWORK: &str = "default";

/// The network created on first start: NAT and DHCP on 10.77.0.0/24.
pub fn default_network() -> NetworkSpec {
    NetworkSpec {
        name: DEFAULT_NETWORK.into(),
        subnet: "10.77.0.0/24"
            .parse()
            .unwrap_or_else(|_| unreachable!("constant subnet")),
        gateway: None,
        range: None,
        dhcp: true,
        nat: true,
        vxlan: None,
    }
}

fn key(project: &str, name: &str) -> String {
    format!("networks/{project}/{name}")
}

/// netd's view with the network's name as the project knows it.
fn as_seen_in(project: &str, mut status: NetworkStatus) -> NetworkStatus {
    status.spec.name = name_in_project(project, &status.spec.name).to_string();
    status
}

/// Records from before projects (`networks/<name>`) move to `networks/default/<name>`.
pub async fn migrate(state: &AppState) -> Result<(), ApiError> {
    for (k, v) in state.store.list("networks/").await? {
        let rest = &k["networks/".len()..];
        if !rest.contains('/') {
            state
                .store
                .put(&key(crate::auth::keys::DEFAULT_PROJECT, rest), v.value)
                .await?;
            state.store.delete(&k).await?;
        }
    }
    Ok(())
}

/// Creates the default network the first time the api starts (never again once the
/// user deleted it).
pub async fn ensure_default(state: &AppState) -> Result<(), ApiError> {
    let marker = "meta/default-network-created";
    if state.store.get(marker).await?.is_some() {
        return Ok(());
    }
    let spec = default_network();
    state.netd.ensure_network(&spec).await.map_err(upstream)?;
    state
        .store
        .put(
            &key(crate::auth::keys::DEFAULT_PROJECT, &spec.name),
            store::encode(&spec),
        )
        .await?;
    state.store.put(marker, b"true".to_vec()).await?;
    tracing::info!("created the default network {}", spec.subnet);
    Ok(())
}

#[utoipa::path(post, path = "/v1/networks", tag = "networks", params(crate::openapi::ProjectParam, crate::openapi::IdempotencyKey), request_body = CreateNetwork,
    responses((status = 201, body = NetworkStatus), (status = 409, description = "The name is taken or the subnet overlaps", body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn create(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateNetwork>,
) -> Result<Response, ApiError> {
    crate::model::validate_name("network", &req.name)?;
    let project = caller.project.as_str();
    let subnet = req.subnet.parse().map_err(|e| {
        ApiError::unprocessable(format!(
            "invalid subnet {:?}: {e} (use CIDR, e.g. 10.50.0.0/24)",
            req.subnet
        ))
    })?;
    let spec = NetworkSpec {
        name: host_name(project, &req.name),
        subnet,
        gateway: req.gateway,
        range: req.range,
        dhcp: req.dhcp,
        nat: req.nat,
        vxlan: req.vxlan,
    };
    if state.store.get(&key(project, &req.name)).await?.is_some() {
        return Err(ApiError::conflict(format!("network {:?} already exists", req.name)));
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
                return Err(e.into());
            }
            Ok(status)
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(as_seen_in(project, status))).into_response())
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
            .map(|n| as_seen_in(project, n))
            .collect(),
    ))
}

/// Whether the project has this network (the default project also owns networks netd
/// has that predate the api's records).
async fn owned(state: &AppState, project: &str, name: &str) -> Result<bool, ApiError> {
    crate::model::validate_name("network", name)?;
    Ok(state.store.get(&key(project, name)).await?.is_some()
        || (project == crate::auth::keys::DEFAULT_PROJECT && state.netd.network(name).await.is_ok()))
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, body = NetworkStatus), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<NetworkStatus>, ApiError> {
    if !owned(&state, &caller.project, &name).await? {
        return Err(ApiError::not_found(format!("network {name:?} does not exist")));
    }
    let status = state
        .netd
        .network(&host_name(&caller.project, &name))
        .await
        .map_err(upstream)?;
    Ok(Json(as_seen_in(&caller.project, status)))
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
        return Err(ApiError::not_found(format!("network {name:?} does not exist")));
    }
    let vms: Vec<String> = store::list_json::<VmRecord>(state.store.as_ref(), "vms/")
        .await?
        .into_iter()
        .filter(|(vm, _)| vm.project == project && vm.nics.iter().any(|n| n.network == name))
        .map(|(vm, _)| vm.name)
        .collect();
    if !vms.is_empty() {
        return Err(
            ApiError::conflict(format!("network {name:?} has VMs attached: {}", vms.join(", ")))
                .with_details(serde_json::json!({"vms": vms})),
        );
    }
    let (st, p, n) = (state.clone(), project.to_string(), name.clone());
    intents::run(&state, intents::Kind::Network, project, &name, "delete", async move {
        remove(&st, &p, &n).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a network completely, from netd and the store (the reconciler, for a
/// create or delete a crash cut short).
pub async fn remove(state: &AppState, project: &str, name: &str) -> Result<(), ApiError> {
    state
        .netd
        .delete_network(&host_name(project, name))
        .await
        .map_err(upstream)?;
    state.store.delete(&key(project, name)).await?;
    Ok(())
}
