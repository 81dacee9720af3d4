//! Creating a VM: the checks of the request, and the saga [`VM_CREATE`] whose steps
//! claim the name, record the VM, make its ports, claim its volumes, lease its image
//! (all before the `202`, so a taken name or address is refused at once), then clone
//! its root disk, write its seed, define and start it. A create that fails is undone
//! step by step: nothing of it is left in the store or any daemon.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_manager::spec::{DiskSpec, VmAction, VmState};

use crate::model::HypervisorKind;

use crate::daemons::upstream;
use crate::model::{AttachVolume, CreateVm, NicIngress, NicRequest, Operation, Phase, RootDisk, Vm, VmRecord};
use crate::networks::DEFAULT_NETWORK;
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;
use crate::store;
use crate::vms::command::CreateVmCommand;
use crate::vms::define::{define_with, kernel_for, root_disk, seed_disk};
use crate::vms::error::VmError;
use crate::vms::parts;
use crate::vms::records::{name_key, vm_key};

/// Chooses the hypervisor: the request's, else the configured default, falling back to
/// QEMU where Cloud Hypervisor is not installed.
pub(crate) fn choose_hypervisor(
    state: &AppState,
    hypervisors: &[vmm_manager::service::HypervisorAvailability],
    requested: Option<HypervisorKind>,
) -> Result<HypervisorKind, VmError> {
    let available = |k: HypervisorKind| {
        hypervisors
            .iter()
            .find(|h| HypervisorKind::from(h.kind) == k)
            .filter(|h| h.available)
            .is_some()
    };
    let reason = |k: HypervisorKind| {
        hypervisors
            .iter()
            .find(|h| HypervisorKind::from(h.kind) == k)
            .and_then(|h| h.detail.clone())
            .unwrap_or_default()
    };
    match requested {
        Some(kind) if available(kind) => Ok(kind),
        Some(kind) => Err(VmError::HypervisorUnavailable {
            kind,
            reason: reason(kind),
        }),
        None => {
            let kind = state.config.default_hypervisor;
            if available(kind) {
                Ok(kind)
            } else if available(HypervisorKind::Qemu) {
                Ok(HypervisorKind::Qemu)
            } else {
                Err(VmError::NoHypervisor)
            }
        }
    }
}

/// Looks an image up in imaged; an unknown image is the request's fault (422).
pub(crate) async fn find_image(
    images: &imaged::client::ImagedClient,
    name: &str,
) -> Result<imaged::ImageInfo, VmError> {
    imaged::validate_name(name).map_err(|e| VmError::Invalid(e.to_string()))?;
    images.get(name).await.map_err(|e| {
        if e.is_not_found() {
            VmError::UnknownImage {
                name: name.to_string(),
                reason: e.to_string(),
            }
        } else {
            upstream(e).into()
        }
    })
}

fn port_id(vm_id: &str, index: usize) -> String {
    format!("{vm_id}-{index}")
}

/// Creates the ports of a VM's NICs; on failure removes the ones already made.
pub(crate) async fn attach_nics(
    state: &AppState,
    host: &str,
    d: &crate::hosts::daemons::Daemons,
    project: &str,
    vm_id: &str,
    requests: &[crate::model::NicRequest],
) -> Result<Vec<crate::model::Nic>, VmError> {
    let mut nics = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let made = async {
            let host_network = crate::model::host_name(project, &req.network);
            let (net, spans) = crate::networks::overlay::on_host(state, host, &d.netd, project, &req.network)
                .await?
                .ok_or_else(|| VmError::UnknownNetwork(req.network.clone()))?;
            if let Some(ip) = req.ip {
                if !net.spec.subnet.contains(&ip) {
                    return Err(VmError::Invalid(format!(
                        "address {ip} is outside network {}'s subnet {}",
                        req.network, net.spec.subnet
                    )));
                }
            }
            // Across hosts, the api hands the address out (once for the whole network).
            let ip = match req.ip {
                None if spans => Some(
                    crate::networks::overlay::pick_address(state, &net.spec, net.gateway, project, &req.network, vm_id)
                        .await?,
                ),
                ip => ip,
            };
            let spec = netd::network::PortSpec {
                network: host_network.clone(),
                mac: None,
                ip,
                queues: 1,
                ingress: req.ingress.as_ref().map(NicIngress::to_netd),
            };
            let port = d.netd.ensure_port(&port_id(vm_id, i), &spec).await.map_err(upstream)?;
            Ok(crate::model::Nic {
                network: req.network.clone(),
                port: port.id,
                tap: port.tap,
                mac: port.mac,
                ip: port.ip,
                prefix: port.prefix,
                gateway: port.gateway,
                dhcp: net.spec.dhcp,
                ingress: req.ingress.clone(),
            })
        }
        .await;
        match made {
            Ok(nic) => nics.push(nic),
            Err(e) => {
                detach_nics(d, &nics).await;
                return Err(e);
            }
        }
    }
    Ok(nics)
}

/// Removes a VM's ports (TAPs and addresses).
pub(crate) async fn detach_nics(d: &crate::hosts::daemons::Daemons, nics: &[crate::model::Nic]) {
    for nic in nics {
        if let Err(e) = d.netd.delete_port(&nic.port).await {
            tracing::error!(port = %nic.port, "cannot remove port: {e}");
        }
    }
}

/// What a VM create's saga carries from step to step (recorded with its progress).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmCreate {
    /// The VM as it will be recorded; `nics` and `volumes` fill in as they are made.
    pub rec: VmRecord,
    pub image: imaged::ImageInfo,
    pub nic_requests: Vec<NicRequest>,
    pub volume_requests: Vec<AttachVolume>,
    /// Data volumes to clone from the snapshot the VM is made from (attached too: they
    /// are in `volume_requests`), and those made so far.
    #[serde(default)]
    pub clones: Vec<crate::vms::snapshot::VolumeClone>,
    #[serde(default)]
    pub clones_made: Vec<String>,
    /// The root disk and seed, once made.
    #[serde(default)]
    pub boot: Vec<DiskSpec>,
    pub start: bool,
}

/// Checks a create request, then runs the saga's first steps (the name, the record,
/// ports, volume claims, the image lease: what can refuse the request with a 409 or
/// 422) before answering, and the rest (disks, definition, start) in a task.
pub async fn begin(state: &Arc<AppState>, project: &str, req: CreateVm) -> Result<(Operation, Vm), VmError> {
    let context = prepare(state, project, req).await?;
    let id = context.rec.id.clone();
    let mut saga = Saga::begin(state, &VM_CREATE, &uuid::Uuid::new_v4().to_string(), context).await?;
    saga.run_until(state, Some(ROOT_DISK)).await?;
    let op = match saga.start_operation(state, project, "vm", &id).await {
        Ok(op) => op,
        Err(e) => {
            // Not accepted: undone now, as a failed step would be.
            saga.abandon(state, &e).await;
            return Err(e.into());
        }
    };
    let vm = Vm::from_record(&saga.context.rec, None, true);
    let task_state = state.clone();
    // The saga records its operation's end itself.
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Ok((op, vm))
}

/// Creates a VM to the end (a managed service's own VM, from within its saga): the
/// whole create saga in this task, with its operation; the VM as recorded.
pub async fn run(state: &AppState, project: &str, req: CreateVm) -> Result<VmRecord, VmError> {
    let context = prepare(state, project, req).await?;
    let id = context.rec.id.clone();
    let mut saga = Saga::begin(state, &VM_CREATE, &uuid::Uuid::new_v4().to_string(), context).await?;
    if let Err(e) = saga.start_operation(state, project, "vm", &id).await {
        saga.abandon(state, &e).await;
        return Err(e.into());
    }
    Ok(saga.finish(state).await?.rec)
}

/// Checks a create request against the host and the image: the saga's context.
async fn prepare(state: &AppState, project: &str, req: CreateVm) -> Result<VmCreate, VmError> {
    let req = CreateVmCommand::try_from(req)?;
    let (id, name) = (req.id.clone(), req.name.clone());
    // Where it goes: the scheduler's choice among the hosts, unless its volumes or the
    // VM it is made from tie it to one.
    let pinned = pinned_host(state, project, &req).await?;
    let needs = hearth_placement::Resources {
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        disk_bytes: match &req.disk_size {
            Some((_, bytes)) => *bytes,
            None => state
                .images
                .get(&req.image)
                .await
                .ok()
                .and_then(|i| i.disk.map(|d| d.virtual_size))
                .unwrap_or(0),
        },
    };
    let (host_name_, placement) = crate::hosts::schedule::place(state, needs, &req.placement, pinned).await?;
    let d = crate::hosts::daemons::on(state, Some(&host_name_)).await?;
    // The host's facts from its vmm-manager, not from the machine the api runs on.
    let host = if crate::hosts::daemons::is_local(state, Some(&host_name_)) {
        state.host_facts.get_or(|| state.vmm.host()).await
    } else {
        d.vmm.host().await
    }
    .map_err(upstream)?;
    let host_mib = host.memory_mib;
    if req.memory_mib > host_mib {
        return Err(VmError::InsufficientMemory {
            host_mib,
            asked: req.memory_mib,
        });
    }
    let hypervisor = choose_hypervisor(state, &host.hypervisors, req.hypervisor)?;
    // Room to grow. vCPUs: as many as the host has, by default (free: measured, no
    // slower boot). Memory: all the host has under Cloud Hypervisor (free too), none
    // under QEMU unless asked, because QEMU's memory hot-plug slots cost a guest
    // ~0.2 s of every boot under TCG (~10% of the tiny guest's; docs/architecture.md).
    let max_vcpus = req
        .max_vcpus
        .unwrap_or_else(|| host.cpus.clamp(req.vcpus, vmm_manager::spec::MAX_VCPUS));
    let step = vmm_manager::spec::MEMORY_STEP_MIB;
    let max_memory_mib = match req.max_memory_mib {
        Some(m) if m > host_mib => {
            return Err(VmError::Invalid(format!(
                "max_memory_mib {m} is more than the host's {host_mib} MiB"
            )))
        }
        Some(m) => m,
        None if hypervisor == HypervisorKind::CloudHypervisor => {
            req.memory_mib + (host_mib - req.memory_mib) / step * step
        }
        None => req.memory_mib,
    };
    if req.vnc && hypervisor != HypervisorKind::Qemu {
        return Err(VmError::VncNeedsQemu);
    }
    if req.machine.is_some() && hypervisor != HypervisorKind::Qemu {
        return Err(VmError::MachineNeedsQemu);
    }
    let machine = req.machine.unwrap_or_default();
    let from = match &req.from_snapshot {
        Some((vm, snap)) => crate::vms::snapshot::origin_for(state, project, (vm, snap), &req.image, &name).await?,
        None => Default::default(),
    };
    let origin = from.root_origin.clone();
    let mut volume_requests = req.volumes.clone();
    volume_requests.extend(from.clones.iter().map(|c| AttachVolume {
        volume: c.name.clone(),
        via: None,
        read_only: false,
    }));
    let image = find_image(&d.images, &req.image).await?;
    kernel_for(&image, hypervisor)?;
    let disk_size = match (&req.disk_size, &image.disk) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(VmError::Invalid(format!(
                "image {:?} has no root disk; disk_size applies to images that have one",
                req.image
            )))
        }
        (Some((s, bytes)), Some(d)) => {
            if *bytes < d.virtual_size {
                return Err(VmError::Invalid(format!(
                    "disk_size {s} is smaller than image {:?} ({} bytes)",
                    req.image, d.virtual_size
                )));
            }
            Some(*bytes)
        }
    };
    // Images with a root disk are cloud images: they get a cloud-init seed, as does any
    // VM given keys or user-data (checked by the command).
    let seed = image.disk.is_some() || req.user_data.is_some() || !req.ssh_keys.is_empty();

    let nic_requests = match req.nics.clone() {
        Some(n) => n,
        None if crate::networks::work::exists(state, project, DEFAULT_NETWORK).await? => {
            vec![NicRequest {
                network: DEFAULT_NETWORK.into(),
                ip: None,
                ingress: None,
            }]
        }
        None => vec![],
    };
    let rec = VmRecord {
        id: id.clone(),
        name: name.clone(),
        project: project.into(),
        image: req.image.clone(),
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        max_vcpus: Some(max_vcpus),
        max_memory_mib: Some(max_memory_mib),
        hypervisor,
        cmdline_append: req.cmdline_append.clone(),
        vnc: req.vnc,
        machine,
        nics: vec![],
        volumes: vec![],
        image_digest: image.digest.clone(),
        root_disk: image.disk.as_ref().map(|_| RootDisk {
            volume: format!("vm-{id}-root"),
            size_bytes: disk_size,
            origin: origin.clone(),
        }),
        seed,
        ssh_keys: req.ssh_keys.clone(),
        user_data: req.user_data.clone(),
        phase: Phase::Creating,
        created_at_ms: vmm_manager::spec::now_ms(),
        desired_running: Some(req.start),
        limits: req.limits.clone(),
        managed_by: req.managed_by.clone(),
        host: Some(host_name_),
        placement: Some(placement),
    };
    Ok(VmCreate {
        rec,
        image,
        nic_requests,
        volume_requests,
        clones: from.clones,
        clones_made: vec![],
        boot: vec![],
        start: req.start,
    })
}

/// The host a new VM must go to, and why: its data volumes' host, or the host of the
/// VM it is made from (volumes do not span hosts yet).
async fn pinned_host(
    state: &AppState,
    project: &str,
    req: &CreateVmCommand,
) -> Result<Option<(String, String)>, VmError> {
    if let Some((vm, _)) = &req.from_snapshot {
        if let Ok((src, _)) = crate::vms::records::resolve(state, project, vm).await {
            let host = crate::hosts::schedule::host_of(state, &src).to_string();
            return Ok(Some((
                host,
                format!("it is made from a snapshot of VM {vm}, which lives here"),
            )));
        }
    }
    if !req.volumes.is_empty() {
        // Volumes live where the api that made them runs: on this api's host.
        let names: Vec<&str> = req.volumes.iter().map(|v| v.volume.as_str()).collect();
        return Ok(Some((
            state.config.host.name.clone(),
            format!("its volumes ({}) live here", names.join(", ")),
        )));
    }
    Ok(None)
}

const ROOT_DISK: &str = "root-disk";

/// Creating a VM, step by step. Everything up to `recorded` runs before the `202`;
/// once `ready` has run, the VM is whole and a crash resumes the create (it is
/// started if it was to be) instead of undoing it.
pub static VM_CREATE: SagaDef<VmCreate, VmError> = SagaDef {
    kind: "vm.create",
    pivot: 10,
    steps: &[
        Step {
            name: "name",
            doing: "claiming the name",
            run: |state, c| Box::pin(claim_name(state, c)),
            undo: |state, c| Box::pin(free_name(state, c)),
        },
        Step {
            name: "record",
            doing: "recording the VM",
            run: |state, c| Box::pin(put_record(state, &c.rec)),
            undo: |state, c| Box::pin(delete_record(state, c)),
        },
        Step {
            name: "ports",
            doing: "making its ports",
            run: |state, c| Box::pin(make_ports(state, c)),
            undo: |state, c| Box::pin(remove_ports(state, c)),
        },
        Step {
            name: "volumes",
            doing: "claiming its volumes",
            run: |state, c| Box::pin(claim_volumes(state, c)),
            undo: |state, c| {
                Box::pin(async move {
                    parts::release_volumes(state, &c.rec).await?;
                    crate::vms::snapshot::remove_clones(state, &c.rec.project, &c.clones_made).await
                })
            },
        },
        Step {
            name: "image-lease",
            doing: "leasing the image",
            run: |state, c| Box::pin(lease_image(state, c)),
            undo: |state, c| Box::pin(parts::release_image(state, &c.rec)),
        },
        Step {
            name: "recorded",
            doing: "recording its ports and volumes",
            run: |state, c| Box::pin(put_record(state, &c.rec)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: ROOT_DISK,
            doing: "cloning the root disk from the image",
            run: |state, c| Box::pin(make_root_disk(state, c)),
            undo: |state, c| Box::pin(parts::remove_root_disk(state, &c.rec)),
        },
        Step {
            name: "seed",
            doing: "writing the cloud-init seed",
            run: |state, c| Box::pin(make_seed(state, c)),
            undo: |state, c| Box::pin(parts::remove_seed(state, &c.rec)),
        },
        Step {
            name: "define",
            doing: "defining the VM",
            run: |state, c| Box::pin(define_vm(state, c)),
            undo: |state, c| Box::pin(parts::remove_vmm(state, &c.rec)),
        },
        Step {
            name: "ready",
            doing: "recording the VM ready",
            run: |state, c| Box::pin(mark_ready(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: "start",
            doing: "starting the VMM",
            run: |state, c| Box::pin(start_vm(state, c)),
            // Its VMM goes with the definition.
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
    ],
};

async fn claim_name(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    let (project, name) = (&c.rec.project, &c.rec.name);
    state
        .store
        .compare_and_swap(&name_key(project, name), None, store::encode(&c.rec.id))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => VmError::NameTaken(name.clone()),
            other => other.into(),
        })?;
    Ok(())
}

/// Frees the name only when this VM holds it (the step fails when another VM does).
async fn free_name(state: &AppState, c: &VmCreate) -> Result<(), VmError> {
    let key = name_key(&c.rec.project, &c.rec.name);
    if let Some((holder, rev)) = store::get_json::<String>(state.store.as_ref(), &key).await? {
        if holder == c.rec.id {
            // A compare-and-delete would be exact; the holder cannot change meanwhile,
            // as only this VM's saga frees its claim.
            let _ = rev;
            state.store.delete(&key).await?;
        }
    }
    Ok(())
}

async fn put_record(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    state.store.put(&vm_key(&rec.id), store::encode(rec)).await?;
    Ok(())
}

async fn delete_record(state: &AppState, c: &VmCreate) -> Result<(), VmError> {
    state.store.delete(&vm_key(&c.rec.id)).await?;
    Ok(())
}

async fn make_ports(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.rec).await?;
    let host = crate::hosts::schedule::host_of(state, &c.rec).to_string();
    c.rec.nics = attach_nics(state, &host, &d, &c.rec.project, &c.rec.id, &c.nic_requests).await?;
    Ok(())
}

/// Every port this VM may have made, by the names derived from its id (a crash may
/// have cut the step short before its ports were recorded).
async fn remove_ports(state: &AppState, c: &VmCreate) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.rec).await?;
    for i in 0..c.nic_requests.len() {
        d.netd.delete_port(&port_id(&c.rec.id, i)).await.map_err(upstream)?;
    }
    Ok(())
}

async fn claim_volumes(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    let clones = c.clones.clone();
    crate::vms::snapshot::make_clones(state, &c.rec.project, &clones, &mut c.clones_made).await?;
    for v in &c.volume_requests {
        let a = crate::volumes::work::claim(state, &c.rec, v, &c.rec.volumes).await?;
        c.rec.volumes.push(a);
    }
    Ok(())
}

async fn lease_image(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.rec).await?;
    d.images.lease(&c.image.digest, &c.rec.id).await.map_err(upstream)?;
    Ok(())
}

async fn make_root_disk(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    c.boot.extend(root_disk(state, &c.rec, &c.image).await?);
    Ok(())
}

async fn make_seed(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    c.boot.extend(seed_disk(state, &c.rec).await?);
    Ok(())
}

async fn define_vm(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    define_with(state, &c.rec, &c.image, c.boot.clone()).await
}

async fn mark_ready(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    c.rec.phase = Phase::Ready;
    put_record(state, &c.rec).await
}

async fn start_vm(state: &AppState, c: &mut VmCreate) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, &c.rec).await?;
    if !c.start {
        return Ok(());
    }
    let vm = d.vmm.get(&c.rec.id).await.map_err(upstream)?;
    // Resumed after a crash, the VMM may already run.
    if !matches!(vm.status.state, VmState::Stopped | VmState::Failed) {
        return Ok(());
    }
    let started = d
        .vmm
        .action(&c.rec.id, VmAction::Start, false)
        .await
        .map_err(upstream)?;
    state.observe(c.rec.host.as_deref(), &started);
    Ok(())
}
