//! `hearth volume …`: data disks that outlive VMs.

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::ApiClient;
use super::{print_value, s, table, Output};

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume: empty, a clone of a snapshot, or a volume another host exports over NBD.
    Create {
        name: String,
        /// Size, e.g. 10G, 512M, or bytes.
        #[arg(long)]
        size: Option<String>,
        /// Clone this snapshot (volume@snapshot).
        #[arg(long)]
        from_snapshot: Option<String>,
        /// A volume on another host: its NBD address host:port (with --remote-export).
        #[arg(long)]
        remote: Option<String>,
        /// The export name on the other host (default: this volume's name).
        #[arg(long)]
        remote_export: Option<String>,
        /// Reach the other host's NBD server inside TLS (this host's blockd verifies
        /// it with the ca-cert.pem of its --nbd-tls-certificates).
        #[arg(long, requires = "remote")]
        remote_tls: bool,
    },
    /// List volumes.
    List,
    /// Show one volume, its snapshots and exports.
    Show { name: String },
    /// Grow a volume (volumes never shrink).
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Take a read-only snapshot of a volume.
    Snapshot { name: String, snapshot: String },
    /// Delete a snapshot (refused while clones depend on it).
    DeleteSnapshot { name: String, snapshot: String },
    /// Make a new volume from a volume's snapshot (taken now unless --snapshot names one).
    Clone {
        name: String,
        new_name: String,
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Attach a volume to a VM (hot-plugged if it runs).
    Attach {
        name: String,
        vm: String,
        /// file (the hypervisor opens it) or vhost-user (blockd serves it).
        #[arg(long)]
        via: Option<String>,
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a volume from its VM (hot-unplugged if it runs).
    Detach { name: String },
    /// Serve a volume over NBD so other hosts and tools can reach it.
    Export {
        name: String,
        #[arg(long)]
        read_only: bool,
    },
    /// Stop serving a volume over NBD.
    Unexport { name: String },
    /// Delete a volume (refused while attached, exported, or cloned from).
    Delete { name: String },
}

pub async fn run(api: &ApiClient, out: Output, cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            from_snapshot,
            remote,
            remote_export,
            remote_tls,
        } => {
            let mut body = json!({ "name": name });
            if let Some(size) = size {
                body["size"] = json!(size);
            }
            if let Some(snap) = from_snapshot {
                body["source"] = json!({ "snapshot": snap });
            }
            if let Some(addr) = remote {
                body["remote"] = json!({ "tcp": addr, "export": remote_export.unwrap_or_else(|| name.clone()) });
                if remote_tls {
                    body["remote"]["tls"] = json!(true);
                }
            }
            let v = api.post("/v1/volumes", Some(body)).await?;
            print_value(out, &v, print_details);
        }
        VolumeCommand::List => {
            let vols = api.get("/v1/volumes").await?;
            print_value(out, &vols, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|v| {
                        vec![
                            s(&v["name"]),
                            v["size_bytes"].as_u64().map(human).unwrap_or_else(|| "-".into()),
                            v["allocated_bytes"].as_u64().map(human).unwrap_or_else(|| "-".into()),
                            if v["location"] == "remote" {
                                "remote".into()
                            } else {
                                s(&v["backend"])
                            },
                            v["snapshots"].as_array().map(|a| a.len()).unwrap_or(0).to_string(),
                            v["attached_to"]["vm_name"].as_str().unwrap_or("-").to_string(),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("no volumes");
                } else {
                    println!(
                        "{}",
                        table(&["NAME", "SIZE", "USED", "BACKEND", "SNAPSHOTS", "ATTACHED TO"], &rows)
                    );
                }
            });
        }
        VolumeCommand::Show { name } => {
            let v = api.get(&format!("/v1/volumes/{name}")).await?;
            print_value(out, &v, print_details);
        }
        VolumeCommand::Resize { name, size } => {
            let v = api
                .post(&format!("/v1/volumes/{name}/resize"), Some(json!({ "size": size })))
                .await?;
            print_value(out, &v, print_details);
        }
        VolumeCommand::Snapshot { name, snapshot } => {
            let sn = api
                .post(
                    &format!("/v1/volumes/{name}/snapshots"),
                    Some(json!({ "name": snapshot })),
                )
                .await?;
            print_value(out, &sn, |sn| {
                println!("snapshot {}@{} ({})", s(&sn["volume"]), s(&sn["name"]), size_of(sn))
            });
        }
        VolumeCommand::DeleteSnapshot { name, snapshot } => {
            api.delete_empty(&format!("/v1/volumes/{name}/snapshots/{snapshot}"))
                .await?;
            done(
                out,
                json!({ "deleted": format!("{name}@{snapshot}") }),
                &format!("deleted snapshot {name}@{snapshot}"),
            );
        }
        VolumeCommand::Clone {
            name,
            new_name,
            snapshot,
        } => {
            let mut body = json!({ "name": new_name });
            if let Some(snap) = snapshot {
                body["snapshot"] = json!(snap);
            }
            let v = api.post(&format!("/v1/volumes/{name}/clone"), Some(body)).await?;
            print_value(out, &v, print_details);
        }
        VolumeCommand::Attach {
            name,
            vm,
            via,
            read_only,
        } => {
            let mut body = json!({ "vm": vm, "read_only": read_only });
            if let Some(via) = via {
                body["via"] = json!(via);
            }
            let v = api.post(&format!("/v1/volumes/{name}/attach"), Some(body)).await?;
            print_value(out, &v, print_details);
        }
        VolumeCommand::Detach { name } => {
            let v = api.post(&format!("/v1/volumes/{name}/detach"), None).await?;
            print_value(out, &v, print_details);
        }
        VolumeCommand::Export { name, read_only } => {
            let e = api
                .post(
                    &format!("/v1/volumes/{name}/export"),
                    Some(json!({ "read_only": read_only })),
                )
                .await?;
            print_value(out, &e, |e| {
                for uri in e["nbd"]["uris"].as_array().into_iter().flatten() {
                    println!("{}", s(uri));
                }
            });
        }
        VolumeCommand::Unexport { name } => {
            api.delete_empty(&format!("/v1/volumes/{name}/export")).await?;
            done(
                out,
                json!({ "unexported": name }),
                &format!("volume {name} is no longer served over NBD"),
            );
        }
        VolumeCommand::Delete { name } => {
            api.delete_empty(&format!("/v1/volumes/{name}")).await?;
            done(out, json!({ "deleted": name }), &format!("deleted volume {name}"));
        }
    }
    Ok(())
}

fn done(out: Output, j: Value, text: &str) {
    if out == Output::Json {
        println!("{j}");
    } else {
        println!("{text}");
    }
}

/// Bytes in binary units: 1.5G, 64M, 512.
pub fn human(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, n) in UNITS {
        if b >= n {
            let v = b as f64 / n as f64;
            return if b % n == 0 {
                format!("{}{u}", b / n)
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    b.to_string()
}

fn size_of(v: &Value) -> String {
    v["size_bytes"].as_u64().map(human).unwrap_or_else(|| "-".into())
}

fn print_details(v: &Value) {
    println!("name:        {}", s(&v["name"]));
    if v["location"] == "remote" {
        let r = &v["remote"];
        println!(
            "location:    remote, NBD export {} at {}",
            s(&r["export"]),
            r["tcp"].as_str().or(r["unix"].as_str()).unwrap_or("?")
        );
    } else {
        println!("size:        {}", size_of(v));
        println!(
            "used:        {}",
            v["allocated_bytes"].as_u64().map(human).unwrap_or_else(|| "-".into())
        );
        println!("backend:     {} ({})", s(&v["backend"]), s(&v["format"]));
    }
    if let Some(o) = v["origin"].as_str() {
        println!("cloned from: {o}");
    }
    match v["attached_to"]["vm_name"].as_str() {
        Some(vm) => println!(
            "attached to: {vm} as {} via {}",
            s(&v["attached_to"]["disk"]),
            s(&v["attached_to"]["via"])
        ),
        None => println!("attached to: -"),
    }
    for sn in v["snapshots"].as_array().into_iter().flatten() {
        let clones = sn["clones"]
            .as_array()
            .map(|c| c.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        println!(
            "snapshot:    {} ({}){}",
            s(&sn["name"]),
            size_of(sn),
            if clones.is_empty() {
                String::new()
            } else {
                format!(", clones: {clones}")
            }
        );
    }
    for e in v["exports"].as_array().into_iter().flatten() {
        match e["kind"].as_str() {
            Some("nbd") => {
                for uri in e["nbd"]["uris"].as_array().into_iter().flatten() {
                    println!("export:      {}", s(uri));
                }
            }
            _ => println!(
                "export:      vhost-user ({})",
                if e["connected"] == true {
                    "a VM is connected"
                } else {
                    "no VM connected"
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(super::human(64 << 20), "64M");
        assert_eq!(super::human(3 << 29), "1.5G");
        assert_eq!(super::human(512), "512");
    }
}
