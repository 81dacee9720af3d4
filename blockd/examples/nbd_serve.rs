//! Serves one file (or block device) over NBD: used by the NBD conformance tests and
//! by `scripts/bench_nbd.sh`.
//!
//! Prints `listening tcp=ADDR` / `listening unix=PATH` lines on stdout once ready, and
//! serves until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blockd::device::FileDevice;
use blockd::nbd::{ExportOptions, NbdServer, ServerConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Serve a file over NBD")]
struct Args {
    /// File or block device to export.
    #[arg(long)]
    file: PathBuf,
    /// Export name.
    #[arg(long, default_value = "")]
    name: String,
    /// Export description.
    #[arg(long, default_value = "")]
    description: String,
    /// TCP address to listen on (repeatable; port 0 picks one).
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// Unix socket to listen on (repeatable).
    #[arg(long)]
    unix: Vec<PathBuf>,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Only accept TCP peers in these networks (repeatable, e.g. 127.0.0.0/8).
    #[arg(long)]
    allow: Vec<ipnet::IpNet>,
    /// Threads serving one connection's requests at most.
    #[arg(long)]
    connection_threads: Option<usize>,
    /// Socket send/receive buffer size for accepted connections (0: kernel default).
    #[arg(long)]
    socket_buffer: Option<usize>,
    /// Handshake timeout in seconds.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Microseconds a connection polls for its next request before it sleeps.
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// Tokio worker threads, for accepting and handshakes (default: tokio's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// blockd's own TLS options (--nbd-tls, --nbd-tls-certificates, --nbd-tls-verify-peer).
    #[command(flatten)]
    tls: blockd::exports::NbdTlsArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    socket_http::logging::init();
    blockd::raise_open_file_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.threads {
        builder.worker_threads(n);
    }
    builder.build().context("starting the runtime")?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if args.tcp.is_empty() && args.unix.is_empty() {
        anyhow::bail!("give at least one --tcp or --unix listener");
    }
    let device =
        FileDevice::open(&args.file, args.read_only).with_context(|| format!("opening {}", args.file.display()))?;
    let mut config = ServerConfig {
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        allowed_networks: (!args.allow.is_empty()).then_some(args.allow.clone()),
        ..ServerConfig::default()
    };
    if let Some(n) = args.connection_threads {
        config.threads_per_connection = n;
    }
    if let Some(us) = args.busy_poll_us {
        config.busy_poll = Duration::from_micros(us);
    }
    if let Some(n) = args.socket_buffer {
        config.socket_buffer_bytes = n;
    }
    if let Some(tls) = args.tls.settings().map_err(anyhow::Error::msg)? {
        config.tls = tls.server()?;
    }
    let server = NbdServer::new(config);
    let options = ExportOptions {
        read_only: args.read_only,
        description: args.description.clone(),
        ..Default::default()
    };
    server.add_export(&args.name, Arc::new(device), options)?;
    for addr in &args.tcp {
        let bound = server.listen_tcp(*addr).await?;
        println!("listening tcp={bound}");
    }
    for path in &args.unix {
        server.listen_unix(path).await?;
        println!("listening unix={}", path.display());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown();
    // Give the accept loops a moment to remove their socket files.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
