//! Where a VM goes: the user's rules, and the scheduler's decision as the VM records it.

use serde::{Deserialize, Serialize};

/// The user's rules for where a VM goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Only this host (`GET /v1/hosts` lists them).
    #[serde(default)]
    pub host: Option<String>,
    /// No two VMs of this group on one host (a name of the user's choosing).
    #[serde(default)]
    pub anti_affinity_group: Option<String>,
}

/// Where a VM was placed: the host, the user's rules, and the scheduler's verdict on
/// every host (why the chosen one, why not the others).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlacementRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity_group: Option<String>,
    pub decided_at_ms: u64,
    pub verdicts: Vec<hearth_placement::Verdict>,
}
