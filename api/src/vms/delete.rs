//! Deleting a VM: the saga [`VM_DELETE`], forward-only. The record is marked `deleting`
//! first (so nothing else starts on the VM), then its VMM, ports, root disk, seed,
//! volume attachments and image lease go, and the records last. A step that fails, or
//! a crash, leaves the saga for the reconciler to finish; nothing is ever put back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{Operation, Phase, Vm, VmRecord};
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;
use crate::store;
use crate::vms::error::VmError;
use crate::vms::parts;
use crate::vms::records::{name_key, vm_key};

/// What a VM delete's saga carries: the record as it was when the delete began.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmDelete {
    pub rec: VmRecord,
}

/// Marks the VM `deleting` (compare-and-swap at `rev`, so a concurrent change wins or
/// loses whole) and runs the saga in a task. A VM still being created is refused.
pub async fn begin(state: &Arc<AppState>, rec: VmRecord, rev: u64) -> Result<(Operation, Vm), VmError> {
    let (op, vm, saga) = start(state, rec, rev).await?;
    let task_state = state.clone();
    // The saga records its operation's end itself.
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Ok((op, vm))
}

/// Deletes a VM to the end, in this task (a managed service removing its own VM).
pub async fn run(state: &AppState, rec: VmRecord, rev: u64) -> Result<(), VmError> {
    let (_, _, saga) = start(state, rec, rev).await?;
    saga.finish(state).await.map(|_| ())
}

async fn start(
    state: &AppState,
    mut rec: VmRecord,
    rev: u64,
) -> Result<(Operation, Vm, Saga<VmDelete, VmError>), VmError> {
    if rec.phase == Phase::Creating {
        return Err(VmError::StillCreating(rec.name));
    }
    // Its root disk's snapshots are the origin of VMs made from them.
    let clones = crate::vms::snapshot::made_from(state, &rec).await?;
    if !clones.is_empty() {
        return Err(VmError::HasClones {
            vm: rec.name,
            clones: clones.join(", "),
        });
    }
    rec.phase = Phase::Deleting;
    state
        .store
        .compare_and_swap(&vm_key(&rec.id), Some(rev), store::encode(&rec))
        .await?;
    let id = uuid::Uuid::new_v4().to_string();
    let vm = Vm::from_record(&rec, None, true);
    let mut saga = Saga::begin(state, &VM_DELETE, &id, VmDelete { rec }).await?;
    let (project, vm_id) = (saga.context.rec.project.clone(), saga.context.rec.id.clone());
    let op = saga.start_operation(state, &project, "vm", &vm_id).await?;
    Ok((op, vm, saga))
}

fn nothing_to_undo<'a>(_: &'a AppState, _: &'a VmDelete) -> futures_util::future::BoxFuture<'a, Result<(), VmError>> {
    Box::pin(async { Ok(()) })
}

/// Deleting a VM, step by step (each idempotent: a resumed step that already ran
/// finds nothing to remove).
pub static VM_DELETE: SagaDef<VmDelete, VmError> = SagaDef {
    kind: "vm.delete",
    pivot: 0,
    steps: &[
        Step {
            name: "vmm",
            doing: "stopping and removing the VMM",
            run: |state, c| Box::pin(parts::remove_vmm(state, &c.rec)),
            undo: nothing_to_undo,
        },
        Step {
            name: "ports",
            doing: "removing its ports",
            run: |state, c| Box::pin(parts::remove_ports(state, &c.rec)),
            undo: nothing_to_undo,
        },
        Step {
            name: "root-disk",
            doing: "removing its root disk",
            run: |state, c| Box::pin(parts::remove_root_disk(state, &c.rec)),
            undo: nothing_to_undo,
        },
        Step {
            name: "seed",
            doing: "removing its cloud-init seed",
            run: |state, c| Box::pin(parts::remove_seed(state, &c.rec)),
            undo: nothing_to_undo,
        },
        Step {
            name: "volumes",
            doing: "detaching its volumes",
            run: |state, c| Box::pin(parts::release_volumes(state, &c.rec)),
            undo: nothing_to_undo,
        },
        Step {
            name: "image-lease",
            doing: "releasing the image",
            run: |state, c| Box::pin(parts::release_image(state, &c.rec)),
            undo: nothing_to_undo,
        },
        Step {
            name: "records",
            doing: "removing its records",
            run: |state, c| Box::pin(remove_records(state, c)),
            undo: nothing_to_undo,
        },
    ],
};

async fn remove_records(state: &AppState, c: &mut VmDelete) -> Result<(), VmError> {
    state.store.delete(&vm_key(&c.rec.id)).await?;
    // The name only when it is still this VM's (a delete resumed late must not free a
    // name a new VM took meanwhile).
    let key = name_key(&c.rec.project, &c.rec.name);
    if let Some((holder, _)) = store::get_json::<String>(state.store.as_ref(), &key).await? {
        if holder == c.rec.id {
            state.store.delete(&key).await?;
        }
    }
    Ok(())
}
