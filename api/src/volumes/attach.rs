//! Attaching a volume to a VM: the saga [`VOLUME_ATTACH`]. The volume is claimed for
//! the VM (compare-and-swap: one VM at a time), made reachable the way it is attached
//! (its file, or a vhost-user-blk socket from blockd), hot-plugged into the VM, and
//! recorded in the VM's record. A step that fails unwinds the ones before it; after a
//! crash the reconciler undoes an attach cut short, or finishes one that was recorded.

use serde::{Deserialize, Serialize};

use crate::daemons::upstream;
use crate::model::{AttachVolume, AttachedVolume, VmRecord};
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;
use crate::store;
use crate::volumes::error::VolumeError;
use crate::volumes::records::{claim_key, Attachment};
use crate::volumes::work::{claim, disk_spec, unexport};

/// What an attach's saga carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeAttach {
    /// The VM's record when the attach began, and its revision: the last step records
    /// the volume only if the record did not change meanwhile.
    pub vm: VmRecord,
    pub vm_revision: u64,
    pub request: AttachVolume,
    /// Set by the claim: the disk the VM gets.
    #[serde(default)]
    pub attached: Option<AttachedVolume>,
}

/// Attaches a volume to a VM (hot-plugged while it runs); the saga ends before this
/// returns.
pub async fn attach(
    state: &AppState,
    vm: VmRecord,
    vm_revision: u64,
    request: AttachVolume,
) -> Result<(), VolumeError> {
    if !crate::hosts::daemons::is_local(state, vm.host.as_deref()) {
        return Err(VolumeError::VmOnAnotherHost {
            vm: vm.name,
            host: vm.host.unwrap_or_default(),
            here: state.config.host.name.clone(),
        });
    }
    let context = VolumeAttach {
        vm,
        vm_revision,
        request,
        attached: None,
    };
    let saga = Saga::begin(state, &VOLUME_ATTACH, &uuid::Uuid::new_v4().to_string(), context).await?;
    saga.finish(state).await.map(|_| ())
}

/// Attaching a volume, step by step; once the VM's record has the volume the attach is
/// whole, and a crash finishes it.
pub static VOLUME_ATTACH: SagaDef<VolumeAttach, VolumeError> = SagaDef {
    kind: "volume.attach",
    pivot: 4,
    steps: &[
        Step {
            name: "claim",
            doing: "claiming the volume for the VM",
            run: |state, c| Box::pin(take_claim(state, c)),
            undo: |state, c| Box::pin(drop_claim(state, c)),
        },
        Step {
            name: "disk",
            doing: "making the volume reachable by the VM",
            run: |state, c| Box::pin(make_disk(state, c)),
            undo: |state, c| Box::pin(remove_disk(state, c)),
        },
        Step {
            name: "hot-plug",
            doing: "attaching the disk to the VM",
            run: |state, c| Box::pin(plug(state, c)),
            undo: |state, c| Box::pin(unplug(state, c)),
        },
        Step {
            name: "record",
            doing: "recording the volume in the VM's record",
            run: |state, c| Box::pin(record(state, c)),
            undo: |state, c| Box::pin(unrecord(state, c)),
        },
    ],
};

async fn take_claim(state: &AppState, c: &mut VolumeAttach) -> Result<(), VolumeError> {
    c.attached = Some(claim(state, &c.vm, &c.request, &c.vm.volumes).await?);
    Ok(())
}

/// The claim goes only if it is this VM's: a claim step that failed because another
/// VM holds the volume must leave that VM's claim alone.
async fn drop_claim(state: &AppState, c: &VolumeAttach) -> Result<(), VolumeError> {
    let key = claim_key(&c.vm.project, &c.request.volume);
    if let Some((held, _)) = store::get_json::<Attachment>(state.store.as_ref(), &key).await? {
        if held.vm == c.vm.id {
            state.store.delete(&key).await?;
        }
    }
    Ok(())
}

fn ours(c: &VolumeAttach) -> Result<&AttachedVolume, VolumeError> {
    c.attached.as_ref().ok_or(VolumeError::NoClaim)
}

async fn make_disk(state: &AppState, c: &mut VolumeAttach) -> Result<(), VolumeError> {
    disk_spec(state, &c.vm.project, ours(c)?).await.map(|_| ())
}

async fn remove_disk(state: &AppState, c: &VolumeAttach) -> Result<(), VolumeError> {
    match &c.attached {
        Some(a) => unexport(state, &c.vm.project, a).await,
        None => Ok(()),
    }
}

async fn plug(state: &AppState, c: &mut VolumeAttach) -> Result<(), VolumeError> {
    // Asked again (it is idempotent): the socket or file the VM gets.
    let disk = disk_spec(state, &c.vm.project, ours(c)?).await?;
    state.vmm.attach_disk(&c.vm.id, &disk).await.map_err(upstream)?;
    Ok(())
}

async fn unplug(state: &AppState, c: &VolumeAttach) -> Result<(), VolumeError> {
    let Some(a) = &c.attached else {
        return Ok(());
    };
    match state.vmm.detach_disk(&c.vm.id, &a.disk).await {
        Ok(_) => Ok(()),
        // No such VM or disk: nothing is plugged.
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(upstream(e).into()),
    }
}

async fn record(state: &AppState, c: &mut VolumeAttach) -> Result<(), VolumeError> {
    let a = ours(c)?.clone();
    let mut vm = c.vm.clone();
    if !vm.volumes.iter().any(|v| v.volume == a.volume) {
        vm.volumes.push(a);
    }
    state
        .store
        .compare_and_swap(&format!("vms/{}", vm.id), Some(c.vm_revision), store::encode(&vm))
        .await?;
    Ok(())
}

async fn unrecord(state: &AppState, c: &VolumeAttach) -> Result<(), VolumeError> {
    let Some(a) = &c.attached else {
        return Ok(());
    };
    store::update_json(
        state.store.as_ref(),
        &format!("vms/{}", c.vm.id),
        |vm: &mut VmRecord| {
            let before = vm.volumes.len();
            vm.volumes.retain(|v| !(v.volume == a.volume && v.disk == a.disk));
            vm.volumes.len() != before
        },
    )
    .await?;
    Ok(())
}
