//! The `hearth-api` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hearth_api::server;
use hearth_api::state::{AllInOne, ApiConfig};
use vmm_manager::{Accel, HypervisorKind, VmmConfig};

#[derive(Parser, Debug)]
#[command(name = "hearth-api", version, about = "hearth's REST API", args_override_self = true)]
struct Args {
    /// Print the OpenAPI document (what GET /openapi.json serves) and exit.
    #[arg(long)]
    openapi: bool,
    /// Run the api and all four daemons (vmm-manager, netd, blockd, imaged) in this process.
    #[arg(long)]
    all_in_one: bool,
    /// Data directory: store, admin key, and with --all-in-one the daemons' state and sockets.
    #[arg(long, default_value = "/var/lib/hearth")]
    data_dir: PathBuf,
    /// Address to serve the REST API on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the daemons' sockets (default: /run/hearth, or <data dir>/run with --all-in-one).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// A daemon reached over TCP with TLS instead of its socket:
    /// `NAME=https://host:port` (NAME: vmm-manager, netd, blockd or imaged; repeatable).
    /// Needs --daemon-ca and --daemon-token-file.
    #[arg(long = "daemon", value_name = "NAME=URL", requires_all = ["daemon_ca", "daemon_token_file"])]
    daemons: Vec<String>,
    /// The CA that signed the TLS certificates of the daemons given with --daemon.
    #[arg(long)]
    daemon_ca: Option<PathBuf>,
    /// A file whose first line is the token the daemons given with --daemon accept.
    #[arg(long)]
    daemon_token_file: Option<PathBuf>,
    /// Where the desired state lives: `embedded` (<data dir>/store.redb) or
    /// etcd://host:port[,host:port…][/prefix] for several hosts.
    #[arg(long, default_value = "embedded")]
    store: hearth_api::store::StoreLocation,
    /// Failed authentications per minute from one address before it is refused (429)
    /// for the rest of the minute; 0 turns the limit off.
    #[arg(long, default_value_t = hearth_api::auth::limit::FAILURE_LIMIT)]
    auth_failures_per_minute: u32,
    /// Seconds between the reconciler's passes while the api serves (orphans, and
    /// changes a crash cut short); 0 runs it only at start.
    #[arg(long, default_value_t = 300)]
    reconcile_interval: u64,
    /// Hypervisor for VMs that do not name one; QEMU is used where it is not installed.
    #[arg(long, default_value = "cloud-hypervisor")]
    default_hypervisor: HypervisorKind,
    /// This host's name in the cluster (a DNS label; default: the machine's host name).
    #[arg(long)]
    host_name: Option<String>,
    /// The address other hosts reach this host at. With --all-in-one, the daemons are
    /// then also served there over TLS (ports --daemon-port to --daemon-port + 3), so
    /// the apis of other hosts can place VMs here.
    #[arg(long)]
    host_address: Option<std::net::IpAddr>,
    /// The first of the four TLS ports of --host-address.
    #[arg(long, default_value_t = 7440)]
    daemon_port: u16,
    /// vCPUs VMs may be given per host CPU, in all (the scheduler's vCPU capacity).
    #[arg(long, default_value_t = 16.0)]
    cpu_allocation_ratio: f64,
    /// All-in-one: image catalog directory (default <data dir>/images).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// All-in-one: QEMU accelerator (auto probes whether KVM really boots a guest).
    #[arg(long, default_value = "auto")]
    qemu_accel: Accel,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_binary: String,
    #[arg(long, default_value = "cloud-hypervisor")]
    cloud_hypervisor_binary: String,
    /// All-in-one: where volumes live: file:/dir (default <data dir>/volumes),
    /// lvm:VG[/THINPOOL] or memory:BYTES.
    #[arg(long)]
    volume_pool: Option<blockd::PoolConfig>,
    /// All-in-one: serve volumes over NBD on this TCP address (off unless given).
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// All-in-one: networks allowed to reach the NBD address (repeatable).
    #[arg(long)]
    nbd_allow: Vec<ipnet::IpNet>,
    /// All-in-one: TLS of the NBD server and of remote disks.
    #[command(flatten)]
    nbd_tls: blockd::exports::NbdTlsArgs,
    /// All-in-one: seconds a guest gets to power off before it is forced.
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
    /// All-in-one: how VMMs are jailed.
    #[command(flatten)]
    jail: vmm_manager::jail::JailArgs,
}

fn main() -> anyhow::Result<()> {
    // All-in-one: the VMM jailer runs from this binary, before any thread exists.
    vmm_manager::jail::launch::dispatch();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    socket_http::logging::init();
    let a = Args::parse_from(socket_http::config::args_with_config("api")?);
    if a.openapi {
        print!("{}", server::openapi_document());
        return Ok(());
    }
    let run_dir = a.data_dir.join("run");
    let socket_dir = a.socket_dir.clone().unwrap_or_else(|| {
        if a.all_in_one {
            run_dir.clone()
        } else {
            "/run/hearth".into()
        }
    });
    let mut endpoints = std::collections::BTreeMap::new();
    if let (Some(ca), Some(token_file)) = (&a.daemon_ca, &a.daemon_token_file) {
        let token = socket_http::tls::read_token(token_file)?;
        for d in &a.daemons {
            let (name, url) = d
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--daemon {d:?}: use NAME=https://host:port"))?;
            if !hearth_api::daemons::DAEMONS.contains(&name) {
                anyhow::bail!(
                    "--daemon {d:?}: no daemon {name:?}; use one of {}",
                    hearth_api::daemons::DAEMONS.join(", ")
                );
            }
            if a.all_in_one {
                anyhow::bail!("--daemon {d:?}: --all-in-one runs every daemon in this process");
            }
            let target = socket_http::tls::TlsTarget::new(url, ca, token.clone())
                .map_err(|e| anyhow::anyhow!("--daemon {d:?}: {e}"))?;
            endpoints.insert(name.to_string(), socket_http::Endpoint::Tls(target));
        }
    }
    let host_name = a
        .host_name
        .clone()
        .unwrap_or_else(hearth_api::state::HostIdentity::default_name);
    hearth_api::hosts::join::check_name(&host_name).map_err(|e| anyhow::anyhow!("--host-name: {e}"))?;
    if !(a.cpu_allocation_ratio.is_finite() && a.cpu_allocation_ratio >= 0.1) {
        anyhow::bail!("--cpu-allocation-ratio must be at least 0.1");
    }
    let config = ApiConfig {
        host: hearth_api::state::HostIdentity {
            name: host_name,
            address: a.host_address,
            daemon_port: a.daemon_port,
        },
        cpu_allocation_ratio: a.cpu_allocation_ratio,
        data_dir: a.data_dir.clone(),
        endpoints,
        listen: a.listen,
        socket_dir,
        default_hypervisor: a.default_hypervisor.into(),
        store: a.store.clone(),
        auth_failures_per_minute: a.auth_failures_per_minute,
        reconcile_interval: Duration::from_secs(a.reconcile_interval),
        daemon_retry: if a.all_in_one {
            Duration::ZERO
        } else {
            hearth_api::state::DAEMON_RESTART
        },
    };
    let nbd_tls = a.nbd_tls.settings().map_err(anyhow::Error::msg)?;
    let all_in_one = a.all_in_one.then(|| AllInOne {
        vmm: VmmConfig {
            run_dir: run_dir.clone(),
            state_dir: a.data_dir.join("vmm"),
            qemu_binary: a.qemu_binary.clone(),
            cloud_hypervisor_binary: a.cloud_hypervisor_binary.clone(),
            accel: a.qemu_accel,
            stop_timeout: Duration::from_secs(a.stop_timeout),
            jail: a.jail.config(),
        },
        images_dir: a.images_dir.clone().unwrap_or_else(|| a.data_dir.join("images")),
        netd: netd::network::NetdConfig::new(a.data_dir.join("netd")),
        blockd: {
            let mut b = blockd::BlockdConfig::new(a.data_dir.clone(), run_dir.clone());
            if let Some(pool) = a.volume_pool.clone() {
                b.pool = pool;
            }
            b.nbd.tcp = a.nbd_tcp;
            b.nbd.allow = (!a.nbd_allow.is_empty()).then(|| a.nbd_allow.clone());
            b.nbd.tls = nbd_tls;
            b
        },
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        socket_http::server::shutdown_signal().await;
        tracing::info!("shutting down; VMs keep running");
        let _ = tx.send(true);
    });
    server::run(config, all_in_one, rx).await
}
