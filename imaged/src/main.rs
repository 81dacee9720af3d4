//! The `imaged` binary: the image store, imports and cloud-init seeds on a Unix socket.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "imaged", version, about = "hearth image daemon", args_override_self = true)]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = "/run/hearth/imaged.sock")]
    socket: PathBuf,
    /// Also serve over TCP with TLS and a token (for an api on another host).
    #[command(flatten)]
    listen: socket_http::server::Listen,
    /// The content-addressed image store.
    #[arg(long, default_value = "/var/lib/hearth/imaged")]
    store_dir: PathBuf,
    /// Recipe outputs (one folder per image, as guest-images/*/build.sh writes them),
    /// imported on first use.
    #[arg(long)]
    catalog_dir: Option<PathBuf>,
    /// Where cloud-init seed images are written.
    #[arg(long, default_value = "/var/lib/hearth/imaged/seeds")]
    seeds_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    socket_http::logging::init();
    let args = Args::parse_from(socket_http::config::args_with_config("imaged")?);
    let imaged = imaged::Imaged::open(imaged::ImagedConfig {
        store_dir: args.store_dir,
        catalog_dir: args.catalog_dir,
        seeds_dir: args.seeds_dir,
    })?;
    socket_http::server::serve(
        args.socket,
        args.listen.tls(),
        imaged::router(imaged),
        socket_http::server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
