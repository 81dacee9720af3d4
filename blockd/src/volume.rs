//! Volumes and snapshots, and the `VolumeBackend` trait every storage backend (a file
//! pool, an LVM volume group, memory) implements. The trait is synchronous: backends
//! run lvm2 commands and file system calls; the service runs them on the blocking pool.
//!
//! Clones depend on the snapshot they were made from, as in ZFS: a snapshot with clones
//! cannot be deleted, nor can the volume that holds it. The rule is the same for every
//! backend, even where the backend could cope (reflink copies), so a volume behaves the
//! same whichever pool holds it.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::BlockDevice;

/// A volume as it exists in its pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// Which backend holds it: `file`, `lvm` or `memory`.
    pub backend: String,
    /// What the guest sees, in bytes.
    pub size_bytes: u64,
    /// What it really occupies in the pool, in bytes.
    pub allocated_bytes: u64,
    /// `raw` or `qcow2`: how a hypervisor must open `path`.
    pub format: VolumeFormat,
    /// The file or block device holding it (none for memory volumes).
    pub path: Option<PathBuf>,
    /// The snapshot this volume was cloned from (`volume@snapshot`), if any.
    pub origin: Option<String>,
    pub snapshots: Vec<Snapshot>,
}

/// A read-only point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub volume: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    /// Volumes cloned from this snapshot.
    pub clones: Vec<String>,
}

/// How a volume's bytes are laid out on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    Raw,
    Qcow2,
}

/// Space in a pool, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Why a volume operation failed. Each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Backend(String),
}

impl VolumeError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
        let context = context.into();
        move |source| VolumeError::Io { context, source }
    }
}

impl From<VolumeError> for socket_http::ApiError {
    fn from(e: VolumeError) -> Self {
        use axum::http::StatusCode;
        use socket_http::ApiError;
        match &e {
            VolumeError::NotFound(m) => ApiError::not_found(m.clone()),
            VolumeError::Conflict(m) => ApiError::conflict(m.clone()),
            VolumeError::Invalid(m) => ApiError::unprocessable(m.clone()),
            VolumeError::NoSpace(m) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", m.clone())
            }
            VolumeError::Unsupported(m) => ApiError::new(StatusCode::CONFLICT, "unsupported", m.clone()),
            VolumeError::Io { .. } | VolumeError::Backend(_) => ApiError::internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, VolumeError>;

/// The snapshot of an image base volume that root disks are cloned from.
pub const IMAGE_BASE_SNAPSHOT: &str = "base";

/// The volume that holds an image's blocks once, for backends that clone snapshots.
pub fn image_base_name(key: &str) -> String {
    let short: String = key.chars().filter(|c| c.is_ascii_alphanumeric()).take(24).collect();
    format!("image-{short}")
}

/// Whether `name` is one [`image_base_name`] makes from an image digest (`sha256:…`).
pub fn is_image_base_name(name: &str) -> bool {
    name.strip_prefix("image-sha256")
        .is_some_and(|hex| hex.len() == 18 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A storage backend: where volumes live and how they are snapshotted and cloned.
/// Every method is idempotent where that makes sense: deleting what is missing succeeds.
pub trait VolumeBackend: Send + Sync + std::fmt::Debug {
    /// `file`, `lvm` or `memory`.
    fn kind(&self) -> &'static str;
    /// Creates an empty (zero-filled) volume. Fails with `Conflict` if it exists.
    fn create(&self, name: &str, size_bytes: u64) -> Result<Volume>;
    /// Creates a volume holding the raw bytes of `path` (an image), grown to
    /// `size_bytes` if that is larger.
    fn create_from_file(&self, name: &str, path: &std::path::Path, size_bytes: Option<u64>) -> Result<Volume>;
    /// Deletes a volume and its snapshots. The service checks clones first.
    fn delete(&self, name: &str) -> Result<()>;
    /// Grows a volume. Shrinking is refused by the service before it gets here.
    fn resize(&self, name: &str, size_bytes: u64) -> Result<Volume>;
    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Snapshot>;
    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()>;
    /// Puts `volume` back to what `volume@snapshot` holds (its size too), keeping the
    /// snapshot. Nobody may have the volume open: the service checks.
    fn rollback(&self, volume: &str, snapshot: &str) -> Result<Volume>;
    /// Creates `name` from `volume@snapshot`, sharing blocks where the backend can.
    fn clone_snapshot(&self, volume: &str, snapshot: &str, name: &str) -> Result<Volume>;
    /// Creates `name` as a copy-on-write clone of an immutable image file (imaged's
    /// cache), never a full copy where the backend can share blocks. `key` names the
    /// image (its digest) for backends that keep one base per image.
    ///
    /// The default keeps one base volume per image (`image-<key>`, filled once from the
    /// file) with one snapshot `base`, and clones that snapshot: an LVM thin snapshot.
    fn clone_image(&self, name: &str, image: &std::path::Path, key: &str) -> Result<Volume> {
        let base = image_base_name(key);
        let volume = match self.get(&base)? {
            Some(v) => v,
            None => self.create_from_file(&base, image, None)?,
        };
        let has_snapshot = volume.snapshots.iter().any(|s| s.name == IMAGE_BASE_SNAPSHOT);
        if !has_snapshot {
            self.snapshot(&base, IMAGE_BASE_SNAPSHOT)?;
        }
        self.clone_snapshot(&base, IMAGE_BASE_SNAPSHOT, name)
    }
    fn list(&self) -> Result<Vec<Volume>>;
    fn get(&self, name: &str) -> Result<Option<Volume>> {
        Ok(self.list()?.into_iter().find(|v| v.name == name))
    }
    /// The data path of a raw volume, for the NBD server and vhost-user-blk.
    fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>>;
    /// The data path of a snapshot (read-only).
    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Arc<dyn BlockDevice>>;
    fn usage(&self) -> Result<PoolUsage>;
    /// What volume sizes are rounded up to: a volume asked to hold `n` bytes gets `n`
    /// rounded up to this (LVM: the volume group's extent, 4 MiB by default).
    fn size_granularity(&self) -> Result<u64> {
        Ok(512)
    }
}

/// Checks a volume or snapshot name: 1-63 characters from `[A-Za-z0-9_.-]`, starting
/// with a letter or digit. So no `/`, no `..`, no control characters, nothing a path,
/// an LVM name or a shell could misread.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "invalid {what} name {name:?}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

/// Checks a requested size: more than 0 and a whole number of 512-byte sectors.
pub fn validate_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 {
        return Err(VolumeError::Invalid("size_bytes must be more than 0".into()));
    }
    if size_bytes % 512 != 0 {
        return Err(VolumeError::Invalid(format!(
            "size_bytes {size_bytes} is not a multiple of 512 (a disk sector)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            "",
            "a/b",
            "..",
            "a..b",
            ".hidden",
            "-x",
            "a\nb",
            "a\0b",
            "é",
            &"x".repeat(64),
            "a b",
            "a@b",
            "a+b",
        ] {
            assert!(validate_name("volume", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["data", "db-1", "vm_7.root", "A9", &"x".repeat(63)] {
            validate_name("volume", good).expect(good);
        }
    }

    #[test]
    fn sizes_must_be_whole_sectors() {
        assert!(validate_size(0).is_err());
        assert!(validate_size(1000).is_err());
        validate_size(1 << 30).expect("1 GiB");
    }
}
