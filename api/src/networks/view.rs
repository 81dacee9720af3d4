//! What `/v1/networks` shows and takes: the api's own types. netd's wire types
//! (`netd::network::*`) are converted at the edge, so a change to netd's protocol
//! cannot change the public API by accident.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::model::name_in_project;

/// A network as requested (names as the project knows them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkSpec {
    pub name: String,
    #[schema(example = "10.77.0.0/24")]
    pub subnet: String,
    /// Defaults to the subnet's first host address.
    #[schema(value_type = Option<String>, format = Ipv4, example = "10.77.0.1")]
    pub gateway: Option<Ipv4Addr>,
    /// Addresses handed out, inclusive; defaults to the whole subnet.
    pub range: Option<IpRange>,
    pub dhcp: bool,
    pub nat: bool,
    pub vxlan: Option<VxlanSpec>,
}

/// Addresses handed out, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    #[schema(value_type = String, format = Ipv4, example = "10.77.0.10")]
    pub start: Ipv4Addr,
    #[schema(value_type = String, format = Ipv4, example = "10.77.0.200")]
    pub end: Ipv4Addr,
}

/// Joins the network to the same network on other hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VxlanSpec {
    pub vni: u32,
    /// This host's underlay address.
    #[schema(value_type = String, format = Ipv4, example = "192.168.1.10")]
    pub local: Ipv4Addr,
    /// The underlay device (optional).
    #[serde(default)]
    pub device: Option<String>,
    /// Other hosts' underlay addresses.
    #[serde(default)]
    #[schema(value_type = Vec<String>, format = Ipv4, example = json!(["192.168.1.11"]))]
    pub peers: Vec<Ipv4Addr>,
    /// UDP port (default 4789).
    #[serde(default = "vxlan_port")]
    pub port: u16,
}

fn vxlan_port() -> u16 {
    4789
}

/// A network as it exists.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkStatus {
    pub spec: NetworkSpec,
    /// The Linux bridge on the host.
    pub bridge: String,
    #[schema(value_type = String, format = Ipv4, example = "10.77.0.1")]
    pub gateway: Ipv4Addr,
    /// Whether the bridge exists right now.
    pub bridge_present: bool,
    pub vxlan_device: Option<String>,
    /// dnsmasq's process, while it serves DHCP.
    pub dhcp_pid: Option<u32>,
    /// The ports (VM NICs) on it.
    pub ports: Vec<String>,
    /// Addresses IPAM has handed out.
    pub allocated: usize,
}

impl From<IpRange> for netd::network::IpRange {
    fn from(r: IpRange) -> Self {
        Self {
            start: r.start,
            end: r.end,
        }
    }
}

impl From<netd::network::IpRange> for IpRange {
    fn from(r: netd::network::IpRange) -> Self {
        Self {
            start: r.start,
            end: r.end,
        }
    }
}

impl From<VxlanSpec> for netd::network::VxlanSpec {
    fn from(v: VxlanSpec) -> Self {
        Self {
            vni: v.vni,
            local: v.local,
            device: v.device,
            peers: v.peers,
            port: v.port,
        }
    }
}

impl From<netd::network::VxlanSpec> for VxlanSpec {
    fn from(v: netd::network::VxlanSpec) -> Self {
        Self {
            vni: v.vni,
            local: v.local,
            device: v.device,
            peers: v.peers,
            port: v.port,
        }
    }
}

impl NetworkStatus {
    /// netd's view of a network of `project`, with the name the project knows it by.
    pub fn seen_in(project: &str, s: netd::network::NetworkStatus) -> Self {
        Self {
            spec: NetworkSpec {
                name: name_in_project(project, &s.spec.name).to_string(),
                subnet: s.spec.subnet.to_string(),
                gateway: s.spec.gateway,
                range: s.spec.range.map(Into::into),
                dhcp: s.spec.dhcp,
                nat: s.spec.nat,
                vxlan: s.spec.vxlan.map(Into::into),
            },
            bridge: s.bridge,
            gateway: s.gateway,
            bridge_present: s.bridge_present,
            vxlan_device: s.vxlan_device,
            dhcp_pid: s.dhcp_pid,
            ports: s.ports,
            allocated: s.allocated,
        }
    }
}
