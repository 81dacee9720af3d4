//! The `blockd` binary: serves blockd's API on a Unix socket (and, with `--listen-tls`, over TCP with TLS and a token).

use std::net::SocketAddr;
use std::path::PathBuf;

use blockd::exports::{NbdSettings, NbdTlsArgs};
use blockd::{BlockdConfig, PoolConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "blockd", version, about = "hearth storage daemon", args_override_self = true)]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = "/run/hearth/blockd.sock")]
    socket: PathBuf,
    /// Also serve over TCP with TLS and a token (for an api on another host).
    #[command(flatten)]
    listen: socket_http::server::Listen,
    /// Where volumes live: file:/absolute/dir, lvm:VG[/THINPOOL] or memory:BYTES.
    #[arg(long, default_value = "file:/var/lib/hearth/volumes")]
    pool: PoolConfig,
    /// Persistent state (the export table).
    #[arg(long, default_value = "/var/lib/hearth/blockd")]
    state_dir: PathBuf,
    /// Directory of the vhost-user-blk sockets.
    #[arg(long, default_value = "/run/hearth/blockd")]
    socket_dir: PathBuf,
    /// Serve NBD on this TCP address (e.g. 0.0.0.0:10809). Off unless given.
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// Serve NBD on this Unix socket.
    #[arg(long, default_value = "/run/hearth/blockd/nbd.sock")]
    nbd_unix: PathBuf,
    /// Only these networks may connect over TCP (repeatable, e.g. 192.168.1.0/24).
    #[arg(long)]
    nbd_allow: Vec<ipnet::IpNet>,
    #[command(flatten)]
    nbd_tls: NbdTlsArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    socket_http::logging::init();
    let a = Args::parse_from(socket_http::config::args_with_config("blockd")?);
    let open_files = blockd::raise_open_file_limit();
    tracing::debug!(open_files, "open file limit");
    let config = BlockdConfig {
        pool: a.pool,
        state_dir: a.state_dir,
        socket_dir: a.socket_dir,
        nbd: NbdSettings {
            tcp: a.nbd_tcp,
            unix: Some(a.nbd_unix),
            allow: (!a.nbd_allow.is_empty()).then_some(a.nbd_allow),
            tls: a.nbd_tls.settings().map_err(anyhow::Error::msg)?,
        },
    };
    let blockd = blockd::Blockd::open(config).await?;
    socket_http::server::serve(
        a.socket,
        a.listen.tls(),
        blockd::router(blockd.clone()),
        socket_http::server::shutdown_signal(),
    )
    .await?;
    blockd.exports.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd::exports::NbdTlsMode;

    #[test]
    fn later_options_override_earlier_ones_and_lists_accumulate() {
        // hearth.toml's options come first; the command line's win.
        let a = Args::parse_from([
            "blockd",
            "--pool",
            "memory:1048576",
            "--nbd-allow",
            "10.0.0.0/8",
            "--nbd-allow",
            "192.168.1.0/24",
            "--pool",
            "file:/tmp/p",
        ]);
        assert_eq!(a.pool, PoolConfig::File("/tmp/p".into()));
        assert_eq!(a.nbd_allow.len(), 2);
    }

    #[test]
    fn nbd_tls_options_must_fit_together() {
        let settings = |args: &[&str]| Args::parse_from([&["blockd"], args].concat()).nbd_tls.settings();
        assert_eq!(settings(&[]), Ok(None));
        let on = settings(&["--nbd-tls", "require", "--nbd-tls-certificates", "/etc/hearth/tls"]).expect("valid");
        let on = on.expect("TLS on");
        assert!(on.mode == NbdTlsMode::Require && !on.verify_peer);
        assert_eq!(on.dir, PathBuf::from("/etc/hearth/tls"));
        let err = settings(&["--nbd-tls", "on"]).expect_err("no directory");
        assert!(err.contains("--nbd-tls-certificates"), "{err}");
        // The directory alone: remote disks may use TLS, the server stays plaintext.
        let client_only = settings(&["--nbd-tls-certificates", "/d"])
            .expect("valid")
            .expect("some");
        assert_eq!(client_only.mode, NbdTlsMode::Off);
        assert!(settings(&["--nbd-tls-verify-peer"]).is_err());
        assert!(Args::try_parse_from(["blockd", "--nbd-tls", "maybe"]).is_err());
    }
}
