//! The `hearth` command: a client of the REST API.
//!
//! It reads the API's address from `--url`/`HEARTH_URL`, the key from
//! `--api-key`/`HEARTH_API_KEY` or the file named by `--api-key-file`/
//! `HEARTH_API_KEY_FILE`, and the project from `--project`/`HEARTH_PROJECT`. What none
//! of those give comes from the config file (`--config`/`HEARTH_CLI_CONFIG`, default
//! `~/.config/hearth/cli.toml`: `url`, `api_key`, `api_key_file`, `project`), then from
//! the defaults `http://127.0.0.1:8080`, `/var/lib/hearth/admin.key` and `default`.

mod client;
pub mod doctor;
mod identity;
mod image;
mod terminal;
mod volume;

use std::path::PathBuf;
use std::time::Duration;
use vmm_manager::VmAction;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

pub use client::ApiClient;

#[derive(Parser, Debug)]
#[command(name = "hearth", version, about = "Drive a hearth private cloud")]
pub struct Cli {
    /// The API's base URL [default: http://127.0.0.1:8080].
    #[arg(long, env = "HEARTH_URL", global = true)]
    pub url: Option<String>,
    /// API key (hth_…).
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// File holding the API key [default: /var/lib/hearth/admin.key].
    #[arg(long, env = "HEARTH_API_KEY_FILE", global = true)]
    pub api_key_file: Option<PathBuf>,
    /// The project to work in [default: default].
    #[arg(long, env = "HEARTH_PROJECT", global = true)]
    pub project: Option<String>,
    /// Config file with url, api_key, api_key_file and project [default: ~/.config/hearth/cli.toml].
    #[arg(long, env = "HEARTH_CLI_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Attach this terminal to a VM's serial console. Detach with Ctrl-] (the VM keeps running).
    Console {
        vm: String,
        /// Watch only; do not type into the guest.
        #[arg(long)]
        read_only: bool,
    },
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Manage volumes: data disks that outlive VMs.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Manage guest images: import, list, show, delete.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Show a long-running operation.
    Operation { id: String },
    /// Projects and their members.
    #[command(subcommand)]
    Project(identity::ProjectCommand),
    /// Users (administrators).
    #[command(subcommand)]
    User(identity::UserCommand),
    /// API keys.
    #[command(subcommand)]
    Key(identity::KeyCommand),
    /// Check this host: KVM really usable, device-mapper, tools, IP forwarding, firewall
    /// rules that would drop bridged traffic. Needs no API key; run it as root.
    Doctor {
        /// Guest kernel to probe KVM with (default: the tiny image's).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Where guest images are built.
        #[arg(long, env = "HEARTH_IMAGE_CACHE", default_value = "/var/cache/hearth/images")]
        images_dir: PathBuf,
        /// Do not boot a guest to check KVM (up to 8 s); report only whether /dev/kvm opens.
        #[arg(long)]
        no_kvm_probe: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a network (a bridge with the gateway address, IPAM, optional DHCP and NAT).
    Create {
        name: String,
        /// IPv4 subnet in CIDR notation, e.g. 10.50.0.0/24.
        #[arg(long)]
        subnet: String,
        /// Gateway address (default: the subnet's first address).
        #[arg(long)]
        gateway: Option<String>,
        /// Do not serve DHCP.
        #[arg(long)]
        no_dhcp: bool,
        /// Masquerade traffic leaving through the host.
        #[arg(long)]
        nat: bool,
        /// Join a VXLAN overlay with this VNI (needs --vxlan-local).
        #[arg(long)]
        vxlan_vni: Option<u32>,
        /// This host's underlay address for VXLAN.
        #[arg(long)]
        vxlan_local: Option<String>,
        /// Underlay device for VXLAN.
        #[arg(long)]
        vxlan_device: Option<String>,
        /// Other hosts' underlay addresses (repeatable).
        #[arg(long)]
        vxlan_peer: Vec<String>,
    },
    /// List networks.
    List,
    /// Show one network.
    Show { name: String },
    /// Delete a network (refused while VMs are attached).
    Delete { name: String },
}

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
        /// Define the VM without starting it.
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

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Doctor {
        kernel,
        images_dir,
        no_kvm_probe,
    } = cli.command
    {
        return doctor_command(cli.output, (!no_kvm_probe).then_some(kernel), images_dir).await;
    }
    let file = CliConfig::load(cli.config.as_deref())?;
    let url = cli
        .url
        .clone()
        .or(file.url)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let key_file = cli
        .api_key_file
        .clone()
        .or(file.api_key_file)
        .unwrap_or_else(|| "/var/lib/hearth/admin.key".into());
    let key = match cli.api_key.clone().or(file.api_key) {
        Some(k) => k,
        None => std::fs::read_to_string(&key_file)
            .with_context(|| {
                format!(
                    "no API key: set HEARTH_API_KEY or --api-key, put api_key in the config file, or make {} readable",
                    key_file.display()
                )
            })?
            .trim()
            .to_string(),
    };
    let api = ApiClient::new(&url, &key)?.with_project(cli.project.clone().or(file.project));
    let out = cli.output;
    match cli.command {
        Command::Vm(cmd) => vm(&api, out, cmd).await,
        Command::Console { vm, read_only } => terminal::attach(&api, &vm, !read_only).await,
        Command::Network(cmd) => network(&api, out, cmd).await,
        Command::Volume(cmd) => volume::run(&api, out, cmd).await,
        Command::Image(cmd) => image::run(&api, out, cmd).await,
        Command::Project(cmd) => identity::project(&api, out, cmd).await,
        Command::User(cmd) => identity::user(&api, out, cmd).await,
        Command::Key(cmd) => identity::key(&api, out, cmd).await,
        Command::Operation { id } => {
            let op = api.get(&format!("/v1/operations/{id}")).await?;
            print_value(out, &op, |op| println!("{}", op_line(op)));
            Ok(())
        }
        Command::Doctor {
            kernel,
            images_dir,
            no_kvm_probe,
        } => doctor_command(out, (!no_kvm_probe).then_some(kernel), images_dir).await,
    }
}

/// The CLI's config file: what flags and environment variables do not give.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CliConfig {
    url: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    project: Option<String>,
}

impl CliConfig {
    /// Reads `path`, or `~/.config/hearth/cli.toml` (`$XDG_CONFIG_HOME` honoured) when
    /// it exists. A named file must exist.
    fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let (path, must) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => {
                let base = std::env::var_os("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
                match base {
                    Some(b) => (b.join("hearth/cli.toml"), false),
                    None => return Ok(Self::default()),
                }
            }
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must && e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("{} is not a valid hearth CLI config", path.display()))
    }
}

/// `probe`: None skips the KVM boot probe; Some(kernel) probes (with that kernel, or the tiny image's).
async fn doctor_command(out: Output, probe: Option<Option<PathBuf>>, images_dir: PathBuf) -> anyhow::Result<()> {
    if !doctor::run(out, probe, images_dir).await? {
        bail!("some checks failed");
    }
    Ok(())
}

async fn vm(api: &ApiClient, out: Output, cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Create {
            name,
            image,
            vcpus,
            memory,
            hypervisor,
            cmdline_append,
            vnc,
            machine,
            volumes,
            disk_size,
            ssh_keys,
            user_data,
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

async fn network(api: &ApiClient, out: Output, cmd: NetworkCommand) -> anyhow::Result<()> {
    match cmd {
        NetworkCommand::Create {
            name,
            subnet,
            gateway,
            no_dhcp,
            nat,
            vxlan_vni,
            vxlan_local,
            vxlan_device,
            vxlan_peer,
        } => {
            let mut body = json!({"name": name, "subnet": subnet, "dhcp": !no_dhcp, "nat": nat});
            if let Some(g) = gateway {
                body["gateway"] = json!(g);
            }
            if let Some(vni) = vxlan_vni {
                let local = vxlan_local.ok_or_else(|| anyhow::anyhow!("--vxlan-vni needs --vxlan-local"))?;
                body["vxlan"] = json!({"vni": vni, "local": local, "device": vxlan_device, "peers": vxlan_peer});
            }
            let n = api.post("/v1/networks", Some(body)).await?;
            print_value(out, &n, print_network_details);
        }
        NetworkCommand::List => {
            let nets = api.get("/v1/networks").await?;
            print_value(out, &nets, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|n| {
                        vec![
                            s(&n["spec"]["name"]),
                            s(&n["spec"]["subnet"]),
                            s(&n["gateway"]),
                            yes_no(&n["spec"]["dhcp"]),
                            yes_no(&n["spec"]["nat"]),
                            n["spec"]["vxlan"]["vni"]
                                .as_u64()
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "-".into()),
                            n["ports"].as_array().map(|p| p.len()).unwrap_or(0).to_string(),
                            s(&n["bridge"]),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("no networks");
                } else {
                    println!(
                        "{}",
                        table(
                            &["NAME", "SUBNET", "GATEWAY", "DHCP", "NAT", "VNI", "PORTS", "BRIDGE"],
                            &rows
                        )
                    );
                }
            });
        }
        NetworkCommand::Show { name } => {
            let n = api.get(&format!("/v1/networks/{name}")).await?;
            print_value(out, &n, print_network_details);
        }
        NetworkCommand::Delete { name } => {
            api.delete_empty(&format!("/v1/networks/{name}")).await?;
            if out == Output::Json {
                println!("{}", json!({"deleted": name}));
            } else {
                println!("deleted network {name}");
            }
        }
    }
    Ok(())
}

fn yes_no(v: &Value) -> String {
    if v.as_bool() == Some(true) { "yes" } else { "no" }.to_string()
}

fn print_network_details(n: &Value) {
    let rows = [
        ("Name", s(&n["spec"]["name"])),
        ("Subnet", s(&n["spec"]["subnet"])),
        ("Gateway", s(&n["gateway"])),
        ("DHCP", yes_no(&n["spec"]["dhcp"])),
        ("NAT", yes_no(&n["spec"]["nat"])),
        (
            "Bridge",
            format!(
                "{} ({})",
                s(&n["bridge"]),
                if n["bridge_present"] == true {
                    "present"
                } else {
                    "MISSING"
                }
            ),
        ),
        (
            "VXLAN",
            n["spec"]["vxlan"]["vni"]
                .as_u64()
                .map(|v| format!("VNI {v} via {}", s(&n["vxlan_device"])))
                .unwrap_or_else(|| "-".into()),
        ),
        ("Addresses", format!("{} allocated", s(&n["allocated"]))),
        (
            "Ports",
            n["ports"]
                .as_array()
                .map(|p| p.iter().map(s).collect::<Vec<_>>().join(", "))
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "-".into()),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<10} {v}");
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
async fn finish(api: &ApiClient, out: Output, accepted: Value, no_wait: bool, vm: &str) -> anyhow::Result<()> {
    let op_id = accepted["operation"]["id"].as_str().unwrap_or_default().to_string();
    if no_wait {
        print_value(out, &accepted, |a| println!("{}", op_line(&a["operation"])));
        return Ok(());
    }
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

pub(crate) fn print_value(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => table(v),
    }
}

fn op_line(op: &Value) -> String {
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

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
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
        ("vCPUs", s(&v["vcpus"])),
        ("Memory", format!("{} MiB", s(&v["memory_mib"]))),
        ("Image", s(&v["image"])),
    ];
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

#[cfg(test)]
mod tests {
    #[test]
    fn tables_align_columns() {
        let t = super::table(
            &["NAME", "STATE"],
            &[
                vec!["web".into(), "running".into()],
                vec!["database".into(), "stopped".into()],
            ],
        );
        assert_eq!(t, "NAME      STATE\nweb       running\ndatabase  stopped");
    }
}
