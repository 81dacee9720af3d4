//! The VM spec vmm-manager is handed (by the api, or by hand), and the state it reports.
//!
//! The spec is hypervisor-neutral: each driver maps it to its own configuration
//! (Cloud Hypervisor's `VmConfig`, QEMU's command line).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    CloudHypervisor,
    Qemu,
}

impl HypervisorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HypervisorKind::CloudHypervisor => "cloud-hypervisor",
            HypervisorKind::Qemu => "qemu",
        }
    }
}

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cloud-hypervisor" => Ok(HypervisorKind::CloudHypervisor),
            "qemu" => Ok(HypervisorKind::Qemu),
            other => Err(format!(
                "unknown hypervisor {other:?}: use \"cloud-hypervisor\" or \"qemu\""
            )),
        }
    }
}

/// Everything needed to run one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Stable identifier; also the name of the VM's state directory.
    pub id: String,
    /// Human name, for logs and process titles.
    pub name: String,
    pub hypervisor: HypervisorKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Room to grow while it runs: the most vCPUs it may be given without a restart
    /// (`None`: `vcpus`, no hot-plug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// The most memory it may be given without a restart (`None`: `memory_mib`). The
    /// headroom above `memory_mib` is hot-plugged in steps of [`MEMORY_STEP_MIB`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// Kernel to boot directly: a bzImage or PVH ELF for QEMU, a PVH ELF for Cloud Hypervisor.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub qemu: QemuOptions,
    /// CPU and I/O shares of a jailed VM (its memory limit follows from its size).
    #[serde(default, skip_serializing_if = "VmLimits::is_default")]
    pub limits: VmLimits,
    /// A control channel to an agent in the guest (managed services): a virtio-serial
    /// port under QEMU, vsock under Cloud Hypervisor, both reached through
    /// `agent.sock` in the VM's directory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_channel: bool,
}

/// A VM's share of the host, enforced by its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLimits {
    /// Relative CPU weight, 1..=10000 (default 100): under contention, a VM with 300
    /// gets three times the CPU time of one with 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// The most CPU time the VM may use, in CPUs (1.5: one and a half CPUs' worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// Relative I/O weight, 1..=10000 (default 100), where the host's cgroups have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
}

impl VmLimits {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A block device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub id: String,
    pub source: DiskSource,
    #[serde(default)]
    pub readonly: bool,
}

/// Where a disk's blocks live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DiskSource {
    /// An image file on the host.
    File { path: PathBuf, format: DiskFormat },
    /// A vhost-user-blk backend listening on a Unix socket.
    VhostUser { socket: PathBuf },
}

/// Image file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// A network interface backed by a TAP device created beforehand (by netd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub id: String,
    pub tap: String,
    pub mac: String,
    /// Queue pairs of the TAP (1 unless it was created multi-queue).
    #[serde(default = "one")]
    pub queue_pairs: u32,
    /// A jailed VMM's view only: the descriptors its jailer opened for the TAP's
    /// queues (never part of a spec).
    #[serde(skip)]
    pub fds: Vec<i32>,
}

fn one() -> u32 {
    1
}

/// QEMU-only choices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuOptions {
    #[serde(default)]
    pub machine: QemuMachine,
    /// Give the VM a VGA display served over VNC on a Unix socket.
    #[serde(default)]
    pub vnc: bool,
}

/// QEMU machine types hearth supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QemuMachine {
    #[default]
    Q35,
    Microvm,
}

/// Why a spec was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("invalid VM id {0:?}: use 1-64 lowercase letters, digits and '-'")]
    Id(String),
    #[error("vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u32, max: u32 },
    #[error("memory_mib must be between 64 and the host's {host_mib} MiB, got {got}")]
    Memory { got: u64, host_mib: u64 },
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Device(String),
}

/// Largest vCPU count accepted (Cloud Hypervisor's and QEMU q35's practical limit).
pub const MAX_VCPUS: u32 = 254;

/// The guest agent's virtio-serial port name (QEMU) and vsock port (Cloud Hypervisor);
/// the guest agent's own constants are the same (checked by a test in the api).
pub const AGENT_SERIAL_PORT: &str = "org.hearth.agent.0";
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Memory is hot-plugged in whole Linux memory blocks: Cloud Hypervisor refuses any
/// other addition ("not a valid size"), and a guest can online only whole blocks.
pub const MEMORY_STEP_MIB: u64 = 128;
/// Smallest memory a guest is given.
pub const MIN_MEMORY_MIB: u64 = 64;

impl VmSpec {
    /// Checks what can be checked before any process starts.
    pub fn validate(&self, host_memory_mib: u64) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus {
                got: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > host_memory_mib {
            return Err(SpecError::Memory {
                got: self.memory_mib,
                host_mib: host_memory_mib,
            });
        }
        if let Some(max) = self.max_vcpus {
            if max < self.vcpus || max > MAX_VCPUS {
                return Err(SpecError::Device(format!(
                    "max_vcpus must be between vcpus ({}) and {MAX_VCPUS}, got {max}",
                    self.vcpus
                )));
            }
        }
        if let Some(max) = self.max_memory_mib {
            if max < self.memory_mib || (max - self.memory_mib) % MEMORY_STEP_MIB != 0 {
                return Err(SpecError::Device(format!(
                    "max_memory_mib must be memory_mib ({}) plus a multiple of {MEMORY_STEP_MIB}, got {max}",
                    self.memory_mib
                )));
            }
        }
        for (what, w) in [
            ("cpu_weight", self.limits.cpu_weight),
            ("io_weight", self.limits.io_weight),
        ] {
            if let Some(w) = w {
                if !(1..=10_000).contains(&w) {
                    return Err(SpecError::Device(format!(
                        "{what} must be between 1 and 10000, got {w}"
                    )));
                }
            }
        }
        if let Some(c) = self.limits.cpu_limit {
            if !(c.is_finite() && c >= 0.01 && c <= f64::from(self.vcpu_limit())) {
                return Err(SpecError::Device(format!(
                    "cpu_limit must be between 0.01 and the VM's most vCPUs ({}), got {c}",
                    self.vcpu_limit()
                )));
            }
        }
        for d in &self.disks {
            if d.id.contains('/') || d.id.starts_with('.') {
                return Err(SpecError::Device(format!(
                    "disk id {:?} may not hold '/' or start with '.'",
                    d.id
                )));
            }
        }
        require_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initramfs {
            require_file("initramfs", initrd)?;
        }
        let mut ids = std::collections::HashSet::new();
        for d in &self.disks {
            if !ids.insert(d.id.as_str()) {
                return Err(SpecError::Device(format!("device id {:?} is used twice", d.id)));
            }
            if let DiskSource::File { path, .. } = &d.source {
                require_file("disk image", path)?;
            }
        }
        for n in &self.nics {
            if !ids.insert(n.id.as_str()) {
                return Err(SpecError::Device(format!("device id {:?} is used twice", n.id)));
            }
            if n.tap.is_empty() || n.tap.len() > 15 {
                return Err(SpecError::Device(format!("TAP name {:?} must be 1-15 bytes", n.tap)));
            }
            if n.queue_pairs == 0 {
                return Err(SpecError::Device(format!("NIC {} needs at least one queue pair", n.id)));
            }
        }
        Ok(())
    }

    /// The most vCPUs this VM can have without a restart.
    pub fn vcpu_limit(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus).max(self.vcpus)
    }

    /// The most memory this VM can have without a restart.
    pub fn memory_limit_mib(&self) -> u64 {
        self.max_memory_mib.unwrap_or(self.memory_mib).max(self.memory_mib)
    }

    /// True when a disk needs guest memory shared with a vhost-user backend.
    pub fn needs_shared_memory(&self) -> bool {
        self.disks
            .iter()
            .any(|d| matches!(d.source, DiskSource::VhostUser { .. }))
    }
}

/// VM ids name directories and appear in process command lines: keep them boring.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Id(id.to_string()))
    }
}

fn require_file(what: &'static str, path: &Path) -> Result<(), SpecError> {
    if path.exists() {
        Ok(())
    } else {
        Err(SpecError::MissingFile {
            what,
            path: path.to_path_buf(),
        })
    }
}

/// The host's total memory in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> u64 {
    meminfo_mib("MemTotal:")
}

/// Memory the host can still give (`MemAvailable`), in MiB.
pub fn host_available_memory_mib() -> u64 {
    meminfo_mib("MemAvailable:")
}

fn meminfo_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// What `GET /host` reports: the facts about this host a caller on another machine
/// cannot read itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Online CPUs.
    pub cpus: u32,
    pub memory_mib: u64,
    /// `MemAvailable` when asked.
    pub available_memory_mib: u64,
    /// Which hypervisors can run VMs here.
    pub hypervisors: Vec<crate::service::HypervisorAvailability>,
    /// vmm-manager's version.
    pub version: String,
    /// How VMMs are jailed here (absent from vmm-managers older than jailing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailSupport>,
}

/// Lifecycle states a VM can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    /// The VMM died or the guest failed; `reason` says why.
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Failed => "failed",
        }
    }

    /// True while a VMM process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

// One enum from the CLI through the public API (`POST /v1/vms/{id}/{action}`) to
// vmm-manager's route and its driver.
/// What can be done to a VM that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmAction {
    Start,
    /// ACPI power button, forced after the stop timeout (or at once with `force`).
    Stop,
    Reboot,
    Pause,
    Resume,
}

impl VmAction {
    pub const ALL: [VmAction; 5] = [
        VmAction::Start,
        VmAction::Stop,
        VmAction::Reboot,
        VmAction::Pause,
        VmAction::Resume,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmAction::Start => "start",
            VmAction::Stop => "stop",
            VmAction::Reboot => "reboot",
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
        }
    }

    /// Starting a VM that runs, or stopping one that is stopped, changes nothing: these
    /// may be sent again when the daemon died before answering.
    pub fn is_idempotent(self) -> bool {
        matches!(self, VmAction::Start | VmAction::Stop)
    }

    /// Whether the VM is meant to run after the action (`None`: unchanged).
    pub fn desired_running(self) -> Option<bool> {
        match self {
            VmAction::Start | VmAction::Reboot | VmAction::Resume => Some(true),
            VmAction::Stop => Some(false),
            VmAction::Pause => None,
        }
    }

    /// Whether the action can run on a VM in `state` (start and stop always can).
    pub fn allowed_in(self, state: VmState) -> bool {
        match self {
            VmAction::Reboot | VmAction::Pause => state == VmState::Running,
            VmAction::Resume => state == VmState::Paused,
            VmAction::Start | VmAction::Stop => true,
        }
    }
}

impl std::fmt::Display for VmAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown VM action {s:?}: use start, stop, reboot, pause or resume"))
    }
}

/// A VM's runtime status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Milliseconds since the Unix epoch when `state` was entered.
    pub since_ms: u64,
    /// Orders the changes of one VM: a later change has a larger `seq`. Taken from one
    /// counter per vmm-manager process that starts at the wall clock in microseconds, so
    /// it keeps growing across restarts. 0 in status files written before it existed.
    #[serde(default)]
    pub seq: u64,
    /// The running VMM's jail: its user, cgroup and limits (absent while it is not
    /// running, and with jailing off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailInfo>,
}

/// What `GET /vms/{id}` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub spec: VmSpec,
    pub status: VmStatus,
}

/// The body of `POST /vms/{id}/resize`: the vCPUs and memory the VM should have.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A state change, published to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmEvent {
    pub vm_id: String,
    pub name: String,
    /// `None` when the VM was deleted.
    pub state: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The VMM process while the VM is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub at_ms: u64,
    /// The [`VmStatus::seq`] of this change (a delete takes the next one).
    #[serde(default)]
    pub seq: u64,
    /// [`VmStatus::jail`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailInfo>,
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kernel: &Path) -> VmSpec {
        VmSpec {
            id: "vm-1".into(),
            name: "one".into(),
            hypervisor: HypervisorKind::Qemu,
            vcpus: 1,
            memory_mib: 128,
            max_vcpus: None,
            max_memory_mib: None,
            kernel: kernel.to_path_buf(),
            initramfs: None,
            cmdline: String::new(),
            disks: vec![],
            nics: vec![],
            qemu: QemuOptions::default(),
            limits: Default::default(),
            agent_channel: false,
        }
    }

    #[test]
    fn spec_json_is_strict() {
        let good = r#"{"id":"a","name":"a","hypervisor":"qemu","vcpus":1,"memory_mib":64,"kernel":"/k"}"#;
        assert!(serde_json::from_str::<VmSpec>(good).is_ok());
        let cases = [
            r#"{"id":"a","name":"a","hypervisor":"qemu","vcpus":1,"memory_mib":64,"kernel":"/k","bogus":1}"#,
            r#"{"id":"a","name":"a","hypervisor":"kvmtool","vcpus":1,"memory_mib":64,"kernel":"/k"}"#,
            r#"{"id":"a","name":"a","hypervisor":"qemu","vcpus":-1,"memory_mib":64,"kernel":"/k"}"#,
            r#"{"id":"a","name":"a","hypervisor":"qemu","vcpus":1,"memory_mib":64}"#,
            r#"{"id":"a","name":"a","hypervisor":"qemu","vcpus":1,"memory_mib":64,"kernel":"/k","disks":[{"id":"d","source":{"kind":"file","path":"/x"}}]}"#,
            r#"{"id":"a","name":"a","hypervisor":"qemu","vcpus":1,"memory_mib":64,"kernel":"/k","disks":[{"id":"d","source":{"kind":"file","path":"/x","format":"raw","extra":1}}]}"#,
        ];
        for c in cases {
            assert!(serde_json::from_str::<VmSpec>(c).is_err(), "accepted {c}");
        }
        let disk = r#"{"id":"d","source":{"kind":"vhost-user","socket":"/s"}}"#;
        let d: DiskSpec = serde_json::from_str(disk).expect("vhost-user disk parses");
        assert_eq!(d.source, DiskSource::VhostUser { socket: "/s".into() });
    }

    #[test]
    fn validation_refuses_what_would_fail_later() -> Result<(), Box<dyn std::error::Error>> {
        let k = tempfile::NamedTempFile::new()?;
        let ok = spec(k.path());
        assert_eq!(ok.validate(1024), Ok(()));
        let mut s = ok.clone();
        s.vcpus = 0;
        assert!(matches!(s.validate(1024), Err(SpecError::Vcpus { got: 0, .. })));
        let mut s = ok.clone();
        s.memory_mib = 63;
        assert!(matches!(s.validate(1024), Err(SpecError::Memory { .. })));
        let mut s = ok.clone();
        s.memory_mib = 2048;
        assert!(matches!(s.validate(1024), Err(SpecError::Memory { .. })));
        let mut s = ok.clone();
        s.kernel = "/nonexistent/kernel".into();
        assert!(matches!(
            s.validate(1024),
            Err(SpecError::MissingFile { what: "kernel", .. })
        ));
        let mut s = ok.clone();
        s.id = "../etc".into();
        assert!(matches!(s.validate(1024), Err(SpecError::Id(_))));
        // Room to grow: at least what it has; memory in whole 128 MiB steps.
        for (max_vcpus, max_memory_mib, good) in [
            (Some(4), Some(128 + 256), true),
            (Some(1), Some(128), true),
            (Some(0), None, false),
            (Some(MAX_VCPUS + 1), None, false),
            (None, Some(64), false),
            (None, Some(128 + 100), false),
        ] {
            let s = VmSpec {
                max_vcpus,
                max_memory_mib,
                ..ok.clone()
            };
            assert_eq!(s.validate(1024).is_ok(), good, "{max_vcpus:?} {max_memory_mib:?}");
        }
        let mut s = ok;
        s.nics.push(NicSpec {
            id: "n".into(),
            tap: "a-very-long-tap-name".into(),
            mac: "52:54:00:00:00:01".into(),
            queue_pairs: 1,
            fds: vec![],
        });
        assert!(matches!(s.validate(1024), Err(SpecError::Device(_))));
        Ok(())
    }
}
