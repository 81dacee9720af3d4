//! Every VMM in its own jail, as Firecracker's jailer and libvirt's QEMU driver do it.
//!
//! - **Its own user.** VM slot `n` runs as uid and gid `uid_base + n` (no passwd entry:
//!   nothing but the kernel needs the numbers). The slot is recorded in the VM's
//!   directory and kept for the VM's life.
//! - **Handed over, not shared.** Before the VMM starts, vmm-manager (root) gives that
//!   user what the VM needs and nothing else: the VM's directory (root-owned, group
//!   the VM's, sticky, so the VMM can make its sockets but not replace the spec or the
//!   PID file), its writable disks (owner, mode 0600), its vhost-user sockets, its TAPs
//!   (`TUNSETOWNER`), its saved-state directory.
//! - **Confined.** The jailer ([`launch`]) gives the VMM a mount namespace whose root
//!   is an empty tmpfs holding read-only `/usr`, the VM's directory, its disks under
//!   `<vm dir>/disks/<disk id>`, its kernel, a private `/dev` with only the nodes it needs,
//!   and `/proc` showing only its own processes. The host's `/var/lib/hearth`, other
//!   VMs and their sockets do not exist there. QEMU gets `-sandbox on` with every deny
//!   option; Cloud Hypervisor its own seccomp filter and `--landlock` rules for exactly
//!   its directories. No capabilities, `no_new_privs`.
//! - **Limited.** A cgroup per VM ([`cgroup`]): memory at the VM's size plus the VMM's
//!   overhead, CPU weight and optional quota, I/O weight where the host can.

pub mod cgroup;
pub mod launch;
pub mod plan;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::spec::{DiskSource, DiskSpec, HypervisorKind, VmSpec};
use crate::vm_dir::VmDir;
use cgroup::{CgroupLayout, CgroupSupport, Limits};
use plan::{Bind, JailPlan};

/// How vmm-manager jails VMMs.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Off only by an explicit, logged, insecure setting.
    pub enabled: bool,
    /// VM slot `n` runs as uid and gid `uid_base + n`.
    pub uid_base: u32,
    pub uid_count: u32,
    /// The directory under vmm-manager's own cgroup that holds the VMs' cgroups.
    pub cgroup_name: String,
    /// The binary that serves the jailer (`__hearth-jail`): vmm-manager's own, or the
    /// all-in-one hearth-api's.
    pub exe: PathBuf,
    /// The environment every VMM gets beyond `PATH`, `LANG` and `HOME` (a VMM starts
    /// with a clean environment, jailed or not).
    pub env: Vec<(String, String)>,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid_base: 1_900_000_000,
            uid_count: 1 << 20,
            cgroup_name: "hearth-vms".into(),
            exe: "/proc/self/exe".into(),
            env: Vec::new(),
        }
    }
}

/// The memory a VMM needs beyond its guest's: measured on QEMU 10 under TCG (the
/// translation cache, capped at [`TCG_TB_MIB`], plus ~70 MiB of QEMU itself), QEMU with
/// KVM, and Cloud Hypervisor v54.
pub const TCG_TB_MIB: u64 = 256;
pub fn overhead_mib(kind: HypervisorKind, tcg: bool) -> u64 {
    match kind {
        HypervisorKind::Qemu if tcg => TCG_TB_MIB + 128,
        HypervisorKind::Qemu => 128,
        HypervisorKind::CloudHypervisor => 64,
    }
}

/// What `GET /vms/{id}` shows of a VM's jail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JailInfo {
    pub uid: u32,
    pub gid: u32,
    /// The VM's cgroup directories.
    pub cgroups: Vec<PathBuf>,
    /// The cgroup's memory limit: the VM's most memory plus `memory_overhead_mib`.
    pub memory_limit_mib: Option<u64>,
    pub memory_overhead_mib: u64,
    pub cpu_weight: Option<u32>,
    /// CPUs' worth of time the VM may use; `None`: no quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// `None` when the host has no I/O controller with weights.
    pub io_weight: Option<u32>,
}

/// What vmm-manager records of a VM's jail (`<vm dir>/jail.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JailRecord {
    slot: u32,
    info: JailInfo,
}

/// What the host offers for jailing, for `hearth doctor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JailSupport {
    pub enabled: bool,
    pub cgroups: CgroupSupport,
    /// Whether user namespaces can be made (hearth does not need them: it starts as root).
    pub user_namespaces: bool,
    pub seccomp: bool,
    /// The landlock ABI version, 0 when the kernel has none.
    pub landlock_abi: i64,
    /// What hearth does with it, in words.
    pub summary: String,
}

/// Jails VMMs for one vmm-manager.
pub struct Jailer {
    config: JailConfig,
    run_dir: PathBuf,
    state_dir: PathBuf,
    layout: CgroupLayout,
    /// What the host offers, read once (`/health/ready` asks on every probe).
    support: JailSupport,
    slots: Mutex<()>,
}

fn chown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .map_err(|e| io::Error::new(e.kind(), format!("handing {} over: {e}", p.display())))
}

fn chmod(p: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// Where the VMM sees disk `id`.
fn disk_in_jail(dir: &VmDir, id: &str) -> PathBuf {
    dir.dir.join("disks").join(id.replace('/', "_"))
}

/// Where the VMM sees the directory of a vhost-user disk's socket.
fn socket_dir_in_jail(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_os_string();
    name.push(".d");
    PathBuf::from(name)
}

impl Jailer {
    pub fn new(config: JailConfig, run_dir: &Path, state_dir: &Path) -> Self {
        let (layout, cgroups) = cgroup::detect(&config.cgroup_name);
        let support = support(config.enabled, &cgroups);
        if !config.enabled {
            tracing::warn!("INSECURE: VMMs run as root, unconfined and unlimited (jailing is turned off)");
        }
        Self {
            config,
            run_dir: run_dir.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            layout,
            support,
            slots: Mutex::new(()),
        }
    }

    /// A jailer that jails nothing, for drivers' unit tests.
    #[cfg(test)]
    pub fn off() -> std::sync::Arc<Self> {
        let config = JailConfig {
            enabled: false,
            ..JailConfig::default()
        };
        std::sync::Arc::new(Self::new(config, Path::new("/nonexistent"), Path::new("/nonexistent")))
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn support(&self) -> JailSupport {
        self.support.clone()
    }

    fn record_path(dir: &VmDir) -> PathBuf {
        dir.dir.join("jail.json")
    }

    pub fn plan_path(dir: &VmDir) -> PathBuf {
        dir.dir.join("jail-plan.json")
    }

    fn read_record(dir: &VmDir) -> Option<JailRecord> {
        serde_json::from_slice(&crate::vm_dir::read_trusted(&Self::record_path(dir)).ok()?).ok()
    }

    /// The jail a VM had or has (`None` when jailing is off or the VM never started).
    pub fn info_of(dir: &VmDir) -> Option<JailInfo> {
        Self::read_record(dir).map(|r| r.info)
    }

    /// Checks that a socket vmm-manager connected to in a jailed VM's directory (which
    /// the VMM may write: it could have put a link to another VM's socket there) is
    /// served by the VM's own user. Without a jail record, anyone root trusts.
    pub fn check_peer(dir: &VmDir, stream: &impl std::os::fd::AsRawFd) -> io::Result<()> {
        let Some(jail) = Self::info_of(dir) else { return Ok(()) };
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for getsockopt to fill.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut libc::ucred as *mut libc::c_void,
                &mut len,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("SO_PEERCRED: {e}")));
        }
        let uid = cred.uid;
        if uid != jail.uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("served by uid {uid}, not the VM's user {}", jail.uid),
            ));
        }
        Ok(())
    }

    /// The VM's slot: the one it had, else the lowest no other VM holds.
    fn slot(&self, dir: &VmDir) -> io::Result<u32> {
        if let Some(r) = Self::read_record(dir) {
            return Ok(r.slot);
        }
        let mut used: Vec<u32> = std::fs::read_dir(self.run_dir.join("vms"))?
            .flatten()
            .filter_map(|e| Self::read_record(&VmDir { dir: e.path() }).map(|r| r.slot))
            .collect();
        used.sort_unstable();
        let mut slot = 0;
        for u in used {
            if u == slot {
                slot += 1;
            } else if u > slot {
                break;
            }
        }
        if slot >= self.config.uid_count {
            return Err(io::Error::other("no free VM user left in the reserved range"));
        }
        Ok(slot)
    }

    /// The spec as the jailed VMM sees it: every disk at `<vm dir>/disks/<id>`.
    pub fn view(&self, dir: &VmDir, spec: &VmSpec) -> VmSpec {
        if !self.config.enabled {
            return spec.clone();
        }
        let mut v = spec.clone();
        for d in &mut v.disks {
            *d = self.disk_view(dir, d);
        }
        if Self::own_netns(spec.hypervisor) {
            for (n, fds) in v.nics.iter_mut().zip(Self::tap_fds(spec)) {
                n.fds = fds;
            }
        }
        v
    }

    pub fn disk_view(&self, dir: &VmDir, disk: &DiskSpec) -> DiskSpec {
        if !self.config.enabled {
            return disk.clone();
        }
        let mut d = disk.clone();
        let at = disk_in_jail(dir, &disk.id);
        match &mut d.source {
            DiskSource::File { path, .. } => *path = at,
            DiskSource::VhostUser { socket } => {
                let file = socket
                    .file_name()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| "vhost.sock".into());
                *socket = socket_dir_in_jail(&at).join(file);
            }
        }
        d
    }

    /// The saved-state directory of VM `id`, bound into its jail.
    fn states_of(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
    }

    /// Hands `disk` to the VM's user and makes its mount point; returns the binds that
    /// put it (and a qcow2 backing chain) into the jail.
    fn hand_over_disk(&self, dir: &VmDir, disk: &DiskSpec, uid: u32, gid: u32) -> io::Result<Vec<Bind>> {
        if let DiskSource::VhostUser { socket } = &disk.source {
            // The socket's directory, not the socket: a backend that restarts makes a
            // new socket there, which the VMM reconnects to (blockd gives every
            // socket a directory of its own, kept across its restarts).
            let sdir = socket.parent().ok_or_else(|| {
                io::Error::other(format!("disk {:?}: {} has no directory", disk.id, socket.display()))
            })?;
            let src = std::fs::canonicalize(sdir)
                .map_err(|e| io::Error::new(e.kind(), format!("disk {:?}: {}: {e}", disk.id, sdir.display())))?;
            chown(&src, uid, gid)?;
            chmod(&src, 0o700)?;
            let at = socket_dir_in_jail(&disk_in_jail(dir, &disk.id));
            std::fs::create_dir_all(&at)?;
            return Ok(vec![Bind {
                src,
                dst: at,
                writable: true,
            }]);
        }
        let (src, writable) = match &disk.source {
            DiskSource::File { path, .. } => (path, !disk.readonly),
            DiskSource::VhostUser { socket } => (socket, true),
        };
        let src = std::fs::canonicalize(src)
            .map_err(|e| io::Error::new(e.kind(), format!("disk {:?}: {}: {e}", disk.id, src.display())))?;
        let meta = std::fs::metadata(&src)?;
        if writable {
            chown(&src, uid, gid)?;
            if meta.is_file() {
                chmod(&src, 0o600)?;
            } else if meta.file_type().is_socket() || is_device(&meta) {
                chmod(&src, 0o660)?;
            }
        }
        let at = disk_in_jail(dir, &disk.id);
        std::fs::create_dir_all(at.parent().unwrap_or(&dir.dir))?;
        if std::fs::symlink_metadata(&at).is_err() {
            if is_device(&meta) && meta.file_type().is_block_device() {
                // A node of the same kind, so drivers that look see a block device.
                let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
                // SAFETY: `c` is a NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK, meta.rdev()) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else {
                std::fs::File::create(&at)?;
                chmod(&at, 0o600)?;
            }
        }
        let mut binds = vec![Bind {
            src: src.clone(),
            dst: at,
            writable,
        }];
        if matches!(
            disk.source,
            DiskSource::File {
                format: crate::spec::DiskFormat::Qcow2,
                ..
            }
        ) {
            // The header of a writable image is the VMM's to rewrite: a backing file it
            // names is mounted only if any local user may read it anyway (a world-
            // readable regular file, not writable but by its owner), read-only.
            for b in plan::backing_chain(&src) {
                let Ok(real) = std::fs::canonicalize(&b) else { break };
                let ok = std::fs::metadata(&real)
                    .is_ok_and(|m| m.is_file() && m.mode() & 0o004 != 0 && m.mode() & 0o022 == 0);
                if !ok {
                    return Err(io::Error::other(format!(
                        "disk {:?}: its backing file {} is not a world-readable, read-only file",
                        disk.id,
                        b.display()
                    )));
                }
                binds.push(Bind {
                    src: real,
                    dst: b,
                    writable: false,
                });
            }
        }
        Ok(binds)
    }

    /// Gives TAP `name` to the VM's user, so the VMM attaches to it without
    /// `CAP_NET_ADMIN` (the kernel lets a TAP's owner open it).
    fn hand_over_tap(name: &str, multi_queue: bool, uid: u32, gid: u32) -> io::Result<()> {
        const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
        const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
        let tun = open_tap(name, multi_queue)?;
        use std::os::fd::AsRawFd;
        let fd = tun.as_raw_fd();
        // SAFETY: TUNSETOWNER and TUNSETGROUP take integers.
        unsafe {
            if libc::ioctl(fd, TUNSETOWNER, uid as libc::c_ulong) < 0
                || libc::ioctl(fd, TUNSETGROUP, gid as libc::c_ulong) < 0
            {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("handing TAP {name} over: {e}")));
            }
        }
        Ok(())
    }

    /// The descriptors a jailed QEMU gets for its NICs' TAPs (one per queue, from
    /// [`plan::FIRST_TAP_FD`] on, in the order of its NICs): the jailer opens them in
    /// the host's network namespace and then gives the VMM one of its own, empty.
    fn tap_fds(spec: &VmSpec) -> Vec<Vec<i32>> {
        let mut next = plan::FIRST_TAP_FD;
        spec.nics
            .iter()
            .map(|n| {
                let fds: Vec<i32> = (next..next + n.queue_pairs.max(1) as i32).collect();
                next += n.queue_pairs.max(1) as i32;
                fds
            })
            .collect()
    }

    /// Whether a VMM of this kind gets a network namespace of its own. QEMU takes its
    /// TAPs as descriptors (`-netdev tap,fd=`); Cloud Hypervisor's API takes them only
    /// with `SCM_RIGHTS`, which hearth's client does not send yet, so it opens them by
    /// name in the host's namespace.
    fn own_netns(kind: HypervisorKind) -> bool {
        kind == HypervisorKind::Qemu
    }

    /// Everything before a jailed VMM starts: the VM's user, the handover, its cgroup
    /// and the jailer's plan. Returns the spec as the VMM sees it. With jailing off,
    /// the spec unchanged.
    pub fn prepare(&self, dir: &VmDir, spec: &VmSpec, tcg: bool) -> io::Result<VmSpec> {
        if !self.config.enabled {
            let _ = std::fs::remove_file(Self::record_path(dir));
            let _ = std::fs::remove_file(Self::plan_path(dir));
            return Ok(spec.clone());
        }
        let _slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.slot(dir)?;
        let uid = self.config.uid_base + slot;
        let gid = uid;

        // The VM's directory: root's, group the VM's, sticky.
        chown(&dir.dir, 0, gid)?;
        chmod(&dir.dir, 0o1770)?;
        // The files the VMM writes itself (never followed if the last VMM left a link
        // in their place). Cloud Hypervisor's console log is vmm-manager's own.
        let mut own = vec![dir.vmm_log(), dir.events()];
        if spec.hypervisor == crate::spec::HypervisorKind::Qemu {
            own.push(dir.console_log());
        }
        for f in own {
            match std::fs::symlink_metadata(&f) {
                Ok(m) if m.is_file() => std::os::unix::fs::lchown(&f, Some(uid), Some(gid))?,
                Ok(_) => std::fs::remove_file(&f)?,
                Err(_) => {}
            }
        }
        let root = dir.dir.join("root");
        std::fs::create_dir_all(&root)?;
        let disks_dir = dir.dir.join("disks");
        std::fs::create_dir_all(&disks_dir)?;
        chmod(&disks_dir, 0o755)?;
        // Saved states: root's (the VMM may read them; only a Cloud Hypervisor saving
        // one gets that one's `vmm/` directory).
        let states = self.states_of(&spec.id);
        std::fs::create_dir_all(&states)?;
        chown(&states, 0, 0)?;
        chmod(&states, 0o755)?;

        let mut jp = JailPlan {
            uid,
            gid,
            groups: vec![],
            root,
            binds: vec![
                Bind {
                    src: dir.dir.clone(),
                    dst: dir.dir.clone(),
                    writable: true,
                },
                Bind {
                    src: states.clone(),
                    dst: states,
                    writable: true,
                },
            ],
            symlinks: vec![],
            devices: ["/dev/kvm", "/dev/net/tun"]
                .into_iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect(),
            cgroup_procs: vec![],
            workdir: dir.dir.clone(),
            env: self.config.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            net_namespace: false,
            taps: vec![],
        };
        plan::system(&mut jp);
        for file in std::iter::once(&spec.kernel).chain(spec.initramfs.as_ref()) {
            let src = std::fs::canonicalize(file)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
            jp.binds.push(Bind {
                src,
                dst: file.clone(),
                writable: false,
            });
        }
        for d in &spec.disks {
            jp.binds.extend(self.hand_over_disk(dir, d, uid, gid)?);
        }
        for n in &spec.nics {
            Self::hand_over_tap(&n.tap, n.queue_pairs > 1, uid, gid)?;
        }
        if Self::own_netns(spec.hypervisor) {
            jp.net_namespace = true;
            jp.taps = spec
                .nics
                .iter()
                .zip(Self::tap_fds(spec))
                .map(|(n, fds)| plan::PlanTap {
                    name: n.tap.clone(),
                    multi_queue: n.queue_pairs > 1,
                    fds,
                })
                .collect();
        }
        jp.order();

        let overhead = overhead_mib(spec.hypervisor, tcg);
        let most = spec.max_memory_mib.unwrap_or(spec.memory_mib).max(spec.memory_mib);
        let limits = Limits {
            memory_bytes: (most + overhead) << 20,
            cpu_weight: spec.limits.cpu_weight.unwrap_or(cgroup::DEFAULT_WEIGHT),
            cpu_limit: spec.limits.cpu_limit,
            io_weight: spec.limits.io_weight.unwrap_or(cgroup::DEFAULT_WEIGHT),
        };
        let cgroups = self.layout.dirs(&spec.id);
        cgroup::remove(&cgroups); // what a VMM killed with vmm-manager down left
        jp.cgroup_procs = self
            .layout
            .create(&spec.id, &limits)
            .map_err(|e| io::Error::new(e.kind(), format!("the VM's cgroup: {e}")))?;
        let info = JailInfo {
            uid,
            gid,
            cgroups,
            memory_limit_mib: self.layout.memory.is_some().then_some(most + overhead),
            memory_overhead_mib: overhead,
            cpu_weight: self.layout.cpu.is_some().then_some(limits.cpu_weight),
            cpu_limit: limits.cpu_limit.filter(|_| self.layout.cpu.is_some()),
            io_weight: self.layout.io.is_some().then_some(limits.io_weight),
        };
        VmDir::write_atomic(
            &Self::record_path(dir),
            &serde_json::to_vec_pretty(&JailRecord { slot, info }).map_err(io::Error::other)?,
        )?;
        VmDir::write_atomic(
            &Self::plan_path(dir),
            &serde_json::to_vec_pretty(&jp).map_err(io::Error::other)?,
        )?;
        Ok(self.view(dir, spec))
    }

    /// The command that starts `binary args` jailed (or plainly, with jailing off).
    pub fn command(&self, dir: &VmDir, binary: &Path, args: &[String]) -> Command {
        if !self.config.enabled {
            let mut c = Command::new(binary);
            c.args(args)
                .env_clear()
                .envs(base_env(&dir.dir))
                .envs(self.config.env.iter().cloned());
            return c;
        }
        let mut c = Command::new(&self.config.exe);
        c.arg(launch::JAIL_ARG)
            .arg(Self::plan_path(dir))
            .arg("--")
            .arg(binary)
            .args(args)
            .env_clear();
        c
    }

    /// The directory a Cloud Hypervisor writes a state it saves into (`dest`, just made
    /// by root). QEMU gets a descriptor instead and is handed nothing.
    pub fn hand_over_state_dir(&self, dir: &VmDir, kind: HypervisorKind, dest: &Path) -> io::Result<()> {
        if kind != HypervisorKind::CloudHypervisor {
            return Ok(());
        }
        let Some(r) = self.enabled().then(|| Self::read_record(dir)).flatten() else {
            return Ok(());
        };
        std::os::unix::fs::lchown(dest, Some(r.info.uid), Some(r.info.gid))
    }

    /// Hot-plug: hands `disk` over and mounts it into the running VMM's namespace.
    /// Returns the disk as the VMM sees it.
    pub async fn attach_disk(&self, dir: &VmDir, pid: u32, disk: &DiskSpec) -> io::Result<DiskSpec> {
        if !self.config.enabled {
            return Ok(disk.clone());
        }
        let r = Self::read_record(dir).ok_or_else(|| io::Error::other("the VM's jail record is missing"))?;
        let binds = self.hand_over_disk(dir, disk, r.info.uid, r.info.gid)?;
        for b in &binds {
            let mode = if b.writable { "rw" } else { "ro" };
            let args = [
                launch::BIND_ARG.as_ref(),
                b.src.as_os_str(),
                b.dst.as_os_str(),
                mode.as_ref(),
            ];
            self.namespace_helper(pid, &args)
                .await
                .map_err(|e| io::Error::other(format!("putting disk {:?} into the VM's jail: {e}", disk.id)))?;
        }
        Ok(self.disk_view(dir, disk))
    }

    /// After a hot-unplug: takes the disk out of the running VMM's namespace.
    pub async fn detach_disk(&self, dir: &VmDir, pid: u32, disk_id: &str) {
        if !self.config.enabled {
            return;
        }
        let at = disk_in_jail(dir, disk_id);
        // A vhost-user disk has its socket's directory mounted at `<id>.d` instead.
        let sockets = socket_dir_in_jail(&at);
        let mounted = if sockets.exists() { &sockets } else { &at };
        if let Err(e) = self
            .namespace_helper(pid, &[launch::UNBIND_ARG.as_ref(), mounted.as_os_str()])
            .await
        {
            tracing::warn!(disk = disk_id, "cannot take the disk out of the VM's jail: {e}");
        }
        let _ = std::fs::remove_file(&at);
        let _ = std::fs::remove_dir(&sockets);
    }

    /// Runs the jailer binary's namespace helper (`args[0]` names it) on process
    /// `pid`'s mount namespace; its error output becomes the error.
    async fn namespace_helper(&self, pid: u32, args: &[&std::ffi::OsStr]) -> io::Result<()> {
        let (helper, rest) = args.split_first().ok_or_else(|| io::Error::other("no helper named"))?;
        let out = tokio::process::Command::new(&self.config.exe)
            .arg(helper)
            .arg(pid.to_string())
            .args(rest)
            .output()
            .await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    }

    /// A disk leaving the VM (detached, or the VM deleted) goes back to root, as
    /// libvirt restores ownership: the next VM given this uid must not find it its own.
    pub fn give_back(&self, disk: &DiskSpec) {
        if !self.config.enabled {
            return;
        }
        let path = match &disk.source {
            DiskSource::File { path, .. } if !disk.readonly => path.clone(),
            DiskSource::File { .. } => return,
            DiskSource::VhostUser { socket } => match socket.parent() {
                Some(d) => d.to_path_buf(),
                None => return,
            },
        };
        if let Ok(p) = std::fs::canonicalize(&path) {
            if let Err(e) = chown(&p, 0, 0) {
                tracing::warn!(disk = %disk.id, "{e}");
            }
        }
    }

    /// After the VMM exited: removes its cgroup and the disks' mount points.
    pub fn release(&self, dir: &VmDir) {
        if let Some(r) = Self::read_record(dir) {
            cgroup::remove(&r.info.cgroups);
        }
        let _ = std::fs::remove_dir_all(dir.dir.join("disks"));
    }

    /// The peak memory use of the VM's cgroup, in bytes.
    pub fn memory_peak(&self, id: &str) -> Option<u64> {
        cgroup::memory_peak(&self.layout, id)
    }
}

/// What this host offers for jailing and what vmm-manager does with it (also for
/// `hearth doctor`, which runs without a daemon).
pub fn support(enabled: bool, cgroups: &CgroupSupport) -> JailSupport {
    let landlock_abi = landlock_abi();
    let seccomp = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").is_ok();
    let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    let summary = if !enabled {
        "INSECURE: jailing is turned off (--insecure-no-jail): VMMs run as root, unconfined and unlimited".to_string()
    } else {
        format!(
            "VMMs run as users of their own with no capabilities, in mount namespaces of their own; seccomp: {}; landlock for Cloud Hypervisor: {}; cgroups: {}",
            if seccomp { "yes" } else { "NO (the kernel lacks it)" },
            if landlock_abi > 0 { format!("yes (ABI {landlock_abi})") } else { "no (the kernel lacks it)".into() },
            cgroups.used.join(", ")
        )
    };
    JailSupport {
        enabled,
        cgroups: cgroups.clone(),
        user_namespaces,
        seccomp,
        landlock_abi,
        summary,
    }
}

fn is_device(m: &std::fs::Metadata) -> bool {
    m.file_type().is_block_device() || m.file_type().is_char_device()
}

/// The landlock ABI the kernel offers; 0 without landlock.
pub fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute and this flag the call only returns the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

/// The environment a VMM starts with (plus [`JailConfig::env`]).
pub fn base_env(home: &Path) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOME".into(), home.display().to_string()),
    ]
}

/// The jail's command-line settings, shared by vmm-manager and the all-in-one api.
#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// Run VMMs as root, unconfined and unlimited. INSECURE: a guest that escapes its
    /// VMM owns the host. Named as such in the log and in `/health/ready`.
    #[arg(long)]
    pub insecure_no_jail: bool,
    /// VM slot n runs as uid and gid BASE + n (a range no real user holds).
    #[arg(long, default_value_t = JailConfig::default().uid_base)]
    pub jail_uid_base: u32,
    /// The directory under this daemon's own cgroup that holds the VMs' cgroups.
    #[arg(long, default_value = "hearth-vms")]
    pub cgroup_name: String,
    /// An environment variable every VMM gets, KEY=VALUE (repeatable; VMMs otherwise
    /// start with only PATH, LANG and HOME).
    #[arg(long = "vmm-env", value_parser = parse_env)]
    pub vmm_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl JailArgs {
    pub fn config(&self) -> JailConfig {
        JailConfig {
            enabled: !self.insecure_no_jail,
            uid_base: self.jail_uid_base,
            cgroup_name: self.cgroup_name.clone(),
            env: self.vmm_env.clone(),
            ..JailConfig::default()
        }
    }
}

/// Opens TAP `name` (made by netd) as a queue: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as
/// QEMU opens one, with `IFF_MULTI_QUEUE` for a multi-queue TAP.
pub(crate) fn open_tap(name: &str, multi_queue: bool) -> io::Result<std::fs::File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("TAP name {name:?} is too long")));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    if multi_queue {
        req.flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: `req` is a valid ifreq for TUNSETIFF.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("opening TAP {name}: {e}")));
    }
    Ok(tun)
}
