//! Saved VM states: a VM's memory and devices at one paused instant, kept under
//! `<state dir>/<vm id>/<name>/` (`spec.json`: the VM's spec then; `vmm/`: what the
//! hypervisor wrote; `complete`: written last, so a save cut short is never taken for
//! a state), and loaded back into a fresh VMM. The VM's disks are the caller's: a
//! consistent snapshot takes them (blockd) while the VM is paused, and puts them back
//! before a restore.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{lock, ServiceError, VmService};
use crate::spec::{self, now_ms, VmInfo, VmSpec, VmState};

/// A saved state, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub name: String,
    /// What it takes on disk (the guest's memory, mostly).
    pub size_bytes: u64,
    pub created_ms: u64,
}

const COMPLETE: &str = "complete";

fn du(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| du(&e.path()))
            .sum()
    } else {
        meta.blocks() * 512
    }
}

fn read_saved(dir: &std::path::Path, name: &str) -> Option<SavedState> {
    let created_ms = std::fs::read_to_string(dir.join(COMPLETE)).ok()?.trim().parse().ok()?;
    Some(SavedState {
        name: name.to_string(),
        size_bytes: du(dir),
        created_ms,
    })
}

impl VmService {
    fn state_path(&self, id: &str, name: &str) -> PathBuf {
        self.config.state_dir.join(id).join(name)
    }

    /// Saves the paused VM's memory and devices as `name`. Saving a name already saved
    /// changes nothing (a retried request); the VM stays paused.
    pub async fn save_state(&self, id: &str, name: &str) -> Result<SavedState, ServiceError> {
        spec::validate_id(name)?;
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let dir = self.state_path(id, name);
        if let Some(saved) = read_saved(&dir, name) {
            return Ok(saved);
        }
        let state = lock(&vm.status).state;
        if state != VmState::Paused || Self::runtime_handles(&vm).is_none() {
            return Err(ServiceError::State {
                id: id.to_string(),
                state: state.as_str(),
                action: "save its state (pause it first)",
            });
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("vmm"))?;
        // A jailed VMM writes its state itself, as the VM's user.
        self.jail
            .hand_over_state_dir(&vm.dir, vm.driver.kind(), &dir.join("vmm"))?;
        let saved = async {
            let spec = serde_json::to_vec_pretty(&vm.current_spec()).map_err(std::io::Error::other)?;
            std::fs::write(dir.join("spec.json"), spec)?;
            vm.driver.save_state(&vm.dir, &dir.join("vmm")).await?;
            std::fs::write(dir.join(COMPLETE), now_ms().to_string())?;
            Ok::<_, ServiceError>(())
        }
        .await;
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(vm = %id, state = name, "VM state saved");
        read_saved(&dir, name).ok_or_else(|| std::io::Error::other("the saved state vanished").into())
    }

    /// The VM's saved states, by name.
    pub fn saved_states(&self, id: &str) -> Result<Vec<SavedState>, ServiceError> {
        self.vm(id)?;
        let mut out: Vec<SavedState> = std::fs::read_dir(self.config.state_dir.join(id))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_saved(&e.path(), &e.file_name().to_string_lossy()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes a saved state; a missing one is no error.
    pub fn delete_state(&self, id: &str, name: &str) -> Result<(), ServiceError> {
        spec::validate_id(name)?;
        match std::fs::remove_dir_all(self.state_path(id, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every saved state of VM `id` (it is being deleted).
    pub(super) fn delete_states(&self, id: &str) -> Result<(), ServiceError> {
        match std::fs::remove_dir_all(self.config.state_dir.join(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Takes the VM back to the saved state `name`: its VMM, if one runs, is stopped
    /// at once, a fresh one loads the state, and the guest runs on from that instant
    /// (its disks must already hold what they held then). The VM takes the spec it had
    /// then (disks, vCPUs, memory).
    pub async fn restore_state(self: &Arc<Self>, id: &str, name: &str) -> Result<VmInfo, ServiceError> {
        spec::validate_id(name)?;
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let dir = self.state_path(id, name);
        let missing = || ServiceError::NoState {
            vm: id.to_string(),
            name: name.to_string(),
        };
        read_saved(&dir, name).ok_or_else(missing)?;
        let spec: VmSpec = crate::vm_dir::read_trusted(&dir.join("spec.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(missing)?;
        self.stop_locked(&vm, true).await?;
        *lock(&vm.disks) = spec.disks.clone();
        *lock(&vm.shape) = (spec.vcpus, spec.memory_mib);
        vm.save_spec()?;
        self.set_status(&vm, VmState::Starting, Some(format!("restoring state {name}")));
        let pid = match vm.driver.launch_restore(&vm.dir, &spec, &dir.join("vmm")).await {
            Ok(pid) => pid,
            Err(e) => {
                self.jail.release(&vm.dir);
                self.set_status(
                    &vm,
                    VmState::Failed,
                    Some(format!("restoring state {name} failed: {e}")),
                );
                return Err(e.into());
            }
        };
        self.supervise(&vm, pid).await?;
        // Loaded paused, as it was saved: it runs on from there.
        if let Err(e) = vm.driver.resume(&vm.dir).await {
            let _ = self.stop_locked(&vm, true).await;
            self.set_status(
                &vm,
                VmState::Failed,
                Some(format!("the restored VM did not resume: {e}")),
            );
            return Err(e.into());
        }
        self.set_status(&vm, VmState::Running, Some(format!("restored from state {name}")));
        tracing::info!(vm = %id, state = name, pid, "VM state restored");
        Ok(Self::info(&vm))
    }
}
