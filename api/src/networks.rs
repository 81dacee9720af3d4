//! `/v1/networks`: create, list, show, delete. netd does the work; the api records the
//! network (so it knows which exist even while netd is down) and refuses to delete a
//! network that VMs are attached to.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use netd::network::{IpRange, NetworkSpec, NetworkStatus, VxlanSpec};
use serde::Deserialize;
use socket_http::ApiError;

use crate::json::JsonBody;
use crate::model::VmRecord;
use crate::server::AppState;
use crate::store;
use crate::vms::upstream;

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

fn key(name: &str) -> String {
    format!("networks/{name}")
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
    state.store.put(&key(&spec.name), store::encode(&spec)).await?;
    state.store.put(marker, b"true".to_vec()).await?;
    tracing::info!("created the default network {}", spec.subnet);
    Ok(())
}

#[utoipa::path(post, path = "/v1/networks", tag = "networks", params(crate::openapi::ProjectParam, crate::openapi::IdempotencyKey), request_body = CreateNetwork,
    responses((status = 201, body = NetworkStatus), (status = 409, description = "The name is taken or the subnet overlaps", body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn create(State(state): AppS, JsonBody(req): JsonBody<CreateNetwork>) -> Result<Response, ApiError> {
    crate::model::validate_name("network", &req.name)?;
    let subnet = req.subnet.parse().map_err(|e| {
        ApiError::unprocessable(format!(
            "invalid subnet {:?}: {e} (use CIDR, e.g. 10.50.0.0/24)",
            req.subnet
        ))
    })?;
    let spec = NetworkSpec {
        name: req.name.clone(),
        subnet,
        gateway: req.gateway,
        range: req.range,
        dhcp: req.dhcp,
        nat: req.nat,
        vxlan: req.vxlan,
    };
    if state.store.get(&key(&spec.name)).await?.is_some() {
        return Err(ApiError::conflict(format!("network {:?} already exists", spec.name)));
    }
    let status = state.netd.ensure_network(&spec).await.map_err(upstream)?;
    state.store.put(&key(&spec.name), store::encode(&spec)).await?;
    Ok((StatusCode::CREATED, Json(status)).into_response())
}

#[utoipa::path(get, path = "/v1/networks", tag = "networks", params(crate::openapi::ProjectParam), responses((status = 200, body = Vec<NetworkStatus>)))]
pub async fn list(State(state): AppS) -> Result<Json<Vec<NetworkStatus>>, ApiError> {
    Ok(Json(state.netd.networks().await.map_err(upstream)?))
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, body = NetworkStatus), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(State(state): AppS, Path(name): Path<String>) -> Result<Json<NetworkStatus>, ApiError> {
    crate::model::validate_name("network", &name)?;
    Ok(Json(state.netd.network(&name).await.map_err(upstream)?))
}

#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 204, description = "Deleted, or did not exist"), (status = 409, description = "VMs are attached", body = crate::openapi::ErrorResponse)))]
pub async fn delete(State(state): AppS, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    crate::model::validate_name("network", &name)?;
    if state.store.get(&key(&name)).await?.is_none() && state.netd.network(&name).await.is_err() {
        return Err(ApiError::not_found(format!("network {name:?} does not exist")));
    }
    let vms: Vec<String> = store::list_json::<VmRecord>(state.store.as_ref(), "vms/")
        .await?
        .into_iter()
        .filter(|(vm, _)| vm.nics.iter().any(|n| n.network == name))
        .map(|(vm, _)| vm.name)
        .collect();
    if !vms.is_empty() {
        return Err(
            ApiError::conflict(format!("network {name:?} has VMs attached: {}", vms.join(", ")))
                .with_details(serde_json::json!({"vms": vms})),
        );
    }
    state.netd.delete_network(&name).await.map_err(upstream)?;
    state.store.delete(&key(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}
