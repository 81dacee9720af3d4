//! Resizing a running QEMU VM: vCPUs hot-plugged into the free slots `-smp …,maxcpus=`
//! left (the CPU model's own hot-plug driver, as `query-hotpluggable-cpus` names it),
//! memory as a `pc-dimm` per addition into the room `-m …,slots=,maxmem=` left. The
//! guest sees ACPI hot-plug events and onlines what it gets (Linux: a udev rule, the
//! kernel's `memhp_default_state=online`, or a hotplug helper, as hearth's tiny guest
//! has). Shrinking needs the guest's cooperation QEMU cannot ask for without a balloon
//! or a vCPU unplug the guest agrees to: refused, with the restart that does it.

use serde_json::{json, Value};

use super::{qmp, VmmError};
use crate::spec::{QemuMachine, VmSpec};
use crate::vm_dir::VmDir;

/// DIMM slots a q35 VM with room to grow gets (one per memory addition).
pub const MEMORY_SLOTS: u32 = 8;

/// `-smp` and `-m` for `spec`: with the room to grow its spec gives, on q35.
pub fn smp_and_memory_args(spec: &VmSpec) -> [String; 2] {
    let microvm = spec.qemu.machine == QemuMachine::Microvm;
    let smp = if spec.vcpu_limit() > spec.vcpus && !microvm {
        format!("{},maxcpus={}", spec.vcpus, spec.vcpu_limit())
    } else {
        spec.vcpus.to_string()
    };
    let mem = if spec.memory_limit_mib() > spec.memory_mib && !microvm {
        format!(
            "{}M,slots={MEMORY_SLOTS},maxmem={}M",
            spec.memory_mib,
            spec.memory_limit_mib()
        )
    } else {
        format!("{}M", spec.memory_mib)
    };
    [smp, mem]
}

/// Gives the running VM `vcpus` and `memory_mib`, growing only.
pub async fn resize(dir: &VmDir, spec: &VmSpec, vcpus: u32, memory_mib: u64) -> Result<(), VmmError> {
    if spec.qemu.machine == QemuMachine::Microvm {
        return Err(VmmError::Unsupported(
            "a microvm machine has no hot-plug: restart the VM to resize it".into(),
        ));
    }
    let sock = dir.qmp_socket();
    let cpus = qmp::execute(&sock, "query-hotpluggable-cpus", None).await?;
    let slots = cpus.as_array().cloned().unwrap_or_default();
    let plugged = slots.iter().filter(|c| c.get("qom-path").is_some()).count() as u32;
    let sizes = qmp::execute(&sock, "query-memory-size-summary", None).await?;
    let bytes = |k: &str| sizes.get(k).and_then(Value::as_u64).unwrap_or(0);
    let memory_now = (bytes("base-memory") + bytes("plugged-memory")) >> 20;
    if vcpus < plugged {
        return Err(VmmError::Unsupported(format!(
            "a running QEMU VM does not give vCPUs back ({plugged} now, {vcpus} asked): restart the VM to resize it"
        )));
    }
    if memory_mib < memory_now {
        return Err(VmmError::Unsupported(format!(
            "a running QEMU VM does not give memory back without a balloon ({memory_now} MiB now, {memory_mib} asked): restart the VM to resize it"
        )));
    }
    let mut free: Vec<&Value> = slots.iter().filter(|c| c.get("qom-path").is_none()).collect();
    let key = |c: &Value| {
        ["socket-id", "die-id", "core-id", "thread-id"].map(|k| c["props"].get(k).and_then(Value::as_u64).unwrap_or(0))
    };
    free.sort_by_key(|c| key(c));
    if free.len() < (vcpus - plugged) as usize {
        return Err(VmmError::Unsupported(format!(
            "the VM has room for {} more vCPUs, {} asked: restart the VM to resize it",
            free.len(),
            vcpus - plugged
        )));
    }
    for slot in free.into_iter().take((vcpus - plugged) as usize) {
        let mut dev = slot["props"].clone();
        let [s, d, c, t] = key(slot);
        dev["driver"] = slot["type"].clone();
        dev["id"] = json!(format!("vcpu-s{s}-d{d}-c{c}-t{t}"));
        qmp::execute(&sock, "device_add", Some(dev)).await?;
    }
    if memory_mib > memory_now {
        let devices = qmp::execute(&sock, "query-memory-devices", None).await?;
        let n = devices.as_array().map(Vec::len).unwrap_or(0);
        let (mem, dimm) = (format!("mem-dimm{n}"), format!("dimm{n}"));
        // Shared like the boot memory, so vhost-user backends can map it too.
        let backend = json!({"qom-type": "memory-backend-memfd", "id": mem,
                             "size": (memory_mib - memory_now) << 20, "share": true});
        qmp::execute(&sock, "object-add", Some(backend)).await?;
        let added = qmp::execute(
            &sock,
            "device_add",
            Some(json!({"driver": "pc-dimm", "id": dimm, "memdev": mem})),
        )
        .await;
        if let Err(e) = added {
            let _ = qmp::execute(&sock, "object-del", Some(json!({"id": mem}))).await;
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{HypervisorKind, QemuOptions};

    fn spec(machine: QemuMachine, max_vcpus: Option<u32>, max_memory_mib: Option<u64>) -> VmSpec {
        VmSpec {
            id: "x".into(),
            name: "x".into(),
            hypervisor: HypervisorKind::Qemu,
            vcpus: 1,
            memory_mib: 256,
            max_vcpus,
            max_memory_mib,
            kernel: "/k".into(),
            initramfs: None,
            cmdline: String::new(),
            disks: vec![],
            nics: vec![],
            qemu: QemuOptions { machine, vnc: false },
            limits: Default::default(),
            agent_channel: false,
        }
    }

    #[test]
    fn room_to_grow_is_maxcpus_and_maxmem_on_q35_only() {
        assert_eq!(smp_and_memory_args(&spec(QemuMachine::Q35, None, None)), ["1", "256M"]);
        assert_eq!(
            smp_and_memory_args(&spec(QemuMachine::Q35, Some(4), Some(1024))),
            ["1,maxcpus=4", "256M,slots=8,maxmem=1024M"]
        );
        assert_eq!(
            smp_and_memory_args(&spec(QemuMachine::Microvm, Some(4), Some(1024))),
            ["1", "256M"]
        );
    }
}
