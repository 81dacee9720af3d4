//! The `Hypervisor` driver trait and its two drivers: Cloud Hypervisor
//! ([`cloud_hypervisor`]) and QEMU ([`qemu`]).
//!
//! A driver knows how to turn a [`VmSpec`] into a running VMM process and how to drive
//! that process's control API. Supervision (watching the PID, consoles, state) is the
//! same for both and lives in [`crate::service`].

pub mod ch_events;
pub mod cloud_hypervisor;
pub mod qemu;
pub mod qemu_resize;
pub mod qemu_state;
pub mod qmp;

use futures_util::future::BoxFuture;

use crate::process::ExitInfo;
use crate::spec::{HypervisorKind, VmSpec, VmState};
use crate::vm_dir::VmDir;

/// A failure talking to or starting a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{binary} is not installed or not executable ({reason})")]
    MissingBinary { binary: String, reason: String },
    #[error("the VMM failed to start: {0}")]
    Launch(String),
    #[error("the VMM refused {action}: {message}")]
    Refused { action: String, message: String },
    #[error("cannot reach the VMM's control socket: {0}")]
    Control(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// What `query` found a live VMM doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeState {
    Running,
    Paused,
    /// The VMM lives but its guest is not running (for example a failed boot).
    NotRunning,
}

/// How a VMM's exit is reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitVerdict {
    pub state: VmState,
    pub reason: String,
}

/// One VMM implementation.
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> HypervisorKind;

    /// Checks that the VMM binary can run at all.
    fn check_available(&self) -> Result<(), VmmError>;

    /// Starts a VMM for `spec` and boots the guest. Returns the VMM's PID once the
    /// guest is booting. On failure nothing is left running.
    fn launch<'a>(&'a self, dir: &'a VmDir, spec: &'a VmSpec) -> BoxFuture<'a, Result<u32, VmmError>>;

    /// Presses the ACPI power button: the guest should shut itself down.
    fn power_button<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Stops the VMM without the guest's cooperation.
    fn force_stop<'a>(&'a self, dir: &'a VmDir, pid: u32) -> BoxFuture<'a, Result<(), VmmError>>;

    fn reboot<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;
    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;
    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Asks a live VMM what its guest is doing.
    fn query<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<RuntimeState, VmmError>>;

    /// Decides how an exit is reported: stopped or failed, and why.
    fn classify_exit(&self, dir: &VmDir, exit: ExitInfo, stop_requested: bool) -> ExitVerdict;

    /// Hot-plugs `disk` into the running VM (`spec` already includes it).
    fn add_disk<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        disk: &'a crate::spec::DiskSpec,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Hot-unplugs a disk; returns once the guest has released it.
    fn remove_disk<'a>(&'a self, dir: &'a VmDir, disk_id: &'a str) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Tells the running VM that the file or device behind `disk` grew to `size` bytes,
    /// so the guest sees the new capacity. A vhost-user-blk disk's size is its
    /// backend's to announce: `Unsupported`.
    fn resize_disk<'a>(
        &'a self,
        dir: &'a VmDir,
        disk: &'a crate::spec::DiskSpec,
        size: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Gives the running VM `vcpus` and `memory_mib` (both within the limits of the
    /// spec it was started with). Growing is hot-plug; what the hypervisor cannot do
    /// while the guest runs is `Unsupported`, with the reason.
    fn resize<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        vcpus: u32,
        memory_mib: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Saves the paused VM's whole state (memory and devices) into the empty directory
    /// `dest`; the VM stays paused.
    fn save_state<'a>(&'a self, dir: &'a VmDir, dest: &'a std::path::Path) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Starts a new VMM that loads the state [`Hypervisor::save_state`] wrote into
    /// `src` for this VM (`spec`: its spec at that moment). Returns the VMM's PID once
    /// the state is loaded; the VM is then paused, as it was saved. On failure nothing
    /// is left running.
    fn launch_restore<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        src: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<u32, VmmError>>;

    /// True when the VMM writes the console log itself (QEMU's `logfile=`), false when
    /// vmm-manager must.
    fn writes_console_log(&self) -> bool;
}

/// The refusal to resize a vhost-user-blk disk through the VMM.
pub fn vhost_user_resize_unsupported(disk: &str) -> VmmError {
    VmmError::Unsupported(format!(
        "disk {disk:?} is a vhost-user-blk device: its size comes from the backend, which tells the VM itself (blockd sends a config-change message when it grows a volume)"
    ))
}

/// Checks that `binary` (a path, or a name looked up in `PATH`) exists and is executable.
pub fn find_binary(binary: &str) -> Result<std::path::PathBuf, VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<std::path::PathBuf> = if binary.contains('/') {
        vec![binary.into()]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(binary)).collect())
            .unwrap_or_default()
    };
    for c in &candidates {
        if let Ok(meta) = std::fs::metadata(c) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
        }
    }
    Err(VmmError::MissingBinary {
        binary: binary.to_string(),
        reason: if binary.contains('/') {
            "no such executable file".into()
        } else {
            "not found in PATH".into()
        },
    })
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = crate::console::read_tail(path, 8192).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until a Unix socket accepts connections, while the process `pid` lives.
/// (Liveness, not the command line: right after the fork the child still shows its
/// parent's.)
pub async fn wait_for_socket(path: &std::path::Path, pid: u32, timeout: std::time::Duration) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        if !crate::process::is_alive(pid) {
            return Err(VmmError::Launch("the VMM exited during start-up".into()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmmError::Launch(format!(
                "{} did not appear within {timeout:?}",
                path.display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
