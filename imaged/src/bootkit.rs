//! The boot kit inside a disk image. Cloud images (Debian's, Ubuntu's) boot through
//! their bootloader; hearth boots kernels directly, so an image imported without a
//! kernel gets the one installed in it: the partition table (GPT or MBR, or none) is
//! read, each ext2/3/4 file system is opened read-only (`ext4-view`, no mount), and the
//! kernel, initramfs and command line are taken from the first `linux` entry of
//! grub.cfg, or else from the newest `vmlinuz-*` with the root file system named the
//! way /etc/fstab names it. Cloud Hypervisor boots an uncompressed ELF with a PVH
//! entry: it is unpacked from the bzImage (gzip, LZ4, zstd).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Read};

use crate::ImageError;

const SECTOR: u64 = 512;
const MAX_KERNEL: u64 = 256 << 20;
const MAX_INITRAMFS: u64 = 512 << 20;
const MAX_VMLINUX: usize = 512 << 20;

/// What was found in a disk.
#[derive(Debug)]
pub struct Found {
    /// The kernel as installed (a bzImage), for QEMU.
    pub kernel: Vec<u8>,
    /// The uncompressed kernel with a PVH entry, for Cloud Hypervisor; why not, if not.
    pub vmlinux: Result<Vec<u8>, String>,
    pub initramfs: Option<Vec<u8>>,
    pub cmdline: String,
    /// Where the kernel was found, for the log: "partition 1: /boot/vmlinuz-6.1.0-18".
    pub source: String,
}

/// A partition, or the whole disk when it has no partition table (number 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// The name Linux gives it in `root=PARTUUID=`.
    pub partuuid: Option<String>,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A GUID as text: the first three fields are stored little-endian.
fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10..16].iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// The disk's partitions; the whole disk when there is no table.
pub fn partitions(f: &File, disk_len: u64) -> std::io::Result<Vec<Partition>> {
    let mut head = [0u8; 1024];
    let n = (disk_len as usize).min(head.len());
    f.read_exact_at(&mut head[..n], 0)?;
    let fits = |start: u64, len: u64| len > 0 && start.checked_add(len).is_some_and(|end| end <= disk_len);
    let mut found = Vec::new();
    if n >= 1024 && &head[512..520] == b"EFI PART" {
        let entries_lba = le64(&head, 512 + 72);
        let count = le32(&head, 512 + 80).min(1024) as u64;
        let size = le32(&head, 512 + 84) as u64;
        if (128..=4096).contains(&size) && entries_lba.checked_mul(SECTOR).is_some_and(|o| fits(o, count * size)) {
            let mut table = vec![0u8; (count * size) as usize];
            f.read_exact_at(&mut table, entries_lba * SECTOR)?;
            for (i, e) in table.chunks_exact(size as usize).enumerate() {
                if e[..16].iter().all(|&b| b == 0) {
                    continue;
                }
                let (first, last) = (le64(e, 32), le64(e, 40));
                let len = last
                    .checked_sub(first)
                    .and_then(|d| d.checked_add(1))
                    .and_then(|n| n.checked_mul(SECTOR));
                let place = first.checked_mul(SECTOR).zip(len).filter(|&(s, l)| fits(s, l));
                if let Some((start, len)) = place {
                    found.push(Partition {
                        number: i as u32 + 1,
                        start,
                        len,
                        partuuid: Some(guid(&e[16..32])),
                    });
                }
            }
            return Ok(found);
        }
    }
    if n >= 512 && head[510..512] == [0x55, 0xaa] {
        let signature = le32(&head, 0x1b8);
        for i in 0..4 {
            let e = &head[0x1be + 16 * i..0x1be + 16 * (i + 1)];
            // Empty, GPT's protective entry, and extended partitions are not file systems.
            if matches!(e[4], 0x00 | 0xee | 0x05 | 0x0f | 0x85) {
                continue;
            }
            let (start, len) = (le32(e, 8) as u64 * SECTOR, le32(e, 12) as u64 * SECTOR);
            if fits(start, len) {
                found.push(Partition {
                    number: i as u32 + 1,
                    start,
                    len,
                    partuuid: Some(format!("{signature:08x}-{:02x}", i + 1)),
                });
            }
        }
    }
    if found.is_empty() {
        found.push(Partition {
            number: 0,
            start: 0,
            len: disk_len,
            partuuid: None,
        });
    }
    Ok(found)
}

/// Reads one partition of the disk for ext4-view.
struct PartReader {
    f: Arc<File>,
    part: Partition,
}

impl Ext4Read for PartReader {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start
            .checked_add(dst.len() as u64)
            .is_none_or(|end| end > self.part.len)
        {
            return Err("read past the end of the partition".into());
        }
        self.f.read_exact_at(dst, self.part.start + start)?;
        Ok(())
    }
}

/// An ext file system on the disk.
struct Fs {
    part: Partition,
    ext4: Ext4,
}

impl Fs {
    fn file(&self, path: &str, max: u64) -> Option<Vec<u8>> {
        let md = self.ext4.metadata(path).ok()?;
        if md.is_dir() || md.len() > max || md.len() == 0 {
            return None;
        }
        self.ext4.read(path).ok()
    }

    fn text(&self, path: &str) -> Option<String> {
        self.file(path, 4 << 20)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn exists(&self, path: &str) -> bool {
        self.ext4.exists(path).unwrap_or(false)
    }

    fn names(&self, dir: &str) -> Vec<String> {
        let Ok(entries) = self.ext4.read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
            .collect()
    }

    fn where_(&self, path: &str) -> String {
        match self.part.number {
            0 => format!("the disk's file system: {path}"),
            n => format!("partition {n}: {path}"),
        }
    }
}

/// Whether the ext2/3/4 superblock at the partition's start describes a file system
/// that fits the partition, with a sane number of block groups. ext4-view sizes its
/// tables from these fields, so a crafted superblock must not reach it.
fn plausible_ext(f: &File, part: &Partition) -> bool {
    let mut sb = [0u8; 1024];
    if part.len < 2048 || f.read_exact_at(&mut sb, part.start + 1024).is_err() || sb[0x38..0x3a] != [0x53, 0xef] {
        return false;
    }
    let log_block = le32(&sb, 0x18);
    let per_group = le32(&sb, 0x20) as u64;
    let is_64bit = le32(&sb, 0x60) & 0x80 != 0;
    let blocks = le32(&sb, 0x04) as u64 | if is_64bit { (le32(&sb, 0x150) as u64) << 32 } else { 0 };
    if log_block > 6 || per_group < 1024 || blocks == 0 {
        return false;
    }
    let fits = blocks
        .checked_mul(1024 << log_block)
        .is_some_and(|bytes| bytes <= part.len);
    fits && blocks.div_ceil(per_group) <= 1 << 22
}

fn filesystems(f: &Arc<File>, parts: Vec<Partition>) -> Vec<Fs> {
    let mut out = Vec::new();
    for part in parts {
        if !plausible_ext(f, &part) {
            continue;
        }
        let reader = PartReader {
            f: f.clone(),
            part: part.clone(),
        };
        match Ext4::load(Box::new(reader)) {
            Ok(ext4) => out.push(Fs { part, ext4 }),
            Err(e) => tracing::info!(partition = part.number, "cannot read the ext file system: {e}"),
        }
    }
    out
}

/// The first boot entry of a grub.cfg: kernel path, initrd paths, arguments.
pub fn grub_entry(cfg: &str) -> Option<(String, Vec<String>, Vec<String>)> {
    let mut lines = cfg.lines().map(str::trim);
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    // grub names files "(hd0,gpt1)/boot/x" or "($root)/boot/x": the path is what follows.
    let path = |w: &str| match w.strip_prefix('(').and_then(|r| r.split_once(')')) {
        Some((_, rest)) => rest.to_string(),
        None => w.to_string(),
    };
    let linux = lines
        .by_ref()
        .map(words)
        .find(|w| matches!(w.first().map(String::as_str), Some("linux" | "linuxefi" | "linux16")) && w.len() >= 2)?;
    let args = linux[2..]
        .iter()
        .filter(|a| !a.contains('$') && !a.starts_with("BOOT_IMAGE="))
        .cloned()
        .collect();
    let mut initrds = Vec::new();
    for w in lines.map(words) {
        match w.first().map(String::as_str) {
            Some("initrd" | "initrdefi" | "initrd16") => {
                initrds = w[1..].iter().map(|p| path(p)).collect();
                break;
            }
            Some("}" | "menuentry" | "linux" | "linuxefi") => break,
            _ => {}
        }
    }
    Some((path(&linux[1]), initrds, args))
}

/// Compares kernel versions the way a person would: digit runs as numbers.
fn version_key(s: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (num, tail) = rest.split_at(digits);
        let text_len = tail.len() - tail.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
        let (text, tail) = tail.split_at(text_len);
        key.push((num.parse().unwrap_or(0), text.to_string()));
        rest = tail;
    }
    key
}

/// Looks for a kernel in `disk` (a raw image). `Ok(None)`: there is none to be found.
pub fn find(disk: &Path) -> Result<Option<Found>, ImageError> {
    let io = |e| ImageError::Io(disk.to_path_buf(), e);
    let f = Arc::new(File::open(disk).map_err(io)?);
    let len = f.metadata().map_err(io)?.len();
    let fss = filesystems(&f, partitions(&f, len).map_err(io)?);
    let root = fss
        .iter()
        .find(|fs| fs.exists("/etc/fstab") || fs.exists("/etc/os-release"))
        .or(fss.first());
    let Some(root) = root else {
        return Ok(None);
    };

    // grub.cfg's first entry, its paths on the file system that holds it (or another).
    for fs in &fss {
        for cfg in ["/boot/grub/grub.cfg", "/grub/grub.cfg"] {
            let Some((kernel_path, initrds, args)) = fs.text(cfg).as_deref().and_then(grub_entry) else {
                continue;
            };
            let holder = std::iter::once(fs).chain(fss.iter()).find(|f| f.exists(&kernel_path));
            let Some(holder) = holder else {
                tracing::info!("{} names {kernel_path}, which is on no file system", fs.where_(cfg));
                continue;
            };
            let Some(kernel) = holder.file(&kernel_path, MAX_KERNEL) else {
                continue;
            };
            let mut initramfs = Vec::new();
            for p in &initrds {
                let room = MAX_INITRAMFS.saturating_sub(initramfs.len() as u64);
                initramfs.extend(holder.file(p, room).unwrap_or_default());
            }
            let cmdline = with_console(args.join(" "));
            return Ok(Some(found(
                kernel,
                (!initramfs.is_empty()).then_some(initramfs),
                cmdline,
                holder.where_(&kernel_path),
            )));
        }
    }

    // No grub.cfg: the newest kernel in / or /boot of any file system.
    struct Candidate<'a> {
        key: Vec<(u64, String)>,
        fs: &'a Fs,
        dir: &'static str,
        version: String,
    }
    let mut best: Option<Candidate> = None;
    for fs in &fss {
        for dir in ["/boot", ""] {
            for name in fs.names(if dir.is_empty() { "/" } else { dir }) {
                let Some(version) = name.strip_prefix("vmlinuz-") else {
                    continue;
                };
                let key = version_key(version);
                if best.as_ref().is_none_or(|b| key > b.key) {
                    best = Some(Candidate {
                        key,
                        fs,
                        dir,
                        version: version.to_string(),
                    });
                }
            }
        }
    }
    let Some(Candidate { fs, dir, version, .. }) = best else {
        return Ok(None);
    };
    let kernel_path = format!("{dir}/vmlinuz-{version}");
    let Some(kernel) = fs.file(&kernel_path, MAX_KERNEL) else {
        return Ok(None);
    };
    let initramfs = [
        format!("{dir}/initrd.img-{version}"),
        format!("{dir}/initramfs-{version}.img"),
        format!("{dir}/initrd-{version}"),
    ]
    .iter()
    .find_map(|p| fs.file(p, MAX_INITRAMFS));
    let spec = root_spec(root, initramfs.is_some());
    let cmdline = with_console(format!("root={spec} ro"));
    Ok(Some(found(kernel, initramfs, cmdline, fs.where_(&kernel_path))))
}

fn found(kernel: Vec<u8>, initramfs: Option<Vec<u8>>, cmdline: String, source: String) -> Found {
    let vmlinux = vmlinux_from_bzimage(&kernel);
    Found {
        kernel,
        vmlinux,
        initramfs,
        cmdline,
        source,
    }
}

/// hearth's console is the first serial port.
fn with_console(cmdline: String) -> String {
    if cmdline.split_whitespace().any(|a| a.starts_with("console=ttyS0")) {
        cmdline
    } else {
        format!("{cmdline} console=ttyS0").trim().to_string()
    }
}

/// How to name the root file system on the command line: as /etc/fstab does when an
/// initramfs will resolve it, else by PARTUUID, which the kernel resolves alone.
fn root_spec(root: &Fs, initramfs: bool) -> String {
    let from_fstab = root.text("/etc/fstab").and_then(|t| {
        t.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.len() >= 2 && !w[0].starts_with('#') && w[1] == "/")
            .map(|w| w[0].to_string())
    });
    match (from_fstab, &root.part.partuuid) {
        (Some(spec), _) if initramfs || spec.starts_with("PARTUUID=") || spec.starts_with("/dev/") => spec,
        (_, Some(uuid)) => format!("PARTUUID={uuid}"),
        _ => "/dev/vda".to_string(),
    }
}

/// The uncompressed kernel inside a bzImage, checked to be an ELF with a PVH entry.
pub fn vmlinux_from_bzimage(bz: &[u8]) -> Result<Vec<u8>, String> {
    if bz.len() < 0x260 || &bz[0x202..0x206] != b"HdrS" || le16(bz, 0x206) < 0x208 {
        return Err("the kernel is not a bzImage (boot protocol 2.08 or later)".into());
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + le32(bz, 0x248) as usize;
    let len = le32(bz, 0x24c) as usize;
    let payload = start
        .checked_add(len)
        .filter(|&end| len > 4 && end <= bz.len())
        .map(|end| &bz[start..end])
        .ok_or("the bzImage's payload lies outside it")?;
    // The kernel build appends the uncompressed size.
    let (body, size) = payload.split_at(len - 4);
    let size = le32(size, 0) as usize;
    // No kernel compresses better than 64:1; a bigger claim is a lie to make us allocate.
    if size == 0 || size > MAX_VMLINUX || size / 64 > payload.len() {
        return Err(format!("the bzImage says its kernel is {size} bytes"));
    }
    let mut out = Vec::with_capacity(size);
    let what = match body {
        [0x1f, 0x8b, ..] => {
            flate2::read::GzDecoder::new(payload)
                .take(size as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip: {e}"))?;
            "gzip"
        }
        [0x02, 0x21, 0x4c, 0x18, ..] => {
            // LZ4's legacy format: blocks of up to 8 MiB, each after its u32 length.
            out.resize(size, 0);
            let (mut i, mut o) = (4, 0);
            while i + 4 <= body.len() {
                let n = le32(body, i) as usize;
                i += 4;
                if n == 0x184c_2102 {
                    continue;
                }
                let block = body.get(i..i + n).ok_or("lz4: a block runs past the payload")?;
                o += lz4_flex::block::decompress_into(block, &mut out[o..]).map_err(|e| format!("lz4: {e}"))?;
                i += n;
            }
            out.truncate(o);
            "lz4"
        }
        [0x04, 0x22, 0x4d, 0x18, ..] => {
            lz4_flex::frame::FrameDecoder::new(body)
                .take(size as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("lz4: {e}"))?;
            "lz4"
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            let mut input = body;
            ruzstd::decoding::StreamingDecoder::new(&mut input)
                .map_err(|e| format!("zstd: {e}"))?
                .take(size as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("zstd: {e}"))?;
            "zstd"
        }
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            return Err("the kernel is xz-compressed, which hearth cannot unpack yet".into())
        }
        _ => return Err("the kernel is compressed in a way hearth does not know".into()),
    };
    if out.len() != size {
        return Err(format!("{what}: {} bytes came out, the bzImage says {size}", out.len()));
    }
    if !has_pvh_note(&out) {
        return Err("the kernel has no PVH entry (CONFIG_PVH), which Cloud Hypervisor needs".into());
    }
    Ok(out)
}

/// Whether an ELF64 file has the Xen note XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let (phoff, phentsize, phnum) = (
        le64(elf, 0x20) as usize,
        le16(elf, 0x36) as usize,
        le16(elf, 0x38) as usize,
    );
    for i in 0..phnum {
        let Some(ph) = phoff
            .checked_add(i * phentsize)
            .and_then(|o| elf.get(o..o.checked_add(56)?))
        else {
            return false;
        };
        if le32(ph, 0) != 4 {
            continue; // not PT_NOTE
        }
        let (off, size) = (le64(ph, 8) as usize, le64(ph, 32) as usize);
        let Some(mut notes) = off.checked_add(size).and_then(|end| elf.get(off..end)) else {
            continue;
        };
        while notes.len() >= 12 {
            let (namesz, descsz, kind) = (le32(notes, 0) as usize, le32(notes, 4) as usize, le32(notes, 8));
            let name_end = 12 + namesz.next_multiple_of(4);
            let Some(next) = name_end.checked_add(descsz.next_multiple_of(4)) else {
                break;
            };
            if notes.get(12..12 + namesz) == Some(b"Xen\0") && kind == 18 {
                return true;
            }
            notes = notes.get(next..).unwrap_or(&[]);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_entries_are_read_like_grub_reads_them() {
        let debian = "set default=0\nmenuentry 'Debian GNU/Linux' --class debian {\n\tload_video\n\
                      \tsearch --no-floppy --fs-uuid --set=root 1234\n\
                      \tlinux\t/boot/vmlinuz-6.1.0-18-cloud-amd64 root=PARTUUID=ab-cd ro  console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0\n\
                      \tinitrd\t/boot/initrd.img-6.1.0-18-cloud-amd64\n}\n\
                      menuentry 'old' {\n\tlinux /boot/vmlinuz-5 root=/dev/sda1\n}\n";
        let (k, i, a) = grub_entry(debian).expect("entry");
        assert_eq!(k, "/boot/vmlinuz-6.1.0-18-cloud-amd64");
        assert_eq!(i, vec!["/boot/initrd.img-6.1.0-18-cloud-amd64".to_string()]);
        assert_eq!(
            a.join(" "),
            "root=PARTUUID=ab-cd ro console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
        );
        let ubuntu = "menuentry 'Ubuntu' {\n linux ($root)/vmlinuz-6.8.0-31-generic root=LABEL=cloudimg-rootfs ro console=tty1 $vt_handoff\n \
                      initrd /microcode.cpio /initrd.img-6.8.0-31-generic\n}\n";
        let (k, i, a) = grub_entry(ubuntu).expect("entry");
        assert_eq!(k, "/vmlinuz-6.8.0-31-generic");
        assert_eq!(i, vec!["/microcode.cpio", "/initrd.img-6.8.0-31-generic"]);
        assert_eq!(
            with_console(a.join(" ")),
            "root=LABEL=cloudimg-rootfs ro console=tty1 console=ttyS0"
        );
        assert!(grub_entry("set timeout=5\n").is_none());
    }

    #[test]
    fn newer_kernel_versions_sort_higher() {
        assert!(version_key("6.1.0-18-cloud-amd64") > version_key("6.1.0-9-cloud-amd64"));
        assert!(version_key("6.10.1") > version_key("6.9.12"));
        assert!(version_key("5.15.0-100-generic") > version_key("5.15.0-99-generic"));
    }

    #[test]
    fn gpt_guids_read_mixed_endian() {
        let b = [
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
        ];
        assert_eq!(guid(&b), "0fc63daf-8483-4772-8e79-3d69d8477de4");
    }

    #[test]
    fn a_bzimage_that_lies_is_refused() {
        assert!(vmlinux_from_bzimage(b"not a kernel").is_err());
        let mut bz = vec![0u8; 4096];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x1f1] = 1;
        bz[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(vmlinux_from_bzimage(&bz)
            .expect_err("payload outside")
            .contains("outside"));
        bz[0x24c..0x250].copy_from_slice(&64u32.to_le_bytes());
        bz[1124..1128].copy_from_slice(&[0x02, 0x21, 0x4c, 0x18]);
        bz[1128..1132].copy_from_slice(&1000u32.to_le_bytes());
        bz[1184..1188].copy_from_slice(&4096u32.to_le_bytes());
        assert!(vmlinux_from_bzimage(&bz).is_err());
        assert!(!has_pvh_note(b"\x7fELF\x02\x01 but truncated"));
    }
}
