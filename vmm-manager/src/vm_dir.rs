//! A VM's state directory, `<run dir>/vms/<id>/`: everything needed to find and
//! re-adopt a running VMM after vmm-manager restarts.

use std::path::{Path, PathBuf};

use crate::spec::VmSpec;

/// Paths inside one VM's state directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub dir: PathBuf,
}

impl VmDir {
    pub fn new(run_dir: &Path, id: &str) -> Self {
        Self {
            dir: run_dir.join("vms").join(id),
        }
    }
    /// The spec the VM was created with.
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// PID of the running VMM; absent while stopped.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }
    /// Last status written by vmm-manager (what a restart reports for a stopped VM).
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    /// Cloud Hypervisor's `--api-socket`.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The guest's serial port, served by the VMM, connected to by vmm-manager.
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }
    /// Everything the guest printed on its serial port.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VMM's own log (Cloud Hypervisor `--log-file`) or stderr (QEMU).
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// The VMM's stdout and stderr.
    pub fn vmm_output(&self) -> PathBuf {
        self.dir.join("vmm.out")
    }
    /// Cloud Hypervisor's `--event-monitor` file.
    pub fn events(&self) -> PathBuf {
        self.dir.join("events.json")
    }
    /// QEMU's VNC server.
    pub fn vnc_socket(&self) -> PathBuf {
        self.dir.join("vnc.sock")
    }

    /// Marker that identifies this VM's VMM among processes: the directory path.
    pub fn marker(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn read_spec(&self) -> std::io::Result<VmSpec> {
        let bytes = std::fs::read(self.spec())?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid()).ok()?.trim().parse().ok()
    }

    /// Writes `bytes` to `path` atomically (temp file + rename), so a crash never
    /// leaves a torn spec or PID file.
    pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }

    /// Removes the sockets and files a VMM leaves behind when it exits.
    pub fn remove_runtime_files(&self) {
        for p in [
            self.pid(),
            self.api_socket(),
            self.dir.join("api.sock.lock"),
            self.qmp_socket(),
            self.serial_socket(),
            self.vnc_socket(),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }
}
