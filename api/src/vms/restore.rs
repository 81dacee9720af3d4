//! `POST /v1/vms/{id}/restore {snapshot}`: the VM goes back to one of its snapshots.
//! Its VMM is stopped at once, every disk the snapshot holds is rolled back to it
//! (blockd; a volume blockd serves over vhost-user is unexported for that and served
//! again), and then, for a snapshot with memory, a fresh VMM loads the saved state and
//! the guest runs on from that instant; for one without, the VM stays stopped, its
//! disks as they were, as after a power cut at that moment. The VM also takes back the
//! vCPUs and memory it had then.
//!
//! A restore is destructive and runs forwards only: what the disks held since the
//! snapshot is gone once they are rolled back, so there is nothing to undo to. A
//! failure leaves the VM stopped, its operation saying where it stopped.

use std::sync::Arc;

use vmm_manager::spec::{VmAction, VmState};

use crate::daemons::upstream;
use crate::model::{Operation, Phase, VmRecord};
use crate::state::AppState;
use crate::vms::error::VmError;
use crate::vms::records::set_desired_running;
use crate::vms::snapshot::{
    disk_snapshot, disks_of, find, held_by_blockd, state_name, RestoreVm, SnapshotRecord, SnapshotState,
};

/// Checks the request and starts the restore; the operation ends when the VM is back.
pub async fn begin(state: &Arc<AppState>, vm: VmRecord, req: RestoreVm) -> Result<Operation, VmError> {
    if vm.phase != Phase::Ready {
        return Err(VmError::NotReady {
            vm: vm.name,
            phase: format!("{:?}", vm.phase).to_lowercase(),
        });
    }
    let snap = find(state, &vm, &req.snapshot).await?;
    if snap.view.state != SnapshotState::Ready {
        return Err(VmError::SnapshotNotReady {
            vm: vm.name,
            name: req.snapshot,
        });
    }
    // The VM must have the disks the snapshot holds: a volume attached or detached
    // since would be missing from (or left over in) the restored VM.
    let (now, _) = disks_of(state, &vm).await?;
    let names = |d: &[crate::vms::snapshot::SnapshotDisk]| {
        let mut v: Vec<String> = d.iter().map(|d| format!("{} as {}", d.volume, d.disk)).collect();
        v.sort();
        v
    };
    let (then, now) = (names(&snap.view.disks), names(&now));
    if then != now {
        return Err(VmError::DisksChanged {
            vm: vm.name,
            name: req.snapshot,
            detail: format!("it had [{}], it has [{}]", then.join(", "), now.join(", ")),
        });
    }
    set_desired_running(state, &vm.id, snap.view.memory).await?;
    let op = state.ops.start(&vm.project, "vm.restore", "vm", &vm.id).await?;
    let (task_state, op_id) = (state.clone(), op.id.clone());
    tokio::spawn(async move {
        match restore(&task_state, &op_id, &vm, &snap).await {
            Ok(()) => task_state.ops.succeed(&op_id).await,
            Err(e) => {
                tracing::error!(vm = %vm.id, snapshot = %snap.view.name, "restore failed: {e}");
                task_state.ops.fail(&op_id, &(&e).into()).await
            }
        }
    });
    Ok(op)
}

async fn restore(state: &AppState, op: &str, vm: &VmRecord, snap: &SnapshotRecord) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, vm).await?;
    let name = &snap.view.name;
    state.ops.progress(op, "stopping the VM").await;
    let live = d.vmm.get(&vm.id).await.map_err(upstream)?.status.state;
    if !matches!(live, VmState::Stopped | VmState::Failed) {
        d.vmm.action(&vm.id, VmAction::Stop, true).await.map_err(upstream)?;
    }
    state.ops.progress(op, "rolling its disks back").await;
    for (disk, blockd) in snap.view.disks.iter().zip(&snap.blockd) {
        let served = held_by_blockd(vm, &disk.volume);
        if served {
            d.blockd.unexport(blockd, "vhost-user").await.map_err(upstream)?;
        }
        d.blockd
            .rollback(blockd, &disk_snapshot(name))
            .await
            .map_err(upstream)?;
        if served {
            if let Some(a) = vm.volumes.iter().find(|a| a.volume == disk.volume) {
                crate::volumes::work::disk_spec(state, &vm.project, a).await?;
            }
        }
    }
    let info = if snap.view.memory {
        state.ops.progress(op, "loading its memory and devices").await;
        d.vmm.restore_state(&vm.id, &state_name(name)).await.map_err(upstream)?
    } else {
        d.vmm
            .resize(&vm.id, snap.view.vcpus, snap.view.memory_mib)
            .await
            .map_err(upstream)?
    };
    crate::vms::resize::record_size(state, &vm.id, snap.view.vcpus, snap.view.memory_mib).await?;
    state.observe(vm.host.as_deref(), &info);
    Ok(())
}
