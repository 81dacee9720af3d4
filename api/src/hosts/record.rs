//! What the store holds about hosts: `hosts/<name>` (a [`HostRecord`], durable),
//! `hosts-alive/<name>` (leased: present while the host's api renews it) and `leader`
//! (leased: the api doing the cluster's periodic work).

use std::collections::BTreeMap;

use hearth_placement::Resources;
use serde::{Deserialize, Serialize};

use crate::store::{self, StateStore, StoreError};

pub const PREFIX: &str = "hosts/";
pub const ALIVE_PREFIX: &str = "hosts-alive/";
pub const LEADER_KEY: &str = "leader";

pub fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

pub fn alive_key(name: &str) -> String {
    format!("{ALIVE_PREFIX}{name}")
}

/// Why a host was marked lost, and since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lost {
    pub since_ms: u64,
    pub reason: String,
}

/// A host as registered by its api.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// The address other hosts reach it at (`--host-address`); `None`: this host's
    /// daemons are reached only from its own api.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// Its daemons' TLS endpoints (`https://address:port`) by daemon name.
    #[serde(default)]
    pub daemons: BTreeMap<String, String>,
    /// What the machine has: CPUs, memory, the volume pool's size.
    pub capacity: Resources,
    /// What VMs may take of it in all (vCPUs per CPU by `--cpu-allocation-ratio`,
    /// memory less what the host keeps for itself).
    pub allocatable: Resources,
    /// The volume pool's free bytes when last registered.
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// `hearth-api` and each daemon's version.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// Takes no new VMs (`POST /v1/hosts/{name}/cordon`).
    #[serde(default)]
    pub cordoned: bool,
    /// Set by the leader when the host's lease lapsed; cleared when it comes back.
    #[serde(default)]
    pub lost: Option<Lost>,
    pub joined_at_ms: u64,
    /// When its api last registered it (at each start and each lease it took).
    pub registered_at_ms: u64,
}

/// What `hosts-alive/<name>` holds: the api process renewing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alive {
    pub instance: String,
    pub since_ms: u64,
}

/// What `leader` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leader {
    pub host: String,
    pub instance: String,
    pub since_ms: u64,
}

pub async fn get(store: &dyn StateStore, name: &str) -> Result<Option<(HostRecord, u64)>, StoreError> {
    store::get_json(store, &key(name)).await
}

pub async fn list(store: &dyn StateStore) -> Result<Vec<HostRecord>, StoreError> {
    Ok(store::list_json::<HostRecord>(store, PREFIX)
        .await?
        .into_iter()
        .map(|(h, _)| h)
        .collect())
}

/// The names of the hosts whose lease is held now.
pub async fn alive(store: &dyn StateStore) -> Result<std::collections::BTreeSet<String>, StoreError> {
    Ok(store
        .list(ALIVE_PREFIX)
        .await?
        .into_iter()
        .map(|(k, _)| k[ALIVE_PREFIX.len()..].to_string())
        .collect())
}

pub async fn leader(store: &dyn StateStore) -> Result<Option<Leader>, StoreError> {
    Ok(store::get_json::<Leader>(store, LEADER_KEY).await?.map(|(l, _)| l))
}

/// The api processes of other hosts that hold their host's lease now: what they run
/// (sagas, operations) is theirs, not left over. This host's entry, if any, is an
/// earlier process of this host's api, which is gone.
pub async fn live_instances(
    store: &dyn StateStore,
    this_host: &str,
) -> Result<std::collections::BTreeSet<String>, StoreError> {
    Ok(store
        .list(ALIVE_PREFIX)
        .await?
        .into_iter()
        .filter(|(k, _)| k[ALIVE_PREFIX.len()..] != *this_host)
        .filter_map(|(_, v)| serde_json::from_slice::<Alive>(&v.value).ok())
        .map(|a| a.instance)
        .collect())
}
