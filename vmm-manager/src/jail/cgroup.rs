//! One cgroup per VM, with the VM's memory, CPU and I/O limits.
//!
//! cgroup v2 where the host's unified hierarchy has the controller; otherwise the
//! controller's cgroup v1 hierarchy (hosts booted with a hybrid layout, such as the
//! machines hearth is tested on, have memory and cpu only there). Each VM's cgroup is
//! `<vmm-manager's own cgroup>/<name>/<vm id>` in every hierarchy used, so hearth nests
//! under whatever its service manager gave it.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// cgroup v2's default CPU and I/O weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The CPU quota period, in microseconds.
const PERIOD_US: u64 = 100_000;

/// Which hierarchy serves one controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hierarchy {
    /// The unified hierarchy; the parent directory of the VMs' cgroups.
    V2(PathBuf),
    /// A v1 hierarchy; the parent directory of the VMs' cgroups in it.
    V1(PathBuf),
}

impl Hierarchy {
    fn parent(&self) -> &Path {
        match self {
            Hierarchy::V2(p) | Hierarchy::V1(p) => p,
        }
    }
    fn version(&self) -> &'static str {
        match self {
            Hierarchy::V2(_) => "v2",
            Hierarchy::V1(_) => "v1",
        }
    }
}

/// The host's cgroup controllers as hearth uses them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLayout {
    pub memory: Option<Hierarchy>,
    pub cpu: Option<Hierarchy>,
    /// v2 `io` or v1 `blkio` with proportional weights (v1 needs BFQ's `blkio.weight`).
    pub io: Option<Hierarchy>,
}

/// What the host supports, for `hearth doctor` and `/health/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSupport {
    /// Controllers enabled in the unified (v2) hierarchy, if one is mounted.
    pub v2_controllers: Option<Vec<String>>,
    /// Controllers mounted as v1 hierarchies.
    pub v1_controllers: Vec<String>,
    /// "memory v2", "cpu v1", "io: none" and so on.
    pub used: Vec<String>,
}

/// The limits written into one VM's cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_weight: u32,
    /// CPUs' worth of time per period (1.5 = one and a half CPUs); `None`: no quota.
    pub cpu_limit: Option<f64>,
    pub io_weight: u32,
}

struct Mount {
    point: PathBuf,
    fstype: String,
    super_opts: String,
}

fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let _source = r.next()?;
            let super_opts = r.next().unwrap_or("").to_string();
            Some(Mount {
                point: PathBuf::from(point.replace("\\040", " ")),
                fstype,
                super_opts,
            })
        })
        .collect()
}

/// This process's cgroup in the v2 hierarchy (`0::`) or in the v1 hierarchy that
/// has `controller`.
fn own_cgroup(controller: Option<&str>) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let hit = match controller {
            None => id == "0" && ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        if hit {
            return PathBuf::from(path);
        }
    }
    PathBuf::from("/")
}

fn under(mount: &Path, cgroup: &Path) -> PathBuf {
    mount.join(cgroup.strip_prefix("/").unwrap_or(cgroup))
}

/// Reads the host's layout. `name` is the directory under vmm-manager's own cgroup
/// that holds the VMs' cgroups.
pub fn detect(name: &str) -> (CgroupLayout, CgroupSupport) {
    // A hierarchy whose mount is hidden (another file system mounted over /sys, as
    // `ip netns exec` does) is as good as absent.
    let mounts: Vec<Mount> = mounts()
        .into_iter()
        .filter(|m| !m.fstype.starts_with("cgroup") || m.point.join("cgroup.procs").exists())
        .collect();
    let unified = mounts.iter().find(|m| m.fstype == "cgroup2");
    let v2_own = unified.map(|m| under(&m.point, &own_cgroup(None)));
    let v2_controllers: Option<Vec<String>> = v2_own.as_ref().map(|own| {
        std::fs::read_to_string(own.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    });
    let v1 = |ctrl: &str| -> Option<PathBuf> {
        let m = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == ctrl))?;
        Some(under(&m.point, &own_cgroup(Some(ctrl))).join(name))
    };
    let v1_controllers: Vec<String> = ["memory", "cpu", "blkio", "cpuset", "pids"]
        .into_iter()
        .filter(|c| v1(c).is_some())
        .map(str::to_string)
        .collect();
    let pick = |v2name: &str, v1name: &str, v1_weight_file: Option<&str>| -> Option<Hierarchy> {
        if v2_controllers.as_ref().is_some_and(|c| c.iter().any(|x| x == v2name)) {
            return Some(Hierarchy::V2(v2_own.as_ref()?.join(name)));
        }
        let dir = v1(v1name)?;
        if let Some(f) = v1_weight_file {
            // The weight file exists at every level of the hierarchy once the I/O
            // scheduler supports it; look at the hierarchy's root.
            let root = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == v1name))?;
            if !root.point.join(f).exists() {
                return None;
            }
        }
        Some(Hierarchy::V1(dir))
    };
    let layout = CgroupLayout {
        memory: pick("memory", "memory", None),
        cpu: pick("cpu", "cpu", None),
        io: pick("io", "blkio", Some("blkio.weight")),
    };
    let used = [("memory", &layout.memory), ("cpu", &layout.cpu), ("io", &layout.io)]
        .iter()
        .map(|(n, h)| match h {
            Some(h) => format!("{n} {}", h.version()),
            None => format!("{n}: none"),
        })
        .collect();
    (
        layout,
        CgroupSupport {
            v2_controllers,
            v1_controllers,
            used,
        },
    )
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", dir.join(file).display()),
        )
    })
}

/// Enables `controllers` for the children of `dir` (cgroup v2). A cgroup with
/// processes of its own cannot, so vmm-manager's processes there move to a leaf first
/// (what systemd's `Delegate=yes` asks of a service).
fn enable_v2(dir: &Path, controllers: &[&str]) -> io::Result<()> {
    let want: String = controllers.iter().map(|c| format!("+{c} ")).collect();
    match std::fs::write(dir.join("cgroup.subtree_control"), want.trim()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = dir.join("hearth-daemon");
            std::fs::create_dir_all(&leaf)?;
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))?.split_whitespace() {
                let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
            }
            write(dir, "cgroup.subtree_control", want.trim())
        }
        Err(e) => Err(e),
    }
}

impl CgroupLayout {
    /// The directories of VM `id`'s cgroup, one per hierarchy used.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.memory, &self.cpu, &self.io]
            .into_iter()
            .flatten()
            .map(|h| h.parent().join(id))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Creates VM `id`'s cgroup and writes `limits` into it. Returns the
    /// `cgroup.procs` files the VMM joins. What a controller is missing for is left out.
    pub fn create(&self, id: &str, limits: &Limits) -> io::Result<Vec<PathBuf>> {
        let v2: Vec<&str> = [("memory", &self.memory), ("cpu", &self.cpu), ("io", &self.io)]
            .into_iter()
            .filter(|(_, h)| matches!(h, Some(Hierarchy::V2(_))))
            .map(|(n, _)| n)
            .collect();
        if let Some(Hierarchy::V2(parent)) = [&self.memory, &self.cpu, &self.io]
            .into_iter()
            .flatten()
            .find(|h| matches!(h, Hierarchy::V2(_)))
        {
            if let Some(own) = parent.parent() {
                enable_v2(own, &v2)?;
            }
            std::fs::create_dir_all(parent)?;
            enable_v2(parent, &v2)?;
        }
        let dirs = self.dirs(id);
        for d in &dirs {
            std::fs::create_dir_all(d)?;
        }
        if let Some(h) = &self.memory {
            let d = h.parent().join(id);
            match h {
                Hierarchy::V2(_) => write(&d, "memory.max", &limits.memory_bytes.to_string())?,
                Hierarchy::V1(_) => write(&d, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?,
            }
        }
        if let Some(h) = &self.cpu {
            let d = h.parent().join(id);
            let quota = limits.cpu_limit.map(|c| ((c * PERIOD_US as f64) as u64).max(1000));
            match h {
                Hierarchy::V2(_) => {
                    write(&d, "cpu.weight", &limits.cpu_weight.to_string())?;
                    let q = quota.map_or("max".to_string(), |q| q.to_string());
                    write(&d, "cpu.max", &format!("{q} {PERIOD_US}"))?;
                }
                Hierarchy::V1(_) => {
                    write(&d, "cpu.shares", &shares(limits.cpu_weight).to_string())?;
                    write(&d, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
                    write(
                        &d,
                        "cpu.cfs_quota_us",
                        &quota.map_or("-1".to_string(), |q| q.to_string()),
                    )?;
                }
            }
        }
        if let Some(h) = &self.io {
            let d = h.parent().join(id);
            let written = match h {
                Hierarchy::V2(_) => write(&d, "io.weight", &format!("default {}", limits.io_weight)),
                // blkio.weight takes 10..=1000.
                Hierarchy::V1(_) => write(&d, "blkio.weight", &limits.io_weight.clamp(10, 1000).to_string()),
            };
            // The controller is there, yet weights need the I/O scheduler's support
            // (BFQ, or v2's iocost): without it the VM runs unweighted, not at all.
            if let Err(e) = written {
                tracing::warn!(vm = id, "no I/O weight: {e}");
            }
        }
        Ok(dirs.iter().map(|d| d.join("cgroup.procs")).collect())
    }
}

/// cgroup v1's `cpu.shares` for a v2 weight (v1's default 1024 is v2's 100).
pub fn shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / u64::from(DEFAULT_WEIGHT)).max(2)
}

/// Removes cgroup directories once their processes are gone; a cgroup that still has
/// some (a VMM not yet reaped) is retried for a moment, then left and logged.
pub fn remove(dirs: &[PathBuf]) {
    for d in dirs {
        if !d.exists() {
            continue;
        }
        let mut removed = false;
        for attempt in 0..50 {
            if attempt == 10 {
                // What is left there is the VM's (a VMM that outlived its supervision):
                // it must not live on under a uid the next VM in its slot gets.
                for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: kill takes integers.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            match std::fs::remove_dir(d) {
                Ok(()) => {
                    removed = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    removed = true;
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        if !removed {
            tracing::warn!(dir = %d.display(), "cannot remove a VM's cgroup: processes remain in it");
        }
    }
}

/// The peak memory use of a VM's cgroup, in bytes (v2 `memory.peak`, v1
/// `memory.max_usage_in_bytes`).
pub fn memory_peak(layout: &CgroupLayout, id: &str) -> Option<u64> {
    let h = layout.memory.as_ref()?;
    let d = h.parent().join(id);
    let file = match h {
        Hierarchy::V2(_) => "memory.peak",
        Hierarchy::V1(_) => "memory.max_usage_in_bytes",
    };
    std::fs::read_to_string(d.join(file)).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_shares_follow_v2_weights() {
        assert_eq!(shares(100), 1024);
        assert_eq!(shares(300), 3072);
        assert_eq!(shares(1), 10);
        assert_eq!(shares(10000), 102400);
    }

    #[test]
    fn limits_are_written_in_each_hierarchy_s_own_terms() -> io::Result<()> {
        // Directories standing in for cgroup file systems: what is written where.
        let tmp = tempfile::tempdir()?;
        let v2 = tmp.path().join("unified/own/vms");
        let v1 = tmp.path().join("cpu/own/vms");
        std::fs::create_dir_all(&v2)?;
        std::fs::create_dir_all(&v1)?;
        let layout = CgroupLayout {
            memory: Some(Hierarchy::V2(v2.clone())),
            cpu: Some(Hierarchy::V1(v1.clone())),
            io: Some(Hierarchy::V2(v2.clone())),
        };
        let limits = Limits {
            memory_bytes: 300 << 20,
            cpu_weight: 300,
            cpu_limit: Some(1.5),
            io_weight: 50,
        };
        let procs = layout.create("vm1", &limits)?;
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        assert_eq!(read(v2.join("vm1/memory.max")), (300u64 << 20).to_string());
        assert_eq!(read(v2.join("vm1/io.weight")), "default 50");
        assert_eq!(read(v2.join("cgroup.subtree_control")), "+memory +io");
        assert_eq!(read(v1.join("vm1/cpu.shares")), "3072");
        assert_eq!(read(v1.join("vm1/cpu.cfs_quota_us")), "150000");
        assert_eq!(procs, vec![v1.join("vm1/cgroup.procs"), v2.join("vm1/cgroup.procs")]);
        Ok(())
    }
}
