//! The `hearth` command: a client of the REST API.
//!
//! It reads the API's address from `--url`/`HEARTH_URL`, the key from
//! `--api-key`/`HEARTH_API_KEY` or the file named by `--api-key-file`/
//! `HEARTH_API_KEY_FILE`, and the project from `--project`/`HEARTH_PROJECT`. What none
//! of those give comes from the config file (`--config`/`HEARTH_CLI_CONFIG`, default
//! `~/.config/hearth/cli.toml`: `url`, `api_key`, `api_key_file`, `project`), then from
//! the defaults `http://127.0.0.1:8080`, `/var/lib/hearth/admin.key` and `default`.

mod client;
mod database;
pub mod doctor;
mod host;
mod identity;
mod image;
mod network;
mod terminal;
mod vm;
mod volume;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use network::network;
use serde_json::Value;
use vm::{op_line, vm};

pub use client::ApiClient;
pub use network::NetworkCommand;
pub use vm::VmCommand;

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
    /// Managed PostgreSQL databases.
    #[command(subcommand)]
    Db(database::DbCommand),
    /// The hosts of the cluster (administrators).
    #[command(subcommand)]
    Host(host::HostCommand),
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
    if let Command::Host(cmd @ host::HostCommand::Join { .. }) = cli.command {
        return host::join(&url, cli.output, cmd).await;
    }
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
        Command::Db(cmd) => database::run(&api, out, cmd).await,
        Command::Host(cmd) => host::run(&api, out, cmd).await,
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

pub(crate) fn print_value(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => table(v),
    }
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
