//! The `hearth` CLI.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = hearth_cli::Cli::parse();
    if let Err(e) = hearth_cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
