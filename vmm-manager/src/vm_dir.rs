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
    /// The guest agent's control channel (QEMU: a virtio-serial port's chardev; Cloud
    /// Hypervisor: its vsock device's socket).
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Marker that identifies this VM's VMM among processes: the directory path.
    pub fn marker(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn read_spec(&self) -> std::io::Result<VmSpec> {
        let bytes = read_trusted(&self.spec())?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn read_pid(&self) -> Option<u32> {
        String::from_utf8(read_trusted(&self.pid()).ok()?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Writes `bytes` to `path` atomically (a new temporary file under a random name,
    /// then a rename), so a crash never leaves a torn spec or PID file, and a jailed
    /// VMM, which may make files in its VM directory, cannot plant the temporary file.
    pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new().prefix(".hearth-").tempfile_in(dir)?;
        tmp.write_all(bytes)?;
        std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
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

/// Opens `path` without following a symbolic link and only if it is a regular file:
/// a jailed VMM may put links, FIFOs or sockets in its VM directory, which vmm-manager
/// (root) must never write through, read through or block on.
pub fn open_regular(path: &Path, options: &mut std::fs::OpenOptions) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

/// Reads a file vmm-manager wrote itself: a regular file owned by this process's user.
/// Anything else in its place (a VMM's planting) is refused.
pub fn read_trusted(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut f = open_regular(path, std::fs::OpenOptions::new().read(true))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if f.metadata()?.uid() != me {
        return Err(std::io::Error::other(format!(
            "{} is not vmm-manager's own file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_links_and_foreign_files_are_refused() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let d = VmDir {
            dir: tmp.path().to_path_buf(),
        };
        VmDir::write_atomic(&d.pid(), b"42")?;
        assert_eq!(d.read_pid(), Some(42));
        // A link where the pid file was: never followed.
        std::fs::remove_file(d.pid())?;
        std::fs::write(tmp.path().join("elsewhere"), b"7")?;
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), d.pid())?;
        assert_eq!(d.read_pid(), None);
        // The write replaces the link, and writes nothing through it.
        VmDir::write_atomic(&d.pid(), b"43")?;
        assert_eq!(std::fs::read(tmp.path().join("elsewhere"))?, b"7");
        assert_eq!(d.read_pid(), Some(43));
        // A file someone else owns is not vmm-manager's.
        std::fs::write(d.spec(), b"{}")?;
        std::os::unix::fs::chown(d.spec(), Some(1_900_000_123), None)?;
        assert!(d.read_spec().is_err());
        // A FIFO is refused at once instead of blocking.
        let fifo = std::ffi::CString::new(tmp.path().join("fifo").as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(open_regular(&tmp.path().join("fifo"), std::fs::OpenOptions::new().read(true)).is_err());
        Ok(())
    }
}
