//! `POST /v1/networks` as a typed command: every check the request alone allows, made
//! before netd is asked (netd checks again: it is reachable without the api), and
//! unit-tested without a running stack. What needs the host's other networks (an
//! overlapping subnet, a VNI in use) is netd's to refuse.

use std::net::Ipv4Addr;

use super::view::{IpRange, VxlanSpec};
use crate::model::{host_name, validate_name};
use crate::networks::error::NetworkError;
use ipnet::Ipv4Net;
use serde::Deserialize;

/// `POST /v1/networks` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    pub name: String,
    /// e.g. `10.50.0.0/24`
    pub subnet: String,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Ipv4, example = "10.77.0.2")]
    pub gateway: Option<Ipv4Addr>,
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

/// A network create request that passed every check the request alone allows.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateNetworkCommand {
    /// The name as the project knows it.
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub range: Option<IpRange>,
    pub dhcp: bool,
    pub nat: bool,
    pub vxlan: Option<VxlanSpec>,
}

impl TryFrom<CreateNetwork> for CreateNetworkCommand {
    type Error = NetworkError;

    fn try_from(req: CreateNetwork) -> Result<Self, NetworkError> {
        validate_name("network", &req.name)?;
        let subnet: Ipv4Net = req.subnet.parse().map_err(|e| {
            NetworkError::Invalid(format!(
                "invalid subnet {:?}: {e} (use CIDR, e.g. 10.50.0.0/24)",
                req.subnet
            ))
        })?;
        if subnet != subnet.trunc() {
            return Err(NetworkError::Invalid(format!(
                "subnet {subnet} has host bits set: did you mean {}?",
                subnet.trunc()
            )));
        }
        if subnet.prefix_len() < 8 {
            return Err(NetworkError::Invalid(format!(
                "subnet {subnet} is too large: use a prefix of /8 or longer"
            )));
        }
        if subnet.prefix_len() > 30 {
            return Err(NetworkError::Invalid(format!(
                "subnet {subnet} is too small for a network: it needs a gateway and at least one \
                 address for VMs besides its network and broadcast addresses; use a prefix of /30 or shorter"
            )));
        }
        let usable = |a: Ipv4Addr| subnet.contains(&a) && a != subnet.network() && a != subnet.broadcast();
        if let Some(gw) = req.gateway {
            if !usable(gw) {
                return Err(NetworkError::Invalid(format!(
                    "gateway {gw} cannot be the gateway of subnet {subnet}: it must lie inside the subnet \
                     and be neither its network nor its broadcast address"
                )));
            }
        }
        if let Some(r) = req.range {
            let why = if r.start > r.end {
                Some("its start is after its end")
            } else if !usable(r.start) || !usable(r.end) {
                Some("both ends must be host addresses inside the subnet")
            } else {
                None
            };
            if let Some(reason) = why {
                return Err(NetworkError::Invalid(format!(
                    "address range {}-{} is not valid for subnet {subnet}: {reason}",
                    r.start, r.end
                )));
            }
        }
        if let Some(vx) = &req.vxlan {
            if vx.vni == 0 || vx.vni > 16_777_215 {
                return Err(NetworkError::Invalid(format!("VNI {} is outside 1..16777215", vx.vni)));
            }
            if let Some(dev) = &vx.device {
                if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ', '\0']) {
                    return Err(NetworkError::Invalid(format!(
                        "underlay device name {dev:?} is not a Linux interface name"
                    )));
                }
            }
            if vx.port == 0 {
                return Err(NetworkError::Invalid("vxlan port must be between 1 and 65535".into()));
            }
        }
        Ok(Self {
            name: req.name,
            subnet,
            gateway: req.gateway,
            range: req.range,
            dhcp: req.dhcp,
            nat: req.nat,
            vxlan: req.vxlan,
        })
    }
}

impl CreateNetworkCommand {
    /// What netd is asked for, named as the host knows the network.
    pub fn to_netd(&self, project: &str) -> netd::network::NetworkSpec {
        netd::network::NetworkSpec {
            name: host_name(project, &self.name),
            subnet: self.subnet,
            gateway: self.gateway,
            range: self.range.map(Into::into),
            dhcp: self.dhcp,
            nat: self.nat,
            vxlan: self.vxlan.clone().map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> Result<CreateNetworkCommand, NetworkError> {
        CreateNetworkCommand::try_from(serde_json::from_value::<CreateNetwork>(v).expect("shape"))
    }

    fn refused(v: serde_json::Value, says: &str) {
        let e = socket_http::ApiError::from(req(v.clone()).expect_err(&format!("{v} must be refused")));
        assert_eq!(e.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(
            e.body.message.contains(says),
            "{v}: {:?} lacks {says:?}",
            e.body.message
        );
    }

    #[test]
    fn a_plain_network_passes_with_its_defaults() {
        let c = req(serde_json::json!({"name": "lab", "subnet": "10.50.0.0/24"})).expect("valid");
        assert_eq!(c.subnet.to_string(), "10.50.0.0/24");
        assert!(c.dhcp && !c.nat);
        let spec = c.to_netd("default");
        assert_eq!(spec.name, "lab");
        assert_eq!(
            c.to_netd("team").name,
            "team.lab",
            "other projects' networks are prefixed on the host"
        );
    }

    #[test]
    fn bad_names_subnets_gateways_ranges_and_vxlan_are_refused() {
        refused(
            serde_json::json!({"name": "Lab", "subnet": "10.50.0.0/24"}),
            "invalid network name",
        );
        refused(serde_json::json!({"name": "lab", "subnet": "10.50.0.0"}), "use CIDR");
        refused(
            serde_json::json!({"name": "lab", "subnet": "10.50.0.1/24"}),
            "did you mean 10.50.0.0/24",
        );
        refused(serde_json::json!({"name": "lab", "subnet": "10.0.0.0/7"}), "too large");
        refused(
            serde_json::json!({"name": "lab", "subnet": "10.50.0.0/31"}),
            "too small",
        );
        refused(
            serde_json::json!({"name": "lab", "subnet": "10.50.0.0/24", "gateway": "10.51.0.1"}),
            "cannot be the gateway",
        );
        refused(
            serde_json::json!({"name": "lab", "subnet": "10.50.0.0/24", "gateway": "10.50.0.255"}),
            "cannot be the gateway",
        );
        refused(
            serde_json::json!({"name": "lab", "subnet": "10.50.0.0/24", "range": {"start": "10.50.0.9", "end": "10.50.0.2"}}),
            "start is after its end",
        );
        refused(
            serde_json::json!({"name": "lab", "subnet": "10.50.0.0/24", "range": {"start": "10.50.0.2", "end": "10.50.1.9"}}),
            "inside the subnet",
        );
        let vx = |vni: u32, device: &str| {
            serde_json::json!({"name": "lab", "subnet": "10.50.0.0/24",
                "vxlan": {"vni": vni, "local": "127.0.0.1", "device": device}})
        };
        refused(vx(0, "eth0"), "outside 1..16777215");
        refused(vx(16_777_216, "eth0"), "outside 1..16777215");
        refused(vx(7, "a-name-longer-than-15"), "not a Linux interface name");
        assert!(req(vx(7, "eth0")).is_ok());
    }
}
