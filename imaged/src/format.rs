//! Disk image formats: what a file is (by its bytes, never by its name), and turning
//! qcow2 into the raw images the storage backends clone.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::ImageError;

/// Formats imaged accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Raw,
    Qcow2,
}

impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for SourceFormat {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s {
            "raw" => Ok(SourceFormat::Raw),
            "qcow2" => Ok(SourceFormat::Qcow2),
            other => Err(ImageError::Unsupported(format!(
                "format {other:?} is not supported: use raw or qcow2"
            ))),
        }
    }
}

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.len() >= off + magic.len() && &buf[off..off + magic.len()] == magic
}

/// Says what a file holds, from its first 64 KiB and its last sector. Raw files must
/// look like a disk (a partition table or a file system a guest can mount), so a text
/// file or an archive is refused instead of booted.
pub fn detect(path: &Path) -> Result<SourceFormat, ImageError> {
    let f = File::open(path).map_err(|e| ImageError::Io(path.to_path_buf(), e))?;
    let len = f.metadata().map_err(|e| ImageError::Io(path.to_path_buf(), e))?.len();
    let mut head = vec![0u8; 68 * 1024];
    let n = read_full_at(&f, &mut head, 0).map_err(|e| ImageError::Io(path.to_path_buf(), e))?;
    head.truncate(n);
    let mut tail = [0u8; 512];
    if len >= 512 {
        read_full_at(&f, &mut tail, len - 512).map_err(|e| ImageError::Io(path.to_path_buf(), e))?;
    }
    classify(&head, &tail, len)
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// The decision behind [`detect`], on bytes.
pub fn classify(head: &[u8], tail: &[u8], len: u64) -> Result<SourceFormat, ImageError> {
    let unsupported = |what: &str| {
        Err(ImageError::Unsupported(format!(
            "this is a {what} image; imaged imports raw and qcow2 (convert it with qemu-img convert -O qcow2)"
        )))
    };
    if at(head, 0, b"QFI\xfb") {
        return Ok(SourceFormat::Qcow2);
    }
    if at(head, 0, b"KDMV") || at(head, 0, b"# Disk DescriptorFile") {
        return unsupported("VMDK");
    }
    if at(head, 0, b"vhdxfile") {
        return unsupported("VHDX");
    }
    if at(head, 0, b"conectix") || at(tail, 0, b"conectix") {
        return unsupported("VHD (vpc)");
    }
    if at(head, 0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        return unsupported("VDI");
    }
    let compressed = [
        (&b"\x1f\x8b"[..], "gzip"),
        (&b"\xfd7zXZ\x00"[..], "xz"),
        (&b"\x28\xb5\x2f\xfd"[..], "zstd"),
        (&b"BZh"[..], "bzip2"),
    ];
    for (magic, what) in compressed {
        if at(head, 0, magic) {
            return Err(ImageError::NotADisk(format!(
                "the file is {what}-compressed; decompress it first"
            )));
        }
    }
    let disk_like = at(head, 510, &[0x55, 0xaa]) // MBR or protective MBR (GPT)
        || at(head, 512, b"EFI PART")
        || at(head, 1080, &[0x53, 0xef]) // ext2/3/4 superblock
        || at(head, 0, b"XFSB")
        || at(head, 0x10040, b"_BHRfS_M") // btrfs
        || at(head, 32769, b"CD001") // ISO 9660
        || at(head, 0, b"hsqs") // squashfs
        || at(head, 0, b"LUKS\xba\xbe")
        || at(head, 4086, b"SWAPSPACE2");
    if !disk_like {
        return Err(ImageError::NotADisk(
            "the file has no partition table or file system a guest could boot; \
             if it really is a raw disk, import it with format \"raw\""
                .into(),
        ));
    }
    if len % 512 != 0 {
        return Err(ImageError::NotADisk(format!(
            "a raw disk is a whole number of 512-byte sectors; this file has {len} bytes"
        )));
    }
    Ok(SourceFormat::Raw)
}

/// What `qemu-img info` says about a qcow2 file.
#[derive(Debug, Deserialize)]
struct QemuImgInfo {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    format: String,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "encrypted", default)]
    encrypted: bool,
}

/// Checks a qcow2 file before conversion and returns its virtual size. A backing file
/// is refused: it would make qemu-img read any path on this host the image names.
pub async fn qcow2_info(path: &Path) -> Result<u64, ImageError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ImageError::Tool(format!("cannot run qemu-img ({e}); install Debian's qemu-utils")))?;
    if !out.status.success() {
        return Err(ImageError::NotADisk(format!(
            "qemu-img cannot read the qcow2 image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: QemuImgInfo = serde_json::from_slice(&out.stdout)
        .map_err(|e| ImageError::Tool(format!("qemu-img info gave unexpected output: {e}")))?;
    if info.format != "qcow2" {
        return Err(ImageError::NotADisk(format!(
            "qemu-img reads it as {}, not qcow2",
            info.format
        )));
    }
    if let Some(b) = info.backing_filename {
        return Err(ImageError::Unsupported(format!(
            "the qcow2 image has a backing file ({b}); import a standalone image (qemu-img convert -O qcow2)"
        )));
    }
    if info.encrypted {
        return Err(ImageError::Unsupported(
            "encrypted qcow2 images are not supported".into(),
        ));
    }
    Ok(info.virtual_size)
}

/// Converts a qcow2 image to a sparse raw file, reporting progress (0.0–1.0).
pub async fn qcow2_to_raw(src: &Path, dst: &Path, progress: impl Fn(f64)) -> Result<(), ImageError> {
    let mut child = tokio::process::Command::new("qemu-img")
        .args(["convert", "-p", "-W", "-m", "8", "-f", "qcow2", "-O", "raw"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ImageError::Tool(format!("cannot run qemu-img ({e}); install Debian's qemu-utils")))?;
    // `-p` prints "    (12.34/100%)\r" as it goes.
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0u8; 512];
        let mut line = Vec::new();
        while let Ok(n) = out.read(&mut buf).await {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let Some(p) = parse_progress(&line) {
                        progress(p);
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| ImageError::Tool(format!("qemu-img convert: {e}")))?;
    if !out.status.success() {
        return Err(ImageError::NotADisk(format!(
            "qemu-img could not convert the qcow2 image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn parse_progress(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.split('/').next()?;
    inner.parse::<f64>().ok().map(|p| (p / 100.0).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector_with(off: usize, magic: &[u8], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[off..off + magic.len()].copy_from_slice(magic);
        v
    }

    #[test]
    fn formats_are_told_by_their_bytes() {
        let q = sector_with(0, b"QFI\xfb", 4096);
        assert_eq!(classify(&q, &[], 4096).ok(), Some(SourceFormat::Qcow2));
        let mbr = sector_with(510, &[0x55, 0xaa], 4096);
        assert_eq!(classify(&mbr, &[], 1 << 20).ok(), Some(SourceFormat::Raw));
        let ext4 = sector_with(1080, &[0x53, 0xef], 4096);
        assert_eq!(classify(&ext4, &[], 1 << 20).ok(), Some(SourceFormat::Raw));
        assert!(matches!(
            classify(&sector_with(0, b"KDMV", 4096), &[], 4096),
            Err(ImageError::Unsupported(_))
        ));
        assert!(matches!(
            classify(&sector_with(0, b"vhdxfile", 4096), &[], 4096),
            Err(ImageError::Unsupported(_))
        ));
        assert!(matches!(
            classify(&[0u8; 4096], &sector_with(0, b"conectix", 512), 4096),
            Err(ImageError::Unsupported(_))
        ));
        assert!(matches!(
            classify(b"hello, this is a text file\n", &[], 27),
            Err(ImageError::NotADisk(_))
        ));
        assert!(matches!(
            classify(&sector_with(0, b"\x1f\x8b", 4096), &[], 4096),
            Err(ImageError::NotADisk(_))
        ));
        // A file system, but not whole sectors.
        assert!(matches!(classify(&ext4, &[], 4097), Err(ImageError::NotADisk(_))));
    }

    #[test]
    fn qemu_img_progress_lines_parse() {
        assert_eq!(parse_progress(b"    (50.00/100%)"), Some(0.5));
        assert_eq!(parse_progress(b"    (100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress(b"garbage"), None);
    }
}
