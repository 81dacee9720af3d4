//! What `/v1/hosts` shows.

use std::collections::BTreeMap;

use hearth_placement::Resources;
use serde::{Deserialize, Serialize};

use super::record::{HostRecord, Lost};

/// A host of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Host {
    pub name: String,
    /// `ready` (takes new VMs), `cordoned` (keeps its VMs, takes no new ones),
    /// `unreachable` (its api holds no lease, not yet marked lost) or `lost`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<Lost>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<std::net::IpAddr>,
    /// Whether this host's api leads the cluster now.
    pub leader: bool,
    /// What the machine has.
    pub capacity: Resources,
    /// What VMs may take of it (vCPUs by the allocation ratio, memory less the host's).
    pub allocatable: Resources,
    /// What the VMs placed on it take.
    pub used: Resources,
    /// The volume pool's free bytes when the host last registered.
    pub disk_free_bytes: u64,
    /// The VMs placed on it (`project/name`).
    pub vms: Vec<String>,
    /// Versions of `hearth-api` and the daemons it registered.
    pub versions: BTreeMap<String, String>,
    /// Its daemons' TLS endpoints (empty: reached only by its own api).
    pub daemons: BTreeMap<String, String>,
    pub joined_at_ms: u64,
    pub registered_at_ms: u64,
}

impl Host {
    pub fn new(h: HostRecord, alive: bool, leader: bool, used: Resources, vms: Vec<String>) -> Self {
        let state = if h.lost.is_some() {
            "lost"
        } else if !alive {
            "unreachable"
        } else if h.cordoned {
            "cordoned"
        } else {
            "ready"
        };
        Host {
            state: state.into(),
            lost: h.lost,
            address: h.address,
            leader,
            capacity: h.capacity,
            allocatable: h.allocatable,
            used,
            disk_free_bytes: h.disk_free_bytes,
            vms,
            versions: h.versions,
            daemons: h.daemons,
            joined_at_ms: h.joined_at_ms,
            registered_at_ms: h.registered_at_ms,
            name: h.name,
        }
    }
}

/// A drain's answer: its operation, and the host (cordoned now).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Draining {
    pub operation: crate::model::Operation,
    pub host: Host,
}
