//! `hearth network …`: create, list, show and delete networks.

use clap::Subcommand;
use serde_json::{json, Value};

use crate::{print_value, s, table, ApiClient, Output};

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

pub(crate) async fn network(api: &ApiClient, out: Output, cmd: NetworkCommand) -> anyhow::Result<()> {
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
