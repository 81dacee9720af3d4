//! `hearth image …`: the guest image cache.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::client::ApiClient;
use super::volume::human;
use super::{print_value, s, table, Output};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an image from an HTTP(S) URL or a path on the API's host (a raw or qcow2
    /// disk, or a folder a guest-images recipe built). Shows a progress bar.
    /// Example: hearth image import debian /var/cache/hearth/images/debian
    Import {
        /// name or name:tag
        name: String,
        /// An http(s):// URL, or an absolute path on the API's host.
        source: String,
        /// Expected SHA-256 of the file (sha256:HEX or HEX).
        #[arg(long)]
        sha256: Option<String>,
        /// raw or qcow2 (detected when absent).
        #[arg(long)]
        format: Option<String>,
        /// Kernel to boot the disk with (URL or path on the API's host).
        #[arg(long)]
        kernel: Option<String>,
        /// Initramfs for that kernel (URL or path).
        #[arg(long)]
        initramfs: Option<String>,
        /// Default kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Return once the import is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// List images.
    List,
    /// Show one image (by name, name:tag or digest).
    Show { name: String },
    /// Delete an image name (refused while VMs use the image); unused files are collected.
    Delete { name: String },
}

pub async fn run(api: &ApiClient, out: Output, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Import {
            name,
            source,
            sha256,
            format,
            kernel,
            initramfs,
            cmdline,
            no_wait,
        } => {
            let mut body = json!({ "name": name });
            if source.starts_with("http://") || source.starts_with("https://") {
                body["url"] = json!(source);
            } else {
                let p = PathBuf::from(&source);
                let abs = if p.is_absolute() {
                    p
                } else {
                    std::env::current_dir()?.join(p)
                };
                body["path"] = json!(abs.display().to_string());
            }
            let fields = [
                ("sha256", sha256),
                ("format", format),
                ("kernel", kernel),
                ("initramfs", initramfs),
                ("cmdline", cmdline),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let accepted = api.post("/v1/images", Some(body)).await?;
            if no_wait {
                print_value(out, &accepted, |a| {
                    println!("import accepted: operation {}", s(&a["operation"]["id"]))
                });
                return Ok(());
            }
            let op_id = s(&accepted["operation"]["id"]);
            let op = follow(api, &op_id, out == Output::Table).await?;
            if op["status"] == "failed" {
                bail!(
                    "import failed: {}",
                    op["error"]["message"].as_str().unwrap_or("unknown error")
                );
            }
            let img = api.get(&format!("/v1/images/{name}")).await?;
            print_value(out, &img, print_details);
        }
        ImageCommand::List => {
            let imgs = api.get("/v1/images").await?;
            print_value(out, &imgs, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|i| {
                        vec![
                            display_name(i),
                            short_digest(i),
                            i["disk"]["virtual_size"]
                                .as_u64()
                                .map(human)
                                .unwrap_or_else(|| "-".into()),
                            i["stored_bytes"].as_u64().map(human).unwrap_or_else(|| "-".into()),
                            i["in_use_by"].as_array().map(|a| a.len()).unwrap_or(0).to_string(),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("no images");
                } else {
                    println!("{}", table(&["NAME", "DIGEST", "DISK", "STORED", "VMS"], &rows));
                }
            });
        }
        ImageCommand::Show { name } => {
            let img = api.get(&format!("/v1/images/{name}")).await?;
            print_value(out, &img, print_details);
        }
        ImageCommand::Delete { name } => {
            let r = api.delete(&format!("/v1/images/{name}")).await?;
            print_value(out, &r, |r| {
                println!(
                    "deleted {name}; freed {} ({} files)",
                    human(r["freed_bytes"].as_u64().unwrap_or(0)),
                    r["blobs"].as_u64().unwrap_or(0)
                )
            });
        }
    }
    Ok(())
}

/// Polls the operation, drawing a progress bar on stderr (when `bar`), until it ends.
async fn follow(api: &ApiClient, op_id: &str, bar: bool) -> anyhow::Result<Value> {
    let pb = if bar {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    let op = loop {
        let op = api.get(&format!("/v1/operations/{op_id}?wait=1")).await?;
        pb.set_message(s(&op["progress"]));
        let d = &op["progress_detail"];
        if let Some(total) = d["bytes_total"].as_u64() {
            pb.set_length(total);
        }
        if let Some(done) = d["bytes_done"].as_u64() {
            pb.set_position(done);
        }
        if op["status"] != "running" {
            break op;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if op["status"] == "succeeded" {
        pb.finish_with_message("imported");
    } else {
        pb.abandon_with_message("failed");
    }
    Ok(op)
}

fn display_name(i: &Value) -> String {
    match i["tag"].as_str() {
        Some("latest") | None | Some("") => s(&i["name"]),
        Some(t) => format!("{}:{t}", s(&i["name"])),
    }
}

fn short_digest(i: &Value) -> String {
    i["digest"]
        .as_str()
        .map(|d| d.strip_prefix("sha256:").unwrap_or(d).chars().take(12).collect())
        .unwrap_or_else(|| "-".into())
}

fn print_details(i: &Value) {
    let mut rows = vec![
        ("Name", display_name(i)),
        ("Digest", s(&i["digest"])),
        (
            "Names",
            i["names"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
        ),
        ("Source", s(&i["source"])),
        (
            "Stored",
            i["stored_bytes"].as_u64().map(human).unwrap_or_else(|| "-".into()),
        ),
    ];
    if i["disk"].is_object() {
        rows.push((
            "Disk",
            format!(
                "{} raw (imported as {})",
                i["disk"]["virtual_size"].as_u64().map(human).unwrap_or_default(),
                s(&i["disk"]["source_format"])
            ),
        ));
    } else {
        rows.push(("Disk", "none (boots from its initramfs)".into()));
    }
    rows.push(("Cmdline", s(&i["boot"]["cmdline"])));
    let users = i["in_use_by"].as_array().map(|a| a.len()).unwrap_or(0);
    rows.push(("Used by", format!("{users} VM(s)")));
    for (k, v) in rows {
        println!("{k:<8} {v}");
    }
}
