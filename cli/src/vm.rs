//! `hearth vm …`: create, list, show, resize, the lifecycle actions, delete and the console log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};
use vmm_manager::VmAction;

use crate::{print_value, s, table, ApiClient, Output};

// Parsed once per run: the size of the `create` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create (and by default start) a VM.
    Create {
        name: String,
        #[arg(long, default_value = "tiny")]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u64,
        /// The most vCPUs `vm resize` may give it while it runs (default: the host's CPUs).
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// The most memory in MiB it may be given while it runs (default: the host's
        /// under Cloud Hypervisor, none under QEMU).
        #[arg(long)]
        max_memory: Option<u64>,
        /// cloud-hypervisor or qemu (default: the server's choice).
        #[arg(long)]
        hypervisor: Option<String>,
        /// Extra kernel command line arguments.
        #[arg(long)]
        cmdline_append: Option<String>,
        /// Give the VM a VNC display (QEMU only).
        #[arg(long)]
        vnc: bool,
        /// QEMU machine type: q35 (default) or microvm.
        #[arg(long)]
        machine: Option<String>,
        /// Attach this volume (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Root disk size for images with a disk, e.g. 20G (default: the image's).
        #[arg(long)]
        disk_size: Option<String>,
        /// OpenSSH public key file for the image's default user (repeatable).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
        /// cloud-init user-data file (#cloud-config or a script).
        #[arg(long)]
        user_data: Option<PathBuf>,
        /// Make it from another VM's snapshot, VM@SNAPSHOT (a clone of its root disk).
        #[arg(long)]
        from_snapshot: Option<String>,
        /// Relative CPU weight, 1-10000 (default 100).
        #[arg(long)]
        cpu_weight: Option<u32>,
        /// The most CPU time it may use, in CPUs (e.g. 1.5).
        #[arg(long)]
        cpu_limit: Option<f64>,
        /// Relative I/O weight, 1-10000 (default 100), where the host supports one.
        #[arg(long)]
        io_weight: Option<u32>,
        /// Define the VM without starting it.
        /// Only this host (several hosts: `hearth host list`).
        #[arg(long)]
        host: Option<String>,
        /// No two VMs of this group on one host.
        #[arg(long)]
        anti_affinity_group: Option<String>,
        #[arg(long)]
        no_start: bool,
        /// Return once the request is accepted instead of waiting for the operation.
        #[arg(long)]
        no_wait: bool,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show { vm: String },
    /// Boot a VM.
    Start {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a VM (ACPI power button, forced after a timeout).
    Stop {
        vm: String,
        /// Skip the power button.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Reset a VM.
    Reboot {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Freeze a VM's vCPUs.
    Pause {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Unfreeze a paused VM.
    Resume {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Change a VM's vCPUs and memory: hot-plugged while it runs (within its room to
    /// grow), or at its next start when stopped. What needs a restart is refused unless
    /// --restart is given.
    Resize {
        vm: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB (a running VM grows in steps of 128 MiB).
        #[arg(long)]
        memory: Option<u64>,
        /// Restart the VM if it cannot take the new size while it runs.
        #[arg(long)]
        restart: bool,
    },
    /// Snapshot a VM's disks (paused an instant), and with --memory its memory too.
    Snapshot {
        vm: String,
        name: String,
        /// Also the VM's memory and devices: a restore resumes the guest where it was.
        #[arg(long)]
        memory: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// List a VM's snapshots.
    Snapshots { vm: String },
    /// Delete one of a VM's snapshots.
    DeleteSnapshot { vm: String, name: String },
    /// Take a VM back to one of its snapshots (what its disks held since is lost).
    Restore {
        vm: String,
        snapshot: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a VM (stopping it first).
    Delete {
        vm: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Print what the VM printed on its serial console.
    Log {
        vm: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
    },
}

pub(crate) async fn vm(api: &ApiClient, out: Output, cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Create {
            name,
            image,
            vcpus,
            memory,
            max_vcpus,
            max_memory,
            hypervisor,
            cmdline_append,
            vnc,
            machine,
            volumes,
            disk_size,
            ssh_keys,
            user_data,
            from_snapshot,
            cpu_weight,
            cpu_limit,
            io_weight,
            host,
            anti_affinity_group,
            no_start,
            no_wait,
        } => {
            let mut body = json!({"name": name, "image": image, "vcpus": vcpus, "memory_mib": memory, "vnc": vnc, "start": !no_start, "volumes": volumes});
            let mut keys = Vec::new();
            for f in &ssh_keys {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_string),
                );
            }
            if !keys.is_empty() {
                body["ssh_keys"] = json!(keys);
            }
            if let Some(f) = user_data {
                body["user_data"] =
                    json!(std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?);
            }
            if let Some(d) = disk_size {
                body["disk_size"] = json!(d);
            }
            if let Some(m) = max_vcpus {
                body["max_vcpus"] = json!(m);
            }
            if let Some(f) = from_snapshot {
                body["from_snapshot"] = json!(f);
            }
            if let Some(w) = cpu_weight {
                body["cpu_weight"] = json!(w);
            }
            if let Some(c) = cpu_limit {
                body["cpu_limit"] = json!(c);
            }
            if let Some(w) = io_weight {
                body["io_weight"] = json!(w);
            }
            if host.is_some() || anti_affinity_group.is_some() {
                body["placement"] = json!({"host": host, "anti_affinity_group": anti_affinity_group});
            }
            if let Some(m) = max_memory {
                body["max_memory_mib"] = json!(m);
            }
            if let Some(h) = hypervisor {
                body["hypervisor"] = json!(h);
            }
            if let Some(m) = machine {
                body["machine"] = json!(m);
            }
            if let Some(c) = cmdline_append {
                body["cmdline_append"] = json!(c);
            }
            let accepted = api.post("/v1/vms", Some(body)).await?;
            finish(api, out, accepted, no_wait, &name).await
        }
        VmCommand::List => {
            let vms = api.get("/v1/vms").await?;
            print_value(out, &vms, |v| {
                print_vm_table(v.as_array().map(Vec::as_slice).unwrap_or_default())
            });
            Ok(())
        }
        VmCommand::Show { vm } => {
            let v = api.get(&format!("/v1/vms/{vm}")).await?;
            print_value(out, &v, print_vm_details);
            Ok(())
        }
        VmCommand::Start { vm, no_wait } => action(api, out, &vm, VmAction::Start, "", no_wait).await,
        VmCommand::Stop { vm, force, no_wait } => {
            let query = if force { "?force=true" } else { "" };
            action(api, out, &vm, VmAction::Stop, query, no_wait).await
        }
        VmCommand::Reboot { vm, no_wait } => action(api, out, &vm, VmAction::Reboot, "", no_wait).await,
        VmCommand::Pause { vm, no_wait } => action(api, out, &vm, VmAction::Pause, "", no_wait).await,
        VmCommand::Resume { vm, no_wait } => action(api, out, &vm, VmAction::Resume, "", no_wait).await,
        VmCommand::Resize {
            vm,
            vcpus,
            memory,
            restart,
        } => {
            let mut body = json!({});
            if let Some(v) = vcpus {
                body["vcpus"] = json!(v);
            }
            if let Some(m) = memory {
                body["memory_mib"] = json!(m);
            }
            let query = if restart { "?restart=true" } else { "" };
            let v = api.patch(&format!("/v1/vms/{vm}{query}"), body).await?;
            print_value(out, &v, print_vm_details);
            Ok(())
        }
        VmCommand::Snapshot {
            vm,
            name,
            memory,
            no_wait,
        } => {
            let accepted = api
                .post(
                    &format!("/v1/vms/{vm}/snapshots"),
                    Some(json!({"name": name, "memory": memory})),
                )
                .await?;
            finish(api, out, accepted, no_wait, &vm).await
        }
        VmCommand::Snapshots { vm } => {
            let list = api.get(&format!("/v1/vms/{vm}/snapshots")).await?;
            print_value(out, &list, |l| {
                let rows: Vec<Vec<String>> = l
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|snap| {
                        vec![
                            s(&snap["name"]),
                            s(&snap["state"]),
                            if snap["memory"] == true {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                            format!("{} MiB", snap["size_bytes"].as_u64().unwrap_or(0) >> 20),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME", "STATE", "MEMORY", "SIZE"], &rows));
            });
            Ok(())
        }
        VmCommand::DeleteSnapshot { vm, name } => {
            api.delete_empty(&format!("/v1/vms/{vm}/snapshots/{name}")).await?;
            println!("deleted snapshot {name} of {vm}");
            Ok(())
        }
        VmCommand::Restore { vm, snapshot, no_wait } => {
            let accepted = api
                .post(&format!("/v1/vms/{vm}/restore"), Some(json!({"snapshot": snapshot})))
                .await?;
            finish(api, out, accepted, no_wait, &vm).await
        }
        VmCommand::Delete { vm, no_wait } => {
            let accepted = api.delete(&format!("/v1/vms/{vm}")).await?;
            finish(api, out, accepted, no_wait, &vm).await
        }
        VmCommand::Log { vm, bytes } => {
            let log = api
                .get_bytes(&format!("/v1/vms/{vm}/console/log?bytes={bytes}"))
                .await?;
            use std::io::Write;
            std::io::stdout().write_all(&log)?;
            Ok(())
        }
    }
}

async fn action(
    api: &ApiClient,
    out: Output,
    vm: &str,
    action: VmAction,
    query: &str,
    no_wait: bool,
) -> anyhow::Result<()> {
    let accepted = api.post(&format!("/v1/vms/{vm}/{action}{query}"), None).await?;
    finish(api, out, accepted, no_wait, vm).await
}

/// Waits for the operation in a `202 Accepted` body, showing its progress on stderr,
/// then prints the VM.
/// Follows an operation to its end (its steps on stderr); an error if it failed.
pub(crate) async fn wait_operation(api: &ApiClient, out: Output, op_id: &str) -> anyhow::Result<Value> {
    let mut last = String::new();
    let op = loop {
        let op = api.get(&format!("/v1/operations/{op_id}?wait=10")).await?;
        let progress = op["progress"].as_str().unwrap_or_default().to_string();
        if progress != last && out == Output::Table {
            eprintln!("  {} … {progress}", op["kind"].as_str().unwrap_or("operation"));
            last = progress;
        }
        if op["status"] != "running" {
            break op;
        }
    };
    if op["status"] == "failed" {
        bail!(
            "{} failed: {}",
            op["kind"].as_str().unwrap_or("operation"),
            op["error"]["message"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(op)
}

async fn finish(api: &ApiClient, out: Output, accepted: Value, no_wait: bool, vm: &str) -> anyhow::Result<()> {
    let op_id = accepted["operation"]["id"].as_str().unwrap_or_default().to_string();
    if no_wait {
        print_value(out, &accepted, |a| println!("{}", op_line(&a["operation"])));
        return Ok(());
    }
    let op = wait_operation(api, out, &op_id).await?;
    if op["kind"] == "vm.delete" {
        if out == Output::Json {
            println!("{}", serde_json::to_string_pretty(&op)?);
        } else {
            println!("deleted {vm}");
        }
        return Ok(());
    }
    let id = op["target_id"].as_str().unwrap_or(vm);
    // Give vmm-manager's state a moment to settle on the final value.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let v = api.get(&format!("/v1/vms/{id}")).await?;
    print_value(out, &v, print_vm_details);
    Ok(())
}

pub(crate) fn op_line(op: &Value) -> String {
    let mut s = format!(
        "operation {} {} {}",
        op["id"].as_str().unwrap_or("?"),
        op["kind"].as_str().unwrap_or("?"),
        op["status"].as_str().unwrap_or("?")
    );
    if let Some(m) = op["error"]["message"].as_str() {
        s.push_str(&format!(": {m}"));
    }
    s
}

fn print_vm_table(vms: &[Value]) {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                s(&v["name"]),
                s(&v["state"]),
                s(&v["hypervisor"]),
                s(&v["vcpus"]),
                format!("{} MiB", s(&v["memory_mib"])),
                s(&v["image"]),
                v["id"]
                    .as_str()
                    .map(|i| i.chars().take(8).collect())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no VMs");
    } else {
        println!(
            "{}",
            table(
                &["NAME", "STATE", "HYPERVISOR", "VCPUS", "MEMORY", "IMAGE", "ID"],
                &rows
            )
        );
    }
}

fn print_vm_details(v: &Value) {
    let mut rows = vec![
        ("Name", s(&v["name"])),
        ("ID", s(&v["id"])),
        ("State", s(&v["state"])),
        ("Hypervisor", s(&v["hypervisor"])),
        ("vCPUs", format!("{} (room for {})", s(&v["vcpus"]), s(&v["max_vcpus"]))),
        (
            "Memory",
            format!("{} MiB (room for {} MiB)", s(&v["memory_mib"]), s(&v["max_memory_mib"])),
        ),
        ("Image", s(&v["image"])),
    ];
    if let Some(h) = v["host"].as_str() {
        rows.push(("Host", h.to_string()));
    }
    for verdict in v["placement"]["verdicts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        rows.push((
            if verdict["chosen"] == true { "Placed" } else { "Not on" },
            format!("{}: {}", s(&verdict["host"]), s(&verdict["reason"])),
        ));
    }
    let j = &v["jail"];
    if j.is_object() {
        let limit = |k: &str, unit: &str| match &j[k] {
            Value::Null => "none on this host".to_string(),
            x => format!("{}{unit}", s(x)),
        };
        rows.push((
            "Jail",
            format!(
                "uid {}, memory limit {}, CPU weight {}{}, I/O weight {}",
                s(&j["uid"]),
                limit("memory_limit_mib", " MiB"),
                limit("cpu_weight", ""),
                j["cpu_limit"]
                    .as_f64()
                    .map(|c| format!(", at most {c} CPUs"))
                    .unwrap_or_default(),
                limit("io_weight", "")
            ),
        ));
    }
    for nic in v["nics"].as_array().map(Vec::as_slice).unwrap_or_default() {
        rows.push((
            "NIC",
            format!(
                "{} {}/{} on {} ({})",
                s(&nic["mac"]),
                s(&nic["ip"]),
                s(&nic["prefix"]),
                s(&nic["network"]),
                s(&nic["tap"])
            ),
        ));
    }
    if let Some(r) = v["reason"].as_str() {
        rows.push(("Reason", r.to_string()));
    }
    if let Some(p) = v["pid"].as_u64() {
        rows.push(("VMM PID", p.to_string()));
    }
    for (k, val) in rows {
        println!("{k:<11} {val}");
    }
}
