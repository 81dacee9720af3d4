//! What a managed service lets reach its VM's NIC.

use serde::{Deserialize, Serialize};

/// TCP to these ports of the VM only from these IPv4 networks, enforced by netd's
/// firewall at the VM's TAP (a managed database's `allowed_cidrs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NicIngress {
    pub tcp_ports: Vec<u16>,
    #[schema(value_type = Vec<String>)]
    pub from: Vec<ipnet::Ipv4Net>,
}

impl NicIngress {
    pub fn to_netd(&self) -> netd::ingress::PortIngress {
        netd::ingress::PortIngress {
            tcp_ports: self.tcp_ports.clone(),
            from: self.from.clone(),
        }
    }
}
