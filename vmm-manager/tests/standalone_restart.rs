//! The standalone `vmm-manager` binary: a VM keeps running when the daemon is killed,
//! and the next daemon re-adopts it (state, console, stop all work), then takes
//! hot-plugged disks and is told when they grow. Against the fake Cloud Hypervisor, or
//! the real one when HEARTH_TEST_CH_BINARY names it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::VmmReaper;
use futures_util::{SinkExt, StreamExt};
use vmm_manager::client::VmmClient;
use vmm_manager::spec::{DiskFormat, DiskSource, DiskSpec, HypervisorKind, QemuOptions, VmSpec, VmState};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(run_dir: &Path) -> Daemon {
    // The manifest directory at run time: a shared target directory may hold a binary
    // built from another checkout.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    // The real binary when HEARTH_TEST_CH_BINARY names one (a host with KVM).
    let ch = std::env::var("HEARTH_TEST_CH_BINARY")
        .unwrap_or_else(|_| format!("{dir}/tests/fake-cloud-hypervisor/fake-cloud-hypervisor"));
    let child = Command::new(env!("CARGO_BIN_EXE_vmm-manager"))
        .arg("--socket")
        .arg(run_dir.join("vmm-manager.sock"))
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--cloud-hypervisor-binary", &ch, "--stop-timeout", "10"])
        .arg("--cgroup-name")
        .arg(cgroup_name(run_dir))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm-manager");
    Daemon(child)
}

/// The cgroup (under this test's own) that holds the VMs' cgroups: removed at the end.
fn cgroup_name(run_dir: &Path) -> String {
    testkit::CgroupCleanup::name_for(run_dir)
}

async fn wait_healthy(client: &VmmClient) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.health().await.is_err() {
        assert!(Instant::now() < deadline, "vmm-manager did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kernel() -> PathBuf {
    common::tiny_image().join("vmlinux")
}

async fn console_says(client: &VmmClient, id: &str, input: &str, expect: &str) {
    let mut ws = client.console(id, true, false).await.expect("console");
    let _ = ws.next().await; // scrollback
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        input.as_bytes().to_vec().into(),
    ))
    .await
    .expect("send");
    let mut seen = String::new();
    while !seen.contains(expect) {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(m))) => seen.push_str(&String::from_utf8_lossy(&m.into_data())),
            other => panic!("console ended: {other:?}, saw {seen:?}"),
        }
    }
}

#[tokio::test]
async fn vm_outlives_a_killed_vmm_manager_and_is_readopted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Dropped last: after the VMM is killed, its cgroup can go.
    let _cgroups = testkit::CgroupCleanup(cgroup_name(tmp.path()));
    let _reaper = VmmReaper(tmp.path().to_path_buf());
    let client = VmmClient::new(tmp.path().join("vmm-manager.sock"));
    let mut daemon = start(tmp.path());
    wait_healthy(&client).await;

    let spec = VmSpec {
        id: "standalone-1".into(),
        name: "s1".into(),
        hypervisor: HypervisorKind::CloudHypervisor,
        vcpus: 1,
        memory_mib: 128,
        max_vcpus: None,
        max_memory_mib: None,
        kernel: kernel(),
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        disks: vec![],
        nics: vec![],
        qemu: QemuOptions::default(),
        limits: Default::default(),
        agent_channel: false,
    };
    client.ensure(&spec).await.expect("create");
    // Ensuring the same spec again changes nothing; a different spec is a conflict.
    client.ensure(&spec).await.expect("idempotent create");
    let mut other = spec.clone();
    other.vcpus = 2;
    assert_eq!(
        client
            .ensure(&other)
            .await
            .err()
            .and_then(|e| e.status())
            .map(|s| s.as_u16()),
        Some(409)
    );

    let info = client
        .action("standalone-1", vmm_manager::VmAction::Start, false)
        .await
        .expect("start");
    let pid = info.status.pid.expect("pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = client.console_log("standalone-1", 1 << 20).await.expect("log");
        if String::from_utf8_lossy(&log).contains("HEARTH-GUEST-READY") {
            break;
        }
        assert!(Instant::now() < deadline, "guest never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    console_says(&client, "standalone-1", "echo $((6*7))\n", "42").await;

    daemon.0.kill().expect("kill -9 vmm-manager");
    let _ = daemon.0.wait();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM died with its daemon"
    );

    let _daemon = start(tmp.path());
    wait_healthy(&client).await;
    let info = client.get("standalone-1").await.expect("get");
    assert_eq!(info.status.state, VmState::Running, "{info:?}");
    assert_eq!(info.status.pid, Some(pid));
    console_says(&client, "standalone-1", "echo $((7*6))hello\n", "42hello").await;

    // The re-adopted VM takes a hot-plugged disk, and is told when it grows
    // (`vm.resize-disk`; Cloud Hypervisor grows the file to the size itself).
    let data = tmp.path().join("data.raw");
    std::fs::File::create(&data)
        .expect("data disk")
        .set_len(1 << 20)
        .expect("size");
    let disk = DiskSpec {
        id: "data".into(),
        source: DiskSource::File {
            path: data.clone(),
            format: DiskFormat::Raw,
        },
        readonly: false,
    };
    client.attach_disk("standalone-1", &disk).await.expect("hot-plug");
    client
        .resize_disk("standalone-1", "data", 2 << 20)
        .await
        .expect("resize");
    assert_eq!(std::fs::metadata(&data).expect("stat").len(), 2 << 20);
    // A block device (an LVM volume) is grown outside, as blockd grows it, and Cloud
    // Hypervisor only checks that it has the size it is told.
    let lv_file = tmp.path().join("lv.raw");
    std::fs::File::create(&lv_file)
        .expect("lv backing")
        .set_len(1 << 20)
        .expect("size");
    let lv = common::LoopDevice::attach(&lv_file);
    let lv_disk = DiskSpec {
        id: "lv".into(),
        source: DiskSource::File {
            path: lv.path(),
            format: DiskFormat::Raw,
        },
        readonly: false,
    };
    client
        .attach_disk("standalone-1", &lv_disk)
        .await
        .expect("hot-plug a block device");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lv_file)
        .expect("open lv backing")
        .set_len(3 << 20)
        .expect("grow");
    lv.set_capacity();
    client
        .resize_disk("standalone-1", "lv", 3 << 20)
        .await
        .expect("resize a grown block device");
    let err = client
        .resize_disk("standalone-1", "lv", 4 << 20)
        .await
        .expect_err("a block device is not grown by its VMM");
    assert!(
        err.to_string()
            .contains("Block device size 3145728 does not match requested size 4194304"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&data).expect("stat").len(),
        2 << 20,
        "other disks untouched"
    );
    client
        .detach_disk("standalone-1", "lv")
        .await
        .expect("unplug the block device");
    let err = client
        .resize_disk("standalone-1", "nope", 2 << 20)
        .await
        .expect_err("no such disk");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
    let log = client.console_log("standalone-1", 1 << 20).await.expect("log");
    assert!(
        String::from_utf8_lossy(&log).contains("HEARTH-GUEST-READY"),
        "scrollback kept"
    );

    let info = client
        .action("standalone-1", vmm_manager::VmAction::Stop, false)
        .await
        .expect("stop");
    assert_eq!(info.status.state, VmState::Stopped);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
    );
    client.delete("standalone-1").await.expect("delete");
    client
        .delete("standalone-1")
        .await
        .expect("deleting a missing VM succeeds");
    assert!(std::fs::read_dir(tmp.path().join("vms"))
        .expect("vms dir")
        .next()
        .is_none());
}
