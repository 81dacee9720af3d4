//! `POST /v1/vms` as a typed command: every check of the request that needs no daemon
//! lives here and is unit-tested without a running stack. What needs the host (memory
//! against its size, which hypervisors work, the image and its kernel) follows in
//! [`crate::vms::create::begin`].

use vmm_manager::spec::{MAX_VCPUS, MEMORY_STEP_MIB, MIN_MEMORY_MIB};

use crate::model::{HypervisorKind, QemuMachine};

use crate::model::{validate_name, AttachVolume, CreateVm, NicRequest};
use crate::vms::error::VmError;
use crate::volumes::command::parse_size;

/// A VM create request that passed every check the request alone allows.
#[derive(Debug, Clone)]
pub struct CreateVmCommand {
    /// The new VM's id.
    pub id: String,
    pub name: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Room to grow asked for (`None`: the host's defaults, decided with its facts).
    pub max_vcpus: Option<u32>,
    pub max_memory_mib: Option<u64>,
    /// The hypervisor asked for (`None`: the configured default, or QEMU).
    pub hypervisor: Option<HypervisorKind>,
    pub cmdline_append: Option<String>,
    pub vnc: bool,
    pub machine: Option<QemuMachine>,
    pub nics: Option<Vec<NicRequest>>,
    pub start: bool,
    pub volumes: Vec<AttachVolume>,
    /// The root disk's size as written and in bytes.
    pub disk_size: Option<(String, u64)>,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    /// `(VM, snapshot)` the VM is made from.
    pub from_snapshot: Option<(String, String)>,
    /// CPU and I/O shares.
    pub limits: vmm_manager::spec::VmLimits,
    /// Set by a managed service (never by a request): see [`crate::model::VmRecord::managed_by`].
    pub managed_by: Option<String>,
    pub placement: crate::model::Placement,
}

impl TryFrom<CreateVm> for CreateVmCommand {
    type Error = VmError;

    fn try_from(req: CreateVm) -> Result<Self, VmError> {
        let id = uuid::Uuid::new_v4().to_string();
        let name = req.name.unwrap_or_else(|| format!("vm-{}", &id[..8]));
        validate_name("VM", &name)?;
        if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
            return Err(VmError::Invalid(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                req.vcpus
            )));
        }
        if req.memory_mib < MIN_MEMORY_MIB {
            return Err(VmError::Invalid(format!(
                "memory_mib must be at least {MIN_MEMORY_MIB}, got {}",
                req.memory_mib
            )));
        }
        check_room(req.vcpus, req.memory_mib, req.max_vcpus, req.max_memory_mib)?;
        if let Some(p) = &req.placement {
            if let Some(h) = &p.host {
                validate_name("host", h)?;
            }
            if let Some(g) = &p.anti_affinity_group {
                validate_name("anti-affinity group", g)?;
            }
        }
        for (what, w) in [("cpu_weight", req.cpu_weight), ("io_weight", req.io_weight)] {
            if let Some(w) = w {
                if !(1..=10_000).contains(&w) {
                    return Err(VmError::Invalid(format!("{what} must be between 1 and 10000, got {w}")));
                }
            }
        }
        if let Some(c) = req.cpu_limit {
            let most = req.max_vcpus.unwrap_or(MAX_VCPUS).max(req.vcpus);
            if !(c.is_finite() && (0.01..=f64::from(most)).contains(&c)) {
                return Err(VmError::Invalid(format!(
                    "cpu_limit must be between 0.01 and the VM's most vCPUs ({most}), got {c}"
                )));
            }
        }
        let from_snapshot = match &req.from_snapshot {
            None => None,
            Some(r) => match r.split_once('@') {
                Some((vm, snap)) if !vm.is_empty() && !snap.is_empty() => Some((vm.to_string(), snap.to_string())),
                _ => {
                    return Err(VmError::Invalid(format!(
                        "from_snapshot must be VM@SNAPSHOT, got {r:?}"
                    )))
                }
            },
        };
        if let Some(extra) = &req.cmdline_append {
            if extra.len() > 1024 || extra.chars().any(|c| c.is_control()) {
                return Err(VmError::Invalid(
                    "cmdline_append must be at most 1024 printable characters".into(),
                ));
            }
        }
        let hypervisor = req
            .hypervisor
            .as_deref()
            .map(str::parse::<HypervisorKind>)
            .transpose()
            .map_err(VmError::Invalid)?;
        if hypervisor == Some(HypervisorKind::CloudHypervisor) {
            if req.vnc {
                return Err(VmError::VncNeedsQemu);
            }
            if req.machine.is_some() {
                return Err(VmError::MachineNeedsQemu);
            }
        }
        if req.vnc && req.machine == Some(QemuMachine::Microvm) {
            return Err(VmError::VncNeedsQ35);
        }
        let disk_size = req
            .disk_size
            .map(|s| parse_size(&s).map(|bytes| (s, bytes)))
            .transpose()?;
        // Bad keys or user-data are refused now, not when the seed is written.
        if !req.ssh_keys.is_empty() || req.user_data.is_some() {
            let preview = imaged::cloudinit::SeedRequest {
                instance_id: id.clone(),
                hostname: name.clone(),
                ssh_keys: req.ssh_keys.clone(),
                user_data: req.user_data.clone(),
                nics: vec![],
            };
            imaged::cloudinit::compose(&preview).map_err(|e| match e {
                imaged::ImageError::Invalid(_) | imaged::ImageError::InvalidName(_) => VmError::Invalid(e.to_string()),
                other => VmError::Seed(other.to_string()),
            })?;
        }
        Ok(CreateVmCommand {
            id,
            name,
            image: req.image,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            max_vcpus: req.max_vcpus,
            max_memory_mib: req.max_memory_mib,
            hypervisor,
            cmdline_append: req.cmdline_append,
            vnc: req.vnc,
            machine: req.machine,
            nics: req.nics,
            start: req.start,
            volumes: req.volumes.into_iter().map(|v| v.into_attach()).collect(),
            disk_size,
            ssh_keys: req.ssh_keys,
            user_data: req.user_data,
            from_snapshot,
            limits: vmm_manager::spec::VmLimits {
                cpu_weight: req.cpu_weight,
                cpu_limit: req.cpu_limit,
                io_weight: req.io_weight,
            },
            managed_by: req.managed_by,
            placement: req.placement.unwrap_or_default(),
        })
    }
}

/// Checks the room to grow a create asks for: at least what the VM starts with,
/// vCPUs within the hypervisors' limit, memory in whole hot-plug steps.
pub fn check_room(
    vcpus: u32,
    memory_mib: u64,
    max_vcpus: Option<u32>,
    max_memory_mib: Option<u64>,
) -> Result<(), VmError> {
    if let Some(max) = max_vcpus {
        if max < vcpus || max > MAX_VCPUS {
            return Err(VmError::Invalid(format!(
                "max_vcpus must be between vcpus ({vcpus}) and {MAX_VCPUS}, got {max}"
            )));
        }
    }
    if let Some(max) = max_memory_mib {
        if max < memory_mib || (max - memory_mib) % MEMORY_STEP_MIB != 0 {
            return Err(VmError::Invalid(format!(
                "max_memory_mib must be memory_mib ({memory_mib}) plus a multiple of {MEMORY_STEP_MIB}, got {max}"
            )));
        }
    }
    Ok(())
}

/// A `PATCH /v1/vms/{id}` request that passed every check the request alone allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeVmCommand {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

impl TryFrom<crate::model::UpdateVm> for ResizeVmCommand {
    type Error = VmError;

    fn try_from(req: crate::model::UpdateVm) -> Result<Self, VmError> {
        if req.vcpus.is_none() && req.memory_mib.is_none() {
            return Err(VmError::Invalid(
                "nothing to change: give vcpus, memory_mib or both".into(),
            ));
        }
        if let Some(v) = req.vcpus {
            if v == 0 || v > MAX_VCPUS {
                return Err(VmError::Invalid(format!(
                    "vcpus must be between 1 and {MAX_VCPUS}, got {v}"
                )));
            }
        }
        if let Some(m) = req.memory_mib {
            if m < MIN_MEMORY_MIB {
                return Err(VmError::Invalid(format!(
                    "memory_mib must be at least {MIN_MEMORY_MIB}, got {m}"
                )));
            }
        }
        Ok(ResizeVmCommand {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(body: &str) -> Result<CreateVmCommand, (u16, String)> {
        let req: CreateVm = serde_json::from_str(body).map_err(|e| (400, e.to_string()))?;
        CreateVmCommand::try_from(req).map_err(|e| {
            let e = socket_http::ApiError::from(e);
            (e.status.as_u16(), e.message().to_string())
        })
    }

    #[test]
    fn requests_are_checked_without_a_stack() {
        // (body, expected status, a piece of the message)
        let refused: &[(&str, u16, &str)] = &[
            (r#"{"image": "tiny", "name": "Bad_Name"}"#, 422, "VM name"),
            (r#"{"image": "tiny", "vcpus": 0}"#, 422, "vcpus must be between 1"),
            (r#"{"image": "tiny", "vcpus": 100000}"#, 422, "vcpus must be between 1"),
            (
                r#"{"image": "tiny", "memory_mib": 1}"#,
                422,
                "memory_mib must be at least",
            ),
            (r#"{"image": "tiny", "hypervisor": "xen"}"#, 422, "xen"),
            (r#"{"image": "tiny", "from_snapshot": "web"}"#, 422, "VM@SNAPSHOT"),
            (r#"{"image": "tiny", "from_snapshot": "@s1"}"#, 422, "VM@SNAPSHOT"),
            (
                r#"{"image": "tiny", "vcpus": 2, "max_vcpus": 1}"#,
                422,
                "max_vcpus must be between vcpus (2)",
            ),
            (
                r#"{"image": "tiny", "memory_mib": 256, "max_memory_mib": 128}"#,
                422,
                "max_memory_mib must be",
            ),
            (
                r#"{"image": "tiny", "memory_mib": 256, "max_memory_mib": 300}"#,
                422,
                "multiple of 128",
            ),
            (
                r#"{"image": "tiny", "hypervisor": "cloud-hypervisor", "vnc": true}"#,
                422,
                "vnc needs the qemu hypervisor",
            ),
            (
                r#"{"image": "tiny", "hypervisor": "cloud-hypervisor", "machine": "microvm"}"#,
                422,
                "machine is a QEMU option",
            ),
            (
                r#"{"image": "tiny", "vnc": true, "machine": "microvm"}"#,
                422,
                "vnc needs machine q35",
            ),
            (r#"{"image": "tiny", "cmdline_append": "a\nb"}"#, 422, "cmdline_append"),
            (
                r#"{"image": "tiny", "disk_size": "ten gigs"}"#,
                422,
                "size \"ten gigs\"",
            ),
            (r#"{"image": "tiny", "ssh_keys": ["not a key"]}"#, 422, "key"),
            (
                r##"{"image": "tiny", "user_data": "#cloud-config\n: ["}"##,
                422,
                "user_data",
            ),
            // Malformed or of the wrong shape: refused by the parser before any check.
            (r#"{"image": "tiny", "vcpus": "two"}"#, 400, "invalid type"),
            (r#"{"image": "tiny", "colour": "blue"}"#, 400, "unknown field"),
            (r#"{"vcpus": 1}"#, 400, "missing field `image`"),
            (r#"{"image": "tiny""#, 400, "EOF"),
        ];
        for (body, status, needle) in refused {
            match command(body) {
                Ok(c) => panic!("{body} was accepted: {c:?}"),
                Err((got, message)) => {
                    assert_eq!(got, *status, "{body}: {message}");
                    assert!(message.contains(needle), "{body}: {message:?} lacks {needle:?}");
                }
            }
        }
    }

    #[test]
    fn resize_requests_are_checked_without_a_stack() {
        let resize = |body: &str| {
            let req: crate::model::UpdateVm = serde_json::from_str(body).expect("shape");
            ResizeVmCommand::try_from(req).map_err(|e| e.to_string())
        };
        assert!(resize("{}").expect_err("refused").contains("nothing to change"));
        assert!(resize(r#"{"vcpus": 0}"#)
            .expect_err("refused")
            .contains("vcpus must be between 1"));
        assert!(resize(r#"{"memory_mib": 8}"#)
            .expect_err("refused")
            .contains("at least"));
        assert_eq!(
            resize(r#"{"vcpus": 3, "memory_mib": 512}"#),
            Ok(ResizeVmCommand {
                vcpus: Some(3),
                memory_mib: Some(512)
            })
        );
        assert!(serde_json::from_str::<crate::model::UpdateVm>(r#"{"vcpus": 2, "colour": 1}"#).is_err());
    }

    #[test]
    fn accepted_requests_carry_what_they_asked_for() {
        let c = command(
            r#"{"image": "debian", "name": "web", "vcpus": 2, "memory_mib": 512, "hypervisor": "qemu",
                "vnc": true, "disk_size": "10G", "volumes": ["data", {"volume": "x", "via": "vhost-user"}],
                "start": false}"#,
        )
        .expect("accepted");
        assert_eq!((c.name.as_str(), c.vcpus, c.memory_mib), ("web", 2, 512));
        assert_eq!(c.hypervisor, Some(HypervisorKind::Qemu));
        assert_eq!(c.disk_size, Some(("10G".to_string(), 10 << 30)));
        assert_eq!(c.volumes.len(), 2);
        assert!(!c.start && c.vnc);
        let defaults = command(r#"{"image": "tiny"}"#).expect("accepted");
        assert!(defaults.name.starts_with("vm-") && defaults.start, "{defaults:?}");
        assert_eq!(defaults.hypervisor, None, "the server's choice");
        assert_ne!(defaults.id, command(r#"{"image": "tiny"}"#).expect("accepted").id);
    }
}
