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
    /// Cordon the host and move its VMs that keep nothing there to other hosts (cold:
    /// stopped, made elsewhere, started again); says what moved and what stayed.
    Drain { name: String },
    /// Forget a host that is gone for good (refused while it runs or holds VMs).
    Delete { name: String },
    /// Make a single-use token that lets a new machine join (`hearth host join`).
    JoinToken {
        /// Seconds it lasts (default an hour).
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// On a new machine: join the cluster whose api `--url` names, with a token from
    /// `hearth host join-token`; writes the cluster's store, this host's name and
    /// address into hearth.toml's [api] section (then start hearth-api).
    Join {
        #[arg(long)]
        token: String,
        /// This host's name (a DNS label).
        #[arg(long)]
        name: String,
        /// The address the other hosts reach this one at.
        #[arg(long)]
        address: String,
        /// The configuration file to write.
        #[arg(long, default_value = "/etc/hearth/hearth.toml")]
        write_config: std::path::PathBuf,
    },
}

/// `hearth host join`: no API key on the new machine; the token is the credential.
pub async fn join(url: &str, out: Output, cmd: HostCommand) -> anyhow::Result<()> {
    let HostCommand::Join {
        token,
        name,
        address,
        write_config,
    } = cmd
    else {
        anyhow::bail!("not a join");
    };
    let api = ApiClient::new(url, "")?;
    let joined = api
        .post(
            "/v1/hosts/join",
            Some(json!({"token": token, "name": name, "address": address})),
        )
        .await?;
    let store = joined["store"].as_str().unwrap_or_default().to_string();
    let mut doc: toml::Table = match std::fs::read_to_string(&write_config) {
        Ok(text) => text
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: not valid TOML: {e}", write_config.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", write_config.display())),
    };
    let api_section = doc
        .entry("api")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| anyhow::anyhow!("{}: [api] is not a table", write_config.display()))?;
    api_section.insert("store".into(), toml::Value::String(store.clone()));
    api_section.insert("host_name".into(), toml::Value::String(name.clone()));
    api_section.insert("host_address".into(), toml::Value::String(address.clone()));
    if let Some(dir) = write_config.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&write_config, toml::to_string(&doc)?)?;
    if out == Output::Json {
        println!("{}", json!({"joined": name, "store": store, "config": write_config}));
    } else {
        println!(
            "host {name} admitted; {} now names the cluster's store ({store}); start hearth-api with it",
            write_config.display()
        );
    }
    Ok(())
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
        HostCommand::Drain { name } => {
            let accepted = api.post(&format!("/v1/hosts/{name}/drain"), None).await?;
            let op_id = accepted["operation"]["id"].as_str().unwrap_or_default().to_string();
            let op = crate::vm::wait_operation(api, out, &op_id).await?;
            print_value(out, &op, |op| println!("drained {name}: {}", s(&op["progress"])));
        }
        HostCommand::JoinToken { expires_in } => {
            let body = expires_in
                .map(|s| json!({"expires_in_s": s}))
                .unwrap_or_else(|| json!({}));
            let t = api.post("/v1/hosts/join-tokens", Some(body)).await?;
            print_value(out, &t, |t| {
                println!("{}", s(&t["token"]));
                println!("on the new machine: {}", s(&t["join_command"]));
            });
        }
        HostCommand::Join { .. } => unreachable!("joined before an API key is needed"),
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
