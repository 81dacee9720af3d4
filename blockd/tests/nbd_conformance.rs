//! blockd's NBD server and client against real NBD tools (libnbd's nbdinfo, nbdcopy
//! and nbdsh, qemu-img, fio's nbd engine) and against each other, on loopback TCP and
//! Unix sockets only.
//!
//! The tools come from the Debian packages qemu-utils, nbdkit, libnbd-bin,
//! python3-libnbd and fio; a missing tool fails its test with the package's name.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd::device::{BlockDevice, FileDevice, MemoryDevice};
use blockd::nbd::{ExportOptions, NbdAddress, NbdClient, NbdDevice, NbdServer, ReconnectPolicy, ServerConfig};

const MIB: u64 = 1 << 20;

/// Fails the test unless `tool` is installed, naming the package that has it.
fn require(tool: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} is not installed: install the Debian package {package} (apt-get install {package})");
}

/// Debian's Python, which has libnbd's `nbd` module (the first python3 on PATH may not).
fn nbd_python() -> PathBuf {
    let python = require("python3", "python3");
    let ok = Command::new(&python)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd"
    );
    python
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs keeps the big files fast and off the disk.
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    tempfile::Builder::new()
        .prefix("nbd-test-")
        .tempdir_in(base)
        .expect("temp dir")
}

fn random_file(path: &Path, len: u64) {
    let mut src = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = std::fs::File::create(path).expect("create random file");
    let mut buf = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).expect("read /dev/urandom");
        dst.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
}

fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .expect("create export file");
}

fn files_equal(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).expect("open a"),
        std::fs::File::open(b).expect("open b"),
    );
    if fa.metadata().expect("meta").len() != fb.metadata().expect("meta").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba).expect("read a");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// A server running in this process, on its own runtime, listening on a loopback
/// port and a Unix socket in a scratch directory.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: NbdServer,
    tcp: SocketAddr,
    unix: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(config: ServerConfig) -> Fixture {
        let dir = scratch_dir();
        let server = NbdServer::new(config);
        let (runtime, tcp, unix) = common::serve_nbd(&server, dir.path());
        Fixture {
            runtime,
            server,
            tcp,
            unix,
            dir,
        }
    }

    /// Exports a new sparse file of `size` bytes; returns its path.
    fn file_export(&self, name: &str, size: u64, read_only: bool) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.raw"));
        sparse_file(&path, size);
        let device = FileDevice::open(&path, false).expect("open export");
        let options = ExportOptions {
            read_only,
            description: format!("the {name} export"),
            ..Default::default()
        };
        self.server
            .add_export(name, Arc::new(device), options)
            .expect("add export");
        path
    }

    fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.tcp)
    }

    fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.unix.display())
    }

    /// Runs NBDSH_CHECKS on export `rw` over TCP and read-only export `ro` over the
    /// Unix socket.
    fn nbdsh_checks(&self, python: &Path, rw: &str, ro: &str) {
        let script = self.dir.path().join("checks.py");
        std::fs::write(&script, NBDSH_CHECKS).expect("write script");
        let out = run(Command::new(python)
            .arg(&script)
            .arg(self.tcp_uri(rw))
            .arg(self.unix_uri(ro)));
        assert_eq!(out.trim(), "ok");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn nbdinfo_lists_exports_with_their_flags() {
    let nbdinfo = require("nbdinfo", "libnbd-bin");
    let f = Fixture::new(ServerConfig::default());
    f.file_export("data", 64 * MIB, false);
    f.file_export("golden", 16 * MIB, true);

    let list = json(&run(Command::new(&nbdinfo).args([
        "--list",
        "--json",
        &format!("nbd://{}", f.tcp),
    ])));
    assert_eq!(list["protocol"], "newstyle-fixed");
    assert_eq!(list["structured"], true);
    let exports = list["exports"].as_array().expect("exports array");
    let names: Vec<&str> = exports.iter().filter_map(|e| e["export-name"].as_str()).collect();
    assert_eq!(names, ["data", "golden"]);
    let data = &exports[0];
    assert_eq!(data["export-size"], 64 * MIB);
    assert_eq!(data["description"], "the data export");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(data[flag], true, "{flag} on a writable export");
    }
    assert_eq!(data["is_read_only"], false);
    assert_eq!(data["block_size_maximum"], 32 * MIB);
    let golden = &exports[1];
    assert_eq!(golden["is_read_only"], true);
    assert_eq!(golden["can_trim"], false);
    assert_eq!(golden["can_zero"], false);

    // The same export over the Unix socket, asked for by name.
    let one = json(&run(Command::new(&nbdinfo).args(["--json", &f.unix_uri("golden")])));
    assert_eq!(one["exports"][0]["export-size"], 16 * MIB);
    assert_eq!(one["exports"][0]["is_read_only"], true);

    // An unknown export is refused, not served.
    let out = Command::new(&nbdinfo)
        .arg(f.tcp_uri("nope"))
        .output()
        .expect("run nbdinfo");
    assert!(!out.status.success(), "nbdinfo of an unknown export succeeded");
}

#[test]
fn nbdcopy_round_trips_a_random_gibibyte() {
    let nbdcopy = require("nbdcopy", "libnbd-bin");
    let f = Fixture::new(ServerConfig::default());
    let export = f.file_export("disk", 1 << 30, false);
    let src = f.dir.path().join("src.raw");
    let back = f.dir.path().join("back.raw");
    random_file(&src, 1 << 30);

    run(Command::new(&nbdcopy).arg(&src).arg(f.tcp_uri("disk")));
    assert!(
        files_equal(&src, &export),
        "the export does not hold what nbdcopy wrote over TCP"
    );
    run(Command::new(&nbdcopy).arg(f.unix_uri("disk")).arg(&back));
    assert!(
        files_equal(&src, &back),
        "what nbdcopy read back over the Unix socket differs from the source"
    );
    std::fs::remove_file(&back).expect("remove");
    run(Command::new(&nbdcopy).arg(f.tcp_uri("disk")).arg(&back));
    assert!(
        files_equal(&src, &back),
        "what nbdcopy read back over TCP differs from the source"
    );
}

#[test]
fn qemu_img_reads_writes_and_compares_over_nbd() {
    let qemu_img = require("qemu-img", "qemu-utils");
    let f = Fixture::new(ServerConfig::default());
    f.file_export("disk", 64 * MIB, false);
    let uri = f.tcp_uri("disk");

    let info = json(&run(Command::new(&qemu_img).args(["info", "--output=json", &uri])));
    assert_eq!(info["virtual-size"], 64 * MIB);

    let src = f.dir.path().join("src.raw");
    random_file(&src, 64 * MIB);
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));

    let qcow = f.dir.path().join("copy.qcow2");
    run(Command::new(&qemu_img)
        .args(["convert", "-O", "qcow2", &f.unix_uri("disk")])
        .arg(&qcow));
    run(Command::new(&qemu_img)
        .args(["compare", "-F", "qcow2"])
        .arg(&src)
        .arg(&qcow));

    // A changed byte is noticed.
    let mut bytes = std::fs::read(&src).expect("read src");
    bytes[12345] ^= 0xff;
    std::fs::write(&src, &bytes).expect("write src");
    let out = Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "qemu-img compare should see the difference");
}

fn fio_job(fio: &Path, uri: &str, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let out = dir.join("fio.json");
    let mut cmd = Command::new(fio);
    // fio writes verify state files into its working directory: keep them out of the tree.
    cmd.current_dir(dir);
    cmd.args([
        "--name=nbd",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--size=64M",
        "--output-format=json",
    ])
    .arg(format!("--output={}", out.display()))
    .args(extra);
    run(&mut cmd);
    let v = json(&std::fs::read_to_string(&out).expect("fio output"));
    std::fs::remove_file(&out).expect("remove fio output");
    v
}

#[test]
fn fio_nbd_engine_reads_writes_and_trims_without_error() {
    let fio = require("fio", "fio");
    let f = Fixture::new(ServerConfig::default());
    f.file_export("disk", 64 * MIB, false);
    let jobs: [(&str, Vec<&str>, &[&str]); 4] = [
        (
            "randwrite+verify",
            vec![
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--verify=crc32c",
                "--do_verify=1",
            ],
            &["write", "read"],
        ),
        (
            "randread",
            vec![
                "--rw=randread",
                "--bs=4k",
                "--iodepth=32",
                "--runtime=2",
                "--time_based",
            ],
            &["read"],
        ),
        ("randtrim", vec!["--rw=randtrim", "--bs=64k", "--iodepth=8"], &["trim"]),
        (
            "mixed 64k",
            vec!["--rw=randrw", "--bs=64k", "--iodepth=16", "--runtime=2", "--time_based"],
            &["read", "write"],
        ),
    ];
    for (what, args, directions) in jobs {
        let uri = if what == "randread" {
            f.unix_uri("disk")
        } else {
            f.tcp_uri("disk")
        };
        let v = fio_job(&fio, &uri, f.dir.path(), &args);
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "fio {what} reported an error: {job}");
        for d in directions {
            let bytes = job[d]["io_bytes"].as_u64().unwrap_or(0);
            assert!(bytes > 0, "fio {what} moved no {d} bytes");
        }
    }
}

const NBDSH_CHECKS: &str = r#"
import errno, sys
import nbd

tcp, ro_uri = sys.argv[1], sys.argv[2]
h = nbd.NBD()
# Let requests the server must refuse reach it, instead of libnbd refusing them.
h.set_strict_mode(0)
h.connect_uri(tcp)
size = h.get_size()
assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua(), "write features advertised"

def expect_errno(want, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        # libnbd's Python binding gives the errno's name.
        assert e.errno in (want, errno.errorcode[want]), "%s: errno %s, wanted %s (%s)" % (fn.__name__, e.errno, errno.errorcode[want], e)
        return
    raise AssertionError("%s succeeded but should fail with errno %d" % (fn.__name__, want))

# Write with FUA, read back.
h.pwrite(b"\xab" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1 << 20) == b"\xab" * 65536
h.flush()

# TRIM reads back as zeroes (hearth's devices guarantee it).
h.trim(65536, 1 << 20)
assert h.pread(65536, 1 << 20) == bytes(65536), "trimmed range is not zero"

# WRITE_ZEROES, with and without NO_HOLE.
h.pwrite(b"\x11" * 8192, 4096)
h.zero(4096, 4096)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 4096) == bytes(8192), "zeroed range is not zero"
h.pwrite(b"\x22" * 4096, 0, nbd.CMD_FLAG_FUA)
h.zero(4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == bytes(4096)

# Out-of-range requests fail and the connection stays usable.
expect_errno(errno.EINVAL, h.pread, 4096, size - 1024)
expect_errno(errno.EINVAL, h.pread, 512, 1 << 62)
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 4096, size - 1)
expect_errno(errno.EINVAL, h.trim, 8192, size)
expect_errno(errno.ENOSPC, h.zero, 8192, size)
# Over 32 MiB: refused as invalid, connection still fine.
expect_errno(errno.EINVAL, h.pread, (32 << 20) + 1, 0)
h.pwrite(b"\x33" * 512, size - 512)
assert h.pread(512, size - 512) == b"\x33" * 512, "connection unusable after refused requests"
h.shutdown()

# The read-only export refuses every kind of write.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
assert r.is_read_only()
expect_errno(errno.EPERM, r.pwrite, b"x" * 512, 0)
expect_errno(errno.EPERM, r.trim, 4096, 0)
expect_errno(errno.EPERM, r.zero, 4096, 0)
assert r.pread(512, 0) == bytes(512)
r.flush()
r.shutdown()
print("ok")
"#;

#[test]
fn nbdsh_checks_trim_zeroes_flush_fua_ranges_and_read_only() {
    let python = nbd_python();
    let f = Fixture::new(ServerConfig::default());
    f.file_export("disk", 16 * MIB, false);
    f.file_export("golden", 16 * MIB, true);
    f.nbdsh_checks(&python, "disk", "golden");

    // nbdsh itself, the way an operator would use it.
    let out = run(Command::new(&python).args([
        "-m",
        "nbd",
        "-u",
        &f.unix_uri("disk"),
        "-c",
        "print(h.get_size(), h.can_multi_conn(), h.get_structured_replies_negotiated())",
    ]));
    assert_eq!(out.trim(), format!("{} True True", 16 * MIB));
}

#[test]
fn our_client_and_device_against_our_server() {
    let f = Fixture::new(ServerConfig::default());
    let mem = Arc::new(MemoryDevice::new(8 * MIB));
    f.server
        .add_export("mem", mem.clone(), ExportOptions::default())
        .expect("add");
    f.file_export("ro", MIB, true);

    // Many requests in flight on one connection, over TCP.
    f.runtime.block_on(async {
        let client = Arc::new(
            NbdClient::connect(&NbdAddress::Tcp(f.tcp.to_string()), "mem")
                .await
                .expect("connect"),
        );
        assert!(client.info().structured_replies);
        assert_eq!(client.size(), 8 * MIB);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..256u64 {
            let c = client.clone();
            tasks.spawn(async move {
                let block = vec![i as u8; 4096];
                c.write(i * 4096, &block, i % 7 == 0).await.expect("write");
                assert_eq!(c.read(i * 4096, 4096).await.expect("read"), block);
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task");
        }
        client.flush().await.expect("flush");
        // A read larger than one request is split, and holes read as zero.
        let big = client.read(0, 40 << 20).await;
        assert!(big.is_err(), "read past the end must fail");
        let all = client.read(0, 8 << 20).await.expect("read all");
        assert_eq!(all[4096 * 255], 255);
        assert!(all[256 * 4096..].iter().all(|&b| b == 0));
        client.write_zeroes(0, 8192, true).await.expect("zero");
        client.trim(8192, 4096).await.expect("trim");
        assert!(client.read(0, 12288).await.expect("read").iter().all(|&b| b == 0));
        client.disconnect().await.expect("disconnect");
    });
    assert_eq!(mem.to_bytes()[4096 * 3], 3, "writes landed on the exported device");

    // NbdDevice from plain threads, over the Unix socket.
    let dev = Arc::new(
        NbdDevice::connect(NbdAddress::Unix(f.unix.clone()), "mem", ReconnectPolicy::default()).expect("device"),
    );
    assert_eq!(dev.size(), 8 * MIB);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let buf = vec![t + 1; 64 << 10];
                let at = u64::from(t) * MIB;
                dev.write_at(&buf, at).expect("write_at");
                let mut back = vec![0; 64 << 10];
                dev.read_at(&mut back, at).expect("read_at");
                assert_eq!(back, buf);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    dev.flush().expect("flush");
    // From inside a runtime (an NBD server serving a remote disk inline) it works too.
    let d = dev.clone();
    f.runtime.block_on(async move {
        let mut b = [0u8; 4];
        d.read_at(&mut b, MIB).expect("read inside a runtime");
        assert_eq!(b, [2; 4]);
    });
    let mut b = [0u8; 16];
    assert!(dev.read_at(&mut b, 8 * MIB - 8).is_err());

    let ro = NbdDevice::connect(NbdAddress::Tcp(f.tcp.to_string()), "ro", ReconnectPolicy::default()).expect("ro");
    assert!(ro.read_only());
    assert!(ro.write_at(&[1], 0).is_err());
}

/// The `nbd_serve` example, built next to this test binary by `cargo test`.
fn nbd_serve_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("examples").join("nbd_serve");
    assert!(
        bin.exists(),
        "{} is missing: build it with cargo build -p blockd --example nbd_serve",
        bin.display()
    );
    bin
}

struct ServeProcess(Child);

impl ServeProcess {
    fn start(file: &Path, socket: &Path) -> ServeProcess {
        let mut child = Command::new(nbd_serve_binary())
            .args(["--name", "vol", "--file"])
            .arg(file)
            .arg("--unix")
            .arg(socket)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start nbd_serve");
        let mut line = String::new();
        let mut stdout = child.stdout.take().expect("stdout");
        let mut byte = [0u8; 1];
        while !line.ends_with('\n') && stdout.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
            line.push(byte[0] as char);
        }
        assert!(line.starts_with("listening unix="), "nbd_serve did not start: {line:?}");
        ServeProcess(child)
    }

    fn stop(mut self) {
        // SIGTERM by PID, as an operator restarting blockd would.
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: kill with the PID of a child this test started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 16 MiB file `nbd_serve` serves on a Unix socket, and an `NbdDevice` on it (giving
/// up after `give_up_after`) that wrote 4 KiB of 0x5a at 4096 and flushed. Returns the
/// scratch directory, the file, the socket, the server and the device.
fn served_file(give_up_after: Duration) -> (tempfile::TempDir, PathBuf, PathBuf, ServeProcess, NbdDevice) {
    let dir = scratch_dir();
    let file = dir.path().join("vol.raw");
    sparse_file(&file, 16 * MIB);
    let socket = dir.path().join("serve.sock");
    let server = ServeProcess::start(&file, &socket);
    let policy = ReconnectPolicy {
        give_up_after,
        ..ReconnectPolicy::default()
    };
    let dev = NbdDevice::connect(NbdAddress::Unix(socket.clone()), "vol", policy).expect("connect");
    dev.write_at(&[0x5a; 4096], 4096).expect("write");
    dev.flush().expect("flush");
    (dir, file, socket, server, dev)
}

#[test]
fn nbd_device_survives_a_server_restart() {
    let (_dir, file, socket, server, dev) = served_file(Duration::from_secs(20));
    server.stop();
    // The server comes back a moment later; meanwhile the device keeps retrying.
    let (file2, socket2) = (file.clone(), socket.clone());
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        ServeProcess::start(&file2, &socket2)
    });
    let started = Instant::now();
    let mut back = [0u8; 4096];
    dev.read_at(&mut back, 4096).expect("read across the restart");
    assert_eq!(
        back, [0x5a; 4096],
        "data written before the restart reads back after it"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the read cannot have succeeded before the restart"
    );
    assert!(dev.reconnects() >= 1);
    dev.write_at(&[0x6b; 512], 0).expect("write after the restart");
    let server2 = restarter.join().expect("restarter");
    drop(dev);
    server2.stop();

    // With no server at all, requests fail once the policy gives up.
    let policy = ReconnectPolicy {
        give_up_after: Duration::from_millis(300),
        ..ReconnectPolicy::default()
    };
    let server3 = ServeProcess::start(&file, &socket);
    let dev = NbdDevice::connect(NbdAddress::Unix(socket.clone()), "vol", policy).expect("connect");
    server3.stop();
    let started = Instant::now();
    assert!(
        dev.read_at(&mut back, 0).is_err(),
        "read without a server must fail eventually"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up too late: {:?}",
        started.elapsed()
    );
}

/// An export that grew between two connections (its owner resized the volume) is
/// followed: the device reconnects by itself, without waiting for a request, takes the
/// new size and says so; one that shrank is refused.
#[test]
fn nbd_device_follows_an_export_that_grew_and_refuses_one_that_shrank() {
    let (_dir, file, socket, server, dev) = served_file(Duration::from_secs(5));
    let told = Arc::new(Mutex::new(Vec::new()));
    let log = told.clone();
    dev.on_grow(move |size| log.lock().expect("log").push(size));
    server.stop();

    let restart_at = |len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(len))
            .expect("resize the file");
        ServeProcess::start(&file, &socket)
    };
    let server = restart_at(32 * MIB);
    // No request: the device notices on its own (an idle VM's disk grows too).
    let deadline = Instant::now() + Duration::from_secs(10);
    while told.lock().expect("log").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dev.size(), 32 * MIB, "the idle device took the new size");
    assert_eq!(
        *told.lock().expect("log"),
        vec![32 * MIB],
        "on_grow was called once, with the new size, before any request"
    );
    assert_eq!(dev.reconnects(), 1, "one reconnection, by the device itself");
    let mut back = [0u8; 4096];
    dev.read_at(&mut back, 4096).expect("read after the growth");
    assert_eq!(back, [0x5a; 4096], "the data stays where it was");
    assert_eq!(
        told.lock().expect("log").len(),
        1,
        "the read did not report the growth again"
    );
    dev.write_at(&[0x6b; 4096], 30 * MIB).expect("a write past the old end");
    server.stop();

    let server = restart_at(8 * MIB);
    let err = dev
        .read_at(&mut back, 0)
        .expect_err("an export that shrank must not be served");
    assert!(err.to_string().contains("shrank from"), "{err}");
    assert_eq!(dev.size(), 32 * MIB);
    drop(dev);
    server.stop();
}

#[test]
fn peers_outside_the_allowlist_are_closed_before_the_handshake() {
    let nbdinfo = require("nbdinfo", "libnbd-bin");
    let refused = Fixture::new(ServerConfig {
        allowed_networks: Some(vec!["10.0.0.0/8".parse().expect("net")]),
        ..ServerConfig::default()
    });
    refused.file_export("disk", MIB, false);
    let mut s = std::net::TcpStream::connect(refused.tcp).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 18];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a refused peer must not get a greeting");
    let out = Command::new(&nbdinfo)
        .arg(refused.tcp_uri("disk"))
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "nbdinfo from a refused address succeeded");

    let allowed = Fixture::new(ServerConfig {
        allowed_networks: Some(vec![
            "10.0.0.0/8".parse().expect("net"),
            "127.0.0.0/8".parse().expect("net"),
        ]),
        ..ServerConfig::default()
    });
    allowed.file_export("disk", MIB, false);
    run(Command::new(&nbdinfo).arg(allowed.tcp_uri("disk")));
}

/// A tmpfs of `size` mounted on a directory of its own; unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().expect("mount point");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "hearth-test"])
            .arg(dir.path()));
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: a server thread may still hold the file for a moment.
        let _ = Command::new("umount").arg("--lazy").arg(self.dir.path()).status();
    }
}

#[test]
fn large_writes_land_intact_and_a_full_file_system_fails_only_the_request() {
    // Writes of 128 KiB and more go from the socket into the file by splice(2), the
    // rest through a buffer: both must land byte for byte, over TCP and Unix sockets,
    // and a write the file system cannot hold must fail alone, with ENOSPC, leaving
    // the connection in step for the requests after it.
    let small = SmallFs::new("4m");
    let f = Fixture::new(ServerConfig::default());
    let path = f.file_export("disk", 64 * MIB, false);
    let full_path = small.dir.path().join("full.raw");
    sparse_file(&full_path, 64 * MIB);
    f.server
        .add_export(
            "full",
            Arc::new(FileDevice::open(&full_path, false).expect("open")),
            ExportOptions::default(),
        )
        .expect("add");

    let mut pattern = vec![0u8; 64 * MIB as usize];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut pattern))
        .expect("random");
    let pattern = Arc::new(pattern);
    let addresses = [NbdAddress::Tcp(f.tcp.to_string()), NbdAddress::Unix(f.unix.clone())];
    f.runtime.block_on(async {
        for (i, address) in addresses.iter().enumerate() {
            let client = Arc::new(NbdClient::connect(address, "disk").await.expect("connect"));
            // Each transport fills its own half with writes of many sizes at once,
            // some with FUA; sizes from 4 KiB to 4 MiB straddle the splice threshold.
            let half = 32 * MIB as usize;
            let sizes = [4096, 65536, 131072, 131072 + 512, 262144, 1 << 20, 3 << 20, 4 << 20];
            let mut writes = Vec::new();
            let mut at = i * half;
            let mut k = 0;
            while at < (i + 1) * half {
                let len = sizes[k % sizes.len()].min((i + 1) * half - at);
                let (c, p) = (client.clone(), pattern.clone());
                writes.push(tokio::spawn(async move {
                    c.write(at as u64, &p[at..at + len], k % 5 == 0).await
                }));
                at += len;
                k += 1;
            }
            for w in writes {
                w.await.expect("task").expect("write");
            }
            let back = client.read((i * half) as u64, half).await.expect("read back");
            assert!(
                back == pattern[i * half..(i + 1) * half],
                "{address}: the export does not read back what was written"
            );
        }

        let client = NbdClient::connect(&addresses[1], "full").await.expect("connect");
        client
            .write(0, &pattern[..MIB as usize], true)
            .await
            .expect("the first MiB fits");
        let err = client
            .write(8 * MIB, &pattern[..8 * MIB as usize], false)
            .await
            .expect_err("8 MiB on a 4 MiB file system");
        assert!(
            matches!(err, blockd::nbd::ClientError::Request { errno: 28, .. }),
            "expected ENOSPC, got {err}"
        );
        // The connection is in step: the next requests are answered as usual.
        assert_eq!(
            client.read(0, MIB as usize).await.expect("read"),
            pattern[..MIB as usize]
        );
        client.flush().await.expect("flush");
    });
    assert!(
        files_equal_prefix(&path, &pattern),
        "the file differs from what was written"
    );
}

/// A file export whose splice target is the same file opened with `O_APPEND`, into
/// which the kernel refuses splices with EINVAL: what a file system without
/// `splice_write` answers. Everything else goes to the file itself.
#[derive(Debug)]
struct RefusesSplices {
    file: FileDevice,
    append: std::fs::File,
}

impl BlockDevice for RefusesSplices {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.file.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.file.write_zeroes(offset, len, may_trim)
    }
    fn splice_target(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.append))
    }
}

#[test]
fn large_writes_reach_a_file_that_takes_no_splice_through_a_buffer() {
    // The server finds out at the first large write that the file takes no splice
    // (EINVAL), after the data is already in its pipe: that write and every later one
    // must still land where they were sent, and nothing may be appended to the file.
    let f = Fixture::new(ServerConfig::default());
    let path = f.dir.path().join("nosplice.raw");
    let size = 16 * MIB;
    sparse_file(&path, size);
    let device = RefusesSplices {
        file: FileDevice::open(&path, false).expect("open"),
        append: std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open O_APPEND"),
    };
    f.server
        .add_export("nosplice", Arc::new(device), ExportOptions::default())
        .expect("add");
    let mut pattern = vec![0u8; size as usize];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut pattern))
        .expect("random");
    let pattern = Arc::new(pattern);
    f.runtime.block_on(async {
        let client = Arc::new(
            NbdClient::connect(&NbdAddress::Unix(f.unix.clone()), "nosplice")
                .await
                .expect("connect"),
        );
        // Back to front, several at once, 256 KiB to 4 MiB (all above the splice
        // threshold), the first alone so that it is the one that meets the EINVAL.
        let first = 4 * MIB as usize;
        client
            .write((size as usize - first) as u64, &pattern[size as usize - first..], false)
            .await
            .expect("the first large write");
        let sizes = [256 << 10, 1 << 20, (1 << 20) + 4096, 3 << 20];
        let mut writes = Vec::new();
        let mut end = size as usize - first;
        let mut k = 0;
        while end > 0 {
            let len = sizes[k % sizes.len()].min(end);
            let at = end - len;
            let (c, p) = (client.clone(), pattern.clone());
            writes.push(tokio::spawn(async move {
                c.write(at as u64, &p[at..end], k % 3 == 0).await
            }));
            end = at;
            k += 1;
        }
        for w in writes {
            w.await.expect("task").expect("write");
        }
        assert!(
            client.read(0, size as usize).await.expect("read back") == pattern[..],
            "the export does not read back what was written"
        );
    });
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        size,
        "data was appended to the file instead of written in place"
    );
    assert!(
        files_equal_prefix(&path, &pattern),
        "the file differs from what was written"
    );
}

fn files_equal_prefix(path: &Path, want: &[u8]) -> bool {
    std::fs::read(path)
        .map(|got| got.len() >= want.len() && got[..want.len()] == *want)
        .unwrap_or(false)
}

/// An LVM volume is a block device node, not a file: its size comes from seeking to its
/// end, TRIM and WRITE_ZEROES go to the BLKDISCARD and BLKZEROOUT ioctls (a node has no
/// holes to punch), and large writes are spliced into it. Loop devices are block devices
/// this host has (device-mapper it has not), so the same checks as for files run on two
/// of them: one full of random data, served read-write, and an empty one served
/// read-only. A trim must also give the space back, down to the loop's backing file.
#[test]
fn block_device_exports_trim_zero_and_splice_through_the_device_node() {
    let python = nbd_python();
    let f = Fixture::new(ServerConfig::default());
    let disk = common::LoopDevice::new("64M");
    let backing = disk.dir.path().join("disk.img");
    // Nothing has read the loop device yet, so no stale page of it is cached.
    random_file(&backing, 64 * MIB);
    let golden = common::LoopDevice::new("64M");
    for (name, dev, read_only) in [("blk", &disk, false), ("blk-ro", &golden, true)] {
        let device = FileDevice::open(Path::new(&dev.device), read_only).expect("open the loop device");
        assert_eq!(device.size(), 64 * MIB, "a block device's size is where it ends");
        let options = ExportOptions {
            read_only,
            description: format!("{name} on {}", dev.device),
            ..Default::default()
        };
        f.server
            .add_export(name, Arc::new(device), options)
            .expect("add export");
    }

    f.nbdsh_checks(&python, "blk", "blk-ro");

    let blocks = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&backing).expect("stat backing file").blocks() * 512
    };
    let before = blocks();
    // 4 MiB at 32 MiB (spliced: above 128 KiB), then 32 MiB of random data trimmed.
    let out = run(Command::new(&python)
        .arg("-c")
        .arg(BLOCK_DEVICE_WRITES)
        .arg(f.unix_uri("blk")));
    assert_eq!(out.trim(), "ok");
    let freed = before.saturating_sub(blocks());
    assert!(
        freed >= 30 * MIB,
        "trimming 32 MiB gave back {freed} bytes of the loop's backing file"
    );
    let mut file = std::fs::File::open(&backing).expect("open backing file");
    let mut at_32m = vec![0u8; 4 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut at_32m, 32 * MIB).expect("read backing file");
    let want: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    assert!(at_32m == want, "the spliced 4 MiB write is in the backing file");
    let mut first = vec![0u8; 4096];
    file.read_exact(&mut first).expect("read");
    assert_eq!(first, vec![0u8; 4096], "WRITE_ZEROES reached the backing file");
}

/// Run against the read-write block device export after NBDSH_CHECKS.
const BLOCK_DEVICE_WRITES: &str = r#"
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = bytes(i % 251 for i in range(4 << 20))
h.pwrite(data, 32 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4 << 20, 32 << 20) == data
h.trim(16 << 20, 8 << 20)
h.trim(16 << 20, 40 << 20)
assert h.pread(16 << 20, 8 << 20) == bytes(16 << 20)
h.flush()
h.shutdown()
print("ok")
"#;
