//! The `netd` binary: serves netd's API on a Unix socket (and, with `--listen-tls`, over TCP with TLS and a token).

use std::path::PathBuf;

use clap::Parser;
use netd::network::{NetdConfig, NetworkService};

#[derive(Parser, Debug)]
#[command(name = "netd", version, about = "hearth network daemon", args_override_self = true)]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = "/run/hearth/netd.sock")]
    socket: PathBuf,
    /// Also serve over TCP with TLS and a token (for an api on another host).
    #[command(flatten)]
    listen: socket_http::server::Listen,
    /// Persistent state: networks, IPAM, ports.
    #[arg(long, default_value = "/var/lib/hearth/netd")]
    state_dir: PathBuf,
    #[arg(long, default_value = "dnsmasq")]
    dnsmasq_binary: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    socket_http::logging::init();
    let args = Args::parse_from(socket_http::config::args_with_config("netd")?);
    let mut config = NetdConfig::new(args.state_dir);
    config.dnsmasq_binary = args.dnsmasq_binary;
    let svc = NetworkService::open(config).await?;
    socket_http::server::serve(
        args.socket,
        args.listen.tls(),
        netd::http::router(svc),
        socket_http::server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
