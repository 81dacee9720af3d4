//! Networks across hosts. With several hosts (an api given `--host-address`), a
//! network exists on every host that has a VM on it, and hearth joins those copies
//! into one layer-2 segment with a VXLAN overlay of its own: one VNI per network (kept
//! in the store), each copy's peers the other hosts that have the network, updated on
//! every host whenever one more joins. Addresses are then handed out once for the whole
//! network ([`pick_address`]): claims in the store, keyed by address, so a VM on one
//! host never gets an address a VM on another already has.
//!
//! A network whose user gave it an overlay of their own (`vxlan` in the create) is left
//! as it is, and so is every network of an api without `--host-address` (one host).

use std::net::{IpAddr, Ipv4Addr};

use netd::network::{NetworkSpec, NetworkStatus, VxlanSpec};

use crate::daemons::upstream;
use crate::hosts::record;
use crate::model::VmRecord;
use crate::networks::error::NetworkError;
use crate::state::AppState;
use crate::store::{self, StoreError};

/// The VXLAN port hearth's overlays use.
const OVERLAY_PORT: u16 = 4789;

fn vni_key(project: &str, name: &str) -> String {
    format!("network-overlays/{project}/{name}")
}

fn vni_claim_key(vni: u32) -> String {
    format!("network-vnis/{vni}")
}

fn address_key(project: &str, name: &str, ip: Ipv4Addr) -> String {
    format!("network-addresses/{project}/{name}/{ip}")
}

/// Whether hearth spans `spec` over the hosts that have it.
pub fn spans_hosts(state: &AppState, spec: &NetworkSpec) -> bool {
    state.config.host.address.is_some() && spec.vxlan.is_none()
}

/// The network's VNI, chosen once: from its name's hash, the next free one when
/// another network has it.
async fn vni(state: &AppState, project: &str, name: &str) -> Result<u32, NetworkError> {
    let key = vni_key(project, name);
    if let Some((v, _)) = store::get_json::<u32>(state.store.as_ref(), &key).await? {
        return Ok(v);
    }
    let owner = format!("{project}/{name}");
    let start = owner
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    for i in 0..64u32 {
        let candidate = 1 + (start.wrapping_add(i) % 16_000_000);
        match state
            .store
            .compare_and_swap(&vni_claim_key(candidate), None, store::encode(&owner))
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                let held = store::get_json::<String>(state.store.as_ref(), &vni_claim_key(candidate)).await?;
                if held.map(|(o, _)| o) != Some(owner.clone()) {
                    continue;
                }
            }
            Err(e) => return Err(e.into()),
        }
        return match state
            .store
            .compare_and_swap(&key, None, store::encode(&candidate))
            .await
        {
            Ok(_) => Ok(candidate),
            // Another api chose first: its choice stands.
            Err(StoreError::Conflict { .. }) => Ok(store::get_json::<u32>(state.store.as_ref(), &key)
                .await?
                .map(|(v, _)| v)
                .unwrap_or(candidate)),
            Err(e) => Err(e.into()),
        };
    }
    Err(NetworkError::Invalid(format!("no free VXLAN VNI for network {name}")))
}

fn ipv4(host: &str, a: Option<IpAddr>) -> Result<Ipv4Addr, NetworkError> {
    match a {
        Some(IpAddr::V4(v4)) => Ok(v4),
        Some(IpAddr::V6(_)) => Err(NetworkError::Invalid(format!(
            "host {host} has an IPv6 address; hearth's overlays need IPv4 underlay addresses"
        ))),
        None => Err(NetworkError::Invalid(format!("host {host} has no --host-address"))),
    }
}

/// Makes `spec` exist on host `target` as one segment with every other host that has
/// it: the copies on all of them get the overlay with each other as peers. Returns the
/// network as `target` has it.
pub async fn span(
    state: &AppState,
    spec: &NetworkSpec,
    project: &str,
    name: &str,
    target: &str,
) -> Result<NetworkStatus, NetworkError> {
    let vni = vni(state, project, name).await?;
    connect(state, spec, vni, Some(target))
        .await?
        .ok_or_else(|| NetworkError::NotFound(name.to_string()))
}

/// Gives every live host that has the network the others as its overlay's peers
/// (`target`, if any, gets the network first); lost hosts are no peers. Returns the
/// network as `target` has it.
async fn connect(
    state: &AppState,
    spec: &NetworkSpec,
    vni: u32,
    target: Option<&str>,
) -> Result<Option<NetworkStatus>, NetworkError> {
    let target = target.unwrap_or_default();
    let mut members = Vec::new();
    for h in record::list(state.store.as_ref()).await? {
        if h.lost.is_some() {
            continue;
        }
        let d = match crate::hosts::daemons::on(state, Some(&h.name)).await {
            Ok(d) => d,
            Err(e) if h.name == target => return Err(e.into()),
            Err(_) => continue,
        };
        let has = h.name == target || d.netd.network(&spec.name).await.is_ok();
        if has {
            members.push((h.name.clone(), ipv4(&h.name, h.address)?, d));
        }
    }
    let mut on_target = None;
    for (host, local, d) in &members {
        let mut mine = spec.clone();
        mine.vxlan = Some(VxlanSpec {
            vni,
            local: *local,
            device: None,
            peers: members.iter().filter(|m| m.0 != *host).map(|m| m.1).collect(),
            port: OVERLAY_PORT,
        });
        match d.netd.ensure_network(&mine).await {
            Ok(status) if host == target => on_target = Some(status),
            Ok(_) => {}
            Err(e) if host == target => return Err(upstream(e).into()),
            Err(e) => tracing::warn!(%host, network = %spec.name, "cannot update the overlay's peers: {e}"),
        }
    }
    Ok(on_target)
}

/// Brings every overlay in step with the hosts: a host marked lost is no peer any
/// more (its VXLAN traffic is neither sent to it nor flooded there, so a host that was
/// only cut off reaches no VM when it comes back), and a host back again is one.
pub async fn refresh_all(state: &AppState) -> Result<(), NetworkError> {
    for (key, v) in state.store.list("network-overlays/").await? {
        let Some((project, name)) = key["network-overlays/".len()..].split_once('/') else {
            continue;
        };
        let Ok(vni) = serde_json::from_slice::<u32>(&v.value) else {
            continue;
        };
        let Some((spec, _)) =
            store::get_json::<NetworkSpec>(state.store.as_ref(), &crate::networks::work::key(project, name)).await?
        else {
            continue;
        };
        connect(state, &spec, vni, None).await?;
    }
    Ok(())
}

/// An address of the network for VM `vm`'s NIC no VM of any host has: the first of
/// the range not claimed by a VM that still exists, claimed for `vm`.
pub async fn pick_address(
    state: &AppState,
    spec: &NetworkSpec,
    gateway: Ipv4Addr,
    project: &str,
    name: &str,
    vm: &str,
) -> Result<Ipv4Addr, NetworkError> {
    let live: std::collections::BTreeSet<String> = store::list_json::<VmRecord>(state.store.as_ref(), "vms/")
        .await?
        .into_iter()
        .map(|(r, _)| r.id)
        .collect();
    let (first, last) = match &spec.range {
        Some(r) => (u32::from(r.start), u32::from(r.end)),
        None => (
            u32::from(spec.subnet.network()) + 1,
            u32::from(spec.subnet.broadcast()).saturating_sub(1),
        ),
    };
    for n in first..=last {
        let ip = Ipv4Addr::from(n);
        if ip == gateway {
            continue;
        }
        let key = address_key(project, name, ip);
        let held = store::get_json::<String>(state.store.as_ref(), &key).await?;
        let expected = match &held {
            None => None,
            Some((holder, _)) if holder == vm => return Ok(ip),
            Some((holder, _)) if live.contains(holder) => continue,
            // Its VM is gone: the address is free again.
            Some((_, revision)) => Some(*revision),
        };
        match state.store.compare_and_swap(&key, expected, store::encode(&vm)).await {
            Ok(_) => return Ok(ip),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(NetworkError::Invalid(format!(
        "network {name} has no free address left"
    )))
}

/// Network `name` of `project` as the netd of host `host` has it; made there first
/// when that host has none yet (its first VM on the network), joined to the other
/// hosts that have it (see [`crate::networks::overlay`]), and whether hearth spans it
/// over hosts (then addresses come from [`crate::networks::overlay::pick_address`]).
/// `None`: the project has no such network.
pub(crate) async fn on_host(
    state: &AppState,
    host: &str,
    netd: &netd::http::client::NetdClient,
    project: &str,
    name: &str,
) -> Result<Option<(netd::network::NetworkStatus, bool)>, NetworkError> {
    let on_netd = crate::model::host_name(project, name);
    let Some((spec, _)) =
        store::get_json::<NetworkSpec>(state.store.as_ref(), &crate::networks::work::key(project, name)).await?
    else {
        // The default project's networks from before the api kept records.
        return match netd.network(&on_netd).await {
            Ok(n) => Ok(Some((n, false))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(upstream(e).into()),
        };
    };
    if spans_hosts(state, &spec) {
        return span(state, &spec, project, name, host).await.map(|n| Some((n, true)));
    }
    match netd.network(&on_netd).await {
        Ok(n) => return Ok(Some((n, false))),
        Err(e) if !e.is_not_found() => return Err(upstream(e).into()),
        Err(_) => {}
    }
    tracing::info!(network = %on_netd, "making the network on a host that has none of it yet");
    Ok(Some((netd.ensure_network(&spec).await.map_err(upstream)?, false)))
}
