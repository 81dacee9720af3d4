//! The network service: networks (bridge + gateway address + IPAM + optional DHCP, NAT
//! and VXLAN) and ports (a persistent TAP on a network's bridge with an IPAM address),
//! kept in agreement with the host.
//!
//! Every mutation is persisted under the state directory before it returns
//! (`networks/<name>/spec.json`, `networks/<name>/ipam.json`, `ports/<id>.json`), and
//! [`NetworkService::reconcile`] makes the host match that state: it recreates missing
//! bridges, addresses, VXLAN devices, TAPs, dnsmasq instances and firewall rules, and
//! removes links that carry our prefixes but are no longer wanted. It runs at start and
//! every few seconds, so a bridge or TAP deleted by hand comes back.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use socket_http::ApiError;
use tokio::sync::Mutex;

use crate::dhcp::{self, Dnsmasq};
use crate::firewall;
use crate::ipam::{Ipam, IpamError};
use crate::link::{parse_mac, Netlink};
use crate::tap;

/// netd's settings.
#[derive(Debug, Clone)]
pub struct NetdConfig {
    pub state_dir: PathBuf,
    pub dnsmasq_binary: String,
    /// How often the host is checked against the persisted state.
    pub reconcile_every: Duration,
}

impl NetdConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            dnsmasq_binary: "dnsmasq".into(),
            reconcile_every: Duration::from_secs(2),
        }
    }
}

/// A network as requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    /// Defaults to the subnet's first host address.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Addresses handed out, inclusive; defaults to the whole subnet.
    #[serde(default)]
    pub range: Option<IpRange>,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default)]
    pub nat: bool,
    #[serde(default)]
    pub vxlan: Option<VxlanSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

/// Joins the network to the same network on other hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VxlanSpec {
    pub vni: u32,
    /// This host's underlay address.
    pub local: Ipv4Addr,
    /// The underlay device (optional).
    #[serde(default)]
    pub device: Option<String>,
    /// Other hosts' underlay addresses.
    #[serde(default)]
    pub peers: Vec<Ipv4Addr>,
    #[serde(default = "vxlan_port")]
    pub port: u16,
}

fn vxlan_port() -> u16 {
    4789
}

/// A VM NIC's attachment as requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub network: String,
    /// The guest's MAC; derived from the port id when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// A static address; IPAM picks one when absent.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default = "one")]
    pub queues: u32,
    /// TCP to these ports of the VM only from these networks (see [`crate::ingress`]);
    /// changed in place by ensuring the port again with another list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<crate::ingress::PortIngress>,
}

fn one() -> u32 {
    1
}

/// A port as it exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port {
    pub id: String,
    pub network: String,
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub queues: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<crate::ingress::PortIngress>,
}

/// A network as it exists on the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub spec: NetworkSpec,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub bridge_present: bool,
    pub vxlan_device: Option<String>,
    pub dhcp_pid: Option<u32>,
    pub ports: Vec<String>,
    pub allocated: usize,
}

/// Bounded Linux interface name from a free-form name: `<prefix><10 hex of sha256>`.
pub fn interface_name(prefix: &str, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

pub fn bridge_name(network: &str) -> String {
    interface_name("hbr-", network)
}
pub fn vxlan_name(network: &str) -> String {
    interface_name("hvx-", network)
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    #[error("{0}")]
    Host(String),
    #[error("I/O error in netd's state: {0}")]
    Io(#[from] std::io::Error),
}

impl From<NetError> for ApiError {
    fn from(e: NetError) -> Self {
        let msg = e.to_string();
        match e {
            NetError::Invalid(_) => ApiError::unprocessable(msg),
            NetError::Conflict(_) => ApiError::conflict(msg),
            NetError::NotFound(_) => ApiError::not_found(msg),
            NetError::Ipam(IpamError::Taken { .. }) | NetError::Ipam(IpamError::Exhausted { .. }) => {
                ApiError::conflict(msg)
            }
            NetError::Ipam(IpamError::Io { .. }) => ApiError::internal(msg),
            NetError::Ipam(_) => ApiError::unprocessable(msg),
            NetError::Link(_) | NetError::Host(_) | NetError::Io(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "host_error", msg)
            }
        }
    }
}

struct Net {
    spec: NetworkSpec,
    gateway: Ipv4Addr,
    ipam: Ipam,
    dhcp: Option<Dnsmasq>,
}

struct State {
    networks: BTreeMap<String, Net>,
    ports: BTreeMap<String, Port>,
}

/// All networks and ports on this host.
pub struct NetworkService {
    config: NetdConfig,
    nl: Netlink,
    state: Mutex<State>,
    /// The firewall spec last applied, so the periodic reconcile rebuilds the ruleset
    /// only when something changed or our tables went missing.
    applied_firewall: std::sync::Mutex<Option<String>>,
}

fn validate_resource_name(kind: &str, name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Whether `new` differs from `old` only in its overlay: joining one (none before), or
/// the same overlay (VNI, local address, device, port) with other peers.
fn overlay_change_only(old: &NetworkSpec, new: &NetworkSpec) -> bool {
    let same_but_overlay = NetworkSpec {
        vxlan: old.vxlan.clone(),
        ..new.clone()
    } == *old;
    let overlay_ok = match (&old.vxlan, &new.vxlan) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => a.vni == b.vni && a.local == b.local && a.device == b.device && a.port == b.port,
        _ => false,
    };
    same_but_overlay && overlay_ok
}

fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, path)
}

impl NetworkService {
    /// Loads the persisted state and makes the host match it. Must run inside a tokio
    /// runtime, in the network namespace netd manages.
    pub async fn open(config: NetdConfig) -> Result<Arc<Self>, NetError> {
        std::fs::create_dir_all(config.state_dir.join("networks"))?;
        std::fs::create_dir_all(config.state_dir.join("ports"))?;
        let nl = Netlink::connect()?;
        let mut state = State {
            networks: BTreeMap::new(),
            ports: BTreeMap::new(),
        };
        for entry in std::fs::read_dir(config.state_dir.join("networks"))?.flatten() {
            let dir = entry.path();
            let spec: NetworkSpec = match std::fs::read(dir.join("spec.json")).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::warn!(dir = %dir.display(), "ignoring network directory without a valid spec");
                    continue;
                }
            };
            let net = Self::open_net(&config, spec)?;
            state.networks.insert(net.spec.name.clone(), net);
        }
        for entry in std::fs::read_dir(config.state_dir.join("ports"))?.flatten() {
            if let Ok(Ok(port)) = std::fs::read(entry.path()).map(|b| serde_json::from_slice::<Port>(&b)) {
                state.ports.insert(port.id.clone(), port);
            }
        }
        Self::match_addresses_to_ports(&mut state);
        dhcp::stop_orphans(&config.state_dir.join("networks"));
        let svc = Arc::new(Self {
            config,
            nl,
            state: Mutex::new(state),
            applied_firewall: std::sync::Mutex::new(None),
        });
        svc.reconcile().await?;
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(s) => s.config.reconcile_every,
                    None => return,
                };
                tokio::time::sleep(every).await;
                let Some(svc) = weak.upgrade() else { return };
                if let Err(e) = svc.reconcile().await {
                    tracing::warn!("reconcile failed: {e}");
                }
            }
        });
        Ok(svc)
    }

    /// A netd killed between writing a port's file and committing its address (or the
    /// other way round, or half way through a delete) leaves the two disagreeing: an
    /// address without a port is released, a port's missing address taken again.
    /// A port whose address cannot be taken back is logged and left as it is (netd still
    /// starts).
    fn match_addresses_to_ports(state: &mut State) {
        let State { networks, ports } = state;
        for (name, net) in networks.iter_mut() {
            net.ipam.begin_batch();
            for a in net.ipam.list() {
                if ports.get(&a.owner).is_none_or(|p| &p.network != name) {
                    tracing::warn!(network = %name, owner = %a.owner, ip = %a.ip, "releasing an address no port holds");
                    if let Err(e) = net.ipam.release(&a.owner) {
                        tracing::error!(network = %name, owner = %a.owner, "cannot release: {e}");
                    }
                }
            }
            for p in ports.values().filter(|p| &p.network == name) {
                if net.ipam.get(&p.id) != Some(p.ip) {
                    tracing::warn!(network = %name, port = %p.id, ip = %p.ip, "taking back a port's address");
                    if let Err(e) = net.ipam.allocate(&p.id, Some(&p.mac), Some(p.ip)) {
                        tracing::error!(network = %name, port = %p.id, "cannot take its address back: {e}");
                    }
                }
            }
            if let Err(e) = net.ipam.commit() {
                tracing::error!(network = %name, "cannot record the address book: {e}");
            }
        }
    }

    fn net_dir(config: &NetdConfig, name: &str) -> PathBuf {
        config.state_dir.join("networks").join(name)
    }

    fn open_net(config: &NetdConfig, spec: NetworkSpec) -> Result<Net, NetError> {
        let subnet = spec.subnet.trunc();
        let gateway = spec
            .gateway
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
        let range = spec.range.map(|r| (r.start, r.end));
        let ipam = Ipam::open(
            &Self::net_dir(config, &spec.name).join("ipam.json"),
            subnet,
            gateway,
            range,
        )?;
        Ok(Net {
            spec,
            gateway,
            ipam,
            dhcp: None,
        })
    }

    fn validate(spec: &NetworkSpec, others: &BTreeMap<String, Net>) -> Result<(), NetError> {
        validate_resource_name("network", &spec.name)?;
        if spec.subnet != spec.subnet.trunc() {
            return Err(NetError::Invalid(format!(
                "subnet {} has host bits set: did you mean {}?",
                spec.subnet,
                spec.subnet.trunc()
            )));
        }
        if let Some(vx) = &spec.vxlan {
            if vx.vni == 0 || vx.vni > 16_777_215 {
                return Err(NetError::Invalid(format!("VNI {} is outside 1..16777215", vx.vni)));
            }
            if let Some(dev) = &vx.device {
                if dev.is_empty() || dev.len() > 15 {
                    return Err(NetError::Invalid(format!(
                        "underlay device name {dev:?} is not a Linux interface name"
                    )));
                }
            }
        }
        for (name, other) in others {
            if name == &spec.name {
                continue;
            }
            let (a, b) = (spec.subnet, other.spec.subnet);
            if a.contains(&b.network()) || b.contains(&a.network()) {
                return Err(NetError::Conflict(format!(
                    "subnet {a} overlaps network {name}'s subnet {b}"
                )));
            }
            if let (Some(x), Some(y)) = (&spec.vxlan, &other.spec.vxlan) {
                if x.vni == y.vni {
                    return Err(NetError::Conflict(format!(
                        "VNI {} is already used by network {name}",
                        x.vni
                    )));
                }
            }
        }
        Ok(())
    }

    /// Ensures a network exists as described.
    pub async fn ensure_network(&self, spec: NetworkSpec) -> Result<NetworkStatus, NetError> {
        let mut st = self.state.lock().await;
        // Peers the overlay no longer has, to take out of its forwarding table.
        let mut dropped_peers = Vec::new();
        if let Some(existing) = st.networks.get_mut(&spec.name) {
            if existing.spec != spec {
                if !overlay_change_only(&existing.spec, &spec) {
                    return Err(NetError::Conflict(format!(
                        "network {} already exists with a different configuration",
                        spec.name
                    )));
                }
                // The network joins an overlay, or its overlay's peers change (hosts
                // joining it or leaving it): the rest stays as it is.
                write_json(&Self::net_dir(&self.config, &spec.name).join("spec.json"), &spec)?;
                let new_peers = spec.vxlan.as_ref().map(|v| v.peers.clone()).unwrap_or_default();
                dropped_peers = existing
                    .spec
                    .vxlan
                    .as_ref()
                    .map(|v| v.peers.iter().filter(|p| !new_peers.contains(p)).copied().collect())
                    .unwrap_or_default();
                existing.spec = spec.clone();
            }
        } else {
            Self::validate(&spec, &st.networks)?;
            let net = Self::open_net(&self.config, spec.clone())?;
            if let Err(e) = write_json(&Self::net_dir(&self.config, &spec.name).join("spec.json"), &spec) {
                let _ = std::fs::remove_dir_all(Self::net_dir(&self.config, &spec.name));
                return Err(e.into());
            }
            st.networks.insert(spec.name.clone(), net);
        }
        let result = self.realize_locked(&mut st).await;
        if let Err(e) = result {
            // A network that could not be built on the host is not kept half made.
            if let Some(mut net) = st.networks.remove(&spec.name) {
                net.dhcp = None;
                let _ = self.nl.delete(&vxlan_name(&spec.name)).await;
                let _ = self.nl.delete(&bridge_name(&spec.name)).await;
                let _ = std::fs::remove_dir_all(Self::net_dir(&self.config, &spec.name));
            }
            let _ = self.realize_locked(&mut st).await;
            return Err(e);
        }
        if !dropped_peers.is_empty() {
            if let Some(vx) = self.nl.link(&vxlan_name(&spec.name)).await? {
                for peer in dropped_peers {
                    self.nl.fdb_delete_peer(vx.index, peer).await?;
                }
            }
        }
        self.status_locked(&st, &spec.name).await
    }

    pub async fn delete_network(&self, name: &str) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        if !st.networks.contains_key(name) {
            return Ok(());
        }
        let attached: Vec<&String> = st.ports.values().filter(|p| p.network == name).map(|p| &p.id).collect();
        if !attached.is_empty() {
            return Err(NetError::Conflict(format!(
                "network {name} still has ports attached: {attached:?}"
            )));
        }
        // The record goes first: whatever happens after, a restart does not bring the
        // network back, and links no network wants are removed by the reconcile pass.
        match std::fs::remove_dir_all(Self::net_dir(&self.config, name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(mut net) = st.networks.remove(name) {
            net.dhcp = None;
        }
        self.nl.delete(&vxlan_name(name)).await?;
        self.nl.delete(&bridge_name(name)).await?;
        self.apply_firewall(&st)?;
        Ok(())
    }

    pub async fn list_networks(&self) -> Result<Vec<NetworkStatus>, NetError> {
        let st = self.state.lock().await;
        let mut out = Vec::new();
        for name in st.networks.keys() {
            out.push(self.status_locked(&st, name).await?);
        }
        Ok(out)
    }

    pub async fn network(&self, name: &str) -> Result<NetworkStatus, NetError> {
        let st = self.state.lock().await;
        self.status_locked(&st, name).await
    }

    async fn status_locked(&self, st: &State, name: &str) -> Result<NetworkStatus, NetError> {
        let net = st
            .networks
            .get(name)
            .ok_or_else(|| NetError::NotFound(format!("network {name} does not exist")))?;
        let bridge = bridge_name(name);
        Ok(NetworkStatus {
            spec: net.spec.clone(),
            bridge_present: self.nl.link(&bridge).await?.is_some(),
            bridge,
            gateway: net.gateway,
            vxlan_device: net.spec.vxlan.as_ref().map(|_| vxlan_name(name)),
            dhcp_pid: net.dhcp.as_ref().and_then(|d| d.pid()),
            ports: st
                .ports
                .values()
                .filter(|p| p.network == name)
                .map(|p| p.id.clone())
                .collect(),
            allocated: net.ipam.list().len(),
        })
    }

    /// Ensures a port: an address from IPAM, a persistent TAP on the bridge.
    pub async fn ensure_port(&self, id: &str, spec: PortSpec) -> Result<Port, NetError> {
        let mut ports = self.ensure_ports(vec![(id.to_string(), spec)]).await?;
        ports.pop().ok_or_else(|| NetError::Host("no port came back".into()))
    }

    /// Ensures many ports at once, all or nothing: one IPAM sync per network and one
    /// firewall transaction for all of them. Ports that exist already are checked against
    /// their spec and repaired; new ones that were made are taken back if any fails.
    pub async fn ensure_ports(&self, requests: Vec<(String, PortSpec)>) -> Result<Vec<Port>, NetError> {
        let mut ids = std::collections::HashSet::new();
        for (id, spec) in &requests {
            validate_resource_name("port", id)?;
            if spec.queues == 0 || spec.queues > 16 {
                return Err(NetError::Invalid(format!(
                    "port {id}: queues must be 1-16, got {}",
                    spec.queues
                )));
            }
            if !ids.insert(id.as_str()) {
                return Err(NetError::Invalid(format!("port {id} is listed twice")));
            }
        }
        let mut st = self.state.lock().await;
        for net in st.networks.values_mut() {
            net.ipam.begin_batch();
        }
        let mut made: Vec<Port> = Vec::new();
        let result = self.ensure_ports_locked(&mut st, requests, &mut made).await;
        let committed = st.networks.values_mut().try_for_each(|n| n.ipam.commit());
        let result = result.and_then(|ports| committed.map(|()| ports).map_err(NetError::from));
        if result.is_err() {
            // Take back what this call made; the releases are synced one by one.
            for port in &made {
                let _ = tap::delete_tap(&port.tap);
                let _ = firewall::remove_port(&port_rules(port));
                let _ = crate::ingress::set(&port.tap, port.ingress.as_ref(), None);
                let _ = std::fs::remove_file(self.port_file(&port.id));
                st.ports.remove(&port.id);
                if let Some(net) = st.networks.get_mut(&port.network) {
                    let _ = net.ipam.release(&port.id);
                }
            }
        }
        let networks: std::collections::BTreeSet<String> = made.iter().map(|p| p.network.clone()).collect();
        for network in networks {
            self.update_dhcp(&st, &network)?;
        }
        result
    }

    fn port_file(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("ports").join(format!("{id}.json"))
    }

    async fn ensure_ports_locked(
        &self,
        st: &mut State,
        requests: Vec<(String, PortSpec)>,
        made: &mut Vec<Port>,
    ) -> Result<Vec<Port>, NetError> {
        let mut ports = Vec::with_capacity(requests.len());
        let mut new = Vec::new();
        for (id, spec) in requests {
            if let Some(existing) = st.ports.get(&id) {
                if existing.network != spec.network || spec.ip.is_some_and(|ip| ip != existing.ip) {
                    return Err(NetError::Conflict(format!(
                        "port {id} already exists on network {}",
                        existing.network
                    )));
                }
                if existing.ingress != spec.ingress {
                    crate::ingress::set(&existing.tap, existing.ingress.as_ref(), spec.ingress.as_ref())
                        .map_err(host_error)?;
                    let mut changed = existing.clone();
                    changed.ingress = spec.ingress.clone();
                    write_json(&self.port_file(&id), &changed)?;
                    st.ports.insert(id.clone(), changed.clone());
                    ports.push(changed);
                    continue;
                }
                ports.push(existing.clone());
                continue;
            }
            let net = st
                .networks
                .get_mut(&spec.network)
                .ok_or_else(|| NetError::Invalid(format!("network {:?} does not exist", spec.network)))?;
            let mac = match spec.mac {
                Some(m) => {
                    let parsed =
                        parse_mac(&m).ok_or_else(|| NetError::Invalid(format!("invalid MAC address {m:?}")))?;
                    if parsed[0] & 1 == 1 {
                        return Err(NetError::Invalid(format!("MAC {m} is a multicast address")));
                    }
                    m.to_ascii_lowercase()
                }
                None => tap::mac_for(&id, 0),
            };
            let ip = net.ipam.allocate(&id, Some(&mac), spec.ip)?;
            let port = Port {
                id: id.clone(),
                network: spec.network.clone(),
                tap: tap::tap_name_for(&id, 0),
                mac,
                ip,
                prefix: net.spec.subnet.prefix_len(),
                gateway: net.gateway,
                queues: spec.queues,
                ingress: spec.ingress.clone(),
            };
            // Recorded at once, so that a failure further on takes it back.
            st.ports.insert(id, port.clone());
            made.push(port.clone());
            new.push(port.clone());
            ports.push(port);
        }
        // Each TAP may carry only its port's own MAC and address from the moment it
        // exists: the anti-spoofing elements go in first, in one transaction.
        let rules: Vec<_> = new.iter().map(port_rules).collect();
        firewall::add_ports(&rules).map_err(host_error)?;
        for port in new.iter().filter(|p| p.ingress.is_some()) {
            crate::ingress::set(&port.tap, None, port.ingress.as_ref()).map_err(host_error)?;
        }
        let mut bridges = BTreeMap::new();
        for port in &ports {
            let bridge = match bridges.get(&port.network) {
                Some(&index) => index,
                None => {
                    let index = self
                        .nl
                        .link(&bridge_name(&port.network))
                        .await?
                        .ok_or_else(|| NetError::Host(format!("bridge of network {} is missing", port.network)))?
                        .index;
                    bridges.insert(port.network.clone(), index);
                    index
                }
            };
            self.realize_port_on(port, bridge).await?;
        }
        for port in &new {
            write_json(&self.port_file(&port.id), port)?;
        }
        Ok(ports)
    }

    pub async fn delete_port(&self, id: &str) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        let Some(port) = st.ports.get(id).cloned() else {
            return Ok(());
        };
        // The record goes first (a restart then releases the address and removes the
        // TAP), the port leaves the table last (a failure half way can be retried).
        match std::fs::remove_file(self.port_file(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = tap::delete_tap(&port.tap) {
            // In use by a VMM, say: the port stays as it was.
            write_json(&self.port_file(id), &port)?;
            return Err(host_error(e));
        }
        firewall::remove_port(&port_rules(&port)).map_err(host_error)?;
        if port.ingress.is_some() {
            crate::ingress::set(&port.tap, port.ingress.as_ref(), None).map_err(host_error)?;
        }
        if let Some(net) = st.networks.get_mut(&port.network) {
            net.ipam.release(id)?;
        }
        st.ports.remove(id);
        self.update_dhcp(&st, &port.network)?;
        Ok(())
    }

    pub async fn ports(&self) -> Vec<Port> {
        self.state.lock().await.ports.values().cloned().collect()
    }

    pub async fn port(&self, id: &str) -> Result<Port, NetError> {
        self.state
            .lock()
            .await
            .ports
            .get(id)
            .cloned()
            .ok_or_else(|| NetError::NotFound(format!("port {id} does not exist")))
    }

    /// Give the network's dnsmasq the reservations as they are now.
    fn update_dhcp(&self, st: &State, network: &str) -> Result<(), NetError> {
        if let Some(net) = st.networks.get(network) {
            if let Some(d) = &net.dhcp {
                dhcp::write_hosts(d.dir(), &net.ipam.reservations())?;
                d.reload();
            }
        }
        Ok(())
    }

    async fn realize_port(&self, port: &Port) -> Result<(), NetError> {
        let bridge = self
            .nl
            .link(&bridge_name(&port.network))
            .await?
            .ok_or_else(|| NetError::Host(format!("bridge of network {} is missing", port.network)))?;
        self.realize_port_on(port, bridge.index).await
    }

    /// Makes `port`'s TAP exist, with its MAC, on bridge `bridge`, and up.
    async fn realize_port_on(&self, port: &Port, bridge: u32) -> Result<(), NetError> {
        tap::create_tap(&port.tap, port.queues).map_err(host_error)?;
        let link = self
            .nl
            .link(&port.tap)
            .await?
            .ok_or_else(|| NetError::Host(format!("TAP {} vanished after creation", port.tap)))?;
        // The host end gets the guest's MAC with a 0xfe first byte (as libvirt does), so
        // the bridge never learns the guest's own MAC on the host side.
        let mac = parse_mac(&port.mac).map(|mut mac| {
            mac[0] = 0xfe;
            mac
        });
        let change = crate::link::LinkChange {
            mac: mac.filter(|m| link.mac != Some(*m)),
            controller: (link.controller != Some(bridge)).then_some(bridge),
            up: !link.up,
        };
        if change.mac.is_some() || change.controller.is_some() || change.up {
            self.nl.configure(link.index, change).await?;
        }
        Ok(())
    }

    /// Builds every network and port on the host from the state, and removes our links
    /// that are no longer wanted.
    pub async fn reconcile(&self) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        self.realize_locked(&mut st).await
    }

    async fn realize_locked(&self, st: &mut State) -> Result<(), NetError> {
        for net in st.networks.values_mut() {
            let name = net.spec.name.clone();
            let bridge = bridge_name(&name);
            let br = self.nl.ensure_bridge(&bridge).await?;
            self.nl
                .ensure_address(br, net.gateway, net.spec.subnet.prefix_len())
                .await?;
            if let Some(vx) = &net.spec.vxlan {
                let underlay = match &vx.device {
                    Some(dev) => Some(
                        self.nl
                            .link(dev)
                            .await?
                            .ok_or_else(|| NetError::Invalid(format!("underlay device {dev} does not exist")))?
                            .index,
                    ),
                    None => None,
                };
                let vxi = self
                    .nl
                    .ensure_vxlan(&vxlan_name(&name), vx.vni, vx.local, underlay, vx.port)
                    .await?;
                if self.nl.link(&vxlan_name(&name)).await?.and_then(|l| l.controller) != Some(br) {
                    let attach = crate::link::LinkChange {
                        controller: Some(br),
                        ..Default::default()
                    };
                    self.nl.configure(vxi, attach).await?;
                }
                for peer in &vx.peers {
                    self.nl.fdb_append_peer(vxi, *peer).await?;
                }
            }
            if net.spec.dhcp {
                let dir = Self::net_dir(&self.config, &name);
                dhcp::write_hosts(&dir, &net.ipam.reservations())?;
                if net.dhcp.is_none() {
                    net.dhcp = Some(Dnsmasq::start(
                        &self.config.dnsmasq_binary,
                        &dir,
                        &bridge,
                        net.spec.subnet,
                        net.gateway,
                    ));
                }
            }
        }
        let ports: Vec<Port> = st.ports.values().cloned().collect();
        for port in &ports {
            if let Err(e) = self.realize_port(port).await {
                tracing::warn!(port = %port.id, "cannot restore port: {e}");
            }
        }
        // Remove links with our prefixes that nothing wants any more.
        let mut wanted: Vec<String> = st
            .networks
            .keys()
            .flat_map(|n| [bridge_name(n), vxlan_name(n)])
            .collect();
        wanted.extend(ports.iter().map(|p| p.tap.clone()));
        for link in self.nl.links().await? {
            let ours = link.name.starts_with("hbr-") || link.name.starts_with("hvx-") || link.name.starts_with("htap");
            if ours && !wanted.contains(&link.name) {
                tracing::info!(link = %link.name, "removing link that no network or port wants");
                if link.name.starts_with("htap") {
                    let _ = tap::delete_tap(&link.name);
                }
                self.nl.delete(&link.name).await?;
            }
        }
        self.apply_firewall(st)
    }

    /// Rebuild `inet hearth` when the networks changed (or our tables are gone), then make
    /// the anti-spoofing sets hold exactly the ports.
    fn apply_firewall(&self, st: &State) -> Result<(), NetError> {
        let spec = firewall_spec(st);
        let fingerprint = format!("{:?}", spec.without_ports());
        let unchanged = self
            .applied_firewall
            .lock()
            .map(|a| a.as_deref() == Some(fingerprint.as_str()))
            .unwrap_or(false);
        // sync_ports lists (and if need be rebuilds) the anti-spoofing table anyway.
        if !unchanged || !firewall::networks_table_present() {
            // Forwarding is switched on only when a NAT network needs it, and never
            // switched off: the operator may rely on it for other things.
            if st.networks.values().any(|n| n.spec.nat) {
                firewall::ensure_ip_forward(true).map_err(host_error)?;
            }
            firewall::apply_networks(&spec).map_err(host_error)?;
            if let Ok(mut a) = self.applied_firewall.lock() {
                *a = Some(fingerprint);
            }
        }
        firewall::sync_ports(&spec).map_err(host_error)?;
        // The allow-lists: made again whole when the table is gone (flushed by hand).
        if !crate::ingress::present() {
            let guarded: Vec<_> = st
                .ports
                .values()
                .filter_map(|p| Some((p.tap.clone(), p.ingress.clone()?)))
                .collect();
            crate::ingress::rebuild(&guarded).map_err(host_error)?;
        }
        Ok(())
    }
}

fn host_error(e: impl std::fmt::Display) -> NetError {
    NetError::Host(e.to_string())
}

fn port_rules(p: &Port) -> firewall::PortRules {
    firewall::PortRules {
        tap: p.tap.clone(),
        mac: p.mac.clone(),
        ips: vec![p.ip],
    }
}

fn firewall_spec(st: &State) -> firewall::FirewallSpec {
    let networks = st
        .networks
        .values()
        .map(|n| firewall::NetworkRules {
            name: n.spec.name.clone(),
            bridge: bridge_name(&n.spec.name),
            subnet: n.spec.subnet,
            nat: n.spec.nat,
            isolated: true,
            ports: st
                .ports
                .values()
                .filter(|p| p.network == n.spec.name)
                .map(port_rules)
                .collect(),
        })
        .collect();
    firewall::FirewallSpec { networks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_joining_an_overlay_or_changing_its_peers_changes_a_network_in_place() {
        let plain = NetworkSpec {
            name: "n".into(),
            subnet: "10.5.0.0/24".parse().expect("subnet"),
            gateway: None,
            range: None,
            dhcp: true,
            nat: false,
            vxlan: None,
        };
        let overlay = |peers: &[&str], vni: u32| NetworkSpec {
            vxlan: Some(VxlanSpec {
                vni,
                local: "192.0.2.1".parse().expect("ip"),
                device: None,
                peers: peers.iter().map(|p| p.parse().expect("ip")).collect(),
                port: 4789,
            }),
            ..plain.clone()
        };
        assert!(overlay_change_only(&plain, &overlay(&["192.0.2.2"], 7)), "joining");
        assert!(
            overlay_change_only(&overlay(&["192.0.2.2"], 7), &overlay(&["192.0.2.3"], 7)),
            "peers"
        );
        assert!(!overlay_change_only(&overlay(&[], 7), &overlay(&[], 8)), "another VNI");
        assert!(!overlay_change_only(&overlay(&[], 7), &plain), "leaving");
        let mut nat = overlay(&[], 7);
        nat.nat = true;
        assert!(!overlay_change_only(&plain, &nat), "NAT too");
    }
}
