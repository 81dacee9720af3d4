//! VM snapshots: `POST /v1/vms/{id}/snapshots {name, memory}` takes, at one paused
//! instant, a crash-consistent copy-on-write snapshot of every disk the VM has on this
//! host's pool (its root disk and its volumes, through blockd) and, with `memory`, the
//! VM's whole state (vmm-manager: Cloud Hypervisor `vm.snapshot`, QEMU migration to a
//! file). The saga [`VM_SNAPSHOT`] pauses the VM, takes both, and resumes it; a step
//! that fails undoes the ones before, so a failed snapshot leaves the VM running and
//! nothing taken. [`crate::vms::restore`] takes a VM back to one.
//!
//! A snapshot is recorded at `vm-snapshots/{vm id}/{name}`; on blockd each disk's
//! snapshot is named `vm-{name}`, in vmm-manager the saved state `snap-{name}`.

use serde::{Deserialize, Serialize};
use vmm_manager::spec::{VmAction, VmState};

use crate::daemons::upstream;
use crate::model::{validate_name, AttachVia, VmRecord};
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;
use crate::store;
use crate::vms::error::VmError;

/// `POST /v1/vms/{id}/snapshots` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// DNS-label style, unique per VM.
    pub name: String,
    /// Also the VM's memory and devices: a restore resumes the guest where it was.
    /// Without, the disks only (a restore leaves the VM stopped).
    #[serde(default)]
    pub memory: bool,
}

/// `POST /v1/vms/{id}/restore` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreVm {
    /// One of this VM's snapshots.
    pub snapshot: String,
}

/// Whether a snapshot is whole yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Creating,
    Ready,
}

/// One disk a snapshot holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotDisk {
    /// The volume's name (for the root disk, its root volume).
    pub volume: String,
    /// The disk's id inside the VM (`root`, `vol0`, …).
    pub disk: String,
}

/// A VM snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmSnapshot {
    pub name: String,
    pub vm_id: String,
    pub memory: bool,
    pub state: SnapshotState,
    pub created_at_ms: u64,
    /// What it takes on the host: the saved memory and what its disk snapshots hold.
    pub size_bytes: u64,
    /// The VM's size then; a restore gives it back.
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<SnapshotDisk>,
}

/// The record: the view plus the blockd names of its disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    #[serde(flatten)]
    pub view: VmSnapshot,
    /// blockd's name of each disk's volume, in `view.disks` order.
    pub blockd: Vec<String>,
}

pub(crate) fn snapshot_key(vm_id: &str, name: &str) -> String {
    format!("vm-snapshots/{vm_id}/{name}")
}

/// The disk snapshot's name on blockd, the saved state's in vmm-manager.
pub(crate) fn disk_snapshot(name: &str) -> String {
    format!("vm-{name}")
}
pub(crate) fn state_name(name: &str) -> String {
    format!("snap-{name}")
}

/// The VM's snapshot `name`.
pub async fn find(state: &AppState, vm: &VmRecord, name: &str) -> Result<SnapshotRecord, VmError> {
    store::get_json::<SnapshotRecord>(state.store.as_ref(), &snapshot_key(&vm.id, name))
        .await?
        .map(|(r, _)| r)
        .ok_or_else(|| VmError::SnapshotNotFound {
            vm: vm.name.clone(),
            name: name.to_string(),
        })
}

/// A data volume a VM made `from_snapshot` gets: `name`, a clone of `volume`'s disk
/// snapshot `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeClone {
    pub name: String,
    pub volume: String,
    pub snapshot: String,
}

/// What a VM made `from_snapshot` is made of: the root disk's origin
/// (`volume@snapshot`; `None` when that VM had no root disk) and a clone of each data
/// volume the snapshot holds, named `<new VM>-<volume>`.
#[derive(Debug, Clone, Default)]
pub struct FromSnapshot {
    pub root_origin: Option<String>,
    pub clones: Vec<VolumeClone>,
}

/// What a VM named `new_vm` made `from_snapshot` clones, after checking the snapshot:
/// of a VM of this project, ready, of the same image.
pub async fn origin_for(
    state: &AppState,
    project: &str,
    (vm, snapshot): (&str, &str),
    image: &str,
    new_vm: &str,
) -> Result<FromSnapshot, VmError> {
    let refused = |why: String| VmError::Invalid(format!("from_snapshot {vm}@{snapshot}: {why}"));
    let source = match crate::vms::records::resolve(state, project, vm).await {
        Ok((rec, _)) => rec,
        Err(VmError::NotFound(_)) => return Err(refused("no such VM".into())),
        Err(e) => return Err(e),
    };
    let snap = match find(state, &source, snapshot).await {
        Ok(s) => s,
        Err(VmError::SnapshotNotFound { .. }) => return Err(refused("the VM has no such snapshot".into())),
        Err(e) => return Err(e),
    };
    if snap.view.state != SnapshotState::Ready {
        return Err(refused("the snapshot is still being taken".into()));
    }
    if source.image != image {
        return Err(refused(format!("its VM runs image {:?}, not {image:?}", source.image)));
    }
    let root_volume = source.root_disk.as_ref().map(|r| r.volume.clone());
    let mut clones = Vec::new();
    for d in snap
        .view
        .disks
        .iter()
        .filter(|d| Some(&d.volume) != root_volume.as_ref())
    {
        let name = format!("{new_vm}-{}", d.volume);
        validate_name("volume", &name).map_err(|e| {
            refused(format!(
                "the clone of volume {:?} cannot be named {name:?}: {e}",
                d.volume
            ))
        })?;
        match crate::volumes::records::find_record(state, project, &name).await {
            Err(crate::volumes::error::VolumeError::NotFound(_)) => {}
            Ok(_) => {
                return Err(VmError::Volume(crate::volumes::error::VolumeError::AlreadyExists(name)));
            }
            Err(e) => return Err(e.into()),
        }
        clones.push(VolumeClone {
            name,
            volume: d.volume.clone(),
            snapshot: disk_snapshot(snapshot),
        });
    }
    Ok(FromSnapshot {
        root_origin: root_volume.map(|v| format!("{v}@{}", disk_snapshot(snapshot))),
        clones,
    })
}

/// Makes the data volumes of a VM made `from_snapshot` (each a copy-on-write clone of
/// its volume's disk snapshot), recording each in `made` as it is made.
pub(crate) async fn make_clones(
    state: &AppState,
    project: &str,
    clones: &[VolumeClone],
    made: &mut Vec<String>,
) -> Result<(), VmError> {
    for c in clones {
        let req = crate::volumes::command::CreateVolumeCommand {
            name: c.name.clone(),
            origin: crate::volumes::command::Origin::Snapshot {
                volume: c.volume.clone(),
                snapshot: c.snapshot.clone(),
                size_bytes: None,
            },
        };
        crate::volumes::work::create_now(state, project, req, None).await?;
        made.push(c.name.clone());
    }
    Ok(())
}

/// Removes the clones a create made (`made`: never a volume of that name someone else
/// made meanwhile; a clone made just before a crash that kept the create from recording
/// it stays, an ordinary volume the user sees).
pub(crate) async fn remove_clones(state: &AppState, project: &str, made: &[String]) -> Result<(), VmError> {
    for name in made {
        match crate::volumes::work::remove(state, project, name).await {
            Ok(()) | Err(crate::volumes::error::VolumeError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What was made from one of `vm`'s snapshots and still depends on it: VMs whose
/// root disks are clones of its root disk's snapshots (`VM name`), and volumes cloned
/// from its data volumes' snapshots (`volume name`, a VM made `from_snapshot` gets
/// those).
pub async fn made_from(state: &AppState, vm: &VmRecord) -> Result<Vec<String>, VmError> {
    let d = crate::hosts::daemons::of_vm(state, vm).await?;
    let mut out = Vec::new();
    if let Some(root) = &vm.root_disk {
        let prefix = format!("{}@", root.volume);
        out.extend(
            store::list_json::<VmRecord>(state.store.as_ref(), "vms/")
                .await?
                .into_iter()
                .filter(|(r, _)| {
                    r.root_disk
                        .as_ref()
                        .and_then(|d| d.origin.as_deref())
                        .is_some_and(|o| o.starts_with(&prefix))
                })
                .map(|(r, _)| format!("VM {}", r.name)),
        );
    }
    let root = vm.root_disk.as_ref().map(|r| r.volume.as_str());
    for snap in records(state, vm).await? {
        let wanted = disk_snapshot(&snap.view.name);
        for b in snap.blockd.iter().filter(|b| Some(b.as_str()) != root) {
            let Ok(v) = d.blockd.volume(b).await else { continue };
            for s in v.snapshots.iter().filter(|s| s.name == wanted) {
                out.extend(
                    s.clones
                        .iter()
                        .map(|c| format!("volume {}", crate::model::name_in_project(&vm.project, c))),
                );
            }
        }
    }
    Ok(out)
}

/// The VM's snapshot records, by name.
async fn records(state: &AppState, vm: &VmRecord) -> Result<Vec<SnapshotRecord>, VmError> {
    let prefix = format!("vm-snapshots/{}/", vm.id);
    let mut out: Vec<SnapshotRecord> = store::list_json::<SnapshotRecord>(state.store.as_ref(), &prefix)
        .await?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    out.sort_by(|a, b| a.view.name.cmp(&b.view.name));
    Ok(out)
}

/// The VM's snapshots, by name.
pub async fn list(state: &AppState, vm: &VmRecord) -> Result<Vec<VmSnapshot>, VmError> {
    Ok(records(state, vm).await?.into_iter().map(|r| r.view).collect())
}

/// The disks of `vm` a snapshot takes: its root disk and its volumes on this host's
/// pool (a volume served by another host's blockd is left out).
pub(crate) async fn disks_of(state: &AppState, vm: &VmRecord) -> Result<(Vec<SnapshotDisk>, Vec<String>), VmError> {
    let mut disks = Vec::new();
    let mut blockd = Vec::new();
    if let Some(root) = &vm.root_disk {
        disks.push(SnapshotDisk {
            volume: root.volume.clone(),
            disk: "root".into(),
        });
        blockd.push(root.volume.clone());
    }
    for a in &vm.volumes {
        let rec = crate::volumes::records::find_record(state, &vm.project, &a.volume).await?;
        if rec.remote.is_some() {
            continue;
        }
        disks.push(SnapshotDisk {
            volume: a.volume.clone(),
            disk: a.disk.clone(),
        });
        blockd.push(crate::volumes::records::bname(&rec));
    }
    Ok((disks, blockd))
}

/// What a snapshot's saga carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshotting {
    pub vm: VmRecord,
    pub record: SnapshotRecord,
    /// Set by `pause`: the VM ran before, and is resumed after.
    #[serde(default)]
    pub paused_it: bool,
}

/// Checks the request and starts the snapshot's saga; the operation it returns ends
/// when the snapshot is whole (or undone).
pub async fn begin(
    state: &std::sync::Arc<AppState>,
    vm: VmRecord,
    req: CreateSnapshot,
) -> Result<(crate::model::Operation, VmSnapshot), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &vm).await?;
    validate_name("snapshot", &req.name)?;
    if vm.phase != crate::model::Phase::Ready {
        return Err(VmError::NotReady {
            vm: vm.name,
            phase: format!("{:?}", vm.phase).to_lowercase(),
        });
    }
    let live = d.vmm.get(&vm.id).await.map_err(upstream)?.status.state;
    if req.memory && !matches!(live, VmState::Running | VmState::Paused) {
        return Err(VmError::ActionRefused {
            vm: vm.name,
            state: live.as_str().to_string(),
            action: VmAction::Pause,
        });
    }
    let (disks, blockd) = disks_of(state, &vm).await?;
    let record = SnapshotRecord {
        view: VmSnapshot {
            name: req.name.clone(),
            vm_id: vm.id.clone(),
            memory: req.memory,
            state: SnapshotState::Creating,
            created_at_ms: vmm_manager::spec::now_ms(),
            size_bytes: 0,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disks,
        },
        blockd,
    };
    let (project, vm_id) = (vm.project.clone(), vm.id.clone());
    let context = Snapshotting {
        vm,
        record,
        paused_it: false,
    };
    let mut saga = Saga::begin(state, &VM_SNAPSHOT, &uuid::Uuid::new_v4().to_string(), context).await?;
    // The name is claimed before the 202: a taken name is a 409 now.
    saga.run_until(state, Some("pause")).await?;
    let op = match saga.start_operation(state, &project, "vm", &vm_id).await {
        Ok(op) => op,
        Err(e) => {
            saga.abandon(state, &e).await;
            return Err(e.into());
        }
    };
    let shown = saga.context.record.view.clone();
    let task_state = state.clone();
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Ok((op, shown))
}

/// Taking a snapshot, step by step. Once the disks are taken the snapshot is whole:
/// a crash then resumes the VM and records it ready.
pub static VM_SNAPSHOT: SagaDef<Snapshotting, VmError> = SagaDef {
    kind: "vm.snapshot",
    pivot: 4,
    steps: &[
        Step {
            name: "record",
            doing: "recording the snapshot",
            run: |state, c| Box::pin(claim(state, c)),
            undo: |state, c| Box::pin(unclaim(state, c)),
        },
        Step {
            name: "pause",
            doing: "pausing the VM",
            run: |state, c| Box::pin(pause(state, c)),
            undo: |state, c| Box::pin(resume(state, c)),
        },
        Step {
            name: "memory",
            doing: "saving the VM's memory and devices",
            run: |state, c| Box::pin(save_memory(state, c)),
            undo: |state, c| Box::pin(drop_memory(state, c)),
        },
        Step {
            name: "disks",
            doing: "snapshotting its disks",
            run: |state, c| Box::pin(snapshot_disks(state, c)),
            undo: |state, c| Box::pin(drop_disks(state, c)),
        },
        Step {
            name: "resume",
            doing: "resuming the VM",
            run: |state, c| Box::pin(resume(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: "ready",
            doing: "recording the snapshot ready",
            run: |state, c| Box::pin(mark_ready(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
    ],
};

async fn claim(state: &AppState, c: &mut Snapshotting) -> Result<(), VmError> {
    let key = snapshot_key(&c.vm.id, &c.record.view.name);
    state
        .store
        .compare_and_swap(&key, None, store::encode(&c.record))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => VmError::SnapshotExists {
                vm: c.vm.name.clone(),
                name: c.record.view.name.clone(),
            },
            other => other.into(),
        })?;
    Ok(())
}

/// The record goes only while it is still this saga's (creating).
async fn unclaim(state: &AppState, c: &Snapshotting) -> Result<(), VmError> {
    let key = snapshot_key(&c.vm.id, &c.record.view.name);
    if let Some((held, _)) = store::get_json::<SnapshotRecord>(state.store.as_ref(), &key).await? {
        if held.view.state == SnapshotState::Creating && held.view.created_at_ms == c.record.view.created_at_ms {
            state.store.delete(&key).await?;
        }
    }
    Ok(())
}

async fn pause(state: &AppState, c: &mut Snapshotting) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.vm).await?;
    let live = d.vmm.get(&c.vm.id).await.map_err(upstream)?.status.state;
    if live == VmState::Running {
        d.vmm.action(&c.vm.id, VmAction::Pause, false).await.map_err(upstream)?;
        c.paused_it = true;
    }
    Ok(())
}

async fn resume(state: &AppState, c: &Snapshotting) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.vm).await?;
    if !c.paused_it {
        return Ok(());
    }
    let live = d.vmm.get(&c.vm.id).await.map_err(upstream)?.status.state;
    if live == VmState::Paused {
        d.vmm
            .action(&c.vm.id, VmAction::Resume, false)
            .await
            .map_err(upstream)?;
    }
    Ok(())
}

async fn save_memory(state: &AppState, c: &mut Snapshotting) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.vm).await?;
    if c.record.view.memory {
        let saved = d
            .vmm
            .save_state(&c.vm.id, &state_name(&c.record.view.name))
            .await
            .map_err(upstream)?;
        c.record.view.size_bytes = saved.size_bytes;
    }
    Ok(())
}

async fn drop_memory(state: &AppState, c: &Snapshotting) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.vm).await?;
    match d.vmm.delete_state(&c.vm.id, &state_name(&c.record.view.name)).await {
        Err(e) if !e.is_not_found() => Err(upstream(e).into()),
        _ => Ok(()),
    }
}

async fn snapshot_disks(state: &AppState, c: &mut Snapshotting) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.vm).await?;
    let snap = disk_snapshot(&c.record.view.name);
    let mut size = 0;
    for b in &c.record.blockd {
        size += d.blockd.snapshot(b, &snap).await.map_err(upstream)?.allocated_bytes;
    }
    c.record.view.size_bytes += size;
    Ok(())
}

async fn drop_disks(state: &AppState, c: &Snapshotting) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.vm).await?;
    let snap = disk_snapshot(&c.record.view.name);
    for b in &c.record.blockd {
        match d.blockd.delete_snapshot(b, &snap).await {
            Err(e) if !e.is_not_found() => return Err(upstream(e).into()),
            _ => {}
        }
    }
    Ok(())
}

async fn mark_ready(state: &AppState, c: &mut Snapshotting) -> Result<(), VmError> {
    c.record.view.state = SnapshotState::Ready;
    let key = snapshot_key(&c.vm.id, &c.record.view.name);
    state.store.put(&key, store::encode(&c.record)).await?;
    Ok(())
}

/// Deletes a snapshot: its disk snapshots, its saved state, its record.
pub async fn delete(state: &AppState, vm: &VmRecord, name: &str) -> Result<(), VmError> {
    let rec = find(state, vm, name).await?;
    if rec.view.state != SnapshotState::Ready {
        return Err(VmError::SnapshotNotReady {
            vm: vm.name.clone(),
            name: name.to_string(),
        });
    }
    let c = Snapshotting {
        vm: vm.clone(),
        record: rec,
        paused_it: false,
    };
    drop_disks(state, &c).await?;
    drop_memory(state, &c).await?;
    state.store.delete(&snapshot_key(&vm.id, name)).await?;
    Ok(())
}

/// Every snapshot of a VM being deleted (its disks' snapshots go with its volumes'
/// own deletion where those are its own; a data volume keeps living, so its VM
/// snapshots are removed here).
pub async fn delete_all(state: &AppState, vm: &VmRecord) -> Result<(), VmError> {
    for rec in records(state, vm).await? {
        let name = rec.view.name.clone();
        let c = Snapshotting {
            vm: vm.clone(),
            record: rec,
            paused_it: false,
        };
        drop_disks(state, &c).await?;
        state.store.delete(&snapshot_key(&vm.id, &name)).await?;
    }
    Ok(())
}

/// Whether `via` is a vhost-user attachment (blockd holds the volume open).
pub(crate) fn held_by_blockd(vm: &VmRecord, volume: &str) -> bool {
    vm.volumes
        .iter()
        .any(|a| a.volume == volume && a.via == AttachVia::VhostUser)
}
