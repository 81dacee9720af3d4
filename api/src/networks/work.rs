//! The networks' records in the store, the default network, and removal (also the
//! reconciler's, for a create or delete a crash cut short).

use netd::network::NetworkSpec;

use crate::daemons::upstream;
use crate::model::host_name;
use crate::networks::error::NetworkError;
use crate::state::AppState;
use crate::store;

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

pub(crate) fn key(project: &str, name: &str) -> String {
    format!("networks/{project}/{name}")
}

/// Records from before projects (`networks/<name>`) move to `networks/default/<name>`.
pub async fn migrate(state: &AppState) -> Result<(), NetworkError> {
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
pub async fn ensure_default(state: &AppState) -> Result<(), NetworkError> {
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

/// Whether the project has this network (the default project also owns networks netd
/// has that predate the api's records).
pub(crate) async fn owned(state: &AppState, project: &str, name: &str) -> Result<bool, NetworkError> {
    crate::model::validate_name("network", name)?;
    Ok(state.store.get(&key(project, name)).await?.is_some()
        || (project == crate::auth::keys::DEFAULT_PROJECT && state.netd.network(name).await.is_ok()))
}

/// Whether `project` has network `name`: recorded, or (the default project's, from
/// before records) on this host's netd.
pub(crate) async fn exists(state: &AppState, project: &str, name: &str) -> Result<bool, NetworkError> {
    Ok(state.store.get(&key(project, name)).await?.is_some()
        || state.netd.network(&host_name(project, name)).await.is_ok())
}

/// Removes a network completely, from netd and the store (the reconciler, for a
/// create or delete a crash cut short).
pub async fn remove(state: &AppState, project: &str, name: &str) -> Result<(), NetworkError> {
    state
        .netd
        .delete_network(&host_name(project, name))
        .await
        .map_err(upstream)?;
    state.store.delete(&key(project, name)).await?;
    Ok(())
}
