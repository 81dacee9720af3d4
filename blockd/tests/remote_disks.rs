//! Remote disks between two blockd instances in this process (two "hosts", each with
//! its file pool and its HTTP API on a Unix socket; the owner serves NBD on a Unix
//! socket): the volume behind a remote disk is grown on its owner through
//! `NBD_CMD_RESIZE`, by the call the api makes, and every client of the export sees
//! the new size. Bad sizes and exports that cannot grow get the errors a user sees.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::exports::{ExportSpec, RemoteDiskSpec};
use blockd::http::client::BlockdClient;
use blockd::nbd::{ExportOptions, NbdAddress, NbdClient, NbdDevice, NbdServer, ReconnectPolicy, ServerConfig};
use blockd::service::VolumeSpec;

const MIB: u64 = 1 << 20;

/// One blockd, as the daemon runs it, minus the process, with its state in `dir`.
struct Host {
    dir: PathBuf,
    _running: blockd::InProcess,
}

impl Host {
    async fn start(d: &Path) -> Host {
        let config = blockd::BlockdConfig {
            pool: blockd::PoolConfig::File(d.join("pool")),
            state_dir: d.join("state"),
            socket_dir: d.join("run"),
            nbd: blockd::exports::NbdSettings {
                unix: Some(d.join("run/nbd.sock")),
                ..Default::default()
            },
        };
        let running = blockd::InProcess::start(config, &d.join("blockd.sock"))
            .await
            .expect("blockd");
        Host {
            dir: d.to_path_buf(),
            _running: running,
        }
    }

    fn client(&self) -> BlockdClient {
        BlockdClient::new(self.dir.join("blockd.sock"))
    }

    fn nbd_socket(&self) -> PathBuf {
        self.dir.join("run/nbd.sock")
    }
}

fn remote(socket: &Path, export: &str, read_only: bool) -> RemoteDiskSpec {
    RemoteDiskSpec {
        tcp: None,
        unix: Some(socket.to_path_buf()),
        export: export.into(),
        read_only,
        tls: false,
    }
}

fn sized(bytes: u64) -> VolumeSpec {
    VolumeSpec {
        size_bytes: Some(bytes),
        source: None,
    }
}

/// The HTTP status of a refused call, with its message for the assertion.
fn refused<T: std::fmt::Debug>(r: Result<T, socket_http::ClientError>) -> (u16, String) {
    let e = r.expect_err("refused");
    (e.status().map_or(0, |s| s.as_u16()), e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_disk_grows_its_volume_on_the_owner() {
    let (owner_dir, here_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let owner = Host::start(owner_dir.path()).await;
    let here = Host::start(here_dir.path()).await;
    let (oc, hc) = (owner.client(), here.client());
    let file = oc
        .ensure_volume("far", &sized(16 * MIB))
        .await
        .expect("volume")
        .path
        .expect("a file");
    {
        let mut bytes = std::fs::read(&file).expect("volume file");
        assert_eq!(bytes.len() as u64, 16 * MIB, "{}", file.display());
        bytes[MIB as usize..MIB as usize + 14].copy_from_slice(b"BEFORE-GROWING");
        std::fs::write(&file, bytes).expect("fill");
    }
    oc.export("far", "nbd", &ExportSpec { read_only: false })
        .await
        .expect("export");
    let socket = owner.nbd_socket();
    let disk = hc
        .remote_disk("far", &remote(&socket, "far", false))
        .await
        .expect("remote disk");
    assert_eq!(disk.size_bytes, Some(16 * MIB));

    // Another client of the same export (another host's VM, say).
    let address = NbdAddress::Unix(socket.clone());
    let other = {
        let a = address.clone();
        tokio::task::spawn_blocking(move || NbdDevice::connect(a, "far", ReconnectPolicy::default()))
            .await
            .expect("join")
            .expect("second client")
    };
    use blockd::device::BlockDevice;
    assert_eq!(other.size(), 16 * MIB);

    let grown = hc.resize_remote_disk("far", 48 * MIB).await.expect("grow");
    assert_eq!(grown.size_bytes, Some(48 * MIB), "the remote disk's size: {grown:?}");
    assert_eq!(
        oc.volume("far").await.expect("volume").size_bytes,
        48 * MIB,
        "the owner's volume"
    );
    assert_eq!(
        std::fs::metadata(&file).expect("file").len(),
        48 * MIB,
        "the owner's file"
    );
    let listed = hc.exports().await.expect("exports");
    assert_eq!(listed[0].size_bytes, Some(48 * MIB), "GET /exports: {listed:?}");

    // A new connection is offered the new size, and the other client, whose
    // connection the owner ended, reconnected and has it too.
    let fresh = NbdClient::connect(&address, "far").await.expect("connect");
    assert_eq!(fresh.size(), 48 * MIB);
    let deadline = Instant::now() + Duration::from_secs(10);
    while other.size() != 48 * MIB && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(other.size(), 48 * MIB, "the other client follows");

    // The bytes are where they were, and the new end is usable.
    assert_eq!(fresh.read(MIB, 14).await.expect("read"), b"BEFORE-GROWING");
    fresh.write(40 * MIB, b"PAST-THE-OLD-END", true).await.expect("write");
    let bytes = std::fs::read(&file).expect("file");
    assert_eq!(&bytes[40 * MIB as usize..40 * MIB as usize + 16], b"PAST-THE-OLD-END");

    // The size it has again: nothing to do. Less, zero, or not whole sectors: 422.
    // More than the owner's pool holds: 507, with the owner's reason.
    let same = hc.resize_remote_disk("far", 48 * MIB).await.expect("same size");
    assert_eq!(same.size_bytes, Some(48 * MIB));
    for bad in [32 * MIB, 0, 48 * MIB + 100] {
        let (status, message) = refused(hc.resize_remote_disk("far", bad).await);
        assert_eq!(status, 422, "{bad}: {message}");
    }
    let (status, message) = refused(hc.resize_remote_disk("far", 1 << 60).await);
    assert_eq!(status, 507, "{message}");
    assert!(
        message.contains("pool"),
        "the owner's reason reaches the caller: {message}"
    );
    assert_eq!(
        oc.volume("far").await.expect("volume").size_bytes,
        48 * MIB,
        "unchanged"
    );

    // A remote disk this host uses read-only, or an export its owner offers read-only,
    // is not grown from here: 409.
    hc.remote_disk("far-ro", &remote(&socket, "far", true))
        .await
        .expect("read-only remote disk");
    let (status, message) = refused(hc.resize_remote_disk("far-ro", 64 * MIB).await);
    assert_eq!(status, 409, "{message}");
    oc.ensure_volume("frozen", &sized(8 * MIB)).await.expect("volume");
    oc.export("frozen", "nbd", &ExportSpec { read_only: true })
        .await
        .expect("read-only export");
    hc.remote_disk("frozen", &remote(&socket, "frozen", false))
        .await
        .expect("remote disk");
    let (status, message) = refused(hc.resize_remote_disk("frozen", 16 * MIB).await);
    assert_eq!(status, 409, "{message}");
    assert_eq!(oc.volume("frozen").await.expect("volume").size_bytes, 8 * MIB);

    // An NBD server that does not offer resizing (not blockd's): 409, saying so.
    let plain = NbdServer::new(ServerConfig::default());
    plain
        .add_export(
            "plain",
            Arc::new(blockd::device::MemoryDevice::new(MIB)),
            ExportOptions::default(),
        )
        .expect("export");
    let plain_socket = here_dir.path().join("plain.sock");
    plain.listen_unix(&plain_socket).await.expect("listen");
    hc.remote_disk("plain", &remote(&plain_socket, "plain", false))
        .await
        .expect("remote disk");
    let (status, message) = refused(hc.resize_remote_disk("plain", 2 * MIB).await);
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("does not offer resizing"), "{message}");
    plain.shutdown();

    let (status, message) = refused(hc.resize_remote_disk("nothing", 2 * MIB).await);
    assert_eq!(status, 404, "{message}");

    // After the owner restarts, its export is back and still grows; the remote disk
    // here reconnects and follows.
    drop(fresh);
    drop(owner);
    let owner = Host::start(owner_dir.path()).await;
    let grown = hc
        .resize_remote_disk("far", 64 * MIB)
        .await
        .expect("grow after the restart");
    assert_eq!(grown.size_bytes, Some(64 * MIB));
    assert_eq!(std::fs::metadata(&file).expect("file").len(), 64 * MIB);

    for name in ["far", "far-ro", "frozen", "plain"] {
        hc.delete_remote_disk(name).await.expect("delete remote disk");
    }
    drop(other);
    drop(owner);
}
