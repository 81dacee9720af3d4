//! A lost host's VMs that keep nothing on it are started again on another host, by the
//! leader, right after it marked the host lost and took it out of the overlays. Such a
//! VM has no root disk and no data volume (a kernel-and-initramfs image like `tiny`):
//! nothing of it is lost with its host but its memory. It keeps its id, name, MAC and
//! address (the address stays claimed in the store, and the lost host is no overlay
//! peer any more); the scheduler picks the host as for a new VM, with the VM's
//! anti-affinity group. A VM with a root disk or a volume on the lost host stays there,
//! `host_lost`, until the host returns: its disks are not reachable elsewhere yet.
//!
//! The lost host, when its api comes back, finds the VM recorded on another host and
//! removes its stale copy (VMM and port; the reconciler's orphans), so no VM runs twice
//! once it is back.

use vmm_manager::spec::VmAction;

use crate::hosts::schedule::{host_of, needs};
use crate::model::{Phase, Placement, VmRecord};
use crate::state::AppState;
use crate::store;
use crate::vms::error::VmError;
use crate::vms::records::vm_key;

/// Why a VM cannot be moved off its lost host, if it cannot.
fn stays(vm: &VmRecord) -> Option<&'static str> {
    if vm.root_disk.is_some() {
        Some("its root disk is on the lost host")
    } else if !vm.volumes.is_empty() {
        Some("its volumes are on the lost host")
    } else if vm
        .placement
        .as_ref()
        .and_then(|p| p.verdicts.iter().find(|v| v.chosen))
        .is_some_and(|v| v.reason == "the host placement names")
    {
        Some("its placement names the lost host")
    } else {
        None
    }
}

/// Starts the VMs of lost host `lost` that keep nothing there on other hosts; returns
/// how many were moved.
pub async fn restart_elsewhere(state: &AppState, lost: &str) -> usize {
    let vms = match store::list_json::<VmRecord>(state.store.as_ref(), "vms/").await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(host = lost, "cannot list the lost host's VMs: {e}");
            return 0;
        }
    };
    let mut moved = 0;
    for (vm, revision) in vms {
        if host_of(state, &vm) != lost || vm.phase != Phase::Ready {
            continue;
        }
        if let Some(why) = stays(&vm) {
            tracing::warn!(vm = %vm.name, host = lost, "stays on the lost host: {why}");
            continue;
        }
        match move_vm(state, vm.clone(), revision, &format!("host {lost} was lost")).await {
            Ok(to) => {
                moved += 1;
                tracing::warn!(vm = %vm.name, from = lost, %to, "started again on another host");
                state.events.emit(
                    "vm",
                    &vm.project,
                    serde_json::json!({"id": vm.id, "name": vm.name, "moved": {"from": lost, "to": to, "why": "its host was lost"}}),
                );
            }
            Err(e) => tracing::error!(vm = %vm.name, host = lost, "cannot start it on another host: {e}"),
        }
    }
    moved
}

/// Records the VM on the host the scheduler picks (intent first), then makes its
/// networks, ports and definition there and starts it if it was meant to run.
async fn move_vm(state: &AppState, mut vm: VmRecord, revision: u64, why: &str) -> Result<String, VmError> {
    let rules = Placement {
        host: None,
        anti_affinity_group: vm.placement.as_ref().and_then(|p| p.anti_affinity_group.clone()),
    };
    let (to, mut placement) = crate::hosts::schedule::place(state, needs(&vm), &rules, None).await?;
    for v in placement.verdicts.iter_mut().filter(|v| v.chosen) {
        v.reason = format!("{} (moved here: {why})", v.reason);
    }
    vm.host = Some(to.clone());
    vm.placement = Some(placement);
    state
        .store
        .compare_and_swap(&vm_key(&vm.id), Some(revision), store::encode(&vm))
        .await?;
    let d = crate::hosts::daemons::of_vm(state, &vm).await?;
    for nic in &vm.nics {
        crate::networks::overlay::on_host(state, &to, &d.netd, &vm.project, &nic.network).await?;
    }
    crate::vms::create::find_image(&d.images, &vm.image).await?;
    d.images
        .lease(&vm.image_digest, &vm.id)
        .await
        .map_err(crate::daemons::upstream)?;
    crate::vms::define::redefine(state, &vm).await?;
    Ok(to)
}

/// What a drain did: the VMs moved off the host, and those that stayed with why.
#[derive(Debug, Default)]
pub struct Drained {
    pub moved: Vec<String>,
    pub stayed: Vec<(String, String)>,
}

/// Moves every VM that keeps nothing on `host` to another host, cold: stopped there as
/// `stop` stops it (the power button, forced after the stop timeout), its VMM, ports,
/// seed and image lease removed there, then made on the host the scheduler picks and
/// started if it was running. Live migration is not built yet: a running guest
/// restarts. VMs with a root disk or volumes on `host` stay (their disks do not move
/// yet). Operation `op` shows each step.
pub async fn drain(state: &AppState, host: &str, op: &str) -> Drained {
    let mut out = Drained::default();
    let vms = match store::list_json::<VmRecord>(state.store.as_ref(), "vms/").await {
        Ok(v) => v,
        Err(e) => {
            out.stayed.push(("*".into(), format!("cannot list the VMs: {e}")));
            return out;
        }
    };
    for (vm, revision) in vms {
        if host_of(state, &vm) != host || vm.phase != Phase::Ready {
            continue;
        }
        if let Some(why) = stays(&vm) {
            out.stayed.push((vm.name.clone(), why.replace("lost", "drained")));
            continue;
        }
        state.ops.progress(op, &format!("moving {} off {host}", vm.name)).await;
        let moved = async {
            let d = crate::hosts::daemons::of_vm(state, &vm).await?;
            if let Ok(live) = d.vmm.get(&vm.id).await {
                if VmAction::Stop.allowed_in(live.status.state) {
                    d.vmm
                        .action(&vm.id, VmAction::Stop, false)
                        .await
                        .map_err(crate::daemons::upstream)?;
                }
            }
            crate::vms::parts::remove_vmm(state, &vm).await?;
            crate::vms::parts::remove_ports(state, &vm).await?;
            crate::vms::parts::remove_seed(state, &vm).await?;
            crate::vms::parts::release_image(state, &vm).await?;
            match move_vm(state, vm.clone(), revision, &format!("host {host} was drained")).await {
                Ok(to) => Ok(to),
                Err(e) => {
                    // Back where it was, rather than nowhere.
                    if let Err(again) = crate::vms::define::redefine(state, &vm).await {
                        tracing::error!(vm = %vm.name, "cannot define it again on {host} either: {again}");
                    }
                    Err(e)
                }
            }
        }
        .await;
        match moved {
            Ok(to) => {
                tracing::info!(vm = %vm.name, from = host, %to, "moved off a drained host");
                out.moved.push(format!("{} -> {to}", vm.name));
            }
            Err(e) => out.stayed.push((vm.name.clone(), e.to_string())),
        }
    }
    out
}
