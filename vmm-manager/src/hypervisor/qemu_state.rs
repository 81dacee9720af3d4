//! A QEMU VM's whole state (memory and devices) saved to a file and loaded into a fresh
//! QEMU: migration to a file vmm-manager opens and hands over (`getfd`, then `migrate` to `fd:`: a jailed QEMU may neither run a shell nor open the host's files), then a new process
//! started with the same machine and `-incoming`.
//!
//! Migration needs the destination's devices to be the source's, in the same places.
//! A VM may have changed since it was launched (disks, vCPUs and memory hot-plugged),
//! so what it has at the moment of the save is written beside the memory
//! (`topology.json`): the base memory and cold-plugged vCPUs it was launched with, the
//! vCPUs and DIMMs added since, and the PCI place of every disk and NIC. The restore's
//! command line is built from the spec and that record, every device pinned to its
//! place, as libvirt does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{qmp, VmmError};
use crate::spec::VmSpec;
use crate::vm_dir::VmDir;

/// What a saved VM had, besides its spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// Whether it ran under KVM (the restore must use the same accelerator).
    pub kvm: bool,
    /// The memory and vCPUs on its command line.
    pub base_memory_mib: u64,
    pub boot_vcpus: u32,
    /// vCPUs hot-plugged since: the `device_add` arguments that recreate each.
    pub cpus: Vec<Value>,
    /// DIMMs hot-plugged since: id and size in bytes.
    pub dimms: Vec<(String, u64)>,
    /// Device id -> (bus, slot) of every PCI device with an id.
    pub places: BTreeMap<String, (String, u64)>,
}

const MEMORY_FILE: &str = "memory";
const TOPOLOGY_FILE: &str = "topology.json";

/// The name the state file's descriptor gets in QEMU (`getfd`).
const STATE_FD: &str = "hearth-state";

/// Device id -> (bus, slot) from `query-pci`: the root bus is `pcie.0`, a device
/// behind a root port is on that port's id.
pub fn places(pci: &Value) -> BTreeMap<String, (String, u64)> {
    fn walk(devices: &Value, bus: &str, out: &mut BTreeMap<String, (String, u64)>) {
        for d in devices.as_array().into_iter().flatten() {
            let id = d.get("qdev_id").and_then(Value::as_str).unwrap_or_default();
            if !id.is_empty() {
                out.insert(id.to_string(), (bus.to_string(), d["slot"].as_u64().unwrap_or(0)));
            }
            if let Some(inner) = d.get("pci_bridge").and_then(|b| b.get("devices")) {
                walk(inner, if id.is_empty() { bus } else { id }, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for bus in pci.as_array().into_iter().flatten() {
        walk(&bus["devices"], "pcie.0", &mut out);
    }
    out
}

/// Saves the paused VM's state into `dest` (which exists and is empty).
pub async fn save(dir: &VmDir, dest: &Path) -> Result<(), VmmError> {
    let sock = dir.qmp_socket();
    let kvm = qmp::execute(&sock, "query-kvm", None).await?["enabled"]
        .as_bool()
        .unwrap_or(false);
    // A microvm has no PCI bus: its devices keep their command-line order.
    let pci = qmp::execute(&sock, "query-pci", None).await.unwrap_or(Value::Null);
    let sizes = qmp::execute(&sock, "query-memory-size-summary", None).await?;
    let cpus = qmp::execute(&sock, "query-hotpluggable-cpus", None).await?;
    let dimms = qmp::execute(&sock, "query-memory-devices", None).await?;
    let hot = |c: &&Value| {
        c.get("qom-path")
            .and_then(Value::as_str)
            .is_some_and(|p| p.starts_with("/machine/peripheral/"))
    };
    let slots: Vec<Value> = cpus.as_array().cloned().unwrap_or_default();
    let plugged = slots.iter().filter(|c| c.get("qom-path").is_some()).count();
    let topology = Topology {
        kvm,
        base_memory_mib: sizes["base-memory"].as_u64().unwrap_or(0) >> 20,
        boot_vcpus: (plugged - slots.iter().filter(hot).count()) as u32,
        cpus: slots
            .iter()
            .filter(hot)
            .map(|c| {
                let mut dev = c["props"].clone();
                dev["driver"] = c["type"].clone();
                let path = c["qom-path"].as_str().unwrap_or_default();
                dev["id"] = json!(path.trim_start_matches("/machine/peripheral/"));
                dev
            })
            .collect(),
        dimms: dimms
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| {
                let data = &d["data"];
                Some((data["id"].as_str()?.to_string(), data["size"].as_u64()?))
            })
            .collect(),
        places: places(&pci),
    };
    let bytes = serde_json::to_vec_pretty(&topology).map_err(|e| VmmError::Control(e.to_string()))?;
    std::fs::write(dest.join(TOPOLOGY_FILE), bytes)?;
    let file = std::fs::File::create(dest.join(MEMORY_FILE))?;
    qmp::execute_with_fd(
        &sock,
        file.into(),
        STATE_FD,
        "migrate",
        json!({ "uri": format!("fd:{STATE_FD}") }),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let m = qmp::execute(&sock, "query-migrate", None).await?;
        match m["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(VmmError::Refused {
                    action: "migrate".into(),
                    message: m["error-desc"]
                        .as_str()
                        .unwrap_or("the state could not be written")
                        .to_string(),
                })
            }
            _ if tokio::time::Instant::now() > deadline => {
                let _ = qmp::execute(&sock, "migrate_cancel", None).await;
                return Err(VmmError::Control(
                    "saving the VM's state took more than 10 minutes".into(),
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The saved topology in `src`.
pub fn read_topology(src: &Path) -> Result<Topology, VmmError> {
    let bytes = std::fs::read(src.join(TOPOLOGY_FILE))?;
    serde_json::from_slice(&bytes).map_err(|e| VmmError::Control(format!("{}: {e}", src.join(TOPOLOGY_FILE).display())))
}

/// The command line that loads the state in `src` into a new QEMU: the spec's machine
/// at its launch size, the hot-plugged vCPUs and DIMMs, every device at its place.
pub fn restore_args(spec: &VmSpec, dir: &VmDir, t: &Topology, tsc_khz: Option<u64>) -> Vec<String> {
    let launched = VmSpec {
        vcpus: t.boot_vcpus,
        memory_mib: t.base_memory_mib,
        ..spec.clone()
    };
    let mut args = super::qemu::qemu_args(&launched, dir, t.kvm, tsc_khz);
    // Pin each device with an id to where it was.
    for a in args.iter_mut() {
        if !(a.starts_with("virtio-") || a.starts_with("vhost-user-")) {
            continue;
        }
        let id = a.split(',').find_map(|kv| kv.strip_prefix("id=")).unwrap_or_default();
        if let Some((bus, slot)) = t.places.get(id) {
            a.push_str(&format!(",bus={bus},addr={slot:#x}"));
        }
    }
    for (id, size) in &t.dimms {
        let mem = format!("mem-{id}");
        args.extend([
            "-object".to_string(),
            format!("memory-backend-memfd,id={mem},size={size},share=on"),
            "-device".to_string(),
            format!("pc-dimm,id={id},memdev={mem}"),
        ]);
    }
    for cpu in &t.cpus {
        let mut dev = cpu["driver"].as_str().unwrap_or_default().to_string();
        for (k, v) in cpu.as_object().into_iter().flatten() {
            if k != "driver" {
                let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                dev.push_str(&format!(",{k}={v}"));
            }
        }
        args.extend(["-device".to_string(), dev]);
    }
    args.extend([
        "-incoming".to_string(),
        // The state arrives through a descriptor once QEMU runs (see [`load`]).
        "defer".to_string(),
    ]);
    args
}

/// Hands the new QEMU (started with `-incoming defer`) the saved memory in `src`,
/// then waits until it has loaded it.
pub async fn load(dir: &VmDir, src: &Path) -> Result<(), VmmError> {
    let file = std::fs::File::open(src.join(MEMORY_FILE))?;
    qmp::execute_with_fd(
        &dir.qmp_socket(),
        file.into(),
        STATE_FD,
        "migrate-incoming",
        json!({ "uri": format!("fd:{STATE_FD}") }),
    )
    .await?;
    wait_loaded(dir).await
}

/// Waits until the new QEMU has loaded the state (it is then paused, as it was saved).
pub async fn wait_loaded(dir: &VmDir) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let status = qmp::execute(&dir.qmp_socket(), "query-status", None).await?;
        match status["status"].as_str() {
            Some("inmigrate") | Some("restore-vm") => {}
            Some("running") | Some("paused") | Some("postmigrate") | Some("prelaunch") => return Ok(()),
            other => {
                return Err(VmmError::Launch(format!(
                    "loading the saved state left the VM {}",
                    other.unwrap_or("in no state")
                )))
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(VmmError::Launch(
                "loading the saved state took more than 10 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_follow_root_ports() {
        let pci = json!([{"bus": 0, "devices": [
            {"slot": 2, "qdev_id": "net0-dev"},
            {"slot": 3, "qdev_id": "hp0", "pci_bridge": {"bus": {"number": 1}, "devices": [
                {"slot": 0, "qdev_id": "vol-data"}]}},
            {"slot": 4, "qdev_id": ""},
        ]}]);
        let p = places(&pci);
        assert_eq!(p.get("net0-dev"), Some(&("pcie.0".to_string(), 2)));
        assert_eq!(p.get("vol-data"), Some(&("hp0".to_string(), 0)));
        assert_eq!(p.len(), 3);
    }
}
