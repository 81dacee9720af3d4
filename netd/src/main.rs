//! The `netd` binary: serves netd's API on a Unix socket.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "netd", version, about = "hearth netd daemon")]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = "/run/hearth/netd.sock")]
    socket: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    socket_http::logging::init();
    let args = Args::parse();
    socket_http::server::serve_unix(args.socket, netd::router(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
