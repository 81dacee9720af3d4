//! What the jailer builds for one VMM: written by vmm-manager (as root, into the VM's
//! directory, which the VMM cannot alter: sticky and root-owned), read by the jailer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A host file or directory mounted into the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// The host path (resolved: no symbolic links).
    pub src: PathBuf,
    /// Where the VMM sees it.
    pub dst: PathBuf,
    pub writable: bool,
}

/// Everything the jailer needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JailPlan {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups beyond `gid`.
    #[serde(default)]
    pub groups: Vec<u32>,
    /// An empty directory the jail's root (a tmpfs) is mounted on.
    pub root: PathBuf,
    /// Mounted in this order (parents before what lies inside them).
    pub binds: Vec<Bind>,
    /// Symbolic links made in the new root: (where, target).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// Host character devices re-created in the jail's `/dev`, owned by the VM's user.
    pub devices: Vec<PathBuf>,
    /// `cgroup.procs` files the jailer writes its PID into before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// The VMM's working directory (the VM's directory).
    pub workdir: PathBuf,
    /// `KEY=VALUE` the VMM gets beyond PATH, LANG and HOME.
    #[serde(default)]
    pub env: Vec<String>,
    /// A network namespace of its own (empty: not even the host's loopback), with
    /// its TAPs opened before, in the host's, as descriptors.
    #[serde(default)]
    pub net_namespace: bool,
    #[serde(default)]
    pub taps: Vec<PlanTap>,
}

/// The first descriptor number a jailed VMM's TAP queues get.
pub const FIRST_TAP_FD: i32 = 100;

/// A TAP the jailer opens for the VMM: one descriptor per queue, at these numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanTap {
    pub name: String,
    pub multi_queue: bool,
    pub fds: Vec<i32>,
}

impl JailPlan {
    /// Sorts binds so a directory is mounted before anything mounted inside it.
    pub fn order(&mut self) {
        self.binds.sort_by_key(|b| b.dst.components().count());
    }
}

/// The system directories a dynamically linked VMM needs, read-only: `/usr` (binaries,
/// libraries, QEMU's firmware and keymaps), the merged-`/usr` links or directories at
/// the top, and the dynamic loader's cache.
pub fn system(plan: &mut JailPlan) {
    plan.binds.push(Bind {
        src: "/usr".into(),
        dst: "/usr".into(),
        writable: false,
    });
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let p = Path::new(top);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(p) {
                    plan.symlinks.push((p.to_path_buf(), target));
                }
            }
            Ok(m) if m.is_dir() => plan.binds.push(Bind {
                src: p.to_path_buf(),
                dst: p.to_path_buf(),
                writable: false,
            }),
            _ => {}
        }
    }
    for etc in [
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/localtime",
    ] {
        if let Ok(src) = std::fs::canonicalize(etc) {
            plan.binds.push(Bind {
                src,
                dst: etc.into(),
                writable: false,
            });
        }
    }
}

/// The files a qcow2 image's backing chain names, oldest last (absolute names as
/// written; relative ones resolved against the directory of the image naming them).
pub fn backing_chain(image: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut current = image.to_path_buf();
    while out.len() < 16 {
        let Some(next) = qcow2_backing(&current) else { break };
        let next = if next.is_absolute() {
            next
        } else {
            current.parent().map(|d| d.join(&next)).unwrap_or(next)
        };
        out.push(next.clone());
        current = next;
    }
    out
}

/// The backing file named in a qcow2 header, if `path` is qcow2 and has one.
fn qcow2_backing(path: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[0..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(head[16..20].try_into().ok()?) as usize;
    if offset == 0 || size == 0 || size > 4096 {
        return None;
    }
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; size];
    f.read_exact(&mut name).ok()?;
    Some(PathBuf::from(String::from_utf8(name).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qcow2_chain_is_followed_to_its_base() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let base = tmp.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 65536])?;
        let mid = tmp.path().join("mid.qcow2");
        let top = tmp.path().join("top.qcow2");
        let img = |args: &[&str]| std::process::Command::new("qemu-img").args(args).status();
        assert!(img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &base.display().to_string(),
            &mid.display().to_string()
        ])?
        .success());
        // A relative backing name resolves against the image's own directory.
        assert!(img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            &top.display().to_string()
        ])?
        .success());
        assert_eq!(backing_chain(&top), vec![mid.clone(), base.clone()]);
        assert_eq!(backing_chain(&base), Vec::<PathBuf>::new());
        Ok(())
    }

    #[test]
    fn binds_are_ordered_parents_first() {
        let b = |d: &str| Bind {
            src: d.into(),
            dst: d.into(),
            writable: false,
        };
        let mut plan = JailPlan {
            uid: 1,
            gid: 1,
            groups: vec![],
            root: "/r".into(),
            binds: vec![b("/run/vm/disks/root"), b("/run/vm"), b("/usr")],
            symlinks: vec![],
            devices: vec![],
            cgroup_procs: vec![],
            workdir: "/run/vm".into(),
            env: vec![],
            net_namespace: false,
            taps: vec![],
        };
        plan.order();
        let order: Vec<_> = plan.binds.iter().map(|b| b.dst.display().to_string()).collect();
        assert_eq!(order, ["/usr", "/run/vm", "/run/vm/disks/root"]);
    }
}
