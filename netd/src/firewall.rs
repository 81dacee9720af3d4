//! The host firewall for hearth networks, kept in nftables.
//!
//! netd owns exactly two tables and never touches any other:
//!
//! - `inet hearth`: a `forward` chain (policy accept: it drops only what is hearth's to
//!   drop) that lets traffic stay on its own bridge, keeps isolated networks apart and
//!   counts what it drops in a named counter `isolation_drop_<network>`; and a
//!   `postrouting` chain that masquerades NAT networks leaving by any other interface.
//!   It changes only when networks change, and is then rebuilt whole ([`apply_networks`]).
//! - `bridge hearth`: anti-spoofing. One fixed chain at the bridges' prerouting hook
//!   looks at every frame a VM's TAP hands to its bridge (ARP included, which the inet
//!   hooks never see) and drops it unless its Ethernet source, and its IPv4 or ARP sender
//!   address, are the TAP's own. What each TAP owns lives in sets keyed by the TAP's name,
//!   so adding or removing a port changes a few set elements in one transaction
//!   ([`add_port`], [`remove_port`]) instead of rebuilding rules; a TAP with hearth's
//!   `htap` prefix that is in no set may send nothing. Drops are counted per TAP in the
//!   dynamic set `spoofed` (read as [`spoof_counter`] by [`counters`]).
//!
//! Every change is one nftables transaction, so no packet ever meets a half-built
//! ruleset, and everything goes through libnftables in process ([`crate::nft`]).
//! [`apply`] carries the named counters' values over from the ruleset it replaces, so
//! they keep counting.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT};
use nftables::schema::{self, Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{self, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Deserialize;

use crate::nft::{self, NftError};

/// The name of both of netd's tables (`inet hearth` and `bridge hearth`).
pub const TABLE: &str = "hearth";
/// The `inet hearth` chain that isolates networks.
pub const FORWARD_CHAIN: &str = "forward";
/// The `inet hearth` chain that masquerades NAT networks.
pub const POSTROUTING_CHAIN: &str = "postrouting";
/// The prefix of the TAPs netd creates; such a TAP sends nothing until it is a port.
pub const TAP_PREFIX: &str = "htap";
/// `srcnat`.
const POSTROUTING_PRIORITY: i32 = 100;
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Room for the longest counter name prefix within nftables' 255-byte object names.
const MAX_NETWORK_NAME: usize = 64;
/// Linux interface names are at most 15 bytes.
const MAX_IFNAME: usize = 15;

/// The `bridge hearth` table. Ahead of everything else at the bridges' prerouting hook
/// (-300), so nothing sees a spoofed frame first. DHCP arriving over an overlay is
/// dropped: each host's DHCP server answers its own VMs only (a network spanning
/// hosts has one on each, and each knows only its own VMs' addresses).
const GUARD_TABLE: &str = r#"table bridge hearth {
    set ports { type ifname; }
    set macs { type ifname . ether_addr; }
    set addrs { type ifname . ipv4_addr; }
    set spoofed { type ifname; size 65535; flags dynamic; counter; }
    chain prerouting {
        type filter hook prerouting priority -300; policy accept;
        iifname "hvx*" udp dport { 67, 68 } drop
        iifname @ports jump guard
        iifname "htap*" jump guard
    }
    chain guard {
        iifname . ether saddr != @macs update @spoofed { iifname } drop
        ether type != { ip, arp } drop
        ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept
        iifname . ip saddr @addrs accept
        ether type ip update @spoofed { iifname } drop
        iifname . arp saddr ether != @macs update @spoofed { iifname } drop
        arp saddr ip 0.0.0.0 accept
        iifname . arp saddr ip @addrs accept
        update @spoofed { iifname } drop
    }
}
"#;
/// What [`GUARD_TABLE`] holds, to tell a complete table from a damaged one.
const GUARD_CHAINS: usize = 2;
const GUARD_SETS: usize = 4;
const GUARD_RULES: usize = 12;

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

    /// The spec without its ports: what `inet hearth` depends on.
    pub fn without_ports(&self) -> FirewallSpec {
        FirewallSpec {
            networks: self
                .networks
                .iter()
                .map(|n| NetworkRules {
                    ports: Vec::new(),
                    ..n.clone()
                })
                .collect(),
        }
    }

    fn ports(&self) -> impl Iterator<Item = &PortRules> {
        self.networks.iter().flat_map(|n| &n.ports)
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
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("cannot read nftables' answer to {action}: {source}")]
    NftOutput {
        action: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot encode the nftables batch: {0}")]
    Encode(serde_json::Error),
    #[error("cannot {action} {IP_FORWARD}: {source}")]
    IpForward { action: &'static str, source: io::Error },
}

/// The name of the counter of packets dropped because they tried to cross from or into
/// the isolated network `network`.
pub fn isolation_counter(network: &str) -> String {
    format!("isolation_drop_{network}")
}

/// The name under which [`counters`] reports the frames dropped from `tap` as spoofed.
pub fn spoof_counter(tap: &str) -> String {
    format!("spoof_{tap}")
}

/// The `inet hearth` batch for `spec`: recreate the table, then fill it.
///
/// Pure: it neither runs nft nor looks at the host.
pub fn ruleset(spec: &FirewallSpec) -> Result<Nftables<'static>, FirewallError> {
    validate(spec)?;
    let mut batch = Batch::new();
    recreate_table(&mut batch, NfFamily::INet);
    add_inet_rules(&mut batch, spec);
    Ok(batch.to_nftables())
}

/// Make the host's firewall exactly `spec`: rebuild `inet hearth`, and make the
/// anti-spoofing sets hold exactly `spec`'s ports.
pub fn apply(spec: &FirewallSpec) -> Result<(), FirewallError> {
    apply_networks(spec)?;
    sync_ports(spec)
}

/// Rebuild `inet hearth` for `spec`'s networks in one transaction, keeping the named
/// counters' values, and create `bridge hearth` if it is missing or damaged (filled with
/// `spec`'s ports). Leaves the ports of an intact `bridge hearth` alone.
pub fn apply_networks(spec: &FirewallSpec) -> Result<(), FirewallError> {
    validate(spec)?;
    let mut document = serde_json::to_value(ruleset(spec)?).map_err(FirewallError::Encode)?;
    carry_counters(&mut document, &named_counters()?);
    let document = serde_json::to_string(&document).map_err(FirewallError::Encode)?;
    nft::run("load the hearth ruleset", &document)?;
    if guard()?.is_none() {
        let mut commands = String::from("add table bridge hearth\ndelete table bridge hearth\n");
        commands.push_str(GUARD_TABLE);
        for port in spec.ports() {
            commands.push_str(&port_elements("add", port));
        }
        nft::run("load the anti-spoofing table", &commands)?;
    }
    Ok(())
}

/// Let `port` send from its own MAC and addresses (and nothing else) through its TAP.
/// The TAP need not exist yet.
pub fn add_port(port: &PortRules) -> Result<(), FirewallError> {
    check_port(port)?;
    nft::run(&format!("let {} send", port.tap), &port_elements("add", port))?;
    Ok(())
}

/// [`add_port`] for many ports, in one transaction.
pub fn add_ports(ports: &[PortRules]) -> Result<(), FirewallError> {
    if ports.is_empty() {
        return Ok(());
    }
    let mut commands = String::new();
    for port in ports {
        check_port(port)?;
        commands.push_str(&port_elements("add", port));
    }
    nft::run(&format!("let {} ports send", ports.len()), &commands)?;
    Ok(())
}

/// Forget what `port` may send, and its spoofing count. Forgetting a port that is not
/// there is fine.
pub fn remove_port(port: &PortRules) -> Result<(), FirewallError> {
    check_port(port)?;
    let tap = quoted(&port.tap);
    // Adding first makes the deletes succeed when the elements are missing.
    let mut commands = port_elements("add", port);
    commands.push_str(&format!("add element bridge hearth spoofed {{ {tap} }}\n"));
    commands.push_str(&port_elements("delete", port));
    commands.push_str(&format!("delete element bridge hearth spoofed {{ {tap} }}\n"));
    nft::run(&format!("forget port {}", port.tap), &commands)?;
    Ok(())
}

/// Make the anti-spoofing sets hold exactly `spec`'s ports, in one transaction, touching
/// nothing when they already do. Repairs elements deleted or added by hand.
pub fn sync_ports(spec: &FirewallSpec) -> Result<(), FirewallError> {
    validate(spec)?;
    let Some(current) = guard()? else {
        // Missing or damaged: rebuilt, with every port, by apply_networks.
        return apply_networks(spec);
    };
    let mut wanted = GuardSets::default();
    for port in spec.ports() {
        wanted.insert(port);
    }
    let mut commands = String::new();
    for (verb, from, to) in [("delete", &current, &wanted), ("add", &wanted, &current)] {
        for tap in from.ports.difference(&to.ports) {
            commands.push_str(&format!("{verb} element bridge hearth ports {{ {} }}\n", quoted(tap)));
        }
        for (tap, mac) in from.macs.difference(&to.macs) {
            commands.push_str(&format!(
                "{verb} element bridge hearth macs {{ {} . {mac} }}\n",
                quoted(tap)
            ));
        }
        for (tap, ip) in from.addrs.difference(&to.addrs) {
            commands.push_str(&format!(
                "{verb} element bridge hearth addrs {{ {} . {ip} }}\n",
                quoted(tap)
            ));
        }
    }
    for tap in current.spoofed.difference(&wanted.ports) {
        commands.push_str(&format!("delete element bridge hearth spoofed {{ {} }}\n", quoted(tap)));
    }
    if !commands.is_empty() {
        tracing::info!("bringing the anti-spoofing sets back to the ports netd holds");
        nft::run("repair the anti-spoofing sets", &commands)?;
    }
    Ok(())
}

/// True when both of our tables exist and the anti-spoofing table is whole (someone may
/// have flushed the ruleset by hand).
pub fn tables_present() -> bool {
    networks_table_present() && matches!(guard(), Ok(Some(_)))
}

/// True when `inet hearth` exists. (A missing or damaged `bridge hearth` is rebuilt by
/// [`sync_ports`].)
pub fn networks_table_present() -> bool {
    nft::run("look for the hearth table", "list table inet hearth").is_ok()
}

/// Delete netd's tables (and the `netdev hearth` table of netd before 0.1.1). Tables that
/// are already gone are fine.
pub fn remove() -> Result<(), FirewallError> {
    let mut commands = String::new();
    for family in ["inet", "bridge", "netdev"] {
        commands.push_str(&format!("add table {family} hearth\ndelete table {family} hearth\n"));
    }
    commands.push_str("add table bridge hearth_ingress\ndelete table bridge hearth_ingress\n");
    nft::run("delete the hearth tables", &commands)?;
    Ok(())
}

/// The named counters in `inet hearth` (see [`isolation_counter`]) and the spoofing
/// counts per TAP (see [`spoof_counter`]), by name. Empty when the tables do not exist.
pub fn counters() -> Result<BTreeMap<String, CounterValue>, FirewallError> {
    let mut counters = named_counters()?;
    if let Some(guard) = guard()? {
        // A port that never sent a spoofed frame has no element in `spoofed` yet.
        for tap in &guard.ports {
            counters.insert(spoof_counter(tap), CounterValue::default());
        }
        for (tap, value) in guard.spoof_counts {
            counters.insert(spoof_counter(&tap), value);
        }
    }
    counters.extend(crate::ingress::counters());
    Ok(counters)
}

fn named_counters() -> Result<BTreeMap<String, CounterValue>, FirewallError> {
    const ACTION: &str = "list the counters";
    let output = nft::run(ACTION, "list counters")?;
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

/// The elements of the anti-spoofing sets.
#[derive(Debug, Default, PartialEq, Eq)]
struct GuardSets {
    ports: BTreeSet<String>,
    macs: BTreeSet<(String, String)>,
    addrs: BTreeSet<(String, Ipv4Addr)>,
    spoofed: BTreeSet<String>,
    spoof_counts: BTreeMap<String, CounterValue>,
}

impl GuardSets {
    fn insert(&mut self, port: &PortRules) {
        self.ports.insert(port.tap.clone());
        self.macs.insert((port.tap.clone(), port.mac.to_ascii_lowercase()));
        for ip in &port.ips {
            self.addrs.insert((port.tap.clone(), *ip));
        }
    }
}

/// The anti-spoofing table's sets, or None when the table is missing or not whole.
fn guard() -> Result<Option<GuardSets>, FirewallError> {
    const ACTION: &str = "list the anti-spoofing table";
    match nft::run(ACTION, "list table bridge hearth") {
        Ok(output) => parse_guard(&output).map_err(|source| FirewallError::NftOutput { action: ACTION, source }),
        // The usual reason is that the table does not exist; anything else shows again
        // when the table is created.
        Err(_) => Ok(None),
    }
}

fn parse_guard(output: &str) -> Result<Option<GuardSets>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Listing {
        nftables: Vec<serde_json::Value>,
    }
    let listing: Listing = serde_json::from_str(output)?;
    let count = |kind: &str| listing.nftables.iter().filter(|o| o.get(kind).is_some()).count();
    if (count("chain"), count("set"), count("rule")) != (GUARD_CHAINS, GUARD_SETS, GUARD_RULES) {
        return Ok(None);
    }
    let mut sets = GuardSets::default();
    for set in listing.nftables.iter().filter_map(|o| o.get("set")) {
        let name = set.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        let elements = set.get("elem").and_then(|e| e.as_array()).cloned().unwrap_or_default();
        for element in elements {
            // An element with a counter is {"elem": {"val": ..., "counter": ...}}.
            let (value, counter) = match element.get("elem") {
                Some(e) => (e.get("val").cloned().unwrap_or_default(), e.get("counter").cloned()),
                None => (element, None),
            };
            let pair = || -> Option<(String, String)> {
                let parts = value.get("concat")?.as_array()?;
                Some((parts.first()?.as_str()?.to_owned(), parts.get(1)?.as_str()?.to_owned()))
            };
            match name {
                "ports" | "spoofed" => {
                    let Some(tap) = value.as_str() else { continue };
                    if name == "ports" {
                        sets.ports.insert(tap.to_owned());
                    } else {
                        sets.spoofed.insert(tap.to_owned());
                        if let Some(counter) = counter {
                            sets.spoof_counts
                                .insert(tap.to_owned(), CounterValue::deserialize(counter)?);
                        }
                    }
                }
                "macs" => {
                    if let Some(pair) = pair() {
                        sets.macs.insert(pair);
                    }
                }
                "addrs" => {
                    if let Some((tap, ip)) = pair() {
                        if let Ok(ip) = ip.parse() {
                            sets.addrs.insert((tap, ip));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Some(sets))
}

/// `verb` (add or delete) the elements that let `port` send. Validated names only.
fn port_elements(verb: &str, port: &PortRules) -> String {
    let tap = quoted(&port.tap);
    let mac = port.mac.to_ascii_lowercase();
    let mut commands = format!(
        "{verb} element bridge hearth ports {{ {tap} }}\n{verb} element bridge hearth macs {{ {tap} . {mac} }}\n"
    );
    if !port.ips.is_empty() {
        let addrs: Vec<String> = port.ips.iter().map(|ip| format!("{tap} . {ip}")).collect();
        commands.push_str(&format!(
            "{verb} element bridge hearth addrs {{ {} }}\n",
            addrs.join(", ")
        ));
    }
    commands
}

fn quoted(tap: &str) -> String {
    format!("\"{tap}\"")
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
            check_port(port)?;
            if !taps.insert(port.tap.as_str()) {
                return Err(invalid(format!("TAP {:?} is listed twice", port.tap)));
            }
        }
    }
    Ok(())
}

/// A port's TAP name goes into nftables commands quoted, so it is held to the names netd
/// makes (letters, digits, '-', '_', '.'), and its MAC must be unicast.
fn check_port(port: &PortRules) -> Result<(), FirewallError> {
    let tap_ok = !port.tap.is_empty()
        && port.tap.len() <= MAX_IFNAME
        && port
            .tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !tap_ok {
        return Err(invalid(format!(
            "TAP {:?} must be 1 to {MAX_IFNAME} letters, digits, '-', '_' or '.'",
            port.tap
        )));
    }
    parse_mac(&port.mac).ok_or_else(|| {
        invalid(format!(
            "TAP {:?} has MAC {:?}, expected a unicast aa:bb:cc:dd:ee:ff",
            port.tap, port.mac
        ))
    })?;
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
        if counter.table == TABLE && counter.family == "inet" {
            counters.insert(counter.name, counter.value);
        }
    }
    Ok(counters)
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
    fn batch_recreates_the_inet_table_and_touches_no_other() {
        let doc = document(&three_networks());
        let all = commands(&doc);
        let table_commands: Vec<_> = all
            .iter()
            .filter(|(_, kind, _)| kind == "table")
            .map(|(command, _, t)| format!("{command} {} {}", render_expr(&t["family"]), render_expr(&t["name"])))
            .collect();
        assert_eq!(
            table_commands,
            ["add inet hearth", "delete inet hearth", "add inet hearth"]
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
    fn chains_hook_forward_and_postrouting() {
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
    fn every_network_has_a_named_isolation_counter() {
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
            ]
        );
    }

    #[test]
    fn a_port_is_its_mac_and_addresses_in_the_guard_sets() {
        let spec = three_networks();
        assert_eq!(
            port_elements("add", &spec.networks[0].ports[0]),
            "add element bridge hearth ports { \"htap1\" }\n\
             add element bridge hearth macs { \"htap1\" . 52:54:00:00:00:01 }\n\
             add element bridge hearth addrs { \"htap1\" . 10.1.0.2, \"htap1\" . 10.1.0.3 }\n"
        );
    }

    #[test]
    fn a_port_without_addresses_may_only_ask_for_one() {
        // No addrs element: the guard chain accepts only DHCP and ARP probes from 0.0.0.0.
        let spec = three_networks();
        let elements = port_elements("delete", &spec.networks[1].ports[0]);
        assert_eq!(
            elements,
            "delete element bridge hearth ports { \"htap3\" }\n\
             delete element bridge hearth macs { \"htap3\" . 52:54:00:00:00:03 }\n"
        );
        assert!(GUARD_TABLE.contains("ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept"));
        assert!(GUARD_TABLE.contains("arp saddr ip 0.0.0.0 accept"));
    }

    #[test]
    fn the_guard_table_counts_what_it_declares() {
        let rules = GUARD_TABLE
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("jump") || l.ends_with("drop") || l.ends_with("accept"))
            .count();
        assert_eq!(rules, GUARD_RULES);
        assert_eq!(GUARD_TABLE.matches("\n    set ").count(), GUARD_SETS);
        assert_eq!(GUARD_TABLE.matches("\n    chain ").count(), GUARD_CHAINS);
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
        let elements = port_elements("add", &spec.networks[0].ports[0]);
        assert!(elements.contains("\"htap1\" . 52:54:00:ab:cd:ef"), "{elements}");
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
                "quote in tap",
                Box::new(|s| s.networks[0].ports[0].tap = "htap\"1".into()),
                "letters, digits",
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
                         "packets": 5, "bytes": 7}},
            {"counter": {"family": "inet", "name": "isolation_drop_a", "table": "hearth", "handle": 3,
                         "packets": 5_000_000_000u64, "bytes": 168}},
            {"counter": {"family": "inet", "name": "spoof_x", "table": "other", "handle": 4,
                         "packets": 1, "bytes": 1}},
            {"counter": {"family": "ip", "name": "spoof_y", "table": "hearth", "handle": 4,
                         "packets": 1, "bytes": 1}},
        ]});
        let counters = parse_counters(&listing.to_string()).expect("parses");
        assert_eq!(
            counters.into_iter().collect::<Vec<_>>(),
            [(
                "isolation_drop_a".to_owned(),
                CounterValue {
                    packets: 5_000_000_000,
                    bytes: 168
                }
            )]
        );
        assert!(parse_counters("{\"nftables\": [{\"counter\": {\"name\": 1}}]}").is_err());
        assert!(parse_counters("Error: oops").is_err());
    }

    #[test]
    fn counters_carry_their_values_into_the_new_ruleset() {
        let mut doc = document(&three_networks());
        let previous = BTreeMap::from([
            (
                "isolation_drop_b".to_owned(),
                CounterValue {
                    packets: 5_000_000_000,
                    bytes: 9,
                },
            ),
            ("isolation_drop_gone".to_owned(), CounterValue { packets: 1, bytes: 1 }),
        ]);
        carry_counters(&mut doc, &previous);
        let counters = objects(&doc, "counter");
        let carried = counters
            .iter()
            .find(|c| c["name"] == "isolation_drop_b")
            .expect("counter");
        assert_eq!(
            (&carried["packets"], &carried["bytes"]),
            (&json!(5_000_000_000u64), &json!(9))
        );
        let fresh = counters
            .iter()
            .find(|c| c["name"] == "isolation_drop_a")
            .expect("counter");
        assert!(fresh.get("packets").is_none_or(Value::is_null));
        assert!(!counters.iter().any(|c| c["name"] == "isolation_drop_gone"));
    }

    #[test]
    fn the_guard_listing_gives_sets_and_spoof_counts() {
        let mut listing = vec![
            json!({"metainfo": {"version": "1.0.6"}}),
            json!({"table": {"family": "bridge", "name": "hearth"}}),
            json!({"set": {"name": "ports", "elem": ["htap1"]}}),
            json!({"set": {"name": "macs", "elem": [{"concat": ["htap1", "52:54:00:00:00:01"]}]}}),
            json!({"set": {"name": "addrs", "elem": [{"concat": ["htap1", "10.1.0.2"]}]}}),
            json!({"set": {"name": "spoofed", "elem": [
                {"elem": {"val": "htap1", "counter": {"packets": 3, "bytes": 126}}}]}}),
            json!({"chain": {"name": "prerouting"}}),
            json!({"chain": {"name": "guard"}}),
        ];
        listing.extend((0..GUARD_RULES).map(|_| json!({"rule": {}})));
        let parsed = parse_guard(&json!({ "nftables": listing }).to_string())
            .expect("parses")
            .expect("whole");
        let mut wanted = GuardSets::default();
        wanted.insert(&port("htap1", "52:54:00:00:00:01", &["10.1.0.2"]));
        assert_eq!(parsed.ports, wanted.ports);
        assert_eq!(parsed.macs, wanted.macs);
        assert_eq!(parsed.addrs, wanted.addrs);
        assert_eq!(parsed.spoof_counts["htap1"], CounterValue { packets: 3, bytes: 126 });
        // A rule deleted by hand: the table is not whole and gets rebuilt.
        listing.pop();
        assert!(parse_guard(&json!({ "nftables": listing }).to_string())
            .expect("parses")
            .is_none());
    }

    fn port(tap: &str, mac: &str, ips: &[&str]) -> PortRules {
        PortRules {
            tap: tap.into(),
            mac: mac.into(),
            ips: ips.iter().map(|a| ip(a)).collect(),
        }
    }

    /// Tests against the real kernel and nft, each inside a private network namespace so
    /// that the host's own firewall is never touched. They need root.
    mod in_netns {
        use super::*;
        use std::process::{Command, Output};

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

        /// Both of our tables, in a fixed order (a rebuilt table moves to the end of
        /// the full listing).
        fn ours() -> String {
            run(&["nft", "list", "table", "inet", TABLE]) + &run(&["nft", "list", "table", "bridge", TABLE])
        }

        fn guard_elements(set: &str) -> String {
            run(&["nft", "list", "set", "bridge", TABLE, set])
        }

        #[test]
        fn apply_is_idempotent_shrinks_and_leaves_other_tables_alone() {
            in_private_netns(|| {
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
                apply(&spec).expect("apply");
                assert!(tables_present());

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

                // The guard hooks the bridges' prerouting, ahead of everything, and holds
                // every port; TAPs need not exist.
                let text = run(&["nft", "list", "table", "bridge", TABLE]);
                assert!(
                    text.contains("type filter hook prerouting priority dstnat;"),
                    "-300 is dstnat: {text}"
                );
                let macs = guard_elements("macs");
                for element in [
                    "\"htap1\" . 52:54:00:00:00:01",
                    "\"htap2\" . 52:54:00:00:00:02",
                    "\"htap3\" . 52:54:00:00:00:03",
                ] {
                    assert!(macs.contains(element), "{element} missing:\n{macs}");
                }
                let addrs = guard_elements("addrs");
                assert!(addrs.contains("\"htap1\" . 10.1.0.3"), "{addrs}");
                let counter_names: Vec<_> = counters().expect("counters").into_keys().collect();
                assert_eq!(
                    counter_names,
                    [
                        "isolation_drop_a",
                        "isolation_drop_b",
                        "isolation_drop_c",
                        "spoof_htap1",
                        "spoof_htap2",
                        "spoof_htap3"
                    ]
                );

                let first = ours();
                apply(&spec).expect("apply again");
                assert_eq!(ours(), first, "applying the same spec twice changes nothing");

                // Elements deleted and added by hand are put right.
                run(&[
                    "nft",
                    "delete",
                    "element",
                    "bridge",
                    TABLE,
                    "macs",
                    "{ \"htap2\" . 52:54:00:00:00:02 }",
                ]);
                run(&[
                    "nft",
                    "add",
                    "element",
                    "bridge",
                    TABLE,
                    "addrs",
                    "{ \"htap2\" . 10.1.0.99 }",
                ]);
                sync_ports(&spec).expect("sync");
                assert_eq!(ours(), first, "sync repairs the sets");

                // One port at a time.
                let extra = port("htap9", "52:54:00:00:00:09", &["10.1.0.9"]);
                add_port(&extra).expect("add a port");
                assert!(guard_elements("addrs").contains("\"htap9\" . 10.1.0.9"));
                add_port(&extra).expect("adding twice is fine");
                remove_port(&extra).expect("remove a port");
                remove_port(&extra).expect("removing twice is fine");
                assert_eq!(ours(), first, "add then remove leaves what was there");

                spec.networks.remove(1);
                spec.networks[0].ports.remove(0);
                apply(&spec).expect("apply a smaller spec");
                let smaller = listing();
                for gone in ["hbr-b", "isolation_drop_b", "\"htap1\"", "\"htap3\""] {
                    assert!(!smaller.contains(gone), "{gone} is still there:\n{smaller}");
                }
                assert!(smaller.contains("\"htap2\""), "{smaller}");
                assert!(smaller.contains(&other), "another table changed:\n{smaller}");

                // A flushed guard table is rebuilt whole, with the ports.
                run(&["nft", "flush", "chain", "bridge", TABLE, "guard"]);
                assert!(!tables_present());
                apply_networks(&spec).expect("apply networks");
                assert!(tables_present());
                assert!(guard_elements("ports").contains("\"htap2\""));

                remove().expect("remove");
                remove().expect("removing twice is fine");
                assert_eq!(listing().trim(), other.trim(), "only the other table is left");
                assert!(counters().expect("counters without our tables").is_empty());
            });
        }

        /// Writes the calling thread's namespace's forwarding setting directly.
        fn set_ip_forward(on: bool) {
            std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" }).expect("write ip_forward");
        }

        fn read_ip_forward() -> bool {
            std::fs::read_to_string(IP_FORWARD).expect("read ip_forward").trim() != "0"
        }

        /// A new namespace inherits the host's IPv4 settings (with the kernel's default
        /// `net.core.devconf_inherit_init_net = 0`), so it starts forwarding on a router,
        /// a Docker host or a host running hearth: each namespace's starting value is set
        /// here, never assumed. Both directions are checked against a neighbour that holds
        /// the value being switched away from, so a change that leaked out of the caller's
        /// namespace would show whatever the host's own setting is.
        #[test]
        fn ip_forward_is_switched_in_the_callers_namespace_only() {
            let read_host = || std::fs::read_to_string(IP_FORWARD).expect("host ip_forward");
            let host_before = read_host();
            for start in [false, true] {
                // The neighbour: a namespace of its own holding `start`; the namespace
                // netd runs in is made from it and switched to `!start` and back.
                in_private_netns(move || {
                    set_ip_forward(start);
                    in_private_netns(move || {
                        set_ip_forward(start);
                        assert_eq!(
                            ensure_ip_forward(!start).expect("switch"),
                            start,
                            "reports the value it found"
                        );
                        let want = if start { "0" } else { "1" };
                        assert_eq!(run(&["busybox", "sysctl", "-n", "net.ipv4.ip_forward"]).trim(), want);
                        assert_eq!(ensure_ip_forward(!start).expect("again"), !start, "already switched");
                        let seen = std::thread::spawn(read_ip_forward).join().expect("reader");
                        assert_eq!(seen, !start, "threads of the namespace see the change");
                        assert_eq!(ensure_ip_forward(start).expect("back"), !start);
                        assert_eq!(read_ip_forward(), start);
                        ensure_ip_forward(!start).expect("switch for the neighbour's check");
                    });
                    assert_eq!(
                        read_ip_forward(),
                        start,
                        "switching to {} in another namespace left this one alone",
                        !start
                    );
                });
            }
            assert_eq!(read_host(), host_before, "the host's own setting is untouched");
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
