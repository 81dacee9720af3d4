//! QEMU disks on block devices and sparse files, through vmm-manager's library as the
//! api drives it: an LVM volume is a device node, and a volume attached "as a file"
//! hands QEMU that node. The tiny guest boots under QEMU/TCG with a loop device and a
//! sparse raw file as disks, a second loop device is hot-plugged while it runs; the
//! guest reads what the host wrote, writes a pattern to each disk and discards a range
//! of each. After the VM is gone the host finds the patterns on the devices, and the
//! discarded ranges read as zeroes and were given back to the backing files. Grown on
//! the host while the VM runs, both disks show their new size in the guest.
//!
//! Needs root (losetup), `qemu-system-x86_64` and the tiny image.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{LoopDevice, VmmReaper};
use vmm_manager::console::ConsoleWriter;
use vmm_manager::hypervisor::qemu::Accel;
use vmm_manager::service::{VmService, VmmConfig};
use vmm_manager::spec::{DiskFormat, DiskSource, DiskSpec, HypervisorKind, QemuOptions, VmSpec, VmState};

const DISK_SIZE: u64 = 64 << 20;
const GROWN: u64 = 96 << 20;
const HOST_PATTERN_AT: u64 = 8 << 20;
const GUEST_PATTERN_AT: u64 = 16 << 20;
const DISCARD_AT: u64 = 32 << 20;
const DISCARD_LEN: u64 = 4 << 20;
const PATTERN_LINES: usize = 256;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What the guest writes to disk `name`: lines of 32 bytes made by its shell.
fn guest_pattern(name: &str) -> Vec<u8> {
    (0..PATTERN_LINES)
        .flat_map(|i| format!("hearth {name:>4} disk line {i:06}\n").into_bytes())
        .collect()
}

/// A sparse backing file with the host pattern and a range of 0xaa bytes (to be
/// discarded), optionally behind a loop device (detached when dropped).
struct Disk {
    backing: PathBuf,
    loop_device: Option<LoopDevice>,
}

impl Disk {
    fn new(dir: &Path, name: &str, loop_device: bool) -> Disk {
        let backing = dir.join(format!("{name}.raw"));
        let f = std::fs::File::create(&backing).expect("create backing file");
        f.set_len(DISK_SIZE).expect("size backing file");
        f.write_all_at(&testkit::host_pattern(), HOST_PATTERN_AT)
            .expect("host pattern");
        f.write_all_at(&vec![0xaa; DISCARD_LEN as usize], DISCARD_AT)
            .expect("range to discard");
        f.sync_all().expect("sync backing file");
        let loop_device = loop_device.then(|| LoopDevice::attach(&backing));
        Disk { backing, loop_device }
    }

    /// What QEMU opens: the loop device, or the file itself.
    fn path(&self) -> PathBuf {
        self.loop_device.as_ref().map_or(self.backing.clone(), LoopDevice::path)
    }

    fn spec(&self, id: &str) -> DiskSpec {
        DiskSpec {
            id: id.into(),
            source: DiskSource::File {
                path: self.path(),
                format: DiskFormat::Raw,
            },
            readonly: false,
        }
    }

    /// Bytes of the backing file on disk.
    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.backing).expect("stat backing file").blocks() * 512
    }

    /// Reads through what the guest used (the device node's page cache for a loop
    /// device).
    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let f = std::fs::File::open(self.path()).expect("open disk");
        f.read_exact_at(&mut buf, at).expect("read disk");
        buf
    }
}

/// The guest's shell on its serial console.
struct Guest {
    live: tokio::sync::broadcast::Receiver<Bytes>,
    writer: ConsoleWriter,
    seen: String,
    commands: u32,
}

impl Guest {
    async fn attach(svc: &VmService, id: &str) -> Guest {
        let console = svc.console(id).expect("console");
        let sub = console.subscribe();
        let writer = console.try_writer().expect("the console's writer");
        let mut guest = Guest {
            live: sub.live,
            writer,
            seen: String::from_utf8_lossy(&sub.scrollback).into_owned(),
            commands: 0,
        };
        guest.expect("HEARTH-GUEST-READY", BOOT_TIMEOUT).await;
        guest
    }

    /// Reads output until `needle`; returns what came before it.
    async fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.seen.find(needle) {
                let out = self.seen[..pos].to_string();
                self.seen.drain(..pos + needle.len());
                return out;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.live.recv()).await {
                Ok(Ok(b)) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(e)) => panic!("console ended ({e}); got:\n{}", self.seen),
                Err(_) => panic!("no {needle:?} within {timeout:?}; got:\n{}", self.seen),
            }
        }
    }

    /// Runs `cmd` in the guest and returns its output: what the shell prints between
    /// two markers it computes, so the terminal's echo of the typed line (with its line
    /// editing) never matches them.
    async fn run(&mut self, cmd: &str) -> String {
        self.commands += 1;
        let n = 1000 + self.commands;
        let line = format!("echo \"@@BEGIN-$(({n} + 0))@@\"; {cmd}; echo \"@@END-$(({n} + 0))@@\"\n");
        self.writer
            .write(Bytes::from(line))
            .await
            .expect("type into the console");
        let out = self.expect(&format!("@@END-{n}@@"), COMMAND_TIMEOUT).await;
        let begin = format!("@@BEGIN-{n}@@");
        let out = out.replace('\r', "");
        match out.rfind(&begin) {
            Some(at) => out[at + begin.len()..].trim_start_matches('\n').to_string(),
            None => panic!("no {begin} before the end marker of {cmd:?}; got:\n{out:?}"),
        }
    }

    /// Runs `cmd` and requires it to succeed.
    async fn ok(&mut self, cmd: &str) -> String {
        let out = self.run(&format!("{cmd}; echo \"rc=$?\"")).await;
        assert!(out.trim_end().ends_with("rc=0"), "{cmd} failed in the guest:\n{out}");
        out
    }

    async fn md5(&mut self, dev: &str, at: u64, len: u64) -> String {
        let out = self
            .ok(&format!(
                "dd if=/dev/{dev} bs=4096 skip={} count={} 2>/dev/null | md5sum",
                at / 4096,
                len / 4096
            ))
            .await;
        out.split_whitespace().next().unwrap_or_default().to_string()
    }

    /// Writes the guest pattern for `name` to `dev` and discards the test range.
    async fn write_and_discard(&mut self, dev: &str, name: &str) {
        self.ok(&format!(
            "i=0; while [ $i -lt {PATTERN_LINES} ]; do printf 'hearth %4s disk line %06d\\n' {name} $i; i=$((i+1)); done >/tmp/{name}"
        ))
        .await;
        self.ok(&format!(
            "dd if=/tmp/{name} of=/dev/{dev} bs=4096 seek={} conv=fsync 2>/dev/null",
            GUEST_PATTERN_AT / 4096
        ))
        .await;
        self.ok(&format!("blkdiscard -o {DISCARD_AT} -l {DISCARD_LEN} /dev/{dev}"))
            .await;
        self.ok("sync").await;
    }

    /// The guest's virtio disks, sorted.
    async fn disks(&mut self) -> Vec<String> {
        let out = self.ok("ls /sys/block").await;
        let mut v: Vec<String> = out
            .split_whitespace()
            .filter(|d| d.starts_with("vd"))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_disks_on_block_devices_and_sparse_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = common::tiny_image();
    let block = Disk::new(tmp.path(), "block", true);
    let sparse = Disk::new(tmp.path(), "sparse", false);
    let plugged = Disk::new(tmp.path(), "plug", true);
    // Dropped before the disks: QEMU is gone before the loop devices are detached.
    let _reaper = VmmReaper(tmp.path().to_path_buf());
    let before: Vec<u64> = [&block, &sparse, &plugged].iter().map(|d| d.allocated()).collect();
    assert!(
        before.iter().all(|&b| b >= DISCARD_LEN),
        "the range to discard is allocated: {before:?}"
    );

    let mut config = VmmConfig::new(tmp.path().join("run"));
    config.accel = Accel::Tcg;
    config.stop_timeout = Duration::from_secs(30);
    // Jailed, as by default: the jailer is the vmm-manager binary (this test's own
    // binary is not one).
    config.jail.exe = env!("CARGO_BIN_EXE_vmm-manager").into();
    config.jail.cgroup_name = format!("hearth-test-{}", std::process::id());
    let _cgroups = testkit::CgroupCleanup(config.jail.cgroup_name.clone());
    let svc = VmService::open(config).await.expect("open the service");
    let cmdline = std::fs::read_to_string(image.join("cmdline")).expect("cmdline");
    let spec = VmSpec {
        id: "disks-1".into(),
        name: "disks".into(),
        hypervisor: HypervisorKind::Qemu,
        vcpus: 1,
        memory_mib: 256,
        max_vcpus: None,
        max_memory_mib: None,
        kernel: image.join("vmlinuz"),
        initramfs: Some(image.join("initrd.img")),
        cmdline: cmdline.trim().into(),
        disks: vec![block.spec("block"), sparse.spec("sparse")],
        nics: vec![],
        qemu: QemuOptions::default(),
        limits: Default::default(),
        agent_channel: false,
    };
    svc.create(spec).await.expect("create the VM");
    svc.start("disks-1").await.unwrap_or_else(|e| {
        let log = std::fs::read_to_string(tmp.path().join("run/vms/disks-1/vmm.out")).unwrap_or_default();
        panic!("start the VM with a block device disk: {e}\n{log}")
    });
    let mut guest = Guest::attach(&svc, "disks-1").await;
    assert_eq!(guest.disks().await, ["vda", "vdb"]);
    let host_md5 = testkit::md5_hex(&testkit::host_pattern());
    for dev in ["vda", "vdb"] {
        let sectors = guest.ok(&format!("cat /sys/block/{dev}/size")).await;
        assert!(sectors.starts_with(&(DISK_SIZE / 512).to_string()), "{dev}: {sectors}");
        assert_ne!(
            guest
                .ok(&format!("cat /sys/block/{dev}/queue/discard_max_bytes"))
                .await
                .trim_start()
                .chars()
                .next(),
            Some('0'),
            "{dev} offers discard"
        );
        assert_eq!(
            guest
                .md5(dev, HOST_PATTERN_AT, testkit::host_pattern().len() as u64)
                .await,
            host_md5,
            "{dev}: the guest reads what the host wrote"
        );
    }
    guest.write_and_discard("vda", "blk").await;
    guest.write_and_discard("vdb", "file").await;

    // Both grow, as blockd grows a volume, and the running guest is told.
    for disk in [&block, &sparse] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.backing)
            .expect("open backing file");
        f.set_len(GROWN).expect("grow the backing file");
        if let Some(dev) = &disk.loop_device {
            dev.set_capacity();
        }
    }
    for (id, dev) in [("block", "vda"), ("sparse", "vdb")] {
        svc.resize_disk("disks-1", id, GROWN).await.expect("tell the VM");
        let want = (GROWN / 512).to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = guest.ok(&format!("cat /sys/block/{dev}/size")).await;
            if now.lines().next() == Some(want.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{dev} ({id}) still has {now} sectors, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let err = svc
        .resize_disk("disks-1", "nope", GROWN)
        .await
        .expect_err("no such disk");
    assert!(err.to_string().contains("has no disk \"nope\""), "{err}");

    // A block device hot-plugged into the running VM, and unplugged again.
    svc.attach_disk("disks-1", plugged.spec("plug"))
        .await
        .expect("hot-plug a loop device");
    let deadline = Instant::now() + Duration::from_secs(60);
    while guest.disks().await.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the hot-plugged disk never showed up in the guest"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        guest
            .md5("vdc", HOST_PATTERN_AT, testkit::host_pattern().len() as u64)
            .await,
        host_md5,
        "the hot-plugged disk holds what the host wrote"
    );
    guest.write_and_discard("vdc", "plug").await;
    svc.detach_disk("disks-1", "plug")
        .await
        .expect("unplug the loop device");
    let deadline = Instant::now() + Duration::from_secs(60);
    while guest.disks().await.len() > 2 {
        assert!(Instant::now() < deadline, "the unplugged disk is still in the guest");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(guest);

    let info = svc.stop("disks-1", false).await.expect("stop");
    assert_eq!(info.status.state, VmState::Stopped, "{:?}", info.status);
    svc.delete("disks-1").await.expect("delete");

    for (disk, name, was) in [
        (&block, "blk", before[0]),
        (&sparse, "file", before[1]),
        (&plugged, "plug", before[2]),
    ] {
        let what = disk.path().display().to_string();
        assert!(
            disk.read(GUEST_PATTERN_AT, guest_pattern(name).len()) == guest_pattern(name),
            "{what}: the guest's pattern is on the disk"
        );
        assert!(
            disk.read(DISCARD_AT, DISCARD_LEN as usize).iter().all(|&b| b == 0),
            "{what}: the discarded range reads as zeroes"
        );
        let now = disk.allocated();
        // The guest's pattern took 8 KiB; the discard must have given back most of 4 MiB.
        assert!(
            now + DISCARD_LEN * 3 / 4 <= was + 64 * 1024,
            "{what}: the discard gave no space back ({was} bytes allocated before, {now} after)"
        );
    }
    assert!(svc.list().is_empty());
}
