//! One suite, every backend: the memory pool, the file pool on ext4 (snapshots are
//! sparse copies, clones qcow2 overlays), the file pool on XFS with reflink (snapshots
//! and clones share extents), and LVM thin when `HEARTH_TEST_LVM=1` on a host with
//! device-mapper (see `lvm.rs`). Needs root for the XFS loop mount.

mod common;

use std::path::Path;
use std::sync::Arc;
use testkit::{tail, KillOnDrop};

use blockd::pool_file::FilePool;
use blockd::pool_lvm::{LvmConfig, LvmPool, SystemLvm};
use blockd::pool_memory::MemoryPool;
use blockd::service::{VolumeService, VolumeSource, VolumeSpec};
use blockd::volume::{Volume, VolumeBackend, VolumeError, VolumeFormat};
use common::{run, LoopDevice, LoopMount};

const MIB: u64 = 1 << 20;

fn spec(size: u64) -> VolumeSpec {
    VolumeSpec {
        size_bytes: Some(size),
        source: None,
    }
}

fn clone_of(snapshot: &str) -> VolumeSpec {
    VolumeSpec {
        size_bytes: None,
        source: Some(VolumeSource::Snapshot(snapshot.into())),
    }
}

/// Writes `byte` repeated over `len` bytes at `offset` of a volume.
fn write_pattern(b: &Arc<dyn VolumeBackend>, v: &Volume, offset: u64, len: usize, byte: u8) {
    if v.format == VolumeFormat::Qcow2 {
        // qemu-io is qemu's own block I/O tool; it understands qcow2 overlays.
        let cmd = format!("write -P {byte} {offset} {len}");
        let path = v.path.as_ref().expect("path");
        run("qemu-io", &["-f", "qcow2", "-c", &cmd, path.to_str().expect("utf8")]);
        return;
    }
    let dev = b.open(&v.name, false).expect("open");
    dev.write_at(&vec![byte; len], offset).expect("write");
    dev.flush().expect("flush");
}

/// Reads `len` bytes at `offset` of a volume.
fn read(b: &Arc<dyn VolumeBackend>, v: &Volume, offset: u64, len: usize) -> Vec<u8> {
    if v.format == VolumeFormat::Qcow2 {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("raw");
        let path = v.path.as_ref().expect("path");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                path.to_str().expect("utf8"),
                out.to_str().expect("utf8"),
            ],
        );
        let all = std::fs::read(out).expect("read converted");
        return all[offset as usize..offset as usize + len].to_vec();
    }
    let mut buf = vec![0u8; len];
    b.open(&v.name, true)
        .expect("open")
        .read_at(&mut buf, offset)
        .expect("read");
    buf
}

fn assert_all(bytes: &[u8], byte: u8, what: &str) {
    assert!(
        bytes.iter().all(|&x| x == byte),
        "{what}: expected every byte {byte:#x}, got {:?}…",
        &bytes[..16.min(bytes.len())]
    );
}

async fn suite(backend: Arc<dyn VolumeBackend>, scratch: &Path) {
    let svc = VolumeService::new(backend.clone());
    let kind = backend.kind();

    // Create, write, list with real usage.
    let (v, created) = svc.ensure("data", spec(64 * MIB)).await.expect("create");
    assert!(created);
    assert_eq!(v.size_bytes, 64 * MIB);
    let (again, created) = svc.ensure("data", spec(64 * MIB)).await.expect("idempotent");
    assert!(!created, "a second PUT of the same volume creates nothing");
    assert_eq!(again.name, "data");
    write_pattern(&backend, &v, 0, 1 << 20, 0xA1);
    let listed = svc.list().await.expect("list");
    let d = listed.iter().find(|v| v.name == "data").expect("listed");
    if kind != "memory" {
        assert!(
            d.allocated_bytes >= MIB,
            "{kind}: 1 MiB written shows as allocated ({})",
            d.allocated_bytes
        );
        assert!(
            d.allocated_bytes < 64 * MIB,
            "{kind}: volumes are sparse ({})",
            d.allocated_bytes
        );
    }

    // A size the backend does not allocate in (LVM: 4 MiB extents) is rounded up, and
    // the same request again is still a no-op, not a refused shrink.
    let unit = backend.size_granularity().expect("granularity");
    let round_up = |n: u64| n.div_ceil(unit) * unit;
    let (odd, created) = svc.ensure("odd-size", spec(MIB + 512)).await.expect("create");
    assert!(created);
    assert_eq!(odd.size_bytes, round_up(MIB + 512), "{kind}: the size it was given");
    let (again, created) = svc
        .ensure("odd-size", spec(MIB + 512))
        .await
        .expect("the same odd size again");
    assert!(!created);
    assert_eq!(again.size_bytes, odd.size_bytes);
    assert_eq!(
        svc.resize("odd-size", MIB + 512)
            .await
            .expect("resize to the same")
            .size_bytes,
        odd.size_bytes
    );
    svc.delete("odd-size").await.expect("delete");

    // A snapshot keeps the old content after the volume is overwritten.
    let (snap, _) = svc.snapshot("data", "before").await.expect("snapshot");
    assert_eq!(snap.size_bytes, 64 * MIB);
    if kind != "memory" {
        assert!(
            snap.allocated_bytes >= MIB && snap.allocated_bytes < 64 * MIB,
            "{kind}: a snapshot of a volume with 1 MiB written holds about that much ({})",
            snap.allocated_bytes
        );
    }
    write_pattern(&backend, &v, 0, 1 << 20, 0xB2);
    assert_all(&read(&backend, &v, 0, 4096), 0xB2, "volume after overwrite");
    let mut old = vec![0u8; 4096];
    backend
        .open_snapshot("data", "before")
        .map(|d| d.read_at(&mut old, 0).expect("read snapshot"))
        .ok();
    if backend.open_snapshot("data", "before").is_ok() {
        assert_all(&old, 0xA1, "snapshot");
        assert!(
            backend
                .open_snapshot("data", "before")
                .expect("open")
                .write_at(&[0], 0)
                .is_err(),
            "snapshots are read-only"
        );
    }

    // A clone starts with the snapshot's content and is independent of its source.
    let (c, _) = svc.ensure("copy", clone_of("data@before")).await.expect("clone");
    assert_eq!(c.origin.as_deref(), Some("data@before"));
    assert_eq!(c.size_bytes, 64 * MIB);
    assert_all(&read(&backend, &c, 0, 4096), 0xA1, "clone");
    write_pattern(&backend, &c, 0, 4096, 0xC3);
    assert_all(&read(&backend, &c, 0, 4096), 0xC3, "clone after its own write");
    assert_all(
        &read(&backend, &v, 0, 4096),
        0xB2,
        "source untouched by the clone's write",
    );

    // Rolled back: the volume holds the snapshot's content again, the snapshot stays,
    // the clone is untouched; refused while the volume is in use.
    let mut in_use = VolumeService::new(backend.clone());
    in_use.set_busy_check(|n| (n == "data").then(|| "exported over vhost-user".to_string()));
    let refused = in_use.rollback("data", "before").await.expect_err("in use");
    assert!(refused.to_string().contains("in use"), "{kind}: {refused}");
    assert!(
        svc.rollback("data", "nope").await.is_err(),
        "{kind}: an unknown snapshot"
    );
    let back = svc.rollback("data", "before").await.expect("rollback");
    assert_eq!(back.size_bytes, 64 * MIB);
    assert!(
        back.snapshots.iter().any(|s| s.name == "before"),
        "{kind}: the snapshot stays"
    );
    assert_all(&read(&backend, &back, 0, 4096), 0xA1, "volume after rollback");
    assert_all(&read(&backend, &c, 0, 4096), 0xC3, "clone untouched by the rollback");
    write_pattern(&backend, &back, 0, 1 << 20, 0xB2);
    write_pattern(&backend, &v, 4096, 4096, 0xD4);
    assert_all(
        &read(&backend, &c, 4096, 4096),
        0xA1,
        "clone untouched by the source's write",
    );

    // Grow only.
    let grown = svc.resize("data", 128 * MIB).await.expect("grow");
    assert_eq!(grown.size_bytes, 128 * MIB);
    assert_all(&read(&backend, &grown, 0, 4096), 0xB2, "content kept across growth");
    assert!(
        matches!(svc.resize("data", 32 * MIB).await, Err(VolumeError::Invalid(_))),
        "shrink is refused"
    );
    assert!(matches!(
        svc.ensure("data", spec(32 * MIB)).await,
        Err(VolumeError::Invalid(_))
    ));

    // Dependencies: the snapshot and its volume cannot go while the clone exists.
    assert!(matches!(
        svc.delete_snapshot("data", "before").await,
        Err(VolumeError::Conflict(_))
    ));
    match svc.delete("data").await {
        Err(VolumeError::Conflict(m)) => assert!(m.contains("copy"), "{m}"),
        other => panic!("deleting a volume with clones: {other:?}"),
    }

    // Bad input.
    for bad in ["a/b", "..", "x\u{1}", ""] {
        assert!(
            matches!(svc.ensure(bad, spec(MIB)).await, Err(VolumeError::Invalid(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        svc.ensure("zero", spec(0)).await,
        Err(VolumeError::Invalid(_))
    ));
    assert!(matches!(
        svc.ensure("odd", spec(1000)).await,
        Err(VolumeError::Invalid(_))
    ));
    let huge = svc.pool().await.expect("pool").usage.total_bytes + MIB;
    assert!(matches!(
        svc.ensure("huge", spec(huge.div_ceil(512) * 512)).await,
        Err(VolumeError::NoSpace(_))
    ));
    assert!(matches!(
        svc.ensure("bad-clone", clone_of("data@nope")).await,
        Err(VolumeError::NotFound(_))
    ));
    let missing = scratch.join("no-such-image.raw");
    let from_missing = VolumeSpec {
        size_bytes: None,
        source: Some(VolumeSource::Image(missing)),
    };
    assert!(matches!(
        svc.ensure("img", from_missing).await,
        Err(VolumeError::NotFound(_))
    ));
    let names: Vec<String> = svc.list().await.expect("list").into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["copy", "data"], "{kind}: failed operations left nothing behind");

    // From an image file.
    let image = scratch.join("image.raw");
    std::fs::write(&image, vec![0x5Au8; 3 * 4096]).expect("image");
    let from_image = VolumeSpec {
        size_bytes: Some(8 * MIB),
        source: Some(VolumeSource::Image(image)),
    };
    let (img, _) = svc.ensure("from-image", from_image).await.expect("from image");
    assert_eq!(img.size_bytes, 8 * MIB);
    assert_all(&read(&backend, &img, 0, 3 * 4096), 0x5A, "volume from image");
    assert_all(
        &read(&backend, &img, 3 * 4096, 4096),
        0,
        "volume from image, beyond the image",
    );

    // A root disk cloned from an immutable image: copy-on-write, the image untouched.
    let cache_image = scratch.join("cache-image.raw");
    std::fs::write(&cache_image, vec![0x3Cu8; 8 * 4096]).expect("image");
    let digest_before = std::fs::read(&cache_image).expect("read image");
    let root_spec = |size: Option<u64>| VolumeSpec {
        size_bytes: size,
        source: Some(VolumeSource::ImageClone {
            path: cache_image.clone(),
            key: "sha256:0123456789abcdef0123456789abcdef".into(),
        }),
    };
    let (root, _) = svc
        .ensure("root-a", root_spec(Some(16 * MIB)))
        .await
        .expect("clone image");
    let (root_b, _) = svc.ensure("root-b", root_spec(None)).await.expect("clone image again");
    assert_eq!(
        root.size_bytes,
        16 * MIB,
        "{kind}: the clone is grown to the size asked"
    );
    assert_eq!(
        root_b.size_bytes,
        round_up(8 * 4096),
        "{kind}: without a size the clone keeps the image's (rounded up to the backend's unit)"
    );
    assert_all(&read(&backend, &root, 0, 8 * 4096), 0x3C, "image clone");
    write_pattern(&backend, &root, 0, 4096, 0x77);
    assert_all(&read(&backend, &root, 0, 4096), 0x77, "image clone after a write");
    assert_all(&read(&backend, &root_b, 0, 4096), 0x3C, "the other clone of the image");
    assert_eq!(
        std::fs::read(&cache_image).expect("read image"),
        digest_before,
        "{kind}: writing to a clone leaves the image file untouched"
    );
    assert!(matches!(
        svc.ensure("root-small", root_spec(Some(4096))).await,
        Err(VolumeError::Invalid(_))
    ));
    assert!(svc.get("root-small").await.is_err(), "a refused clone leaves nothing");
    svc.delete("root-a").await.expect("delete root");
    svc.delete("root-b").await.expect("delete root");
    if let Some(base) = svc
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|v| v.name.starts_with("image-"))
    {
        // Backends that keep a base volume per image (memory, LVM).
        svc.delete_snapshot(&base.name, "base").await.expect("base snapshot");
        svc.delete(&base.name).await.expect("base");
    }

    // Clean up in dependency order; deleting what is gone succeeds.
    svc.delete("copy").await.expect("delete clone");
    svc.delete_snapshot("data", "before").await.expect("delete snapshot");
    svc.delete("data").await.expect("delete");
    svc.delete("data").await.expect("delete twice");
    svc.delete("from-image").await.expect("delete");
    assert!(svc.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn memory_pool() {
    let scratch = tempfile::tempdir().expect("tempdir");
    suite(Arc::new(MemoryPool::new(512 * MIB)), scratch.path()).await;
}

#[tokio::test]
async fn file_pool_on_ext4_copies_snapshots_and_overlays_clones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = FilePool::open(&dir.path().join("pool")).expect("pool");
    assert!(
        !pool.reflink(),
        "the test expects a file system without reflink here (ext4)"
    );
    suite(Arc::new(pool), dir.path()).await;
    let vols = std::fs::read_dir(dir.path().join("pool/volumes")).expect("dir").count();
    assert_eq!(vols, 0, "no file left in the pool");
}

#[tokio::test]
async fn file_pool_on_xfs_shares_extents() {
    let fs = LoopMount::new("2G", &["mkfs.xfs", "-q", "-m", "reflink=1"]);
    let pool = FilePool::open(&fs.path().join("pool")).expect("pool");
    assert!(pool.reflink(), "XFS with reflink=1 shares extents");
    let pool: Arc<dyn VolumeBackend> = Arc::new(pool);
    suite(pool.clone(), fs.path()).await;

    // A clone of a 1 GiB volume is instant and takes no space.
    let svc = VolumeService::new(pool.clone());
    let (v, _) = svc.ensure("big", spec(1 << 30)).await.expect("big");
    let dev = pool.open("big", false).expect("open");
    let chunk = vec![0xEEu8; 4 * MIB as usize];
    for i in 0..64 {
        dev.write_at(&chunk, i * 4 * MIB).expect("fill");
    }
    dev.flush().expect("flush");
    let before = run("df", &["--output=used", "-B1", fs.path().to_str().expect("utf8")]);
    let t = std::time::Instant::now();
    svc.snapshot("big", "s").await.expect("snapshot");
    svc.ensure("big-clone", clone_of("big@s")).await.expect("clone");
    let took = t.elapsed();
    let after = run("df", &["--output=used", "-B1", fs.path().to_str().expect("utf8")]);
    let used = |s: &str| {
        s.lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .expect("df figure")
    };
    assert!(
        used(&after) - used(&before) < 16 * MIB,
        "snapshot+clone of 256 MiB of data shares extents"
    );
    assert!(took < std::time::Duration::from_secs(2), "snapshot+clone took {took:?}");
    assert_eq!(v.format, VolumeFormat::Raw);
    svc.delete("big-clone").await.expect("delete");
    svc.delete("big").await.expect("delete");
}

/// The whole suite on a real thin pool: only where device-mapper exists. The CI
/// machines have none; there `lvm_thin_pool_in_a_debian_guest` runs this test inside a
/// Debian guest whose kernel has it. On a host with device-mapper run it with
/// `HEARTH_TEST_LVM=1 cargo test -p blockd --test volume_backends -- --ignored`.
#[tokio::test]
#[ignore = "needs device-mapper: runs inside lvm_thin_pool_in_a_debian_guest, or with HEARTH_TEST_LVM=1 cargo test -p blockd --test volume_backends -- --ignored on such a host"]
async fn lvm_thin_pool_with_device_mapper() {
    let vg = TestVg::new("hearthtest");
    let cfg = LvmConfig {
        volume_group: vg.name.clone(),
        thin_pool: "pool".into(),
        pool_size_bytes: Some(512 * MIB),
    };
    let pool = LvmPool::open(cfg, Box::new(SystemLvm)).expect("thin pool");
    let scratch = tempfile::tempdir().expect("tempdir");
    suite(Arc::new(pool), scratch.path()).await;
}

/// The blockd daemon itself on a thin pool: it makes the pool in a fresh volume group,
/// serves a volume over NBD and vhost-user-blk, is killed (-9) and started again; the
/// exports come back from its state and what was written before the kill reads back,
/// as does the snapshot's older content through a clone. Where device-mapper exists
/// only (`lvm_thin_pool_in_a_debian_guest` runs it here); `HEARTH_BLOCKD_BIN` names
/// the daemon when it is not where cargo built it.
#[tokio::test]
#[ignore = "needs device-mapper: runs inside lvm_thin_pool_in_a_debian_guest, or with HEARTH_TEST_LVM=1 cargo test -p blockd --test volume_backends -- --ignored on such a host"]
async fn blockd_daemon_on_a_thin_pool_with_device_mapper() {
    use blockd::exports::{ExportKind, ExportSpec};
    use blockd::http::client::BlockdClient;
    use blockd::nbd::{NbdAddress, NbdClient};

    let test_vg = TestVg::new("hearthd");
    let vg = &test_vg.name;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = std::env::var("HEARTH_BLOCKD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_blockd").to_string());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let api = dir.path().join("blockd.sock");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let args = [
        "--socket".to_string(),
        path("blockd.sock"),
        "--pool".into(),
        format!("lvm:{vg}/pool"),
        "--state-dir".into(),
        path("state"),
        "--socket-dir".into(),
        path("run"),
        "--nbd-tcp".into(),
        format!("127.0.0.1:{port}"),
        "--nbd-unix".into(),
        path("run/nbd.sock"),
    ];
    let start = || {
        KillOnDrop(
            std::process::Command::new(&bin)
                .args(&args)
                .spawn()
                .unwrap_or_else(|e| panic!("start {bin}: {e}")),
        )
    };
    let mut daemon = start();
    let client = BlockdClient::new(&api).with_retry(std::time::Duration::from_secs(60));
    let nbd = NbdAddress::Tcp(format!("127.0.0.1:{port}"));

    let v = client.ensure_volume("data", &spec(64 * MIB)).await.expect("create");
    assert_eq!(v.backend, "lvm");
    let lv = format!("/dev/{vg}/hv-data");
    assert_eq!(v.path.as_deref(), Some(Path::new(&lv)));
    let export = client
        .export("data", "nbd", &ExportSpec::default())
        .await
        .expect("export over NBD");
    let export_name = export.nbd.expect("NBD endpoint").export;
    let vhost = client
        .export("data", "vhost-user", &ExportSpec::default())
        .await
        .expect("export over vhost-user-blk")
        .socket
        .expect("socket");
    let c = NbdClient::connect(&nbd, &export_name).await.expect("connect");
    assert_eq!(c.size(), 64 * MIB);
    c.write(0, &vec![0xA1; MIB as usize], true).await.expect("write");
    client.snapshot("data", "before").await.expect("snapshot");
    c.write(0, &vec![0xB2; MIB as usize], true).await.expect("write");
    drop(c);

    // A crash: nothing is cleaned up, nothing is told.
    daemon.0.kill().expect("kill blockd");
    daemon.0.wait().expect("reap blockd");
    let _daemon = start();
    let exports = client.exports().await.expect("exports after the restart");
    for kind in [ExportKind::Nbd, ExportKind::VhostUser] {
        assert!(
            exports.iter().any(|e| e.volume == "data" && e.kind == kind),
            "the {kind:?} export is back: {exports:?}"
        );
    }
    std::os::unix::net::UnixStream::connect(&vhost).expect("the vhost-user-blk socket listens again");
    let first_mib = |export: String| {
        let nbd = &nbd;
        async move {
            let c = NbdClient::connect(nbd, &export).await.expect("connect");
            c.read(0, MIB as usize).await.expect("read")
        }
    };
    assert_all(&first_mib(export_name).await, 0xB2, "data after a kill -9");
    let data = client.volume("data").await.expect("show");
    assert!(
        data.allocated_bytes >= MIB,
        "usage from the pool: {}",
        data.allocated_bytes
    );
    assert_eq!(data.snapshots.len(), 1);

    let copy = VolumeSpec {
        size_bytes: None,
        source: Some(VolumeSource::Snapshot("data@before".into())),
    };
    client.ensure_volume("copy", &copy).await.expect("clone");
    let e = client
        .export("copy", "nbd", &ExportSpec::default())
        .await
        .expect("export the clone");
    assert_all(
        &first_mib(e.nbd.expect("endpoint").export).await,
        0xA1,
        "the snapshot's content",
    );

    for (volume, kind) in [("copy", "nbd"), ("data", "nbd"), ("data", "vhost-user")] {
        client.unexport(volume, kind).await.expect("unexport");
    }
    client.delete_volume("copy").await.expect("delete the clone");
    client
        .delete_snapshot("data", "before")
        .await
        .expect("delete the snapshot");
    client.delete_volume("data").await.expect("delete");
    assert!(client.volumes().await.expect("list").is_empty());
}

/// A volume group of its own on a 1 GiB loop device, for a test that has confirmed
/// with `HEARTH_TEST_LVM=1`; removed with its loop device when dropped, also when the
/// test panics.
struct TestVg {
    name: String,
    disk: LoopDevice,
}

impl TestVg {
    fn new(prefix: &str) -> TestVg {
        assert_eq!(
            std::env::var("HEARTH_TEST_LVM").as_deref(),
            Ok("1"),
            "this test makes a volume group on a loop device: set HEARTH_TEST_LVM=1 to confirm"
        );
        let disk = LoopDevice::new("1G");
        run("pvcreate", &["-q", &disk.device]);
        let vg = TestVg {
            name: format!("{prefix}{}", std::process::id()),
            disk,
        };
        run("vgcreate", &["-q", &vg.name, &vg.disk.device]);
        vg
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("vgremove")
            .args(["-f", "-q", &self.name])
            .status();
        let _ = std::process::Command::new("pvremove")
            .args(["-q", &self.disk.device])
            .status();
    }
}

/// Where the host has no device-mapper (these machines), the thin suite runs on a real
/// one inside a guest: the Debian image (its cloud kernel has dm-thin-pool) boots under
/// QEMU/TCG on a throw-away overlay, installs lvm2 and thin-provisioning-tools from the
/// .debs `guest-images/debian/guest-debs.sh` fetched (the image's own versions), and runs
/// this very test binary's `lvm_thin_pool_with_device_mapper` as root, with
/// `HEARTH_TEST_LVM=1`, on a loop device of its own. The guest powers off when it is
/// done; its serial console says how the suite went.
///
/// Needs `qemu-system-x86_64`, `qemu-img`, `mkfs.ext4` with `-d`, the debian image in
/// `$HEARTH_TEST_IMAGES` and the .debs in `$HEARTH_TEST_LVM_DEBS` (scripts/test.sh makes
/// both; defaults under /var/cache/hearth).
#[test]
fn lvm_thin_pool_in_a_debian_guest() {
    let guest = testkit::DebianGuest::new();
    let debs = std::env::var_os("HEARTH_TEST_LVM_DEBS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/debs/lvm-guest".into());
    guest.copy_debs(
        &debs,
        &["lvm2", "thin-provisioning-tools"],
        "run guest-images/debian/guest-debs.sh IMAGE_DIR DIR lvm2 thin-provisioning-tools (scripts/test.sh does)",
    );
    guest.copy_in(&std::env::current_exe().expect("this test binary"), "volume_backends");
    guest.copy_in(Path::new(env!("CARGO_BIN_EXE_blockd")), "blockd");
    let run = guest.run(&testkit::script_installing_debs(
        "HEARTH-LVM-GUEST-EXIT ",
        GUEST_SCRIPT_BODY,
    ));
    eprintln!("the guest ran the thin suite in {:?}", run.elapsed);
    run.assert_tests_passed(
        "HEARTH-LVM-GUEST-EXIT ",
        &[
            "lvm_thin_pool_with_device_mapper",
            "blockd_daemon_on_a_thin_pool_with_device_mapper",
        ],
    );
    let log = run.console;
    // The pool was a real dm-thin pool: the kernel's thin-pool target was loaded by it.
    assert!(
        log.lines().any(|l| l.starts_with("thin-pool ")),
        "dmsetup targets lists no thin-pool target:\n{}",
        tail(&log, 40)
    );
}

/// What the guest runs once the .debs are in (`testkit::script_installing_debs`), from
/// the payload disk, as root, with its console on ttyS0.
const GUEST_SCRIPT_BODY: &str = r#"modprobe dm-thin-pool
dmsetup version
lvm version | head -1
cd /tmp
HEARTH_TEST_LVM=1 HEARTH_BLOCKD_BIN=/payload/blockd RUST_BACKTRACE=0 /payload/volume_backends --ignored --exact lvm_thin_pool_with_device_mapper blockd_daemon_on_a_thin_pool_with_device_mapper --nocapture --test-threads=1
rc=$?
dmsetup targets
echo "HEARTH-LVM-GUEST-EXIT $rc"
"#;
