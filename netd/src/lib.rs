//! netd: networks for hearth's VMs.
//!
//! - [`network`]: the service (networks, ports, reconciliation)
//! - [`link`]: bridges, addresses and VXLAN through netlink
//! - [`tap`]: persistent TAP devices through `/dev/net/tun`
//! - [`ipam`]: authoritative, persistent address management
//! - [`firewall`]: NAT, isolation and anti-spoofing through nftables' JSON interface
//! - [`nft`]: libnftables in process, per network namespace
//! - [`dhcp`]: a supervised dnsmasq per network, fed with IPAM's reservations
//! - [`http`]: the Unix-socket API and its client

pub mod dhcp;
pub mod firewall;
pub mod http;
pub mod ingress;
pub mod ipam;
pub mod link;
pub mod network;
pub mod nft;
pub mod tap;
