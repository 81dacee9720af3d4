//! The jail a VM's VMM runs in, as the API shows it.

use serde::{Deserialize, Serialize};

/// How a VM's VMM is confined and limited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmJail {
    /// The unprivileged user and group the VMM runs as.
    pub uid: u32,
    pub gid: u32,
    /// The VM's cgroup directories on the host.
    pub cgroups: Vec<String>,
    /// The cgroup's memory limit: the VM's most memory plus the VMM's overhead.
    pub memory_limit_mib: Option<u64>,
    pub memory_overhead_mib: u64,
    pub cpu_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// Absent when the host has no I/O controller with weights.
    pub io_weight: Option<u32>,
}

impl From<&vmm_manager::jail::JailInfo> for VmJail {
    fn from(j: &vmm_manager::jail::JailInfo) -> Self {
        Self {
            uid: j.uid,
            gid: j.gid,
            cgroups: j.cgroups.iter().map(|p| p.display().to_string()).collect(),
            memory_limit_mib: j.memory_limit_mib,
            memory_overhead_mib: j.memory_overhead_mib,
            cpu_weight: j.cpu_weight,
            cpu_limit: j.cpu_limit,
            io_weight: j.io_weight,
        }
    }
}
