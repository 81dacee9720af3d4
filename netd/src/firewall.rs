//! The host firewall for hearth networks, kept in nftables.
//!
//! netd owns exactly two tables and never touches any other:
//!
//! - `inet hearth`: a `forward` chain (policy accept: it drops only what is hearth's to
//!   drop) that lets traffic stay on its own bridge, keeps isolated networks apart and
//!   counts what it drops in a named counter `isolation_drop_<network>`; and a
//!   `postrouting` chain that masquerades NAT networks leaving by any other interface.
//! - `netdev hearth`: one ingress chain per VM TAP that drops every frame the VM sends from
//!   a MAC or an IPv4 address that is not its own (named counter `spoof_<tap>`). It lives
//!   at the TAP's ingress because the inet hooks never see ARP and see bridged traffic only
//!   through br_netfilter.
//!
//! [`ruleset`] computes the whole ruleset from a [`FirewallSpec`]; [`apply`] loads it with
//! one `nft -j -f -` transaction that deletes and recreates both tables. Applying a spec
//! twice therefore gives the same ruleset, a smaller spec removes what is no longer
//! wanted, and no packet ever meets a half-built ruleset. [`apply`] carries the named
//! counters' values over from the ruleset it replaces, so they keep counting.
//!
//! Ports whose TAP does not exist are left out by [`apply`] and reported in
//! [`Applied::missing_taps`]: kernels before 6.16 refuse a whole batch that hooks a missing
//! device, and a missing TAP carries no traffic to filter. netd applies the ruleset after
//! creating a TAP and before a VM may use it.
//!
//! Everything here blocks on `nft`; call it from a blocking context.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, ExitStatus, Stdio};

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT};
use nftables::schema::{self, Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{self, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Deserialize;

/// The name of both of netd's tables (`inet hearth` and `netdev hearth`).
pub const TABLE: &str = "hearth";
/// The `inet hearth` chain that isolates networks.
pub const FORWARD_CHAIN: &str = "forward";
/// The `inet hearth` chain that masquerades NAT networks.
pub const POSTROUTING_CHAIN: &str = "postrouting";
/// Ahead of everything else at a TAP's ingress, so nothing sees a spoofed frame first.
const INGRESS_PRIORITY: i32 = -500;
/// `srcnat`.
const POSTROUTING_PRIORITY: i32 = 100;
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Room for the longest counter name prefix within nftables' 255-byte object names.
const MAX_NETWORK_NAME: usize = 64;
/// Linux interface names are at most 15 bytes.
const MAX_IFNAME: usize = 15;

/// Everything the firewall must enforce: all of hearth's networks on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallSpec {
    pub networks: Vec<NetworkRules>,
}

impl FirewallSpec {
    /// Whether the host must route IPv4 for this spec: to masquerade a NAT network, or to
    /// route between two networks that are not isolated.
    pub fn needs_ip_forward(&self) -> bool {
        self.networks.iter().any(|n| n.nat) || self.networks.iter().filter(|n| !n.isolated).count() >= 2
    }
}

/// One hearth network: its bridge, its subnet and the VM ports attached to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRules {
    /// The network's name; names its isolation counter.
    pub name: String,
    /// The Linux bridge carrying the network.
    pub bridge: String,
    pub subnet: Ipv4Net,
    /// Masquerade traffic from the subnet that leaves by any other interface.
    pub nat: bool,
    /// Forward nothing between this network and any other hearth network.
    pub isolated: bool,
    pub ports: Vec<PortRules>,
}

impl NetworkRules {
    /// An isolated network without NAT and without ports.
    pub fn new(name: impl Into<String>, bridge: impl Into<String>, subnet: Ipv4Net) -> Self {
        Self {
            name: name.into(),
            bridge: bridge.into(),
            subnet,
            nat: false,
            isolated: true,
            ports: Vec::new(),
        }
    }
}

/// A VM's TAP and what the VM may send from through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRules {
    pub tap: String,
    /// The VM's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The VM's IPv4 addresses. Empty: the VM may only ask for a lease by DHCP and probe
    /// with ARP, both from `0.0.0.0`.
    pub ips: Vec<Ipv4Addr>,
}

/// What [`apply`] loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Ports left out because their TAP does not exist; apply again once it does.
    pub missing_taps: Vec<String>,
}

/// A named counter's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("invalid firewall spec: {0}")]
    InvalidSpec(String),
    #[error("cannot run nft to {action} (is the nftables package installed?): {source}")]
    NftSpawn { action: &'static str, source: io::Error },
    #[error("nft failed to {action} ({status}): {stderr}")]
    NftFailed {
        action: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot read nft's answer to {action}: {source}")]
    NftOutput {
        action: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot encode the nftables batch: {0}")]
    Encode(serde_json::Error),
    #[error("cannot check whether interface {name} exists: {source}")]
    InterfaceLookup { name: String, source: io::Error },
    #[error("cannot {action} {IP_FORWARD}: {source}")]
    IpForward { action: &'static str, source: io::Error },
}

/// The name of the counter of packets dropped because they tried to cross from or into
/// the isolated network `network`.
pub fn isolation_counter(network: &str) -> String {
    format!("isolation_drop_{network}")
}

/// The name of the counter of frames dropped at `tap`'s ingress as spoofed.
pub fn spoof_counter(tap: &str) -> String {
    format!("spoof_{tap}")
}

/// The name of the `netdev hearth` ingress chain of `tap`.
pub fn port_chain(tap: &str) -> String {
    format!("port_{tap}")
}

/// The whole nftables batch for `spec`: recreate both tables, then fill them.
///
/// Pure: it neither runs nft nor looks at the host.
pub fn ruleset(spec: &FirewallSpec) -> Result<Nftables<'static>, FirewallError> {
    validate(spec)?;
    let mut batch = Batch::new();
    recreate_table(&mut batch, NfFamily::INet);
    add_inet_rules(&mut batch, spec);
    recreate_table(&mut batch, NfFamily::NetDev);
    add_port_rules(&mut batch, spec);
    Ok(batch.to_nftables())
}

/// Load the ruleset for `spec` in one transaction, replacing whatever netd loaded before.
///
/// Ports whose TAP does not exist are left out and listed in the result.
pub fn apply(spec: &FirewallSpec) -> Result<Applied, FirewallError> {
    validate(spec)?;
    let mut present = spec.clone();
    let mut missing_taps = Vec::new();
    for network in &mut present.networks {
        let mut ports = Vec::with_capacity(network.ports.len());
        for port in network.ports.drain(..) {
            if interface_exists(&port.tap)? {
                ports.push(port);
            } else {
                missing_taps.push(port.tap);
            }
        }
        network.ports = ports;
    }

    let mut document = serde_json::to_value(ruleset(&present)?).map_err(FirewallError::Encode)?;
    carry_counters(&mut document, &counters()?);
    let document = serde_json::to_string(&document).map_err(FirewallError::Encode)?;
    nft("load the hearth ruleset", &["-j", "-f", "-"], Some(&document))?;
    Ok(Applied { missing_taps })
}

/// True when both of our tables exist (someone may have flushed the ruleset by hand).
pub fn tables_present() -> bool {
    [["list", "table", "inet", TABLE], ["list", "table", "netdev", TABLE]]
        .iter()
        .all(|args| {
            std::process::Command::new("nft")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
}

/// Delete netd's tables. Tables that are already gone are fine.
pub fn remove() -> Result<(), FirewallError> {
    let mut batch = Batch::new();
    for family in [NfFamily::INet, NfFamily::NetDev] {
        // Adding first makes the delete succeed when the table is missing.
        batch.add(NfListObject::Table(table(family)));
        batch.delete(NfListObject::Table(table(family)));
    }
    let document = serde_json::to_string(&batch.to_nftables()).map_err(FirewallError::Encode)?;
    nft("delete the hearth tables", &["-j", "-f", "-"], Some(&document))?;
    Ok(())
}

/// The named counters in netd's tables, by name (see [`isolation_counter`] and
/// [`spoof_counter`]). Empty when the tables do not exist.
pub fn counters() -> Result<BTreeMap<String, CounterValue>, FirewallError> {
    const ACTION: &str = "list the counters";
    let output = nft(ACTION, &["-j", "list", "counters"], None)?;
    parse_counters(&output).map_err(|source| FirewallError::NftOutput { action: ACTION, source })
}

/// Switch IPv4 forwarding on or off in the caller's network namespace and return whether
/// it was on before, so that a caller turns off only what it turned on.
pub fn ensure_ip_forward(enabled: bool) -> Result<bool, FirewallError> {
    let current =
        std::fs::read_to_string(IP_FORWARD).map_err(|source| FirewallError::IpForward { action: "read", source })?;
    let was_enabled = current.trim() != "0";
    if was_enabled != enabled {
        std::fs::write(IP_FORWARD, if enabled { "1\n" } else { "0\n" }).map_err(|source| FirewallError::IpForward {
            action: "write",
            source,
        })?;
    }
    Ok(was_enabled)
}

fn validate(spec: &FirewallSpec) -> Result<(), FirewallError> {
    let mut names = HashSet::new();
    let mut bridges = HashSet::new();
    let mut taps = HashSet::new();
    for network in &spec.networks {
        check_network_name(&network.name)?;
        check_ifname(&network.bridge, &format!("bridge of network {:?}", network.name))?;
        if !names.insert(network.name.as_str()) {
            return Err(invalid(format!("network {:?} is listed twice", network.name)));
        }
        if !bridges.insert(network.bridge.as_str()) {
            return Err(invalid(format!("bridge {:?} carries two networks", network.bridge)));
        }
        for port in &network.ports {
            check_ifname(&port.tap, &format!("TAP of network {:?}", network.name))?;
            parse_mac(&port.mac).ok_or_else(|| {
                invalid(format!(
                    "TAP {:?} has MAC {:?}, expected a unicast aa:bb:cc:dd:ee:ff",
                    port.tap, port.mac
                ))
            })?;
            if !taps.insert(port.tap.as_str()) {
                return Err(invalid(format!("TAP {:?} is listed twice", port.tap)));
            }
        }
    }
    Ok(())
}

fn invalid(reason: String) -> FirewallError {
    FirewallError::InvalidSpec(reason)
}

fn check_network_name(name: &str) -> Result<(), FirewallError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NETWORK_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "network name {name:?} must be 1 to {MAX_NETWORK_NAME} letters, digits, '-', '_' or '.'"
        )))
    }
}

/// The kernel's own rules for interface names (`dev_valid_name`), minus non-ASCII.
fn check_ifname(name: &str, what: &str) -> Result<(), FirewallError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what}: {name:?} is not a Linux interface name (1 to {MAX_IFNAME} printable bytes, no '/' or ':')"
        )))
    }
}

/// A unicast MAC address in nftables' spelling, lower case.
fn parse_mac(mac: &str) -> Option<String> {
    let mut octets = [0u8; 6];
    let mut parts = mac.split(':');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || octets[0] & 1 == 1 {
        return None;
    }
    Some(mac.to_ascii_lowercase())
}

fn table(family: NfFamily) -> Table<'static> {
    Table {
        family,
        name: TABLE.into(),
        handle: None,
    }
}

/// Add (so that the delete cannot fail), delete and add again: one transaction that
/// leaves an empty table.
fn recreate_table(batch: &mut Batch<'static>, family: NfFamily) {
    batch.add(NfListObject::Table(table(family)));
    batch.delete(NfListObject::Table(table(family)));
    batch.add(NfListObject::Table(table(family)));
}

fn add_counter(batch: &mut Batch<'static>, family: NfFamily, name: String) {
    batch.add(NfListObject::Counter(schema::Counter {
        family,
        table: TABLE.into(),
        name: name.into(),
        handle: None,
        packets: None,
        bytes: None,
    }));
}

fn base_chain(family: NfFamily, name: String, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn add_rule(batch: &mut Batch<'static>, family: NfFamily, chain: &str, expr: Vec<Statement<'static>>) {
    batch.add(NfListObject::Rule(Rule {
        family,
        table: TABLE.into(),
        chain: chain.to_owned().into(),
        expr: expr.into(),
        ..Rule::default()
    }));
}

fn add_inet_rules(batch: &mut Batch<'static>, spec: &FirewallSpec) {
    let family = NfFamily::INet;
    for network in &spec.networks {
        add_counter(batch, family, isolation_counter(&network.name));
    }
    batch.add(NfListObject::Chain(base_chain(
        family,
        FORWARD_CHAIN.into(),
        NfChainType::Filter,
        NfHook::Forward,
        0,
    )));
    batch.add(NfListObject::Chain(base_chain(
        family,
        POSTROUTING_CHAIN.into(),
        NfChainType::NAT,
        NfHook::Postrouting,
        POSTROUTING_PRIORITY,
    )));

    // Bridged traffic between two ports of one bridge reaches this hook too when
    // br_netfilter is on, with the bridge as both interfaces; it is never isolation's.
    for network in &spec.networks {
        add_rule(
            batch,
            family,
            FORWARD_CHAIN,
            vec![
                is(meta(MetaKey::Iifname), string(&network.bridge)),
                is(meta(MetaKey::Oifname), string(&network.bridge)),
                accept(),
            ],
        );
    }
    for network in spec.networks.iter().filter(|n| n.isolated) {
        let others: Vec<_> = spec
            .networks
            .iter()
            .filter(|other| other.bridge != network.bridge)
            .map(|other| string(&other.bridge))
            .collect();
        if others.is_empty() {
            continue;
        }
        let counter = isolation_counter(&network.name);
        let (this, others) = (string(&network.bridge), set(others));
        for (from, to) in [(this.clone(), others.clone()), (others, this)] {
            add_rule(
                batch,
                family,
                FORWARD_CHAIN,
                vec![
                    is(meta(MetaKey::Iifname), from),
                    is(meta(MetaKey::Oifname), to),
                    count(&counter),
                    drop_packet(),
                ],
            );
        }
    }
    add_rule(
        batch,
        family,
        FORWARD_CHAIN,
        vec![
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::CT(CT {
                    key: "state".into(),
                    family: None,
                    dir: None,
                })),
                right: Expression::List(vec![string("established"), string("related")]),
                op: Operator::IN,
            }),
            accept(),
        ],
    );
    for network in spec.networks.iter().filter(|n| n.nat) {
        add_rule(
            batch,
            family,
            FORWARD_CHAIN,
            vec![is(meta(MetaKey::Iifname), string(&network.bridge)), accept()],
        );
    }

    for network in spec.networks.iter().filter(|n| n.nat) {
        let subnet = network.subnet.trunc();
        add_rule(
            batch,
            family,
            POSTROUTING_CHAIN,
            vec![
                is(
                    payload("ip", "saddr"),
                    Expression::Named(NamedExpression::Prefix(Prefix {
                        addr: Box::new(string(subnet.addr().to_string())),
                        len: u32::from(subnet.prefix_len()),
                    })),
                ),
                is_not(meta(MetaKey::Oifname), string(&network.bridge)),
                Statement::Masquerade(None),
            ],
        );
    }
}

fn add_port_rules(batch: &mut Batch<'static>, spec: &FirewallSpec) {
    let family = NfFamily::NetDev;
    for port in spec.networks.iter().flat_map(|n| &n.ports) {
        let counter = spoof_counter(&port.tap);
        let chain = port_chain(&port.tap);
        // Validated before.
        let mac = parse_mac(&port.mac).unwrap_or_default();
        add_counter(batch, family, counter.clone());
        batch.add(NfListObject::Chain(Chain {
            dev: Some(port.tap.clone().into()),
            ..base_chain(
                family,
                chain.clone(),
                NfChainType::Filter,
                NfHook::Ingress,
                INGRESS_PRIORITY,
            )
        }));
        let mut rule = |expr: Vec<Statement<'static>>| add_rule(batch, family, &chain, expr);
        let dropped = || [count(&counter), drop_packet()];
        let ips = || set(port.ips.iter().map(|ip| string(ip.to_string())).collect());

        rule(
            [is_not(payload("ether", "saddr"), string(&mac))]
                .into_iter()
                .chain(dropped())
                .collect(),
        );
        // hearth networks are IPv4: anything else (IPv6 and its router advertisements,
        // VLAN tags hiding a spoofed packet) is not the VM's to send. Not counted: a guest
        // with IPv6 on sends it all the time, and the counter is for spoofing.
        rule(vec![
            is_not(payload("ether", "type"), set(vec![string("ip"), string("arp")])),
            drop_packet(),
        ]);
        // DHCP before the VM has an address.
        rule(vec![
            is(payload("ether", "type"), string("ip")),
            is(payload("ip", "saddr"), string("0.0.0.0")),
            is(payload("udp", "sport"), Expression::Number(68)),
            is(payload("udp", "dport"), Expression::Number(67)),
            accept(),
        ]);
        let mut ip_check = vec![is(payload("ether", "type"), string("ip"))];
        if !port.ips.is_empty() {
            ip_check.push(is_not(payload("ip", "saddr"), ips()));
        }
        rule(ip_check.into_iter().chain(dropped()).collect());
        rule(
            [
                is(payload("ether", "type"), string("arp")),
                is_not(payload("arp", "saddr ether"), string(&mac)),
            ]
            .into_iter()
            .chain(dropped())
            .collect(),
        );
        // RFC 5227 address probes.
        rule(vec![
            is(payload("ether", "type"), string("arp")),
            is(payload("arp", "saddr ip"), string("0.0.0.0")),
            accept(),
        ]);
        let mut arp_check = vec![is(payload("ether", "type"), string("arp"))];
        if !port.ips.is_empty() {
            arp_check.push(is_not(payload("arp", "saddr ip"), ips()));
        }
        rule(arp_check.into_iter().chain(dropped()).collect());
    }
}

fn string(s: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(s.into()))
}

fn set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(items.into_iter().map(SetItem::Element).collect()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn is_not(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn count(counter: &str) -> Statement<'static> {
    Statement::Counter(stmt::Counter::Named(counter.to_owned().into()))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop_packet() -> Statement<'static> {
    Statement::Drop(None)
}

/// Start the counters added by `document` from their values in the ruleset it replaces.
/// Done on the JSON because the crate's counter object holds only 32-bit values.
fn carry_counters(document: &mut serde_json::Value, previous: &BTreeMap<String, CounterValue>) {
    let Some(commands) = document.get_mut("nftables").and_then(|v| v.as_array_mut()) else {
        return;
    };
    for command in commands {
        let Some(counter) = command.pointer_mut("/add/counter").and_then(|c| c.as_object_mut()) else {
            continue;
        };
        let Some(value) = counter
            .get("name")
            .and_then(|n| n.as_str())
            .and_then(|n| previous.get(n))
        else {
            continue;
        };
        let value = *value;
        counter.insert("packets".into(), value.packets.into());
        counter.insert("bytes".into(), value.bytes.into());
    }
}

fn parse_counters(output: &str) -> Result<BTreeMap<String, CounterValue>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Listing {
        nftables: Vec<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct ListedCounter {
        family: String,
        table: String,
        name: String,
        #[serde(flatten)]
        value: CounterValue,
    }
    let listing: Listing = serde_json::from_str(output)?;
    let mut counters = BTreeMap::new();
    for object in listing.nftables {
        let Some(counter) = object.get("counter") else {
            continue;
        };
        let counter = ListedCounter::deserialize(counter)?;
        if counter.table == TABLE && matches!(counter.family.as_str(), "inet" | "netdev") {
            counters.insert(counter.name, counter.value);
        }
    }
    Ok(counters)
}

fn interface_exists(name: &str) -> Result<bool, FirewallError> {
    let lookup_error = |source| FirewallError::InterfaceLookup {
        name: name.to_owned(),
        source,
    };
    let c_name = CString::new(name).map_err(|e| lookup_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call, which only reads it.
    // The lookup runs in the calling thread's network namespace, unlike /sys/class/net,
    // which shows the namespace sysfs was mounted in.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index != 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENODEV) {
        Ok(false)
    } else {
        Err(lookup_error(error))
    }
}

/// Run `nft` with `args` (never through a shell), feeding it `stdin`, and return its
/// standard output.
fn nft(action: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let spawn_error = |source| FirewallError::NftSpawn { action, source };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // nft reads all of its input before it answers, so this cannot deadlock on its
        // output; a write error means nft died, and its exit status says why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(FirewallError::NftFailed {
            action,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn net(text: &str) -> Ipv4Net {
        text.parse().expect("test subnet")
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("test address")
    }

    /// An isolated NAT network with two ports, an isolated plain one with a port that has
    /// no address yet, and an open (not isolated) one.
    fn three_networks() -> FirewallSpec {
        FirewallSpec {
            networks: vec![
                NetworkRules {
                    nat: true,
                    ports: vec![
                        PortRules {
                            tap: "htap1".into(),
                            mac: "52:54:00:00:00:01".into(),
                            ips: vec![ip("10.1.0.2"), ip("10.1.0.3")],
                        },
                        PortRules {
                            tap: "htap2".into(),
                            mac: "52:54:00:00:00:02".into(),
                            ips: vec![ip("10.1.0.4")],
                        },
                    ],
                    ..NetworkRules::new("a", "hbr-a", net("10.1.0.1/24"))
                },
                NetworkRules {
                    ports: vec![PortRules {
                        tap: "htap3".into(),
                        mac: "52:54:00:00:00:03".into(),
                        ips: vec![],
                    }],
                    ..NetworkRules::new("b", "hbr-b", net("10.2.0.0/24"))
                },
                NetworkRules {
                    isolated: false,
                    ..NetworkRules::new("c", "hbr-c", net("10.3.0.0/16"))
                },
            ],
        }
    }

    fn document(spec: &FirewallSpec) -> Value {
        serde_json::to_value(ruleset(spec).expect("valid spec")).expect("serializable")
    }

    /// Every `{command: {kind: object}}` of the batch, as (command, kind, object).
    fn commands(doc: &Value) -> Vec<(String, String, Value)> {
        let mut found = Vec::new();
        for entry in doc["nftables"].as_array().expect("nftables array") {
            let (command, inner) = entry.as_object().and_then(|o| o.iter().next()).expect("command");
            let (kind, object) = inner.as_object().and_then(|o| o.iter().next()).expect("object");
            found.push((command.clone(), kind.clone(), object.clone()));
        }
        found
    }

    fn objects(doc: &Value, kind: &str) -> Vec<Value> {
        commands(doc)
            .into_iter()
            .filter(|(command, k, _)| command == "add" && k == kind)
            .map(|(_, _, object)| object)
            .collect()
    }

    fn render_expr(expr: &Value) -> String {
        if let Some(s) = expr.as_str() {
            return s.to_owned();
        }
        if let Some(n) = expr.as_u64() {
            return n.to_string();
        }
        if let Some(items) = expr.as_array() {
            return items.iter().map(render_expr).collect::<Vec<_>>().join(",");
        }
        if let Some(meta) = expr.get("meta") {
            return render_expr(&meta["key"]);
        }
        if let Some(p) = expr.get("payload") {
            return format!("{} {}", render_expr(&p["protocol"]), render_expr(&p["field"]));
        }
        if let Some(ct) = expr.get("ct") {
            return format!("ct {}", render_expr(&ct["key"]));
        }
        if let Some(p) = expr.get("prefix") {
            return format!("{}/{}", render_expr(&p["addr"]), render_expr(&p["len"]));
        }
        if let Some(set) = expr.get("set") {
            return format!("{{{}}}", render_expr(set));
        }
        panic!("unexpected expression {expr}");
    }

    /// A rule in a compact text form, e.g. `iifname == hbr-a counter x drop`.
    fn render_rule(rule: &Value) -> String {
        let mut words = Vec::new();
        for statement in rule["expr"].as_array().expect("expr array") {
            let (key, value) = statement.as_object().and_then(|o| o.iter().next()).expect("statement");
            match key.as_str() {
                "match" => words.push(format!(
                    "{} {} {}",
                    render_expr(&value["left"]),
                    render_expr(&value["op"]),
                    render_expr(&value["right"])
                )),
                "counter" => words.push(format!("counter {}", render_expr(value))),
                verdict => words.push(verdict.to_owned()),
            }
        }
        words.join(" ")
    }

    fn rules(doc: &Value, family: &str, chain: &str) -> Vec<String> {
        objects(doc, "rule")
            .iter()
            .filter(|r| r["family"] == family && r["chain"] == chain)
            .map(render_rule)
            .collect()
    }

    #[test]
    fn batch_recreates_both_tables_and_touches_no_other() {
        let doc = document(&three_networks());
        let all = commands(&doc);
        let table_commands: Vec<_> = all
            .iter()
            .filter(|(_, kind, _)| kind == "table")
            .map(|(command, _, t)| format!("{command} {} {}", render_expr(&t["family"]), render_expr(&t["name"])))
            .collect();
        assert_eq!(
            table_commands,
            [
                "add inet hearth",
                "delete inet hearth",
                "add inet hearth",
                "add netdev hearth",
                "delete netdev hearth",
                "add netdev hearth"
            ]
        );
        // Each table is recreated before anything is put into it.
        assert_eq!(all[0].1, "table");
        assert!(all[..3].iter().all(|(_, kind, _)| kind == "table"));
        for (_, kind, object) in &all {
            let table = if kind == "table" {
                &object["name"]
            } else {
                &object["table"]
            };
            assert_eq!(table, "hearth", "{kind} {object}");
        }
    }

    #[test]
    fn chains_hook_forward_postrouting_and_each_tap_ingress() {
        let doc = document(&three_networks());
        let chains: Vec<_> = objects(&doc, "chain")
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} {} {} {} {}",
                    render_expr(&c["family"]),
                    render_expr(&c["name"]),
                    render_expr(&c["type"]),
                    render_expr(&c["hook"]),
                    c["prio"],
                    render_expr(&c["policy"]),
                    c.get("dev").map(render_expr).unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            chains,
            [
                "inet forward filter forward 0 accept ",
                "inet postrouting nat postrouting 100 accept ",
                "netdev port_htap1 filter ingress -500 accept htap1",
                "netdev port_htap2 filter ingress -500 accept htap2",
                "netdev port_htap3 filter ingress -500 accept htap3",
            ]
        );
    }

    #[test]
    fn forward_keeps_isolated_networks_apart_but_lets_each_bridge_talk_to_itself() {
        let doc = document(&three_networks());
        assert_eq!(
            rules(&doc, "inet", "forward"),
            [
                "iifname == hbr-a oifname == hbr-a accept",
                "iifname == hbr-b oifname == hbr-b accept",
                "iifname == hbr-c oifname == hbr-c accept",
                "iifname == hbr-a oifname == {hbr-b,hbr-c} counter isolation_drop_a drop",
                "iifname == {hbr-b,hbr-c} oifname == hbr-a counter isolation_drop_a drop",
                "iifname == hbr-b oifname == {hbr-a,hbr-c} counter isolation_drop_b drop",
                "iifname == {hbr-a,hbr-c} oifname == hbr-b counter isolation_drop_b drop",
                "ct state in established,related accept",
                "iifname == hbr-a accept",
            ]
        );
    }

    #[test]
    fn only_nat_networks_are_masqueraded_by_their_whole_subnet() {
        let doc = document(&three_networks());
        // The spec gave the gateway's address, 10.1.0.1/24: the rule matches the network.
        assert_eq!(
            rules(&doc, "inet", "postrouting"),
            ["ip saddr == 10.1.0.0/24 oifname != hbr-a masquerade"]
        );
        let mut no_nat = three_networks();
        no_nat.networks[0].nat = false;
        assert!(rules(&document(&no_nat), "inet", "postrouting").is_empty());
    }

    #[test]
    fn every_network_and_every_port_has_a_named_counter() {
        let doc = document(&three_networks());
        let counters: Vec<_> = objects(&doc, "counter")
            .iter()
            .map(|c| format!("{} {}", render_expr(&c["family"]), render_expr(&c["name"])))
            .collect();
        assert_eq!(
            counters,
            [
                "inet isolation_drop_a",
                "inet isolation_drop_b",
                "inet isolation_drop_c",
                "netdev spoof_htap1",
                "netdev spoof_htap2",
                "netdev spoof_htap3",
            ]
        );
    }

    #[test]
    fn a_port_may_send_only_from_its_own_mac_and_addresses() {
        let doc = document(&three_networks());
        assert_eq!(
            rules(&doc, "netdev", "port_htap1"),
            [
                "ether saddr != 52:54:00:00:00:01 counter spoof_htap1 drop",
                "ether type != {ip,arp} drop",
                "ether type == ip ip saddr == 0.0.0.0 udp sport == 68 udp dport == 67 accept",
                "ether type == ip ip saddr != {10.1.0.2,10.1.0.3} counter spoof_htap1 drop",
                "ether type == arp arp saddr ether != 52:54:00:00:00:01 counter spoof_htap1 drop",
                "ether type == arp arp saddr ip == 0.0.0.0 accept",
                "ether type == arp arp saddr ip != {10.1.0.2,10.1.0.3} counter spoof_htap1 drop",
            ]
        );
    }

    #[test]
    fn a_port_without_addresses_may_only_ask_for_one() {
        let doc = document(&three_networks());
        assert_eq!(
            rules(&doc, "netdev", "port_htap3"),
            [
                "ether saddr != 52:54:00:00:00:03 counter spoof_htap3 drop",
                "ether type != {ip,arp} drop",
                "ether type == ip ip saddr == 0.0.0.0 udp sport == 68 udp dport == 67 accept",
                "ether type == ip counter spoof_htap3 drop",
                "ether type == arp arp saddr ether != 52:54:00:00:00:03 counter spoof_htap3 drop",
                "ether type == arp arp saddr ip == 0.0.0.0 accept",
                "ether type == arp counter spoof_htap3 drop",
            ]
        );
    }

    #[test]
    fn an_empty_spec_leaves_empty_tables() {
        let doc = document(&FirewallSpec::default());
        assert_eq!(
            rules(&doc, "inet", "forward"),
            ["ct state in established,related accept"]
        );
        assert_eq!(objects(&doc, "rule").len(), 1);
        assert!(objects(&doc, "counter").is_empty());
        assert_eq!(objects(&doc, "chain").len(), 2, "forward and postrouting stay");
    }

    #[test]
    fn mac_addresses_are_written_in_lower_case() {
        let mut spec = three_networks();
        spec.networks[0].ports[0].mac = "52:54:00:AB:CD:EF".into();
        let rules = rules(&document(&spec), "netdev", "port_htap1");
        assert_eq!(rules[0], "ether saddr != 52:54:00:ab:cd:ef counter spoof_htap1 drop");
    }

    #[test]
    fn invalid_specs_are_refused_with_the_culprit_named() {
        type Mutation = Box<dyn Fn(&mut FirewallSpec)>;
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "empty network name",
                Box::new(|s| s.networks[0].name.clear()),
                "network name \"\"",
            ),
            (
                "space in name",
                Box::new(|s| s.networks[0].name = "a b".into()),
                "\"a b\"",
            ),
            (
                "long name",
                Box::new(|s| s.networks[0].name = "n".repeat(65)),
                "network name",
            ),
            (
                "duplicate name",
                Box::new(|s| s.networks[1].name = "a".into()),
                "\"a\" is listed twice",
            ),
            (
                "long bridge",
                Box::new(|s| s.networks[0].bridge = "hbr-0123456789ab".into()),
                "hbr-0123456789ab",
            ),
            (
                "slash in bridge",
                Box::new(|s| s.networks[0].bridge = "hbr/a".into()),
                "hbr/a",
            ),
            (
                "empty bridge",
                Box::new(|s| s.networks[0].bridge.clear()),
                "bridge of network \"a\"",
            ),
            (
                "shared bridge",
                Box::new(|s| s.networks[1].bridge = "hbr-a".into()),
                "carries two networks",
            ),
            (
                "space in tap",
                Box::new(|s| s.networks[0].ports[0].tap = "htap 1".into()),
                "htap 1",
            ),
            (
                "nul in tap",
                Box::new(|s| s.networks[0].ports[0].tap = "htap\0".into()),
                "TAP of network",
            ),
            (
                "duplicate tap",
                Box::new(|s| s.networks[1].ports[0].tap = "htap1".into()),
                "\"htap1\" is listed",
            ),
            (
                "short mac",
                Box::new(|s| s.networks[0].ports[0].mac = "52:54:00:00:01".into()),
                "52:54:00:00:01",
            ),
            (
                "long mac",
                Box::new(|s| s.networks[0].ports[0].mac = "52:54:00:00:00:01:02".into()),
                "MAC",
            ),
            (
                "dashed mac",
                Box::new(|s| s.networks[0].ports[0].mac = "52-54-00-00-00-01".into()),
                "MAC",
            ),
            (
                "non-hex mac",
                Box::new(|s| s.networks[0].ports[0].mac = "52:54:00:00:00:zz".into()),
                "MAC",
            ),
            (
                "one-digit octet",
                Box::new(|s| s.networks[0].ports[0].mac = "52:54:0:00:00:001".into()),
                "MAC",
            ),
            (
                "multicast mac",
                Box::new(|s| s.networks[0].ports[0].mac = "01:00:5e:00:00:01".into()),
                "unicast",
            ),
            (
                "injection",
                Box::new(|s| s.networks[0].ports[0].mac = "52:54:00:00:00:01\" drop".into()),
                "MAC",
            ),
        ];
        for (case, mutate, culprit) in cases {
            let mut spec = three_networks();
            mutate(&mut spec);
            match ruleset(&spec) {
                Err(FirewallError::InvalidSpec(reason)) => {
                    assert!(
                        reason.contains(culprit),
                        "{case}: {reason:?} does not mention {culprit:?}"
                    )
                }
                other => panic!("{case}: expected InvalidSpec, got {other:?}"),
            }
        }
    }

    #[test]
    fn forwarding_is_needed_for_nat_or_for_two_open_networks() {
        let mut spec = three_networks();
        assert!(spec.needs_ip_forward(), "a NAT network");
        spec.networks[0].nat = false;
        assert!(!spec.needs_ip_forward(), "isolated networks and one open one");
        spec.networks[1].isolated = false;
        assert!(spec.needs_ip_forward(), "two open networks route to each other");
        assert!(!FirewallSpec::default().needs_ip_forward());
    }

    #[test]
    fn counters_are_read_from_our_tables_only() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "netdev", "name": "spoof_htap1", "table": "hearth", "handle": 2,
                         "packets": 5_000_000_000u64, "bytes": 7}},
            {"counter": {"family": "inet", "name": "isolation_drop_a", "table": "hearth", "handle": 3,
                         "packets": 2, "bytes": 168}},
            {"counter": {"family": "inet", "name": "spoof_x", "table": "other", "handle": 4,
                         "packets": 1, "bytes": 1}},
            {"counter": {"family": "ip", "name": "spoof_y", "table": "hearth", "handle": 4,
                         "packets": 1, "bytes": 1}},
        ]});
        let counters = parse_counters(&listing.to_string()).expect("parses");
        assert_eq!(
            counters.into_iter().collect::<Vec<_>>(),
            [
                ("isolation_drop_a".to_owned(), CounterValue { packets: 2, bytes: 168 }),
                (
                    "spoof_htap1".to_owned(),
                    CounterValue {
                        packets: 5_000_000_000,
                        bytes: 7
                    }
                ),
            ]
        );
        assert!(parse_counters("{\"nftables\": [{\"counter\": {\"name\": 1}}]}").is_err());
        assert!(parse_counters("Error: oops").is_err());
    }

    #[test]
    fn counters_carry_their_values_into_the_new_ruleset() {
        let mut doc = document(&three_networks());
        let previous = BTreeMap::from([
            (
                "spoof_htap2".to_owned(),
                CounterValue {
                    packets: 5_000_000_000,
                    bytes: 9,
                },
            ),
            ("spoof_gone".to_owned(), CounterValue { packets: 1, bytes: 1 }),
        ]);
        carry_counters(&mut doc, &previous);
        let counters = objects(&doc, "counter");
        let carried = counters.iter().find(|c| c["name"] == "spoof_htap2").expect("counter");
        assert_eq!(
            (&carried["packets"], &carried["bytes"]),
            (&json!(5_000_000_000u64), &json!(9))
        );
        let fresh = counters.iter().find(|c| c["name"] == "spoof_htap1").expect("counter");
        assert!(fresh.get("packets").is_none_or(Value::is_null));
        assert!(!counters.iter().any(|c| c["name"] == "spoof_gone"));
    }

    /// Tests against the real kernel and nft, each inside a private network namespace so
    /// that the host's own firewall is never touched. They need root.
    mod in_netns {
        use super::*;
        use std::process::Output;

        /// Run `f` on a thread of its own in a fresh network namespace; processes it
        /// spawns (nft, ip) inherit that namespace.
        fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
            let thread = std::thread::spawn(move || {
                // SAFETY: unshare only changes the calling thread's namespaces, and this
                // thread exists for nothing else.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "unshare(CLONE_NEWNET): {} (tests need root)",
                    io::Error::last_os_error()
                );
                run(&["ip", "link", "set", "lo", "up"]);
                f()
            });
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }

        fn output(args: &[&str]) -> Output {
            Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
        }

        fn run(args: &[&str]) -> String {
            let out = output(args);
            assert!(
                out.status.success(),
                "{args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        fn listing() -> String {
            run(&["nft", "list", "ruleset"])
        }

        fn hearth_json(family: &str) -> Value {
            serde_json::from_str(&run(&["nft", "-j", "list", "table", family, TABLE])).expect("nft's JSON")
        }

        fn listed(doc: &Value, kind: &str) -> Vec<Value> {
            doc["nftables"]
                .as_array()
                .expect("nftables array")
                .iter()
                .filter_map(|o| o.get(kind).cloned())
                .collect()
        }

        fn tap(name: &str) {
            run(&["ip", "tuntap", "add", name, "mode", "tap"]);
        }

        fn port(tap: &str, mac: &str, ips: &[&str]) -> PortRules {
            PortRules {
                tap: tap.into(),
                mac: mac.into(),
                ips: ips.iter().map(|a| ip(a)).collect(),
            }
        }

        #[test]
        fn apply_is_idempotent_shrinks_and_leaves_other_tables_alone() {
            in_private_netns(|| {
                tap("htap1");
                tap("htap3");
                run(&["nft", "add", "table", "inet", "other"]);
                run(&[
                    "nft",
                    "add",
                    "chain",
                    "inet",
                    "other",
                    "input",
                    "{ type filter hook input priority 0; }",
                ]);
                run(&["nft", "add", "rule", "inet", "other", "input", "tcp dport 22 accept"]);
                let other = run(&["nft", "list", "table", "inet", "other"]);

                let mut spec = three_networks();
                let applied = apply(&spec).expect("apply");
                assert_eq!(applied.missing_taps, ["htap2"]);

                let inet = hearth_json("inet");
                let chains: Vec<_> = listed(&inet, "chain")
                    .iter()
                    .map(|c| format!("{} {} {}", render_expr(&c["name"]), render_expr(&c["hook"]), c["prio"]))
                    .collect();
                assert_eq!(chains, ["forward forward 0", "postrouting postrouting 100"]);
                let forward: Vec<_> = listed(&inet, "rule")
                    .iter()
                    .filter(|r| r["chain"] == FORWARD_CHAIN)
                    .map(render_rule)
                    .collect();
                assert!(
                    forward.contains(&"iifname == hbr-a oifname == hbr-a accept".to_owned()),
                    "{forward:?}"
                );
                assert!(
                    forward.contains(
                        &"iifname == hbr-a oifname == {hbr-b,hbr-c} counter isolation_drop_a drop".to_owned()
                    ),
                    "{forward:?}"
                );
                let postrouting: Vec<_> = listed(&inet, "rule")
                    .iter()
                    .filter(|r| r["chain"] == POSTROUTING_CHAIN)
                    .map(render_rule)
                    .collect();
                assert_eq!(postrouting, ["ip saddr == 10.1.0.0/24 oifname != hbr-a masquerade"]);

                let netdev = hearth_json("netdev");
                let ports: Vec<_> = listed(&netdev, "chain")
                    .iter()
                    .map(|c| format!("{} {} {}", render_expr(&c["name"]), render_expr(&c["hook"]), c["prio"]))
                    .collect();
                assert_eq!(ports, ["port_htap1 ingress -500", "port_htap3 ingress -500"]);
                // nft 1.0.6 leaves the device out of its JSON listing.
                let text = run(&["nft", "list", "table", "netdev", TABLE]);
                assert!(text.contains("hook ingress device \"htap1\" priority -500"), "{text}");
                let counter_names: Vec<_> = counters().expect("counters").into_keys().collect();
                assert_eq!(
                    counter_names,
                    [
                        "isolation_drop_a",
                        "isolation_drop_b",
                        "isolation_drop_c",
                        "spoof_htap1",
                        "spoof_htap3"
                    ]
                );

                let first = listing();
                apply(&spec).expect("apply again");
                assert_eq!(listing(), first, "applying the same spec twice changes nothing");

                // The TAP appears: applying again picks its port up.
                tap("htap2");
                assert!(apply(&spec).expect("apply").missing_taps.is_empty());
                assert!(listing().contains("chain port_htap2"));

                spec.networks.remove(1);
                spec.networks[0].ports.remove(0);
                apply(&spec).expect("apply a smaller spec");
                let smaller = listing();
                for gone in ["hbr-b", "isolation_drop_b", "port_htap1", "spoof_htap1", "port_htap3"] {
                    assert!(!smaller.contains(gone), "{gone} is still there:\n{smaller}");
                }
                assert!(smaller.contains("chain port_htap2"), "{smaller}");
                assert!(smaller.contains(&other), "another table changed:\n{smaller}");

                remove().expect("remove");
                remove().expect("removing twice is fine");
                assert_eq!(listing().trim(), other.trim(), "only the other table is left");
                assert!(counters().expect("counters without our tables").is_empty());
            });
        }

        #[test]
        fn ip_forward_is_switched_in_the_callers_namespace_only() {
            let read_host = || std::fs::read_to_string(IP_FORWARD).expect("host ip_forward");
            let host_before = read_host();
            in_private_netns(|| {
                assert!(
                    !ensure_ip_forward(true).expect("enable"),
                    "a new namespace starts without forwarding"
                );
                assert_eq!(run(&["busybox", "sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");
                assert!(ensure_ip_forward(true).expect("enable again"));
                assert!(ensure_ip_forward(false).expect("disable"));
                assert_eq!(run(&["busybox", "sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "0");
            });
            assert_eq!(read_host(), host_before);
        }

        /// A named network namespace holding one "VM": the far end of a veth whose near
        /// end stands in for the VM's TAP on a bridge. Deleted on drop, also on failure.
        struct Guest {
            netns: String,
        }

        impl Guest {
            /// `net` picks the subnet 10.71.<net>.0/24: the bridge is .1, the guest .2.
            fn new(side: &str, net: u8, mac: &str) -> Self {
                let netns = format!("hearth-fwtest-{}-{side}", std::process::id());
                run(&["ip", "netns", "add", &netns]);
                let guest = Guest { netns };
                let (bridge, tap) = (format!("br-{side}"), format!("tap-{side}"));
                let gateway = format!("10.71.{net}.1");
                let bridge_mac = format!("52:54:00:71:{net:02x}:01");
                run(&["ip", "link", "add", &bridge, "address", &bridge_mac, "type", "bridge"]);
                run(&["ip", "addr", "add", &format!("{gateway}/24"), "dev", &bridge]);
                run(&["ip", "link", "set", &bridge, "up"]);
                run(&[
                    "ip",
                    "link",
                    "add",
                    &tap,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "address",
                    mac,
                    "netns",
                    &guest.netns,
                ]);
                run(&["ip", "link", "set", &tap, "master", &bridge, "up"]);
                guest.run(&["ip", "link", "set", "lo", "up"]);
                guest.run(&["ip", "addr", "add", &format!("10.71.{net}.2/24"), "dev", "eth0"]);
                guest.run(&["ip", "link", "set", "eth0", "up"]);
                guest.run(&["ip", "route", "add", "default", "via", &gateway]);
                guest
            }

            fn command<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
                let mut command = vec!["ip", "netns", "exec", self.netns.as_str()];
                command.extend_from_slice(args);
                command
            }

            fn run(&self, args: &[&str]) -> String {
                run(&self.command(args))
            }

            /// Whether two pings from `source` (an address or an interface) to `target`
            /// are answered.
            fn pings(&self, source: &str, target: &str) -> bool {
                let args = ["busybox", "ping", "-c", "2", "-W", "1", "-I", source, target];
                output(&self.command(&args)).status.success()
            }
        }

        impl Drop for Guest {
            fn drop(&mut self) {
                // The veth and the bridge go with the namespaces.
                let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
            }
        }

        fn counter(name: &str) -> u64 {
            counters()
                .expect("counters")
                .get(name)
                .map(|c| c.packets)
                .unwrap_or_else(|| panic!("no counter {name}"))
        }

        #[test]
        fn isolation_and_spoofing_drops_are_ours_and_counted() {
            in_private_netns(|| {
                let (mac_a, mac_b) = ("52:54:00:71:01:02", "52:54:00:71:02:02");
                let a = Guest::new("a", 1, mac_a);
                let _b = Guest::new("b", 2, mac_b);
                ensure_ip_forward(true).expect("enable forwarding");
                let network = |name: &str, net: u8, mac: &str| NetworkRules {
                    isolated: false,
                    ports: vec![port(&format!("tap-{name}"), mac, &[&format!("10.71.{net}.2")])],
                    ..NetworkRules::new(name, format!("br-{name}"), super::net(&format!("10.71.{net}.0/24")))
                };
                let mut spec = FirewallSpec {
                    networks: vec![network("a", 1, mac_a), network("b", 2, mac_b)],
                };

                // Open networks route to each other: the fixture works.
                apply(&spec).expect("apply open networks");
                assert!(
                    a.pings("10.71.1.2", "10.71.2.2"),
                    "a reaches b while neither is isolated"
                );

                spec.networks[0].isolated = true;
                apply(&spec).expect("apply isolation");
                assert_eq!(counter("isolation_drop_a"), 0);
                assert!(!a.pings("10.71.1.2", "10.71.2.2"), "a must not reach b");
                assert!(counter("isolation_drop_a") >= 2, "our rule dropped the pings");
                assert!(a.pings("10.71.1.2", "10.71.1.1"), "a still reaches its own gateway");

                // The guest claims an address that is not its own.
                a.run(&["ip", "addr", "add", "10.71.1.99/24", "dev", "eth0"]);
                assert_eq!(counter("spoof_tap-a"), 0, "honest traffic is never counted as spoofed");
                assert!(
                    !a.pings("10.71.1.99", "10.71.1.1"),
                    "a spoofed source must not get through"
                );
                let spoofed = counter("spoof_tap-a");
                assert!(spoofed >= 2, "our rule dropped the spoofed pings ({spoofed})");
                assert!(a.pings("10.71.1.2", "10.71.1.1"), "the real address still works");

                // Re-applying keeps the counts.
                apply(&spec).expect("apply again");
                assert!(counter("spoof_tap-a") >= spoofed);

                // The guest changes its MAC address: its frames must not even reach the
                // bridge, which would learn the MAC and could be made to send it others'
                // traffic.
                let stolen = "52:54:00:71:01:66";
                a.run(&["ip", "link", "set", "eth0", "address", stolen]);
                // Its ARP would carry the new MAC too and be dropped for that: let it
                // send IPv4 straight away, honest but for the Ethernet source.
                a.run(&[
                    "ip",
                    "neigh",
                    "replace",
                    "10.71.1.1",
                    "lladdr",
                    "52:54:00:71:01:01",
                    "dev",
                    "eth0",
                ]);
                let before = counter("spoof_tap-a");
                assert!(!a.pings("10.71.1.2", "10.71.1.1"), "a spoofed MAC must not get through");
                assert!(counter("spoof_tap-a") > before);
                let fdb = run(&["bridge", "fdb", "show", "br", "br-a"]);
                assert!(!fdb.contains(stolen), "the bridge learnt the spoofed MAC:\n{fdb}");
                assert!(fdb.contains(mac_a), "the fixture's bridge learns MACs:\n{fdb}");
            });
        }
    }
}
