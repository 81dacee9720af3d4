//! Volumes as sparse files in a pool directory.
//!
//! ```text
//! <pool>/volumes/<name>.raw | <name>.qcow2     the volumes
//! <pool>/snapshots/<volume>@<snapshot>.<ext>    read-only snapshots
//! <pool>/meta/<name>.json                       {"origin": "volume@snapshot"} of clones
//! ```
//! Snapshots and clones share blocks with their source wherever the file system can:
//! on XFS (reflink=1), btrfs and other file systems with `FICLONE`, a snapshot or clone
//! of any size takes milliseconds and stays raw. Elsewhere (ext4), a snapshot is a
//! sparse copy (only the allocated extents are copied) and a clone is a qcow2 overlay
//! whose backing file is the snapshot, made with `qemu-img`; hypervisors open such a
//! volume as qcow2, and it cannot be served over NBD or vhost-user by blockd (that path
//! needs raw bytes).
//!
//! Every new file is written under a temporary name and renamed into place, so a failed
//! operation leaves nothing behind.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::device::{BlockDevice, FileDevice};
use crate::volume::{PoolUsage, Result, Snapshot, Volume, VolumeBackend, VolumeError, VolumeFormat};

/// `FICLONE` ioctl: make the destination share all of the source's extents.
const FICLONE: libc::c_ulong = 0x4004_9409;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    origin: Option<String>,
}

/// A pool of file volumes in one directory.
#[derive(Debug)]
pub struct FilePool {
    root: PathBuf,
    reflink: bool,
    /// Serializes operations that change the pool, so checks and changes do not interleave.
    changes: Mutex<()>,
}

impl FilePool {
    /// Opens (creating its directories) the pool at `root` and finds out whether its file
    /// system can share extents between files.
    pub fn open(root: &Path) -> Result<FilePool> {
        for d in ["volumes", "snapshots", "meta"] {
            fs::create_dir_all(root.join(d))
                .map_err(VolumeError::io(format!("creating {}", root.join(d).display())))?;
        }
        let reflink = probe_reflink(root);
        tracing::info!(pool = %root.display(), reflink, "file pool opened");
        let pool = FilePool {
            root: root.to_path_buf(),
            reflink,
            changes: Mutex::new(()),
        };
        pool.remove_leftovers();
        Ok(pool)
    }

    /// True when snapshots and clones share extents (FICLONE works here).
    pub fn reflink(&self) -> bool {
        self.reflink
    }

    /// Temporary files of operations interrupted by a crash.
    fn remove_leftovers(&self) {
        for d in ["volumes", "snapshots", "meta"] {
            for e in fs::read_dir(self.root.join(d)).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `<dir>/<stem>.raw` or `<dir>/<stem>.qcow2`, whichever exists.
    fn find_file(&self, dir: &str, stem: &str) -> Option<(PathBuf, VolumeFormat)> {
        [("raw", VolumeFormat::Raw), ("qcow2", VolumeFormat::Qcow2)]
            .into_iter()
            .map(|(ext, format)| (self.root.join(dir).join(format!("{stem}.{ext}")), format))
            .find(|(p, _)| p.exists())
    }

    fn volume_file(&self, name: &str) -> Option<(PathBuf, VolumeFormat)> {
        self.find_file("volumes", name)
    }

    fn snapshot_file(&self, volume: &str, snapshot: &str) -> Option<(PathBuf, VolumeFormat)> {
        self.find_file("snapshots", &format!("{volume}@{snapshot}"))
    }

    fn meta_file(&self, name: &str) -> PathBuf {
        self.root.join("meta").join(format!("{name}.json"))
    }

    fn read_meta(&self, name: &str) -> Meta {
        fs::read(self.meta_file(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn require_volume(&self, name: &str) -> Result<(PathBuf, VolumeFormat)> {
        self.volume_file(name)
            .ok_or_else(|| VolumeError::NotFound(format!("volume {name:?} does not exist")))
    }

    fn refuse_existing(&self, name: &str) -> Result<()> {
        if self.volume_file(name).is_some() {
            return Err(VolumeError::Conflict(format!("volume {name:?} already exists")));
        }
        Ok(())
    }

    fn tmp_path(&self, dir: &str, final_name: &str) -> PathBuf {
        self.root.join(dir).join(format!(".tmp-{final_name}"))
    }

    /// Copies `src` to a new file `dst`: shares extents when the file system can, else
    /// copies only the allocated ranges, leaving holes as holes.
    fn copy_file(&self, src: &Path, dst: &Path) -> Result<()> {
        let ctx = || format!("copying {} to {}", src.display(), dst.display());
        let from = File::open(src).map_err(VolumeError::io(ctx()))?;
        let to = File::create(dst).map_err(VolumeError::io(ctx()))?;
        let result = (|| {
            if self.reflink && ficlone(&from, &to).is_ok() {
                return Ok(());
            }
            sparse_copy(&from, &to)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(dst);
            return Err(VolumeError::Io {
                context: ctx(),
                source: e,
            });
        }
        Ok(())
    }

    /// The snapshot files in the pool, sorted (read once per listing).
    fn snapshot_files(&self) -> Result<Vec<String>> {
        let mut files: Vec<String> = fs::read_dir(self.root.join("snapshots"))
            .map_err(VolumeError::io("listing snapshots"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".tmp-"))
            .collect();
        files.sort();
        Ok(files)
    }

    fn describe(
        &self,
        name: &str,
        path: &Path,
        format: VolumeFormat,
        all_meta: &[(String, Meta)],
        snapshot_files: &[String],
    ) -> Result<Volume> {
        let (size_bytes, allocated_bytes) = sizes(path, format)?;
        let mut snapshots = Vec::new();
        let prefix = format!("{name}@");
        for file in snapshot_files.iter().filter(|n| n.starts_with(&prefix)) {
            let Some((stem, ext)) = file.rsplit_once('.') else {
                continue;
            };
            let snap = &stem[prefix.len()..];
            let fmt = if ext == "qcow2" {
                VolumeFormat::Qcow2
            } else {
                VolumeFormat::Raw
            };
            let (s, a) = sizes(&self.root.join("snapshots").join(file), fmt)?;
            snapshots.push(Snapshot {
                name: snap.to_string(),
                volume: name.to_string(),
                size_bytes: s,
                allocated_bytes: a,
                clones: crate::pool_memory::clones_of(
                    all_meta.iter().map(|(n, m)| (n.as_str(), m.origin.as_deref())),
                    name,
                    snap,
                ),
            });
        }
        Ok(Volume {
            name: name.to_string(),
            backend: "file".into(),
            size_bytes,
            allocated_bytes,
            format,
            path: Some(path.to_path_buf()),
            origin: all_meta
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, m)| m.origin.clone()),
            snapshots,
        })
    }

    fn volume_names(&self) -> Result<Vec<(String, PathBuf, VolumeFormat)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("volumes"))
            .map_err(VolumeError::io("listing volumes"))?
            .flatten()
        {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(".tmp-") {
                continue;
            }
            let Some((stem, ext)) = file.rsplit_once('.') else {
                continue;
            };
            let format = match ext {
                "raw" => VolumeFormat::Raw,
                "qcow2" => VolumeFormat::Qcow2,
                _ => continue,
            };
            out.push((stem.to_string(), e.path(), format));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn all_meta(&self, names: &[(String, PathBuf, VolumeFormat)]) -> Vec<(String, Meta)> {
        names.iter().map(|(n, _, _)| (n.clone(), self.read_meta(n))).collect()
    }

    fn get_volume(&self, name: &str) -> Result<Volume> {
        let names = self.volume_names()?;
        let (path, format) = self.require_volume(name)?;
        self.describe(name, &path, format, &self.all_meta(&names), &self.snapshot_files()?)
    }
}

impl VolumeBackend for FilePool {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn create(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let _g = self.lock();
        self.refuse_existing(name)?;
        let final_path = self.root.join("volumes").join(format!("{name}.raw"));
        let tmp = self.tmp_path("volumes", &format!("{name}.raw"));
        let made = File::create(&tmp)
            .and_then(|f| f.set_len(size_bytes))
            .and_then(|_| fs::rename(&tmp, &final_path));
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(VolumeError::Io {
                context: format!("creating volume {name:?}"),
                source: e,
            });
        }
        drop(_g);
        self.get_volume(name)
    }

    fn create_from_file(&self, name: &str, path: &Path, size_bytes: Option<u64>) -> Result<Volume> {
        let _g = self.lock();
        self.refuse_existing(name)?;
        if is_qcow2(path)? {
            return Err(VolumeError::Unsupported(format!(
                "{} is a qcow2 image; volumes are made from raw images (imaged converts on import)",
                path.display()
            )));
        }
        let final_path = self.root.join("volumes").join(format!("{name}.raw"));
        let tmp = self.tmp_path("volumes", &format!("{name}.raw"));
        self.copy_file(path, &tmp)?;
        let grow = || -> io::Result<()> {
            let f = fs::OpenOptions::new().write(true).open(&tmp)?;
            let len = f.metadata()?.len();
            let want = size_bytes.unwrap_or(len).max(len).div_ceil(512) * 512;
            if want != len {
                f.set_len(want)?;
            }
            fs::rename(&tmp, &final_path)
        };
        if let Err(e) = grow() {
            let _ = fs::remove_file(&tmp);
            return Err(VolumeError::Io {
                context: format!("creating volume {name:?} from {}", path.display()),
                source: e,
            });
        }
        drop(_g);
        self.get_volume(name)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let _g = self.lock();
        let prefix = format!("{name}@");
        for e in fs::read_dir(self.root.join("snapshots"))
            .map_err(VolumeError::io("listing snapshots"))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                remove_if_present(&e.path())?;
            }
        }
        if let Some((p, _)) = self.volume_file(name) {
            remove_if_present(&p)?;
        }
        remove_if_present(&self.meta_file(name))
    }

    fn resize(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let _g = self.lock();
        let (path, format) = self.require_volume(name)?;
        match format {
            VolumeFormat::Raw => fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(size_bytes))
                .map_err(VolumeError::io(format!("growing volume {name:?}")))?,
            VolumeFormat::Qcow2 => qemu_img(&[
                "resize",
                "-f",
                "qcow2",
                &path.to_string_lossy(),
                &size_bytes.to_string(),
            ])?,
        }
        drop(_g);
        self.get_volume(name)
    }

    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Snapshot> {
        {
            let _g = self.lock();
            let (path, format) = self.require_volume(volume)?;
            if self.snapshot_file(volume, snapshot).is_some() {
                return Err(VolumeError::Conflict(format!(
                    "snapshot {volume}@{snapshot} already exists"
                )));
            }
            let ext = if format == VolumeFormat::Qcow2 { "qcow2" } else { "raw" };
            let file = format!("{volume}@{snapshot}.{ext}");
            let tmp = self.tmp_path("snapshots", &file);
            // Whatever the guest wrote before the snapshot must be in the file first.
            File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(VolumeError::io(format!("syncing {volume:?}")))?;
            self.copy_file(&path, &tmp)?;
            let finish = fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .and_then(|_| fs::rename(&tmp, self.root.join("snapshots").join(&file)));
            if let Err(e) = finish {
                let _ = fs::remove_file(&tmp);
                return Err(VolumeError::Io {
                    context: format!("snapshotting {volume:?}"),
                    source: e,
                });
            }
        }
        self.get_volume(volume)?
            .snapshots
            .into_iter()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| VolumeError::Backend(format!("snapshot {volume}@{snapshot} vanished after creation")))
    }

    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let _g = self.lock();
        if let Some((p, _)) = self.snapshot_file(volume, snapshot) {
            remove_if_present(&p)?;
        }
        Ok(())
    }

    fn rollback(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        {
            let _g = self.lock();
            let (path, _) = self.require_volume(volume)?;
            let (snap_path, _) = self
                .snapshot_file(volume, snapshot)
                .ok_or_else(|| VolumeError::NotFound(format!("snapshot {volume}@{snapshot} does not exist")))?;
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = self.tmp_path("volumes", &file_name);
            // A copy of the snapshot (extents shared where the file system can) takes
            // the volume's place in one rename: never half old, half new.
            self.copy_file(&snap_path, &tmp)?;
            let finish = fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .and_then(|_| File::open(&tmp).and_then(|f| f.sync_all()))
                .and_then(|_| fs::rename(&tmp, &path));
            if let Err(e) = finish {
                let _ = fs::remove_file(&tmp);
                return Err(VolumeError::Io {
                    context: format!("rolling {volume:?} back to {snapshot:?}"),
                    source: e,
                });
            }
        }
        self.get_volume(volume)
    }

    fn clone_snapshot(&self, volume: &str, snapshot: &str, name: &str) -> Result<Volume> {
        let _g = self.lock();
        self.refuse_existing(name)?;
        let (snap_path, snap_format) = self
            .snapshot_file(volume, snapshot)
            .ok_or_else(|| VolumeError::NotFound(format!("snapshot {volume}@{snapshot} does not exist")))?;
        let meta = Meta {
            origin: Some(format!("{volume}@{snapshot}")),
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| VolumeError::Backend(e.to_string()))?;
        fs::write(self.meta_file(name), meta_bytes)
            .map_err(VolumeError::io(format!("recording the origin of {name:?}")))?;
        let made = if self.reflink && snap_format == VolumeFormat::Raw {
            let final_path = self.root.join("volumes").join(format!("{name}.raw"));
            let tmp = self.tmp_path("volumes", &format!("{name}.raw"));
            self.copy_file(&snap_path, &tmp).and_then(|_| {
                // The snapshot is read-only; its clone is not.
                fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                    .and_then(|_| fs::rename(&tmp, &final_path))
                    .map_err(|e| {
                        let _ = fs::remove_file(&tmp);
                        VolumeError::Io {
                            context: format!("cloning into {name:?}"),
                            source: e,
                        }
                    })
            })
        } else {
            let final_path = self.root.join("volumes").join(format!("{name}.qcow2"));
            let tmp = self.tmp_path("volumes", &format!("{name}.qcow2"));
            let fmt = if snap_format == VolumeFormat::Qcow2 {
                "qcow2"
            } else {
                "raw"
            };
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                fmt,
                "-b",
                &snap_path.to_string_lossy(),
                &tmp.to_string_lossy(),
            ])
            .and_then(|_| fs::rename(&tmp, &final_path).map_err(VolumeError::io(format!("cloning into {name:?}"))))
            .inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })
        };
        if let Err(e) = made {
            let _ = fs::remove_file(self.meta_file(name));
            return Err(e);
        }
        drop(_g);
        self.get_volume(name)
    }

    /// A reflink of the image where the file system shares extents (and the image is
    /// on it), else a qcow2 overlay whose backing file is the image. Never a copy.
    fn clone_image(&self, name: &str, image: &Path, _key: &str) -> Result<Volume> {
        let _g = self.lock();
        self.refuse_existing(name)?;
        if is_qcow2(image)? {
            return Err(VolumeError::Unsupported(format!(
                "{} is a qcow2 image; root disks are cloned from raw images (imaged converts on import)",
                image.display()
            )));
        }
        let meta = Meta {
            origin: Some(format!("image:{}", image.display())),
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| VolumeError::Backend(e.to_string()))?;
        fs::write(self.meta_file(name), meta_bytes)
            .map_err(VolumeError::io(format!("recording the origin of {name:?}")))?;
        let reflinked = self.reflink && {
            let final_path = self.root.join("volumes").join(format!("{name}.raw"));
            let tmp = self.tmp_path("volumes", &format!("{name}.raw"));
            let cloned = File::open(image)
                .and_then(|from| File::create(&tmp).and_then(|to| ficlone(&from, &to)))
                .and_then(|_| fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644)))
                .and_then(|_| fs::rename(&tmp, &final_path));
            if cloned.is_err() {
                // EXDEV (the image is on another file system) or no reflink: overlay.
                let _ = fs::remove_file(&tmp);
            }
            cloned.is_ok()
        };
        if !reflinked {
            let final_path = self.root.join("volumes").join(format!("{name}.qcow2"));
            let tmp = self.tmp_path("volumes", &format!("{name}.qcow2"));
            let made = qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                &image.to_string_lossy(),
                &tmp.to_string_lossy(),
            ])
            .and_then(|_| fs::rename(&tmp, &final_path).map_err(VolumeError::io(format!("cloning into {name:?}"))));
            if let Err(e) = made {
                let _ = fs::remove_file(&tmp);
                let _ = fs::remove_file(self.meta_file(name));
                return Err(e);
            }
        }
        drop(_g);
        self.get_volume(name)
    }

    fn list(&self) -> Result<Vec<Volume>> {
        let names = self.volume_names()?;
        let meta = self.all_meta(&names);
        let snapshot_files = self.snapshot_files()?;
        let mut out = Vec::new();
        for (n, p, f) in &names {
            match self.describe(n, p, *f, &meta, &snapshot_files) {
                Ok(v) => out.push(v),
                // Deleted between listing and describing.
                Err(VolumeError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<Option<Volume>> {
        match self.get_volume(name) {
            Ok(v) => Ok(Some(v)),
            Err(VolumeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let (path, format) = self.require_volume(name)?;
        if format != VolumeFormat::Raw {
            return Err(VolumeError::Unsupported(format!(
                "volume {name:?} is a qcow2 overlay (this pool's file system has no reflink); \
                 attach it to a VM as a file, or use a pool on XFS or btrfs to serve it over NBD or vhost-user"
            )));
        }
        Ok(Arc::new(
            FileDevice::open(&path, read_only).map_err(VolumeError::io(format!("opening {name:?}")))?,
        ))
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Arc<dyn BlockDevice>> {
        let (path, format) = self
            .snapshot_file(volume, snapshot)
            .ok_or_else(|| VolumeError::NotFound(format!("snapshot {volume}@{snapshot} does not exist")))?;
        if format != VolumeFormat::Raw {
            return Err(VolumeError::Unsupported(format!(
                "snapshot {volume}@{snapshot} is qcow2"
            )));
        }
        Ok(Arc::new(
            FileDevice::open(&path, true).map_err(VolumeError::io(format!("opening {volume}@{snapshot}")))?,
        ))
    }

    fn usage(&self) -> Result<PoolUsage> {
        statvfs(&self.root).map_err(VolumeError::io(format!("statvfs {}", self.root.display())))
    }
}

fn remove_if_present(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::Io {
            context: format!("removing {}", p.display()),
            source: e,
        }),
    }
}

/// (virtual size, bytes allocated on disk).
fn sizes(path: &Path, format: VolumeFormat) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).map_err(VolumeError::io(format!("stat {}", path.display())))?;
    let allocated = m.blocks() * 512;
    let size = match format {
        VolumeFormat::Raw => m.len(),
        VolumeFormat::Qcow2 => qcow2_virtual_size(path)?,
    };
    Ok((size, allocated))
}

/// Reads the virtual size from a qcow2 header (big-endian u64 at offset 24).
fn qcow2_virtual_size(path: &Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(VolumeError::io(format!("opening {}", path.display())))?;
    let mut hdr = [0u8; 32];
    f.read_exact_at(&mut hdr, 0).map_err(VolumeError::io(format!(
        "reading the qcow2 header of {}",
        path.display()
    )))?;
    if &hdr[..4] != b"QFI\xfb" {
        return Err(VolumeError::Backend(format!("{} is not qcow2", path.display())));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&hdr[24..32]);
    Ok(u64::from_be_bytes(size))
}

fn is_qcow2(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(VolumeError::io(format!("opening {}", path.display())))?;
    Ok(f.read(&mut magic)
        .map_err(VolumeError::io(format!("reading {}", path.display())))?
        == 4
        && &magic == b"QFI\xfb")
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| VolumeError::Backend(format!("cannot run qemu-img ({e}); install Debian's qemu-utils")))?;
    if !out.status.success() {
        return Err(VolumeError::Backend(format!(
            "qemu-img {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn ficlone(from: &File, to: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source file descriptor as its argument; both are open.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn probe_reflink(root: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let a = root.join(".tmp-reflink-probe-a");
    let b = root.join(".tmp-reflink-probe-b");
    let ok = (|| -> io::Result<()> {
        // FICLONE reads the source: it must be open for reading.
        let fa = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a)?;
        fa.write_all_at(&[1u8; 4096], 0)?;
        let fb = File::create(&b)?;
        ficlone(&fa, &fb)
    })()
    .is_ok();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    ok
}

/// Copies the allocated ranges of `from` into `to` (same size), skipping holes.
fn sparse_copy(from: &File, to: &File) -> io::Result<()> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let (fd_in, fd_out) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open descriptor with plain integers.
        let data = unsafe { libc::lseek(fd_in, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd_in, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let n = (hole - off_in) as usize;
            // SAFETY: copy_file_range between two open descriptors, with offsets owned here.
            let r = unsafe { libc::copy_file_range(fd_in, &mut off_in, fd_out, &mut off_out, n, 0) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            if r == 0 {
                break;
            }
        }
        pos = hole;
    }
    to.sync_data()
}

fn statvfs(p: &Path) -> io::Result<PoolUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed is a valid statvfs; the call fills it from a NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and s a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PoolUsage {
        total_bytes: s.f_blocks * s.f_frsize,
        free_bytes: s.f_bavail * s.f_frsize,
    })
}
