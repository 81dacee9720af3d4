//! `hearth host …`: the hosts of the cluster, their capacity and state; cordon,
//! uncordon, forget (administrators).

use clap::Subcommand;
use serde_json::{json, Value};

use crate::{print_value, s, table, ApiClient, Output};

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// List the hosts: state, capacity and use, VMs.
    List,
    /// Show one host.
    Show { name: String },
    /// Take no new VMs on the host (its VMs keep running).
    Cordon { name: String },
    /// Let the host take new VMs again.
    Uncordon { name: String },
    /// Forget a host that is gone for good (refused while it runs or holds VMs).
    Delete { name: String },
}

fn mib_gib(v: &Value) -> String {
    format!("{:.1}", v.as_f64().unwrap_or(0.0) / 1024.0)
}

fn use_line(h: &Value) -> (String, String) {
    (
        format!("{}/{}", s(&h["used"]["vcpus"]), s(&h["allocatable"]["vcpus"])),
        format!(
            "{}/{} GiB",
            mib_gib(&h["used"]["memory_mib"]),
            mib_gib(&h["allocatable"]["memory_mib"])
        ),
    )
}

fn details(h: &Value) {
    let (cpu, mem) = use_line(h);
    let state = match h["lost"]["reason"].as_str() {
        Some(why) => format!("lost: {why}"),
        None => s(&h["state"]),
    };
    let vms = h["vms"]
        .as_array()
        .map(|v| v.iter().map(s).collect::<Vec<_>>().join(", "))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "-".into());
    let versions = h["versions"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {}", s(v)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    for (k, v) in [
        ("Name", s(&h["name"])),
        ("State", state),
        ("Leader", if h["leader"] == true { "yes" } else { "no" }.to_string()),
        ("Address", s(&h["address"])),
        (
            "vCPUs",
            format!("{cpu} allocated ({} CPUs)", s(&h["capacity"]["vcpus"])),
        ),
        ("Memory", mem),
        ("VMs", vms),
        ("Versions", versions),
    ] {
        println!("{k:<9} {v}");
    }
}

pub(crate) async fn run(api: &ApiClient, out: Output, cmd: HostCommand) -> anyhow::Result<()> {
    match cmd {
        HostCommand::List => {
            let hosts = api.get("/v1/hosts").await?;
            print_value(out, &hosts, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|h| {
                        let (cpu, mem) = use_line(h);
                        vec![
                            s(&h["name"]),
                            s(&h["state"]),
                            if h["leader"] == true { "*" } else { "" }.to_string(),
                            s(&h["address"]),
                            cpu,
                            mem,
                            h["vms"].as_array().map(|v| v.len()).unwrap_or(0).to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "STATE", "LEADER", "ADDRESS", "VCPUS", "MEMORY", "VMS"], &rows)
                );
            });
        }
        HostCommand::Show { name } => {
            let h = api.get(&format!("/v1/hosts/{name}")).await?;
            print_value(out, &h, details);
        }
        HostCommand::Cordon { name } => {
            let h = api.post(&format!("/v1/hosts/{name}/cordon"), None).await?;
            print_value(out, &h, details);
        }
        HostCommand::Uncordon { name } => {
            let h = api.post(&format!("/v1/hosts/{name}/uncordon"), None).await?;
            print_value(out, &h, details);
        }
        HostCommand::Delete { name } => {
            api.delete_empty(&format!("/v1/hosts/{name}")).await?;
            if out == Output::Json {
                println!("{}", json!({"deleted": name}));
            } else {
                println!("forgot host {name}");
            }
        }
    }
    Ok(())
}
