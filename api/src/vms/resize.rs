//! `PATCH /v1/vms/{id}`: a VM's vCPUs and memory. A running VM grows by hot-plug within
//! the room it was started with (`max_vcpus`, `max_memory_mib`; memory in 128 MiB
//! steps) and keeps running; what it cannot take while it runs (more than its room,
//! giving vCPUs or memory back, a microvm) is refused as `restart_required`, changing
//! nothing, unless the caller asked for the restart (`?restart=true`): then the VM is
//! stopped (the power button, forced after the stop timeout), given its new size and
//! started again. A stopped VM takes the new size at its next start.

use socket_http::ClientError;
use vmm_manager::spec::VmAction;

use crate::daemons::upstream;
use crate::model::{Phase, Vm, VmRecord};
use crate::state::AppState;
use crate::store;
use crate::vms::command::ResizeVmCommand;
use crate::vms::error::VmError;
use crate::vms::records::vm_key;

/// Resizes the VM of `rec` and returns it as it is now.
pub async fn resize(state: &AppState, rec: VmRecord, cmd: ResizeVmCommand, restart: bool) -> Result<Vm, VmError> {
    if rec.phase != Phase::Ready {
        return Err(VmError::NotReady {
            vm: rec.name,
            phase: format!("{:?}", rec.phase).to_lowercase(),
        });
    }
    let (vcpus, memory_mib) = (cmd.vcpus.unwrap_or(rec.vcpus), cmd.memory_mib.unwrap_or(rec.memory_mib));
    let d = crate::hosts::daemons::of_vm(state, &rec).await?;
    let local = crate::hosts::daemons::is_local(state, rec.host.as_deref());
    let host = if local {
        state.host_facts.get_or(|| state.vmm.host()).await
    } else {
        d.vmm.host().await
    }
    .map_err(upstream)?;
    if memory_mib > host.memory_mib {
        return Err(VmError::InsufficientMemory {
            host_mib: host.memory_mib,
            asked: memory_mib,
        });
    }
    let info = match d.vmm.resize(&rec.id, vcpus, memory_mib).await {
        Ok(info) => info,
        Err(ClientError::Api { code, message, .. }) if code == "unsupported" && !restart => {
            return Err(VmError::RestartRequired(message));
        }
        Err(ClientError::Api { code, .. }) if code == "unsupported" => {
            restart_with(&d, &rec.id, vcpus, memory_mib).await?
        }
        Err(e) => return Err(upstream(e).into()),
    };
    let rec = record_size(state, &rec.id, vcpus, memory_mib).await?;
    if local {
        state.live.observe(&info);
    }
    Ok(Vm::from_record(&rec, Some(&info.status), true))
}

/// Stops the VM, gives it its new size, and starts it again (also when the resize
/// fails, with the size it had). Only a running VM gets here: a stopped one takes
/// its new size without a restart.
async fn restart_with(
    d: &crate::hosts::daemons::Daemons,
    id: &str,
    vcpus: u32,
    memory_mib: u64,
) -> Result<vmm_manager::spec::VmInfo, VmError> {
    d.vmm.action(id, VmAction::Stop, false).await.map_err(upstream)?;
    let resized = d.vmm.resize(id, vcpus, memory_mib).await.map_err(upstream);
    let started = d.vmm.action(id, VmAction::Start, false).await.map_err(upstream);
    resized?;
    Ok(started?)
}

/// Writes the new size into the VM's record (its room grows with it when a stopped
/// VM was given more than its room).
pub(crate) async fn record_size(state: &AppState, id: &str, vcpus: u32, memory_mib: u64) -> Result<VmRecord, VmError> {
    let step = vmm_manager::spec::MEMORY_STEP_MIB;
    let updated = store::update_json(state.store.as_ref(), &vm_key(id), |rec: &mut VmRecord| {
        rec.vcpus = vcpus;
        rec.memory_mib = memory_mib;
        if let Some(max) = rec.max_vcpus.as_mut() {
            *max = (*max).max(vcpus);
        }
        if let Some(max) = rec.max_memory_mib.as_mut() {
            if *max < memory_mib || (*max - memory_mib) % step != 0 {
                *max = memory_mib + max.saturating_sub(memory_mib) / step * step;
            }
        }
        true
    })
    .await;
    match updated {
        Err(store::StoreError::Conflict { .. }) => return Err(VmError::Contended),
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    store::get_json::<VmRecord>(state.store.as_ref(), &vm_key(id))
        .await?
        .map(|(rec, _)| rec)
        .ok_or_else(|| VmError::NotFound(id.to_string()))
}
