//! The `vmm-manager` binary: serves vmm-manager's API on a Unix socket (and, with `--listen-tls`, over TCP with TLS and a token).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vmm_manager::{Accel, VmService, VmmConfig};

#[derive(Parser, Debug)]
#[command(name = "vmm-manager", version, about = "hearth VM daemon", args_override_self = true)]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = "/run/hearth/vmm-manager.sock")]
    socket: PathBuf,
    /// Also serve over TCP with TLS and a token (for an api on another host).
    #[command(flatten)]
    listen: socket_http::server::Listen,
    /// Directory for VM state (`vms/<id>/`: spec, pid, sockets, logs).
    #[arg(long, default_value = "/run/hearth")]
    run_dir: PathBuf,
    /// Directory for saved VM states (memory snapshots): `<id>/<name>/`.
    #[arg(long, default_value = "/var/lib/hearth/vmm")]
    state_dir: PathBuf,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_binary: String,
    #[arg(long, default_value = "cloud-hypervisor")]
    cloud_hypervisor_binary: String,
    /// QEMU accelerator: auto probes whether KVM really boots a guest.
    #[arg(long, default_value = "auto")]
    accel: Accel,
    /// Seconds a guest gets to power off after the power button.
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
    #[command(flatten)]
    jail: vmm_manager::jail::JailArgs,
}

fn main() -> anyhow::Result<()> {
    // The jailer and its helpers run here, before any thread exists.
    vmm_manager::jail::launch::dispatch();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    socket_http::logging::init();
    let args = Args::parse_from(socket_http::config::args_with_config("vmm-manager")?);
    let config = VmmConfig {
        run_dir: args.run_dir,
        state_dir: args.state_dir,
        qemu_binary: args.qemu_binary,
        cloud_hypervisor_binary: args.cloud_hypervisor_binary,
        accel: args.accel,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        jail: args.jail.config(),
    };
    let svc = VmService::open(config).await?;
    let closing = svc.clone();
    socket_http::server::serve(
        args.socket,
        args.listen.tls(),
        vmm_manager::http::router(svc),
        async move {
            socket_http::server::shutdown_signal().await;
            closing.close_streams();
        },
    )
    .await?;
    Ok(())
}
