//! The scheduler's inputs, read from the store: every registered host with its
//! allocatable resources, what the VMs placed on it take, and why it may not take a
//! new VM (lost, its lease gone, cordoned, or its daemons out of this api's reach).

use std::collections::{BTreeMap, BTreeSet};

use hearth_placement::{Decision, Host, Request, Resources};

use super::error::HostError;
use super::record;
use crate::model::{PlacementRecord, VmRecord};
use crate::state::AppState;
use crate::store;

/// The host a VM record lives on.
pub fn host_of<'a>(state: &'a AppState, vm: &'a VmRecord) -> &'a str {
    vm.host.as_deref().unwrap_or(&state.config.host.name)
}

/// What a VM takes of its host.
pub fn needs(vm: &VmRecord) -> Resources {
    Resources {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_bytes: vm.root_disk.as_ref().and_then(|d| d.size_bytes).unwrap_or(0),
    }
}

/// Every registered host as the scheduler sees it.
pub async fn candidates(state: &AppState) -> Result<Vec<Host>, HostError> {
    let records = record::list(state.store.as_ref()).await?;
    let alive = record::alive(state.store.as_ref()).await?;
    let vms = store::list_json::<VmRecord>(state.store.as_ref(), "vms/").await?;
    let mut used: BTreeMap<String, (Resources, u32, BTreeSet<String>)> = BTreeMap::new();
    for (vm, _) in &vms {
        let e = used.entry(host_of(state, vm).to_string()).or_default();
        let n = needs(vm);
        e.0 = Resources {
            vcpus: e.0.vcpus + n.vcpus,
            memory_mib: e.0.memory_mib + n.memory_mib,
            disk_bytes: e.0.disk_bytes + n.disk_bytes,
        };
        e.1 += 1;
        if let Some(g) = vm.placement.as_ref().and_then(|p| p.anti_affinity_group.clone()) {
            e.2.insert(g);
        }
    }
    let me = &state.config.host.name;
    Ok(records
        .into_iter()
        .map(|h| {
            let unavailable = if let Some(l) = &h.lost {
                Some(format!("lost: {}", l.reason))
            } else if !alive.contains(&h.name) {
                Some("its lease lapsed (its api is not running)".to_string())
            } else if h.cordoned {
                Some("cordoned".to_string())
            } else if h.name != *me && h.daemons.len() < crate::daemons::DAEMONS.len() {
                Some("its daemons are not reachable from other hosts (its api runs without --host-address)".to_string())
            } else {
                None
            };
            let (u, vms, groups) = used.remove(&h.name).unwrap_or_default();
            Host {
                name: h.name,
                unavailable,
                allocatable: h.allocatable,
                used: u,
                vms,
                groups,
            }
        })
        .collect())
}

/// Places a VM that needs `needs` by the user's `rules`; `pinned` names the host its
/// volumes or origin tie it to, with the reason. Answers the decision to record, or
/// why no host can take it.
pub async fn place(
    state: &AppState,
    needs: Resources,
    rules: &crate::model::Placement,
    pinned: Option<(String, String)>,
) -> Result<(String, PlacementRecord), crate::vms::error::VmError> {
    let hosts = candidates(state).await.map_err(crate::vms::error::VmError::from)?;
    // More than any host has at all is the request's fault, not the cluster's state.
    let records = record::list(state.store.as_ref()).await?;
    if let Some(largest) = records.iter().map(|h| h.capacity.memory_mib).max() {
        if needs.memory_mib > largest {
            return Err(crate::vms::error::VmError::InsufficientMemory {
                host_mib: largest,
                asked: needs.memory_mib,
            });
        }
    }
    let mut host = rules.host.clone();
    if let Some((pin, why)) = &pinned {
        if host.as_ref().is_some_and(|h| h != pin) {
            return Err(crate::vms::error::VmError::Invalid(format!(
                "placement names host {}, but {why} (host {pin})",
                host.unwrap_or_default()
            )));
        }
        host = Some(pin.clone());
    }
    if let Some(h) = &host {
        if !hosts.iter().any(|x| x.name == *h) {
            return Err(crate::vms::error::VmError::Invalid(format!(
                "placement names host {h}, which does not exist"
            )));
        }
    }
    let req = Request {
        needs,
        host,
        anti_affinity_group: rules.anti_affinity_group.clone(),
    };
    let mut decision: Decision = hearth_placement::place(&hosts, &req);
    if let Some((pin, why)) = pinned {
        for v in decision.verdicts.iter_mut().filter(|v| v.host == pin && v.chosen) {
            v.reason = why.clone();
        }
    }
    let Some(chosen) = decision.host.clone() else {
        return Err(crate::vms::error::VmError::NoHostFits(decision.summary()));
    };
    Ok((
        chosen,
        PlacementRecord {
            anti_affinity_group: rules.anti_affinity_group.clone(),
            decided_at_ms: vmm_manager::spec::now_ms(),
            verdicts: decision.verdicts,
        },
    ))
}
