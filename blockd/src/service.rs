//! blockd's service: the rules every backend shares (names, sizes, clones depending on
//! snapshots, exported volumes), on top of one `VolumeBackend`, and the exports that
//! make volumes reachable (NBD, vhost-user-blk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::volume::{validate_name, validate_size, PoolUsage, Result, Snapshot, Volume, VolumeBackend, VolumeError};

/// What a volume is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeSource {
    /// A clone of `volume@snapshot`.
    Snapshot(String),
    /// A copy of a raw image file on this host (shares extents where it can).
    Image(PathBuf),
    /// A copy-on-write clone of an immutable raw image file (imaged's cache): a
    /// reflink or qcow2 overlay in a file pool, a thin snapshot of the image's base
    /// volume in LVM. `key` is the image's digest.
    ImageClone { path: PathBuf, key: String },
}

/// The body of `PUT /volumes/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Size in bytes; optional for clones and images (they keep their source's size).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub source: Option<VolumeSource>,
}

/// The pool and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub backend: String,
    #[serde(flatten)]
    pub usage: PoolUsage,
}

/// An image path must be absolute and name an existing file.
fn check_image_path(path: &Path) -> Result<()> {
    if !path.is_absolute() {
        return Err(VolumeError::Invalid(format!(
            "image path {} must be absolute",
            path.display()
        )));
    }
    if !path.is_file() {
        return Err(VolumeError::NotFound(format!(
            "image file {} does not exist",
            path.display()
        )));
    }
    Ok(())
}

/// Splits `volume@snapshot`.
pub fn split_snapshot_ref(s: &str) -> Result<(&str, &str)> {
    let (v, snap) = s
        .split_once('@')
        .ok_or_else(|| VolumeError::Invalid(format!("{s:?} does not name a snapshot; write volume@snapshot")))?;
    validate_name("volume", v)?;
    validate_name("snapshot", snap)?;
    Ok((v, snap))
}

/// The volume rules over one backend. Backend calls block (lvm2, file copies), so the
/// async methods run them on the blocking pool.
pub struct VolumeService {
    backend: Arc<dyn VolumeBackend>,
    /// Volumes something serves (an export or a VM socket): not deletable meanwhile.
    busy: BusyCheck,
    /// One lock per image base volume: a clone made from it and its removal (the api
    /// removes bases of deleted images) never interleave.
    base_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Says why a volume is in use, or `None`.
type BusyCheck = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl std::fmt::Debug for VolumeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeService")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VolumeError::Backend(format!("storage task failed: {e}")))?
}

/// What [`VolumeService::ensure_reporting`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    /// An existing volume was grown to the size asked for.
    Grown,
    Unchanged,
}

impl VolumeService {
    pub fn new(backend: Arc<dyn VolumeBackend>) -> VolumeService {
        VolumeService {
            backend,
            busy: Box::new(|_| None),
            base_locks: Default::default(),
        }
    }

    async fn lock_base(&self, base: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .base_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(base.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Installs the check that says why a volume is in use (exported, attached).
    pub fn set_busy_check(&mut self, busy: impl Fn(&str) -> Option<String> + Send + Sync + 'static) {
        self.busy = Box::new(busy);
    }

    /// Runs a backend call on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn VolumeBackend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let backend = self.backend.clone();
        blocking(move || f(backend.as_ref())).await
    }

    /// The volume if it exists.
    async fn find(&self, name: &str) -> Result<Option<Volume>> {
        let n = name.to_string();
        self.run(move |b| b.get(&n)).await
    }

    pub fn backend(&self) -> &Arc<dyn VolumeBackend> {
        &self.backend
    }

    pub async fn list(&self) -> Result<Vec<Volume>> {
        self.run(move |b| b.list()).await
    }

    pub async fn get(&self, name: &str) -> Result<Volume> {
        validate_name("volume", name)?;
        self.find(name)
            .await?
            .ok_or_else(|| VolumeError::NotFound(format!("volume {name:?} does not exist")))
    }

    pub async fn pool(&self) -> Result<PoolStatus> {
        let usage = self.run(move |b| b.usage()).await?;
        Ok(PoolStatus {
            backend: self.backend.kind().to_string(),
            usage,
        })
    }

    fn check_fits(&self, size_bytes: u64, usage: PoolUsage) -> Result<()> {
        if size_bytes > usage.total_bytes {
            return Err(VolumeError::NoSpace(format!(
                "{size_bytes} bytes is more than the whole {} pool ({} bytes)",
                self.backend.kind(),
                usage.total_bytes
            )));
        }
        Ok(())
    }

    /// Ensures the volume exists as described. An existing volume is returned as it is
    /// (grown if the spec asks for more; asking for less is refused: volumes never shrink).
    /// The flag: whether it was created.
    pub async fn ensure(&self, name: &str, spec: VolumeSpec) -> Result<(Volume, bool)> {
        let (v, how) = self.ensure_reporting(name, spec).await?;
        Ok((v, how == Ensured::Created))
    }

    /// [`ensure`](Self::ensure), telling also whether an existing volume grew (its
    /// exports must then follow).
    pub async fn ensure_reporting(&self, name: &str, spec: VolumeSpec) -> Result<(Volume, Ensured)> {
        validate_name("volume", name)?;
        if let Some(size) = spec.size_bytes {
            validate_size(size)?;
        }
        if spec.size_bytes.is_none() && spec.source.is_none() {
            return Err(VolumeError::Invalid(
                "size_bytes is required for an empty volume".into(),
            ));
        }
        if let Some(existing) = self.find(name).await? {
            // The same request again finds the size the backend rounded it up to.
            let asked = match spec.size_bytes {
                Some(s) => Some(self.rounded(s).await?),
                None => None,
            };
            return match asked {
                Some(s) if s > existing.size_bytes => Ok((self.resize(name, s).await?, Ensured::Grown)),
                Some(s) if s < existing.size_bytes => Err(VolumeError::Invalid(format!(
                    "volume {name:?} exists with {} bytes; volumes cannot shrink to {s}",
                    existing.size_bytes
                ))),
                _ => Ok((existing, Ensured::Unchanged)),
            };
        }
        if let Some(size) = spec.size_bytes {
            let usage = self.run(move |b| b.usage()).await?;
            self.check_fits(size, usage)?;
        }
        let n = name.to_string();
        let made = match spec.source {
            None => {
                let size = spec.size_bytes.unwrap_or(0);
                self.run(move |b| b.create(&n, size)).await?
            }
            Some(VolumeSource::Image(path)) => {
                check_image_path(&path)?;
                self.run(move |b| b.create_from_file(&n, &path, spec.size_bytes))
                    .await?
            }
            Some(VolumeSource::ImageClone { path, key }) => {
                check_image_path(&path)?;
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == ':') {
                    return Err(VolumeError::Invalid(format!("image key {key:?} must be a digest")));
                }
                let len = std::fs::metadata(&path)
                    .map_err(VolumeError::io(format!("stat {}", path.display())))?
                    .len();
                let base = self.lock_base(&crate::volume::image_base_name(&key)).await;
                let cloned = self.run(move |b| b.clone_image(&n, &path, &key)).await?;
                drop(base);
                match spec.size_bytes {
                    Some(size) if size > cloned.size_bytes => self.resize(name, size).await?,
                    Some(size) if size < len => {
                        let _ = self.delete(name).await;
                        return Err(VolumeError::Invalid(format!(
                            "the image holds {len} bytes; a disk made from it cannot be smaller ({size})"
                        )));
                    }
                    _ => cloned,
                }
            }
            Some(VolumeSource::Snapshot(r)) => {
                let (v, s) = split_snapshot_ref(&r)?;
                let (v, s) = (v.to_string(), s.to_string());
                let asked = match spec.size_bytes {
                    Some(size) => Some(self.rounded(size).await?),
                    None => None,
                };
                let cloned = self.run(move |b| b.clone_snapshot(&v, &s, &n)).await?;
                match asked {
                    Some(size) if size > cloned.size_bytes => self.resize(name, size).await?,
                    Some(size) if size < cloned.size_bytes => {
                        let _ = self.delete(name).await;
                        return Err(VolumeError::Invalid(format!(
                            "the snapshot {r} holds {} bytes; a clone cannot be smaller ({size})",
                            cloned.size_bytes
                        )));
                    }
                    _ => cloned,
                }
            }
        };
        Ok((made, Ensured::Created))
    }

    /// `size` rounded up to what the backend allocates in (see
    /// [`VolumeBackend::size_granularity`]).
    async fn rounded(&self, size: u64) -> Result<u64> {
        let unit = self.run(|b| b.size_granularity()).await?.max(1);
        Ok(size.div_ceil(unit).saturating_mul(unit))
    }

    /// Grows a volume; shrinking is refused (422). A size the backend rounds up to the
    /// volume's present one (an LVM extent) changes nothing.
    pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        validate_size(size_bytes)?;
        let v = self.get(name).await?;
        let size_bytes = self.rounded(size_bytes).await?;
        if size_bytes < v.size_bytes {
            return Err(VolumeError::Invalid(format!(
                "volume {name:?} has {} bytes; shrinking to {size_bytes} would destroy data and is refused",
                v.size_bytes
            )));
        }
        if size_bytes == v.size_bytes {
            return Ok(v);
        }
        let usage = self.run(move |b| b.usage()).await?;
        self.check_fits(size_bytes, usage)?;
        let n = name.to_string();
        self.run(move |b| b.resize(&n, size_bytes)).await
    }

    /// Deletes a volume and its snapshots. Refused while a snapshot has clones or the
    /// volume is in use. Deleting a missing volume succeeds.
    pub async fn delete(&self, name: &str) -> Result<()> {
        validate_name("volume", name)?;
        let _base = match crate::volume::is_image_base_name(name) {
            true => Some(self.lock_base(name).await),
            false => None,
        };
        let Some(v) = self.find(name).await? else {
            return Ok(());
        };
        if let Some(why) = (self.busy)(name) {
            return Err(VolumeError::Conflict(format!("volume {name:?} is in use: {why}")));
        }
        let dependents: Vec<String> = v
            .snapshots
            .iter()
            .flat_map(|s| {
                s.clones
                    .iter()
                    .map(move |c| format!("{c} (from {}@{})", s.volume, s.name))
            })
            .collect();
        if !dependents.is_empty() {
            return Err(VolumeError::Conflict(format!(
                "volume {name:?} has clones that depend on its snapshots: {}; delete them first",
                dependents.join(", ")
            )));
        }
        let n = name.to_string();
        self.run(move |b| b.delete(&n)).await
    }

    pub async fn snapshot(&self, volume: &str, snapshot: &str) -> Result<(Snapshot, bool)> {
        validate_name("volume", volume)?;
        validate_name("snapshot", snapshot)?;
        let v = self.get(volume).await?;
        if let Some(s) = v.snapshots.into_iter().find(|s| s.name == snapshot) {
            return Ok((s, false));
        }
        let (vn, sn) = (volume.to_string(), snapshot.to_string());
        Ok((self.run(move |b| b.snapshot(&vn, &sn)).await?, true))
    }

    /// Puts `volume` back to `volume@snapshot` (keeping the snapshot). Refused while the
    /// volume is in use (exported, or open for a VM through blockd).
    pub async fn rollback(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        validate_name("volume", volume)?;
        validate_name("snapshot", snapshot)?;
        let v = self.get(volume).await?;
        if !v.snapshots.iter().any(|s| s.name == snapshot) {
            return Err(VolumeError::NotFound(format!(
                "snapshot {volume}@{snapshot} does not exist"
            )));
        }
        if let Some(why) = (self.busy)(volume) {
            return Err(VolumeError::Conflict(format!("volume {volume} is in use: {why}")));
        }
        let (vn, sn) = (volume.to_string(), snapshot.to_string());
        self.run(move |b| b.rollback(&vn, &sn)).await
    }

    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        validate_name("volume", volume)?;
        validate_name("snapshot", snapshot)?;
        let Some(v) = self.find(volume).await? else {
            return Ok(());
        };
        if let Some(s) = v.snapshots.iter().find(|s| s.name == snapshot) {
            if !s.clones.is_empty() {
                return Err(VolumeError::Conflict(format!(
                    "snapshot {volume}@{snapshot} has clones: {}; delete them first",
                    s.clones.join(", ")
                )));
            }
        }
        if let Some(why) = (self.busy)(&format!("{volume}@{snapshot}")) {
            return Err(VolumeError::Conflict(format!(
                "snapshot {volume}@{snapshot} is in use: {why}"
            )));
        }
        let (vn, sn) = (volume.to_string(), snapshot.to_string());
        self.run(move |b| b.delete_snapshot(&vn, &sn)).await
    }
}

/// Helper for callers that take a path from a request: refuses relative paths.
pub fn require_absolute(p: &Path) -> Result<()> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "{} must be an absolute path",
            p.display()
        )))
    }
}
