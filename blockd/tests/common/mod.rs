//! Helpers shared by blockd's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use testkit::run;

/// A file system on a loop device, mounted on a temporary directory; unmounted and
/// detached when dropped, also when the test fails.
pub struct LoopMount {
    pub dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    pub device: String,
}

impl LoopMount {
    /// `mkfs` is the command vector making the file system, without the device.
    pub fn new(size: &str, mkfs: &[&str]) -> LoopMount {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        run("truncate", &["-s", size, image.to_str().expect("utf8")]);
        let device = run("losetup", &["--find", "--show", image.to_str().expect("utf8")])
            .trim()
            .to_string();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mkdir");
        let guard = LoopMount {
            dir,
            mountpoint,
            device,
        };
        let mut argv = mkfs.to_vec();
        argv.push(&guard.device);
        run(argv[0], &argv[1..]);
        run("mount", &[&guard.device, guard.mountpoint.to_str().expect("utf8")]);
        guard
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A loop device without a file system (for LVM).
pub struct LoopDevice {
    pub dir: tempfile::TempDir,
    pub device: String,
}

impl LoopDevice {
    pub fn new(size: &str) -> LoopDevice {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        run("truncate", &["-s", size, image.to_str().expect("utf8")]);
        let device = run("losetup", &["--find", "--show", image.to_str().expect("utf8")])
            .trim()
            .to_string();
        LoopDevice { dir, device }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A runtime of its own with `server` listening on a free loopback TCP port and on
/// `dir/nbd.sock`; returns the runtime, the port's address and the socket's path.
pub fn serve_nbd(server: &blockd::nbd::NbdServer, dir: &Path) -> (tokio::runtime::Runtime, SocketAddr, PathBuf) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let unix = dir.join("nbd.sock");
    let tcp = runtime.block_on(async {
        server.listen_unix(&unix).await.expect("listen unix");
        server
            .listen_tcp("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("listen tcp")
    });
    (runtime, tcp, unix)
}
