//! Volumes held in memory: for tests and scratch space. Snapshots and clones are
//! copies. Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::device::{BlockDevice, MemoryDevice, ReadOnly};
use crate::volume::{PoolUsage, Result, Snapshot, Volume, VolumeBackend, VolumeError, VolumeFormat};

#[derive(Debug)]
struct MemVolume {
    device: Arc<MemoryDevice>,
    origin: Option<String>,
    snapshots: BTreeMap<String, Arc<MemoryDevice>>,
}

/// A pool of in-memory volumes with a fixed capacity.
#[derive(Debug)]
pub struct MemoryPool {
    capacity: u64,
    volumes: Mutex<BTreeMap<String, MemVolume>>,
}

impl MemoryPool {
    pub fn new(capacity_bytes: u64) -> MemoryPool {
        MemoryPool {
            capacity: capacity_bytes,
            volumes: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, MemVolume>> {
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn used(vols: &BTreeMap<String, MemVolume>) -> u64 {
        vols.values()
            .map(|v| v.device.size() + v.snapshots.values().map(|s| s.size()).sum::<u64>())
            .sum()
    }

    fn reserve(&self, vols: &BTreeMap<String, MemVolume>, more: u64) -> Result<()> {
        if Self::used(vols) + more > self.capacity {
            return Err(VolumeError::NoSpace(format!(
                "the memory pool has {} bytes free, {more} needed",
                self.capacity.saturating_sub(Self::used(vols))
            )));
        }
        Ok(())
    }

    fn describe(name: &str, v: &MemVolume, all: &BTreeMap<String, MemVolume>) -> Volume {
        Volume {
            name: name.to_string(),
            backend: "memory".into(),
            size_bytes: v.device.size(),
            allocated_bytes: v.device.size(),
            format: VolumeFormat::Raw,
            path: None,
            origin: v.origin.clone(),
            snapshots: v
                .snapshots
                .iter()
                .map(|(s, d)| Snapshot {
                    name: s.clone(),
                    volume: name.to_string(),
                    size_bytes: d.size(),
                    allocated_bytes: d.size(),
                    clones: clones_of(all.iter().map(|(n, v)| (n.as_str(), v.origin.as_deref())), name, s),
                })
                .collect(),
        }
    }
}

/// Names of volumes whose origin is `volume@snapshot`.
pub(crate) fn clones_of<'a>(
    volumes: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    volume: &str,
    snapshot: &str,
) -> Vec<String> {
    let origin = format!("{volume}@{snapshot}");
    volumes
        .filter(|(_, o)| *o == Some(origin.as_str()))
        .map(|(n, _)| n.to_string())
        .collect()
}

fn missing(name: &str) -> VolumeError {
    VolumeError::NotFound(format!("volume {name:?} does not exist"))
}

impl VolumeBackend for MemoryPool {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn create(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let mut vols = self.lock();
        if vols.contains_key(name) {
            return Err(VolumeError::Conflict(format!("volume {name:?} already exists")));
        }
        self.reserve(&vols, size_bytes)?;
        let v = MemVolume {
            device: Arc::new(MemoryDevice::new(size_bytes)),
            origin: None,
            snapshots: BTreeMap::new(),
        };
        vols.insert(name.to_string(), v);
        Ok(Self::describe(name, &vols[name], &vols))
    }

    fn create_from_file(&self, name: &str, path: &std::path::Path, size_bytes: Option<u64>) -> Result<Volume> {
        let mut bytes = std::fs::read(path).map_err(VolumeError::io(format!("reading {}", path.display())))?;
        let size = size_bytes.unwrap_or(0).max(bytes.len() as u64).div_ceil(512) * 512;
        bytes.resize(size as usize, 0);
        let mut vols = self.lock();
        if vols.contains_key(name) {
            return Err(VolumeError::Conflict(format!("volume {name:?} already exists")));
        }
        self.reserve(&vols, size)?;
        let v = MemVolume {
            device: Arc::new(MemoryDevice::from_bytes(bytes)),
            origin: None,
            snapshots: BTreeMap::new(),
        };
        vols.insert(name.to_string(), v);
        Ok(Self::describe(name, &vols[name], &vols))
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.lock().remove(name);
        Ok(())
    }

    fn resize(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let vols = self.lock();
        let v = vols.get(name).ok_or_else(|| missing(name))?;
        self.reserve(&vols, size_bytes.saturating_sub(v.device.size()))?;
        v.device.grow(size_bytes);
        Ok(Self::describe(name, v, &vols))
    }

    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Snapshot> {
        let mut vols = self.lock();
        let size = vols.get(volume).ok_or_else(|| missing(volume))?.device.size();
        self.reserve(&vols, size)?;
        let v = vols.get_mut(volume).ok_or_else(|| missing(volume))?;
        if v.snapshots.contains_key(snapshot) {
            return Err(VolumeError::Conflict(format!(
                "snapshot {volume}@{snapshot} already exists"
            )));
        }
        v.snapshots.insert(
            snapshot.to_string(),
            Arc::new(MemoryDevice::from_bytes(v.device.to_bytes())),
        );
        let desc = Self::describe(volume, &vols[volume], &vols);
        desc.snapshots
            .into_iter()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| missing(snapshot))
    }

    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        if let Some(v) = self.lock().get_mut(volume) {
            v.snapshots.remove(snapshot);
        }
        Ok(())
    }

    fn rollback(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        let mut vols = self.lock();
        let v = vols.get_mut(volume).ok_or_else(|| missing(volume))?;
        let snap = v
            .snapshots
            .get(snapshot)
            .ok_or_else(|| VolumeError::NotFound(format!("snapshot {volume}@{snapshot} does not exist")))?;
        v.device = Arc::new(MemoryDevice::from_bytes(snap.to_bytes()));
        Ok(Self::describe(volume, &vols[volume], &vols))
    }

    fn clone_snapshot(&self, volume: &str, snapshot: &str, name: &str) -> Result<Volume> {
        let mut vols = self.lock();
        if vols.contains_key(name) {
            return Err(VolumeError::Conflict(format!("volume {name:?} already exists")));
        }
        let snap = vols
            .get(volume)
            .and_then(|v| v.snapshots.get(snapshot))
            .ok_or_else(|| VolumeError::NotFound(format!("snapshot {volume}@{snapshot} does not exist")))?
            .clone();
        self.reserve(&vols, snap.size())?;
        let v = MemVolume {
            device: Arc::new(MemoryDevice::from_bytes(snap.to_bytes())),
            origin: Some(format!("{volume}@{snapshot}")),
            snapshots: BTreeMap::new(),
        };
        vols.insert(name.to_string(), v);
        Ok(Self::describe(name, &vols[name], &vols))
    }

    fn list(&self) -> Result<Vec<Volume>> {
        let vols = self.lock();
        Ok(vols.iter().map(|(n, v)| Self::describe(n, v, &vols)).collect())
    }

    fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let dev = self.lock().get(name).ok_or_else(|| missing(name))?.device.clone();
        Ok(if read_only { Arc::new(ReadOnly(dev)) } else { dev })
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Arc<dyn BlockDevice>> {
        let vols = self.lock();
        let snap = vols
            .get(volume)
            .and_then(|v| v.snapshots.get(snapshot))
            .ok_or_else(|| VolumeError::NotFound(format!("snapshot {volume}@{snapshot} does not exist")))?;
        Ok(Arc::new(ReadOnly(snap.clone())))
    }

    fn usage(&self) -> Result<PoolUsage> {
        let vols = self.lock();
        Ok(PoolUsage {
            total_bytes: self.capacity,
            free_bytes: self.capacity.saturating_sub(Self::used(&vols)),
        })
    }
}
