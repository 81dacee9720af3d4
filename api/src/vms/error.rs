//! What goes wrong with VMs, and the one place it becomes the public error envelope
//! (`From<&VmError> for ApiError`; the handlers in [`crate::vms::http`] use it through
//! `?`, the sagas' operations record it).

use socket_http::ApiError;
use vmm_manager::spec::{VmAction, MIN_MEMORY_MIB};

use crate::daemons::DaemonError;
use crate::model::{HypervisorKind, NameError};
use crate::saga::error::SagaError;
use crate::store::StoreError;
use crate::volumes::error::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The request fails a check of its own (vcpus, memory floor, cmdline, a size, an
    /// address, cloud-init keys or user-data).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("vnc needs the qemu hypervisor: Cloud Hypervisor has no framebuffer")]
    VncNeedsQemu,
    #[error("machine is a QEMU option; Cloud Hypervisor has one machine type")]
    MachineNeedsQemu,
    #[error("vnc needs machine q35: microvm has no display device")]
    VncNeedsQ35,
    /// More memory than the host has.
    #[error("memory_mib must be between {MIN_MEMORY_MIB} and the host's {host_mib} MiB, got {asked}")]
    InsufficientMemory { host_mib: u64, asked: u64 },
    /// The hypervisor asked for is missing or cannot work on this host.
    #[error("hypervisor {kind} cannot run VMs on this host: {reason}")]
    HypervisorUnavailable { kind: HypervisorKind, reason: String },
    #[error("no hypervisor is installed: install qemu-system-x86 or cloud-hypervisor")]
    NoHypervisor,
    /// imaged does not have (and cannot import) the image the request names.
    #[error("unknown image {name:?}: {reason}")]
    UnknownImage { name: String, reason: String },
    #[error("image {image:?} has no kernel that {hypervisor} can boot")]
    NoKernel { image: String, hypervisor: HypervisorKind },
    #[error("unknown network {0:?}")]
    UnknownNetwork(String),
    /// The cloud-init seed cannot be composed for a reason other than the request's.
    #[error("{0}")]
    Seed(String),
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("VM {0:?} does not exist")]
    NotFound(String),
    /// Deleting a VM whose create is still running.
    #[error("VM {0} is still being created; retry when its create operation finishes")]
    StillCreating(String),
    /// The VM belongs to a managed service, which alone deletes it.
    #[error("VM {vm:?} belongs to {by}: delete that instead")]
    Managed { vm: String, by: String },
    /// The VM's phase, or its state in vmm-manager, does not allow the action now.
    #[error("VM {vm} is {state}: cannot {action}")]
    ActionRefused {
        vm: String,
        state: String,
        action: VmAction,
    },
    /// Its record changed under every compare-and-swap tried.
    #[error("the VM's record kept changing; retry")]
    Contended,
    /// Defining a lost VM again: netd made its port again on another TAP.
    #[error("port {port} came back as TAP {tap}, the VM was defined with {defined}")]
    PortMoved { port: String, tap: String, defined: String },
    /// Defining a lost VM again: its root disk is gone, and is never made anew empty.
    #[error("the root disk {0} is gone; the VM cannot be defined again")]
    RootDiskGone(String),
    #[error("the volume pool keeps no files (memory pool): root disks need a file or LVM pool")]
    PoolKeepsNoFiles,
    #[error("VM {vm} has snapshots that VMs or volumes were made from ({clones}): delete those first")]
    HasClones { vm: String, clones: String },
    #[error("VM {vm} already has a snapshot {name:?}")]
    SnapshotExists { vm: String, name: String },
    #[error("VM {vm} has no snapshot {name:?}")]
    SnapshotNotFound { vm: String, name: String },
    #[error("snapshot {name:?} of VM {vm} is still being taken")]
    SnapshotNotReady { vm: String, name: String },
    /// A restore needs the VM to have the disks the snapshot holds.
    #[error("VM {vm}'s disks changed since snapshot {name:?} ({detail}): attach or detach volumes to match it first")]
    DisksChanged { vm: String, name: String, detail: String },
    /// Being created or deleted: its size cannot change now.
    #[error("VM {vm} is {phase}: it cannot be resized now")]
    NotReady { vm: String, phase: String },
    /// A running VM cannot take the new size while it runs, and no restart was asked.
    #[error("{0}; ask again with ?restart=true to restart the VM with the new size")]
    RestartRequired(String),
    /// The scheduler found no host for the VM; the message names each host and why.
    #[error("no host can take the VM: {0}")]
    NoHostFits(String),
    /// Its network on its host.
    #[error(transparent)]
    Network(#[from] crate::networks::error::NetworkError),
    /// Its host cannot be reached (lost, or out of this api's reach).
    #[error(transparent)]
    Host(#[from] crate::hosts::error::HostError),
    /// The listing could not be written as JSON.
    #[error(transparent)]
    Render(serde_json::Error),
    /// One of its data volumes.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Saga(#[from] SagaError),
}

impl From<&VmError> for ApiError {
    fn from(e: &VmError) -> Self {
        use VmError::*;
        let message = e.to_string();
        match e {
            Invalid(_)
            | VncNeedsQemu
            | MachineNeedsQemu
            | VncNeedsQ35
            | InsufficientMemory { .. }
            | HypervisorUnavailable { .. }
            | NoHypervisor
            | UnknownImage { .. }
            | NoKernel { .. }
            | UnknownNetwork(_) => ApiError::unprocessable(message),
            InvalidName(e) => ApiError::from(e),
            NotFound(_) => ApiError::not_found(message),
            NameTaken(_)
            | StillCreating(_)
            | Managed { .. }
            | ActionRefused { .. }
            | Contended
            | PortMoved { .. }
            | RootDiskGone(_)
            | PoolKeepsNoFiles => ApiError::conflict(message),
            NotReady { .. }
            | HasClones { .. }
            | SnapshotExists { .. }
            | SnapshotNotReady { .. }
            | DisksChanged { .. } => ApiError::conflict(message),
            SnapshotNotFound { .. } => ApiError::not_found(message),
            RestartRequired(_) => ApiError::new(http::StatusCode::CONFLICT, "restart_required", message),
            NoHostFits(_) => ApiError::new(http::StatusCode::CONFLICT, "no_host_fits", message),
            Host(e) => ApiError::from(e),
            Network(e) => ApiError::from(e),
            Seed(_) | Render(_) => ApiError::internal(message),
            Volume(e) => ApiError::from(e),
            Daemon(e) => ApiError::from(e),
            Store(e) => crate::envelope::of_store(e),
            Saga(e) => ApiError::from(e),
        }
    }
}

crate::envelope::by_value!(VmError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vm_error_has_its_public_status_and_code() {
        let s = String::from;
        let bad_json = serde_json::from_str::<u8>("x").expect_err("not JSON");
        let table = [
            (
                VmError::Invalid(s("vcpus must be between 1 and 8, got 0")),
                422,
                "invalid",
            ),
            (
                VmError::InvalidName(NameError {
                    kind: "VM",
                    name: s("Web"),
                }),
                422,
                "invalid",
            ),
            (VmError::VncNeedsQemu, 422, "invalid"),
            (VmError::MachineNeedsQemu, 422, "invalid"),
            (VmError::VncNeedsQ35, 422, "invalid"),
            (
                VmError::InsufficientMemory {
                    host_mib: 1024,
                    asked: 4096,
                },
                422,
                "invalid",
            ),
            (
                VmError::HypervisorUnavailable {
                    kind: HypervisorKind::CloudHypervisor,
                    reason: s("no /dev/kvm"),
                },
                422,
                "invalid",
            ),
            (VmError::NoHypervisor, 422, "invalid"),
            (
                VmError::UnknownImage {
                    name: s("tiny"),
                    reason: s("no such image"),
                },
                422,
                "invalid",
            ),
            (
                VmError::NoKernel {
                    image: s("disk-only"),
                    hypervisor: HypervisorKind::Qemu,
                },
                422,
                "invalid",
            ),
            (VmError::UnknownNetwork(s("lab")), 422, "invalid"),
            (VmError::Seed(s("image store is damaged")), 500, "internal"),
            (VmError::NameTaken(s("web")), 409, "conflict"),
            (VmError::NotFound(s("web")), 404, "not_found"),
            (VmError::StillCreating(s("web")), 409, "conflict"),
            (
                VmError::ActionRefused {
                    vm: s("web"),
                    state: s("stopped"),
                    action: VmAction::Pause,
                },
                409,
                "conflict",
            ),
            (VmError::Contended, 409, "conflict"),
            (
                VmError::PortMoved {
                    port: s("p"),
                    tap: s("htap1"),
                    defined: s("htap0"),
                },
                409,
                "conflict",
            ),
            (VmError::RootDiskGone(s("vm-1-root")), 409, "conflict"),
            (VmError::PoolKeepsNoFiles, 409, "conflict"),
            (
                VmError::RestartRequired(s("no room for 4 vCPUs")),
                409,
                "restart_required",
            ),
            (
                VmError::NotReady {
                    vm: s("web"),
                    phase: s("creating"),
                },
                409,
                "conflict",
            ),
            (
                VmError::NoHostFits(s("a: cordoned; b: needs 4096 MiB of memory, 1024 MiB free")),
                409,
                "no_host_fits",
            ),
            (
                VmError::Host(crate::hosts::error::HostError::Lost {
                    name: s("b"),
                    reason: s("its lease lapsed"),
                }),
                503,
                "unavailable",
            ),
            (VmError::Render(bad_json), 500, "internal"),
            (VmError::Volume(VolumeError::Unknown(s("data"))), 422, "invalid"),
            (
                VmError::Daemon(DaemonError::Documented {
                    status: axum::http::StatusCode::BAD_GATEWAY,
                    code: "vmm_error",
                    message: s("qemu died"),
                    details: None,
                }),
                502,
                "vmm_error",
            ),
            (
                VmError::Store(StoreError::Conflict {
                    key: s("vms/1"),
                    expected: Some(1),
                    found: Some(2),
                }),
                409,
                "conflict",
            ),
            (VmError::Saga(SagaError::Injected("ports")), 500, "internal"),
        ];
        crate::envelope::assert_public(table);
    }
}
