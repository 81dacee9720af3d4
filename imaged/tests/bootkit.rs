//! Finding the kernel inside a disk image, on disks laid out the way cloud images are:
//! GPT with the kernel in the root file system and a grub.cfg (Debian), GPT with a
//! separate /boot partition and no grub.cfg to go by (Ubuntu-like), MBR, and a bare
//! file system. The kernel is the real Debian cloud kernel of the `tiny` guest image
//! (LZ4-compressed bzImage), so the unpacked vmlinux is checked byte for byte against
//! the one the image recipe made with the lz4 tool. File systems are made by
//! `mkfs.ext4 -d` and partition tables by `sfdisk`, as a user's tools would.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::{run_with_input as run, s};
use imaged::bootkit;
use imaged::import::{ImportRequest, Importer};
use imaged::store::Store;

const MIB: u64 = 1 << 20;
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const ROOT_UUID: &str = "6a1e2c3d-4b5f-4a61-9c7d-8e9f0a1b2c3d";

fn tiny() -> PathBuf {
    let dir = std::env::var_os("HEARTH_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/images".into())
        .join("tiny");
    assert!(
        dir.join("vmlinuz").is_file(),
        "the tiny image is missing in {}: run guest-images/tiny/build.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A file tree for `mkfs.ext4 -d`: (path, bytes).
fn tree(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    for (p, bytes) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, bytes).expect("write");
    }
    dir.to_path_buf()
}

/// An ext4 file system of `mib` MiB holding `tree`.
fn ext4(path: &Path, mib: u64, tree: &Path, label: &str) -> PathBuf {
    run(
        "mkfs.ext4",
        &["-q", "-F", "-L", label, "-d", s(tree), s(path), &format!("{mib}M")],
        None,
    );
    path.to_path_buf()
}

/// A disk with the partition table `script` (sfdisk's input) and file systems copied
/// to the given partition starts (in MiB).
fn disk(path: &Path, mib: u64, script: &str, parts: &[(u64, &Path)]) -> PathBuf {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(mib * MIB).expect("len");
    drop(f);
    if !script.is_empty() {
        run(
            "sfdisk",
            &["-q", "--no-reread", "--no-tell-kernel", s(path)],
            Some(script),
        );
    }
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    for (start, fs) in parts {
        f.write_all_at(&std::fs::read(fs).expect("read fs"), start * MIB)
            .expect("write fs");
    }
    path.to_path_buf()
}

struct Kit {
    vmlinuz: Vec<u8>,
    vmlinux: Vec<u8>,
    initrd: Vec<u8>,
}

fn kit() -> Kit {
    let t = tiny();
    Kit {
        vmlinuz: std::fs::read(t.join("vmlinuz")).expect("vmlinuz"),
        vmlinux: std::fs::read(t.join("vmlinux")).expect("vmlinux"),
        initrd: std::fs::read(t.join("initrd.img")).expect("initrd"),
    }
}

/// The Debian cloud layout: GPT, BIOS boot (14), ESP (15), root (1) holding /boot
/// and a grub.cfg whose first entry names the kernel, and an older kernel beside it.
fn debian_like(dir: &Path, k: &Kit) -> PathBuf {
    let grub = format!(
        "set default=0\nmenuentry 'Debian GNU/Linux' --class debian {{\n\tinsmod ext2\n\
         \tlinux\t/boot/vmlinuz-6.1.0-56-cloud-amd64 root=PARTUUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0\n\
         \tinitrd\t/boot/initrd.img-6.1.0-56-cloud-amd64\n}}\n\
         menuentry 'Debian GNU/Linux, older' {{\n\tlinux /boot/vmlinuz-6.1.0-9-cloud-amd64 root=/dev/sda1\n}}\n"
    );
    let t = tree(
        &dir.join("deb-tree"),
        &[
            ("boot/vmlinuz-6.1.0-56-cloud-amd64", &k.vmlinuz),
            ("boot/initrd.img-6.1.0-56-cloud-amd64", &k.initrd),
            ("boot/vmlinuz-6.1.0-9-cloud-amd64", b"an older kernel"),
            ("boot/grub/grub.cfg", grub.as_bytes()),
            ("etc/fstab", format!("PARTUUID={ROOT_UUID} / ext4 rw 0 1\n").as_bytes()),
            ("etc/os-release", b"ID=debian\n"),
        ],
    );
    let fs = ext4(&dir.join("deb-root.ext4"), 64, &t, "root");
    let script = format!(
        "label: gpt\n\
         start=2048, size=6144, type=21686148-6449-6E6F-744E-656564454649\n\
         start=8192, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=24576, size=131072, type={ROOT_TYPE}, uuid={ROOT_UUID}\n"
    );
    // sfdisk numbers them 1, 2, 3: the root is partition 3 here.
    disk(&dir.join("debian.raw"), 80, &script, &[(12, &fs)])
}

#[test]
fn debian_layout_boots_by_its_grub_cfg() {
    let dir = tempfile::tempdir().expect("tmp");
    let k = kit();
    let d = debian_like(dir.path(), &k);
    let found = bootkit::find(&d).expect("find").expect("a kernel is found");
    assert!(found.kernel == k.vmlinuz, "the bzImage grub names");
    assert!(found.initramfs.as_deref() == Some(&k.initrd[..]), "its initrd");
    assert_eq!(
        found.cmdline,
        format!(
            "root=PARTUUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
        )
    );
    assert_eq!(found.source, "partition 3: /boot/vmlinuz-6.1.0-56-cloud-amd64");
    let vmlinux = found.vmlinux.expect("the LZ4 kernel unpacks");
    assert!(vmlinux == k.vmlinux, "the same vmlinux the recipe's lz4 made");
}

#[test]
fn separate_boot_partition_without_grub_takes_the_newest_kernel() {
    let dir = tempfile::tempdir().expect("tmp");
    let k = kit();
    let root = tree(
        &dir.path().join("root"),
        &[
            ("etc/fstab", b"LABEL=cloudimg-rootfs\t/\text4\tdiscard,errors=remount-ro\t0 1\nLABEL=BOOT\t/boot\text4\tdefaults\t0 2\n"),
            ("etc/os-release", b"ID=ubuntu\n"),
            ("boot/.keep", b""),
        ],
    );
    let boot = tree(
        &dir.path().join("boot"),
        &[
            ("vmlinuz-6.8.0-31-generic", &k.vmlinuz),
            ("initrd.img-6.8.0-31-generic", &k.initrd),
            ("vmlinuz-6.8.0-9-generic", b"older"),
            ("initrd.img-6.8.0-9-generic", b"older"),
        ],
    );
    let root_fs = ext4(&dir.path().join("root.ext4"), 16, &root, "cloudimg-rootfs");
    let boot_fs = ext4(&dir.path().join("boot.ext4"), 64, &boot, "BOOT");
    let script = format!(
        "label: gpt\n\
         start=2048, size=32768, type={ROOT_TYPE}\n\
         start=34816, size=131072, type=BC13C2FF-59E6-4262-A352-B275FD6F7172\n"
    );
    let d = disk(
        &dir.path().join("ubuntu.raw"),
        90,
        &script,
        &[(1, &root_fs), (17, &boot_fs)],
    );
    let found = bootkit::find(&d).expect("find").expect("a kernel is found");
    assert!(found.kernel == k.vmlinuz, "the newest kernel, not 6.8.0-9");
    assert!(found.initramfs.as_deref() == Some(&k.initrd[..]));
    assert_eq!(
        found.cmdline, "root=LABEL=cloudimg-rootfs ro console=ttyS0",
        "as fstab names the root"
    );
    assert_eq!(found.source, "partition 2: /vmlinuz-6.8.0-31-generic");
}

#[test]
fn mbr_and_bare_file_systems_name_the_root_the_kernel_can_find() {
    let dir = tempfile::tempdir().expect("tmp");
    let k = kit();
    // MBR, no initramfs, fstab by UUID: the kernel alone cannot resolve UUID=, so the
    // command line names the partition by PARTUUID (disk signature and number).
    let t = tree(
        &dir.path().join("mbr"),
        &[
            ("boot/vmlinuz-6.1.0-56-cloud-amd64", &k.vmlinuz),
            (
                "etc/fstab",
                b"UUID=0a0b0c0d-0000-4000-8000-000000000001 / ext4 defaults 0 1\n",
            ),
        ],
    );
    let fs = ext4(&dir.path().join("mbr.ext4"), 32, &t, "root");
    let d = disk(
        &dir.path().join("mbr.raw"),
        40,
        "label: dos\nlabel-id: 0x1234abcd\nstart=2048, size=65536, type=83\n",
        &[(1, &fs)],
    );
    let found = bootkit::find(&d).expect("find").expect("found");
    assert!(found.initramfs.is_none());
    assert_eq!(found.cmdline, "root=PARTUUID=1234abcd-01 ro console=ttyS0");
    assert!(found.vmlinux.is_ok());

    // A whole-disk file system (like hearth's own images): /dev/vda.
    let t = tree(
        &dir.path().join("bare"),
        &[("boot/vmlinuz-6.1", &k.vmlinuz), ("etc/os-release", b"ID=x\n")],
    );
    let d = ext4(&dir.path().join("bare.raw"), 32, &t, "root");
    let found = bootkit::find(&d).expect("find").expect("found");
    assert_eq!(found.cmdline, "root=/dev/vda ro console=ttyS0");
    assert_eq!(found.source, "the disk's file system: /boot/vmlinuz-6.1");

    // A superblock claiming 2^32 block groups (one block each): ext4-view would size
    // its tables from it; it is not opened, and nothing is found.
    let crafted = dir.path().join("crafted.raw");
    std::fs::copy(&d, &crafted).expect("copy");
    let f = std::fs::OpenOptions::new().write(true).open(&crafted).expect("open");
    f.write_all_at(&1u32.to_le_bytes(), 1024 + 0x20)
        .expect("blocks per group");
    f.write_all_at(&u32::MAX.to_le_bytes(), 1024 + 0x04).expect("blocks");
    assert!(bootkit::find(&crafted).expect("find").is_none());

    // No kernel anywhere, and no file system at all: nothing found, no error.
    let t = tree(&dir.path().join("none"), &[("etc/os-release", b"ID=x\n")]);
    let d = ext4(&dir.path().join("none.raw"), 8, &t, "root");
    assert!(bootkit::find(&d).expect("find").is_none());
    let d = disk(
        &dir.path().join("empty.raw"),
        8,
        "label: gpt\nstart=2048, type=L\n",
        &[],
    );
    assert!(bootkit::find(&d).expect("find").is_none());
    // A kernel file that is not a bzImage: given to QEMU as found (its loader judges
    // it), with the reason Cloud Hypervisor gets none.
    let t = tree(
        &dir.path().join("junk"),
        &[("boot/vmlinuz-1", b"junk"), ("etc/fstab", b"/dev/vda / ext4 rw 0 1\n")],
    );
    let d = ext4(&dir.path().join("junk.raw"), 8, &t, "root");
    let found = bootkit::find(&d).expect("find").expect("found");
    assert!(found.vmlinux.expect_err("not a bzImage").contains("not a bzImage"));
}

#[tokio::test]
async fn an_image_imported_without_a_kernel_gets_its_own() {
    let dir = tempfile::tempdir().expect("tmp");
    let k = kit();
    let d = debian_like(dir.path(), &k);
    let importer = Arc::new(Importer::new(Arc::new(
        Store::open(dir.path().join("store")).expect("store"),
    )));
    let boot = importer
        .import_and_wait(ImportRequest {
            name: "cloudlike".into(),
            path: Some(d),
            ..Default::default()
        })
        .await
        .expect("import")
        .boot;
    let read = |p: Option<PathBuf>| std::fs::read(p.expect("a boot file")).expect("read");
    assert!(read(boot.kernel_bzimage) == k.vmlinuz, "bzImage for QEMU");
    assert!(read(boot.kernel_elf) == k.vmlinux, "vmlinux for Cloud Hypervisor");
    assert!(read(boot.initramfs) == k.initrd, "initramfs");
    assert!(
        boot.cmdline.starts_with(&format!("root=PARTUUID={ROOT_UUID} ro ")),
        "{}",
        boot.cmdline
    );
}
