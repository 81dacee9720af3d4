//! The `imaged` binary: serves the image catalog on a Unix socket.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "imaged", version, about = "hearth image daemon")]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = "/run/hearth/imaged.sock")]
    socket: PathBuf,
    /// Directory holding one folder per image.
    #[arg(long, default_value = "/var/lib/hearth/images")]
    images_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    socket_http::logging::init();
    let args = Args::parse();
    let router = imaged::router(imaged::ImageCatalog::new(args.images_dir));
    socket_http::server::serve_unix(args.socket, router, socket_http::server::shutdown_signal()).await?;
    Ok(())
}
