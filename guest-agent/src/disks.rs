//! The VM's disks: the root (`root=` on the kernel command line), the NoCloud seed (a
//! FAT file system labelled CIDATA, read in place with the `fatfs` library) and the
//! data volume (every other disk; the first one), formatted when blank and mounted.

use std::io::Read;

use crate::{run, DATA_MOUNT};

pub struct SeedFiles {
    pub device: String,
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// The virtio disks, by name (`/dev/vda`, …).
fn disks() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vd"))
        .map(|n| format!("/dev/{n}"))
        .collect();
    v.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
    v
}

fn root_device() -> String {
    std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|c| {
            c.split_whitespace()
                .find_map(|a| a.strip_prefix("root=").map(str::to_string))
        })
        .unwrap_or_else(|| "/dev/vda".into())
}

fn read_fat(device: &str) -> Option<SeedFiles> {
    let f = std::fs::File::open(device).ok()?;
    let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).ok()?;
    if !fs.volume_label().trim().eq_ignore_ascii_case("cidata") {
        return None;
    }
    let read = |name: &str| -> Option<String> {
        let mut s = String::new();
        fs.root_dir().open_file(name).ok()?.read_to_string(&mut s).ok()?;
        Some(s)
    };
    Some(SeedFiles {
        device: device.to_string(),
        meta_data: read("meta-data").unwrap_or_default(),
        user_data: read("user-data")?,
        network_config: read("network-config").unwrap_or_default(),
    })
}

/// The seed, from the first disk that carries one.
pub fn read_seed() -> Result<SeedFiles, String> {
    let root = root_device();
    disks()
        .into_iter()
        .filter(|d| *d != root)
        .find_map(|d| read_fat(&d))
        .ok_or_else(|| "no NoCloud seed (a FAT disk labelled CIDATA) found".to_string())
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

/// The data volume's device: the first disk that is neither the root nor the seed.
pub fn data_device(seed_device: &str) -> Result<String, String> {
    let root = root_device();
    disks()
        .into_iter()
        .find(|d| *d != root && d != seed_device)
        .ok_or_else(|| "no data volume attached (a database keeps its data only on one)".to_string())
}

/// What the disk holds: ext4 (its superblock magic), nothing (all zeros at the
/// start), or something else, which is never formatted over.
fn blank_or_ext4(device: &str) -> Result<bool, String> {
    let mut f = std::fs::File::open(device).map_err(|e| format!("{device}: {e}"))?;
    let mut head = vec![0u8; 64 * 1024];
    f.read_exact(&mut head).map_err(|e| format!("{device}: {e}"))?;
    if head[0x438] == 0x53 && head[0x439] == 0xEF {
        return Ok(true);
    }
    if head.iter().all(|&b| b == 0) {
        return Ok(false);
    }
    Err(format!(
        "{device} holds something that is not an ext4 file system; it is not formatted over"
    ))
}

/// Formats the data volume if it is blank, and mounts it at [`DATA_MOUNT`].
pub fn mount_data(seed_device: &str) -> Result<(), String> {
    if mounted(DATA_MOUNT) {
        return Ok(());
    }
    let dev = data_device(seed_device)?;
    if !blank_or_ext4(&dev)? {
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-L",
                guest_agent::DATA_LABEL,
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                &dev,
            ],
        )?;
    }
    std::fs::create_dir_all(DATA_MOUNT).map_err(|e| e.to_string())?;
    run("mount", &["-t", "ext4", "-o", "noatime", &dev, DATA_MOUNT])?;
    run("chown", &["postgres:postgres", DATA_MOUNT])?;
    Ok(())
}

/// Grows the data file system to its disk (online).
pub fn grow(seed_device: &str) -> Result<serde_json::Value, String> {
    let dev = data_device(seed_device)?;
    run("resize2fs", &[&dev])?;
    df()
}

/// The data file system's size and use, in bytes.
pub fn df() -> Result<serde_json::Value, String> {
    let path = std::ffi::CString::new(DATA_MOUNT).map_err(|e| e.to_string())?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a valid out-pointer for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(format!("statvfs {DATA_MOUNT}: {}", std::io::Error::last_os_error()));
    }
    let size = st.f_blocks * st.f_frsize;
    let free = st.f_bavail * st.f_frsize;
    Ok(serde_json::json!({"size_bytes": size, "used_bytes": size - st.f_bfree * st.f_frsize, "available_bytes": free}))
}
