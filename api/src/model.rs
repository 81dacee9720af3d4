//! The public API's resource types (one serde type per resource, strict on input).

mod jail;
mod nic;
mod operation;
mod placement;
pub use jail::VmJail;
pub use nic::NicIngress;
pub use operation::{
    saga_key, Accepted, Operation, OperationStatus, ProgressDetail, SagaProgress, SagaRecord, SagaState,
};
pub use placement::{Placement, PlacementRecord};

use serde::{Deserialize, Serialize};

/// `POST /v1/vms` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// DNS-label style name, unique per project; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    pub image: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Room to grow without a restart (`PATCH /v1/vms/{id}`): the most vCPUs the
    /// running VM may be given. Default: the host's CPU count (at least `vcpus`).
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// The most memory the running VM may be given: `memory_mib` plus a multiple of
    /// 128 MiB. Default: as much as the host has under Cloud Hypervisor; none under
    /// QEMU (its memory hot-plug slots slow every boot), so give it to grow a QEMU VM's
    /// memory without a restart.
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// `cloud-hypervisor` or `qemu`; the configured default when absent.
    #[serde(default)]
    pub hypervisor: Option<String>,
    /// Extra kernel command line arguments appended to the image's.
    #[serde(default)]
    pub cmdline_append: Option<String>,
    /// QEMU only: give the VM a display reachable over VNC.
    #[serde(default)]
    pub vnc: bool,
    /// QEMU only: the machine type, `q35` (default) or `microvm`.
    #[serde(default)]
    pub machine: Option<QemuMachine>,
    /// Network interfaces; when absent, one NIC on the `default` network (if it exists).
    #[serde(default)]
    pub nics: Option<Vec<NicRequest>>,
    /// Boot right after creation (default true).
    #[serde(default = "yes")]
    pub start: bool,
    /// Data volumes to attach: names, or `{"volume": name, "via": "vhost-user"}`.
    #[serde(default)]
    pub volumes: Vec<VolumeRef>,
    /// Size of the root disk for images that have one, e.g. "20G" (default: the
    /// image's size). The root disk is a copy-on-write clone of the image.
    #[serde(default)]
    pub disk_size: Option<String>,
    /// OpenSSH public keys for the image's default user (through cloud-init).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// cloud-init user-data: a `#cloud-config` document (merged with hearth's
    /// hostname, network and keys) or a script.
    #[serde(default)]
    pub user_data: Option<String>,
    /// `VM@SNAPSHOT`: a new VM from another VM's snapshot (same image): its root disk
    /// is a copy-on-write clone of the snapshot's. It boots afresh with its own MAC and
    /// address. Data volumes are not cloned: clone their `vm-SNAPSHOT` snapshots with
    /// `POST /v1/volumes/{name}/clone` and attach them.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Relative CPU weight, 1..=10000 (default 100): under contention a VM with 300
    /// gets three times the CPU time of one with 100 (its cgroup's `cpu.weight`).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// The most CPU time the VM may use, in CPUs (e.g. 1.5); no quota when absent.
    #[serde(default)]
    pub cpu_limit: Option<f64>,
    /// Relative I/O weight, 1..=10000 (default 100), where the host's cgroups have one.
    #[serde(default)]
    pub io_weight: Option<u32>,
    /// Where the VM may go when there are several hosts (the scheduler decides the
    /// rest, and `GET /v1/vms/{id}` says why).
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Set only by a managed service creating its VM; never read from a request.
    #[serde(skip)]
    #[schema(ignore)]
    pub managed_by: Option<String>,
}

/// Which VMM runs a VM (the api's own: vmm-manager's enum stays behind the edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    CloudHypervisor,
    Qemu,
}

impl From<HypervisorKind> for vmm_manager::HypervisorKind {
    fn from(h: HypervisorKind) -> Self {
        match h {
            HypervisorKind::CloudHypervisor => Self::CloudHypervisor,
            HypervisorKind::Qemu => Self::Qemu,
        }
    }
}

impl From<vmm_manager::HypervisorKind> for HypervisorKind {
    fn from(h: vmm_manager::HypervisorKind) -> Self {
        match h {
            vmm_manager::HypervisorKind::CloudHypervisor => Self::CloudHypervisor,
            vmm_manager::HypervisorKind::Qemu => Self::Qemu,
        }
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<vmm_manager::HypervisorKind>().map(Into::into)
    }
}

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(vmm_manager::HypervisorKind::from(*self).as_str())
    }
}

/// QEMU machine types a VM can have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QemuMachine {
    #[default]
    Q35,
    Microvm,
}

impl From<QemuMachine> for vmm_manager::spec::QemuMachine {
    fn from(m: QemuMachine) -> Self {
        match m {
            QemuMachine::Q35 => Self::Q35,
            QemuMachine::Microvm => Self::Microvm,
        }
    }
}

/// A volume named in `POST /v1/vms`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum VolumeRef {
    Name(String),
    Full(AttachVolume),
}

impl VolumeRef {
    pub fn into_attach(self) -> AttachVolume {
        match self {
            VolumeRef::Name(volume) => AttachVolume {
                volume,
                via: None,
                read_only: false,
            },
            VolumeRef::Full(a) => a,
        }
    }
}

/// How a VM reaches a volume's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AttachVia {
    /// The hypervisor opens the volume's file or device itself.
    File,
    /// blockd serves it on a vhost-user-blk socket (also volumes on other hosts).
    VhostUser,
}

/// One volume to attach.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    pub volume: String,
    /// `file` or `vhost-user`; default: `file` for local volumes, `vhost-user` for
    /// remote ones (the only way to reach them).
    #[serde(default)]
    pub via: Option<AttachVia>,
    #[serde(default)]
    pub read_only: bool,
}

/// A volume attached to a VM, as recorded on the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttachedVolume {
    pub volume: String,
    /// The disk id inside the VM (`vol0`, `vol1`, …).
    pub disk: String,
    pub via: AttachVia,
    pub read_only: bool,
}

/// One NIC of `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    pub network: String,
    /// A static address in the network; IPAM picks one when absent.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Ipv4, example = "10.77.0.2")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Set only by a managed service (a database's `allowed_cidrs`); never read from a request.
    #[serde(skip)]
    #[schema(ignore)]
    pub ingress: Option<NicIngress>,
}

/// A VM NIC as recorded and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Nic {
    pub network: String,
    pub port: String,
    pub tap: String,
    pub mac: String,
    #[schema(value_type = String, format = Ipv4, example = "10.77.0.2")]
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    #[schema(value_type = String, format = Ipv4, example = "10.77.0.2")]
    pub gateway: std::net::Ipv4Addr,
    /// The guest configures itself by DHCP (else from kernel arguments).
    pub dhcp: bool,
    /// What may reach it, where a managed service limits that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<NicIngress>,
}

fn default_project() -> String {
    crate::auth::keys::DEFAULT_PROJECT.into()
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn yes() -> bool {
    true
}

/// Where the api wants a VM to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Creating,
    Ready,
    Deleting,
}

/// The stored desired state of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Room to grow while running; `None` in records from before resizing existed
    /// (such a VM grows only with a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    pub hypervisor: HypervisorKind,
    #[serde(default)]
    pub cmdline_append: Option<String>,
    #[serde(default)]
    pub vnc: bool,
    #[serde(default)]
    pub machine: QemuMachine,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub volumes: Vec<AttachedVolume>,
    /// The image's digest when the VM was created (its lease in imaged).
    #[serde(default)]
    pub image_digest: String,
    /// The blockd volume holding the root disk (a clone of the image), if the image has a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<RootDisk>,
    /// The VM gets a cloud-init NoCloud seed disk.
    #[serde(default)]
    pub seed: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    pub phase: Phase,
    pub created_at_ms: u64,
    /// The user's last word on whether the VM runs: set by a create that starts it and
    /// by start, reboot and resume, cleared by stop (a guest powering itself off does
    /// not change it). The reconciler starts a VM it had to define again only when set.
    /// `None` in records written before it existed: the reconciler fills it in from
    /// the VM's state when vmm-manager still knows the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_running: Option<bool>,
    /// CPU and I/O shares asked for at create.
    #[serde(default, skip_serializing_if = "vmm_manager::spec::VmLimits::is_default")]
    pub limits: vmm_manager::spec::VmLimits,
    /// The managed service the VM belongs to (`database/<name>`): it gets a guest
    /// agent channel, and only that service deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    /// The host it runs on; `None` in records from before hosts were recorded (the
    /// host of the api that made it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementRecord>,
}

/// A VM's root disk: a blockd volume cloned from the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RootDisk {
    pub volume: String,
    pub size_bytes: Option<u64>,
    /// Made from another VM's snapshot (`from_snapshot`): the disk snapshot it is a
    /// copy-on-write clone of, `volume@snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A VM as the API shows it: the record plus what the host reports.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub project: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The most vCPUs and memory the VM can be given while it runs (`PATCH`); more
    /// needs a restart.
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub hypervisor: HypervisorKind,
    /// `creating`, `deleting`, a vmm-manager state (`stopped`, `starting`, `running`,
    /// `paused`, `stopping`, `failed`), or `unknown` when vmm-manager cannot be reached.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub volumes: Vec<AttachedVolume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<RootDisk>,
    #[serde(default)]
    pub image_digest: String,
    /// QEMU VMs with a display reachable over VNC.
    #[serde(default)]
    pub vnc: bool,
    pub created_at_ms: u64,
    /// The running VMM's jail: its user, its cgroup and the limits in force (absent
    /// while it does not run, and where jailing is turned off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<VmJail>,
    /// The managed service the VM belongs to (`database/<name>`); only that service
    /// changes or deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    /// The host it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why it was placed there: the scheduler's verdict on every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementRecord>,
}

impl Vm {
    pub fn from_record(r: &VmRecord, live: Option<&vmm_manager::spec::VmStatus>, reachable: bool) -> Self {
        let (state, reason, pid) = match (r.phase, live) {
            (Phase::Creating, _) => ("creating".to_string(), None, None),
            (Phase::Deleting, _) => ("deleting".to_string(), None, None),
            (Phase::Ready, Some(status)) => (status.state.as_str().to_string(), status.reason.clone(), status.pid),
            (Phase::Ready, None) if reachable => (
                "missing".to_string(),
                Some("vmm-manager does not know this VM".into()),
                None,
            ),
            (Phase::Ready, None) => ("unknown".to_string(), Some("vmm-manager is unreachable".into()), None),
        };
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            project: r.project.clone(),
            image: r.image.clone(),
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            max_vcpus: r.max_vcpus.unwrap_or(r.vcpus).max(r.vcpus),
            max_memory_mib: r.max_memory_mib.unwrap_or(r.memory_mib).max(r.memory_mib),
            hypervisor: r.hypervisor,
            state,
            reason,
            pid,
            nics: r.nics.clone(),
            volumes: r.volumes.clone(),
            root_disk: r.root_disk.clone(),
            image_digest: r.image_digest.clone(),
            vnc: r.vnc,
            created_at_ms: r.created_at_ms,
            jail: live
                .filter(|_| r.phase == Phase::Ready)
                .and_then(|s| s.jail.as_ref())
                .map(Into::into),
            managed_by: r.managed_by.clone(),
            host: r.host.clone(),
            placement: r.placement.clone(),
        }
    }
}

/// `PATCH /v1/vms/{id}` body: the size the VM should have.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    /// vCPUs: hot-plugged while it runs, up to `max_vcpus`.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory in MiB: hot-plugged while it runs in steps of 128 MiB, up to
    /// `max_memory_mib`. A running VM does not give memory or vCPUs back: that needs
    /// a restart.
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// Validates a resource name: a DNS label (lowercase letters, digits, '-', 1-63 bytes,
/// starting and ending alphanumeric).
/// What the daemons call a project's network or volume: its own name in `default`,
/// `<project>.<name>` elsewhere (project and resource names cannot contain '.', so
/// these never collide). The daemons know no projects.
pub fn host_name(project: &str, name: &str) -> String {
    if project == crate::auth::keys::DEFAULT_PROJECT {
        name.to_string()
    } else {
        format!("{project}.{name}")
    }
}

/// The inverse of [`host_name`]: the name `project` knows a daemon's resource by.
pub fn name_in_project<'a>(project: &str, host: &'a str) -> &'a str {
    host.strip_prefix(project)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(host)
}

/// A name that breaks the rules names of projects, VMs, networks, volumes and the
/// like follow (see [`validate_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} name {name:?}: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
)]
pub struct NameError {
    /// What the name is of: `VM`, `volume`, `project`…
    pub kind: &'static str,
    pub name: String,
}

/// A name is 1-63 lowercase letters, digits and '-', starting and ending with a letter
/// or digit (a DNS label: hosts name resources after it).
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            name: name.to_string(),
        })
    }
}

/// A bad name is the request's fault: 422 `invalid`.
impl From<&NameError> for socket_http::ApiError {
    fn from(e: &NameError) -> Self {
        Self::unprocessable(e.to_string())
    }
}

crate::envelope::by_value!(NameError);

#[cfg(test)]
mod tests {
    use super::{host_name, name_in_project};

    #[test]
    fn daemon_names_carry_the_project_outside_default() {
        assert_eq!(host_name("default", "lab"), "lab");
        assert_eq!(host_name("alpha", "lab"), "alpha.lab");
        for project in ["default", "alpha"] {
            assert_eq!(name_in_project(project, &host_name(project, "lab")), "lab");
        }
        // Another project's prefix, or one that is only a prefix of a name, stays.
        assert_eq!(name_in_project("alpha", "beta.lab"), "beta.lab");
        assert_eq!(name_in_project("alp", "alpha.lab"), "alpha.lab");
    }
}
