//! blockd's vhost-user-blk backend under a real guest: the tiny image boots under
//! QEMU/TCG with a `vhost-user-blk-pci` disk on our socket, writes, discards and reads
//! through the Linux virtio_blk driver, and a second VM attaches to the same running
//! export and reads back what the first wrote.
//!
//! Needs `qemu-system-x86_64` and the tiny image (`guest-images/tiny/build.sh`, found in
//! `$HEARTH_TEST_IMAGES`, default `/var/cache/hearth/images`).

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::device::{BlockDevice, FileDevice};
use blockd::vhost_user::{VhostUserBlkExport, VhostUserBlkOptions};

const DISK_SIZE: u64 = 64 << 20;
const HOST_PATTERN_AT: u64 = 8 << 20;
const GUEST_PATTERN_AT: u64 = 16 << 20;
const DISCARD_AT: u64 = 32 << 20;
const DISCARD_LEN: u64 = 1 << 20;
const PATTERN_LINES: usize = 2048;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

fn images_dir() -> PathBuf {
    let dir = std::env::var_os("HEARTH_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/images".into());
    assert!(
        dir.join("tiny/image.json").is_file(),
        "the tiny image is missing in {}: run guest-images/tiny/build.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// What the guest writes: 2048 lines of 32 bytes, made by the guest's shell with
/// `printf 'hearth vhost-user-blk test %04d\n'`.
fn guest_pattern() -> Vec<u8> {
    (0..PATTERN_LINES)
        .flat_map(|i| format!("hearth vhost-user-blk test {i:04}\n").into_bytes())
        .collect()
}

/// One QEMU process; killed (by its PID) when dropped, so a failing assertion never
/// leaves a VM behind.
struct Vm {
    child: Child,
    console: Console,
    dir: PathBuf,
}

impl Vm {
    fn boot(dir: &Path, name: &str, socket: &Path, smp: u32) -> Vm {
        let images = images_dir().join("tiny");
        let cmdline = std::fs::read_to_string(images.join("cmdline")).expect("cmdline");
        let serial = dir.join(format!("{name}-serial.sock"));
        let log = dir.join(format!("{name}-console.log"));
        let stderr = std::fs::File::create(dir.join(format!("{name}-qemu.stderr"))).expect("stderr file");
        let child = Command::new("qemu-system-x86_64")
            .args(["-name", name, "-machine", "q35", "-accel", "tcg", "-cpu", "max"])
            .args(["-smp", &smp.to_string(), "-m", "256M"])
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa",
                "node,memdev=mem",
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(images.join("vmlinuz"))
            .arg("-initrd")
            .arg(images.join("initrd.img"))
            .args(["-append", cmdline.trim()])
            .arg("-chardev")
            .arg(format!(
                "socket,id=s0,path={},server=on,wait=off,logfile={}",
                serial.display(),
                log.display()
            ))
            .args(["-serial", "chardev:s0"])
            .arg("-chardev")
            .arg(format!("socket,id=blk0,path={}", socket.display()))
            .args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=blk0,num-queues={smp},id=vda"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start qemu-system-x86_64");
        let mut vm = Vm {
            child,
            console: Console::default(),
            dir: dir.to_path_buf(),
        };
        vm.console = Console::connect(&serial, &mut vm.child);
        let dir = vm.dir.clone();
        vm.console
            .expect("HEARTH-GUEST-READY", BOOT_TIMEOUT, &|| diagnostics(&dir, name));
        vm
    }

    /// Asks the guest to power off and waits for QEMU to exit.
    fn power_off(mut self) {
        self.console.send("sync; poweroff");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "qemu exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the guest did not power off within {COMMAND_TIMEOUT:?}");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn diagnostics(dir: &Path, name: &str) -> String {
    let read = |f: &str| std::fs::read_to_string(dir.join(format!("{name}-{f}"))).unwrap_or_default();
    format!(
        "qemu stderr:\n{}\nconsole log:\n{}",
        read("qemu.stderr"),
        read("console.log")
    )
}

/// The guest's serial console (busybox shell on ttyS0).
#[derive(Default)]
struct Console {
    stream: Option<UnixStream>,
    seen: String,
    next_command: u32,
}

impl Console {
    fn connect(path: &Path, child: &mut Child) -> Console {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
                return Console {
                    stream: Some(s),
                    ..Default::default()
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("qemu exited early with {status}");
            }
            assert!(Instant::now() < deadline, "no serial socket at {}", path.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, line: &str) {
        let stream = self.stream.as_mut().expect("connected");
        stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to console");
    }

    /// Reads until `needle` appears; returns everything read up to and including it and
    /// keeps the rest.
    fn expect(&mut self, needle: &str, timeout: Duration, context: &dyn Fn() -> String) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = self.seen.find(needle) {
                let end = pos + needle.len();
                let out = self.seen[..end].to_string();
                self.seen.drain(..end);
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console within {timeout:?}; got:\n{}\n{}",
                self.seen,
                context()
            );
            let stream = self.stream.as_mut().expect("connected");
            match stream.read(&mut buf) {
                Ok(0) => panic!("console closed; got:\n{}\n{}", self.seen, context()),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading the console: {e}"),
            }
        }
    }

    /// Runs `cmd` in the guest shell and returns what it printed (the part after the
    /// echoed command line). The end marker is computed by the shell, so the echo of
    /// the typed line never matches it.
    fn run(&mut self, cmd: &str) -> String {
        self.next_command += 1;
        let n = self.next_command;
        self.send(&format!("{cmd}; echo \"@@END-$((1000 + {n}))@@\""));
        let what = cmd.to_string();
        let out = self.expect(&format!("@@END-{}@@", 1000 + n), COMMAND_TIMEOUT, &|| {
            format!("command: {what}")
        });
        // Drop the echoed command line itself.
        let body = out.split_once('\n').map(|(_, rest)| rest).unwrap_or(&out);
        body.trim_end_matches(&format!("@@END-{}@@", 1000 + n))
            .replace('\r', "")
    }

    /// The value of `KEY<n>=value` printed by `run`, where the guest computes `<n>`.
    fn value(&mut self, cmd_printing_value: &str) -> String {
        let out = self.run(&format!("echo \"VAL$((7))=$({cmd_printing_value})\""));
        out.lines()
            .find_map(|l| l.strip_prefix("VAL7="))
            .unwrap_or_else(|| panic!("no value from {cmd_printing_value:?}; got:\n{out}"))
            .trim()
            .to_string()
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guests_write_and_read_back_through_the_vhost_user_blk_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    let file = std::fs::File::create(&image).expect("create image");
    file.set_len(DISK_SIZE).expect("size image");
    file.write_all_at(&testkit::host_pattern(), HOST_PATTERN_AT)
        .expect("host pattern");
    file.write_all_at(&vec![0xaa; DISCARD_LEN as usize], DISCARD_AT)
        .expect("discard target");
    drop(file);

    let device: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&image, false).expect("open image"));
    let socket = dir.path().join("vda.sock");
    let options = VhostUserBlkOptions {
        num_queues: 2,
        serial: "hearth-vub-test".into(),
        ..Default::default()
    };
    let export = VhostUserBlkExport::start(&socket, device, options).expect("start export");
    assert!(!export.is_connected());

    // First VM: two vCPUs, so the guest's virtio_blk uses both queues.
    let mut vm = Vm::boot(dir.path(), "vm1", &socket, 2);
    assert!(export.is_connected(), "QEMU is connected while the VM runs");
    let c = &mut vm.console;
    assert_eq!(
        c.value("cat /sys/block/vda/size"),
        (DISK_SIZE / 512).to_string(),
        "capacity"
    );
    assert_eq!(c.value("cat /sys/block/vda/serial"), "hearth-vub-test", "GET_ID");
    assert_eq!(c.value("ls /sys/block/vda/mq | wc -l"), "2", "two request queues");
    assert_eq!(c.value("cat /sys/block/vda/ro"), "0");
    assert_ne!(
        c.value("cat /sys/block/vda/queue/discard_max_bytes"),
        "0",
        "discard offered"
    );

    let host_md5 = c.value(&format!(
        "dd if=/dev/vda bs=4096 skip={} count=16 2>/dev/null | md5sum",
        HOST_PATTERN_AT / 4096
    ));
    assert_eq!(
        host_md5.split_whitespace().next(),
        Some(testkit::md5_hex(&testkit::host_pattern()).as_str()),
        "guest reads what the host wrote"
    );

    c.run(&format!(
        "i=0; while [ $i -lt {PATTERN_LINES} ]; do printf 'hearth vhost-user-blk test %04d\\n' $i; i=$((i+1)); done >/tmp/p"
    ));
    assert_eq!(c.value("wc -c </tmp/p"), guest_pattern().len().to_string());
    let out = c.run(&format!(
        "dd if=/tmp/p of=/dev/vda bs=4096 seek={} conv=fsync 2>&1; echo rc=$?",
        GUEST_PATTERN_AT / 4096
    ));
    assert!(out.contains("rc=0"), "dd to /dev/vda failed: {out}");
    let out = c.run(&format!(
        "blkdiscard -o {DISCARD_AT} -l {DISCARD_LEN} /dev/vda 2>&1; echo rc=$?"
    ));
    assert!(out.contains("rc=0"), "blkdiscard failed: {out}");
    vm.power_off();
    wait_until("the export notices QEMU is gone", Duration::from_secs(10), || {
        !export.is_connected()
    });

    let mut on_disk = vec![0u8; guest_pattern().len()];
    let file = std::fs::File::open(&image).expect("open image");
    file.read_exact_at(&mut on_disk, GUEST_PATTERN_AT).expect("read image");
    assert!(on_disk == guest_pattern(), "the guest's bytes landed in the file");
    let mut discarded = vec![1u8; DISCARD_LEN as usize];
    file.read_exact_at(&mut discarded, DISCARD_AT).expect("read image");
    assert!(discarded.iter().all(|&b| b == 0), "the discarded range reads as zeroes");

    // Second VM on the same, still running export.
    let mut vm = Vm::boot(dir.path(), "vm2", &socket, 1);
    assert_eq!(export.connections(), 2);
    let md5 = vm.console.value(&format!(
        "dd if=/dev/vda bs=4096 skip={} count=16 2>/dev/null | md5sum",
        GUEST_PATTERN_AT / 4096
    ));
    assert_eq!(
        md5.split_whitespace().next(),
        Some(testkit::md5_hex(&guest_pattern()).as_str()),
        "the second guest reads the first's pattern"
    );
    let text = vm.console.value(&format!(
        "dd if=/dev/vda bs=32 skip={} count=1 2>/dev/null",
        GUEST_PATTERN_AT / 32 + 7
    ));
    assert_eq!(text, "hearth vhost-user-blk test 0007");
    drop(vm); // killed by PID: a VM that dies without powering off
    wait_until("the export notices the killed QEMU", Duration::from_secs(10), || {
        !export.is_connected()
    });

    export.stop().expect("stop");
    assert!(!socket.exists(), "stop removes the socket");
}
