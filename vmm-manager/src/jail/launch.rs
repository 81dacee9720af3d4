//! The jailer: the short-lived process between vmm-manager and a VMM, like
//! Firecracker's `jailer`. vmm-manager runs its own binary as
//! `<exe> __hearth-jail <plan.json> -- <vmm binary> <args...>`; still root, this
//! process joins the VM's cgroups, builds a mount namespace that holds only the VM's
//! own files, drops to the VM's user with no capabilities and `no_new_privs`, and execs
//! the VMM. It runs before any async runtime starts: `unshare(CLONE_NEWNS)` needs a
//! single-threaded process.
//!
//! The same binary also serves `__hearth-jail-bind` and `__hearth-jail-unbind`, which
//! put a file into (or take it out of) a running VMM's namespace for hot-plug.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::plan::{Bind, JailPlan};

/// The first argument that selects the jailer.
pub const JAIL_ARG: &str = "__hearth-jail";
pub const BIND_ARG: &str = "__hearth-jail-bind";
pub const UNBIND_ARG: &str = "__hearth-jail-unbind";
/// The jailer's exit status when it fails before the exec (the reason is on stderr).
pub const JAIL_FAILED: i32 = 125;

/// Runs the jailer or a namespace helper when the process was started as one; returns
/// otherwise. Call first thing in `main`, before any thread exists.
pub fn dispatch() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return;
    };
    let result = match first {
        JAIL_ARG => jail(&args[2..]),
        BIND_ARG if args.len() == 6 => bind_into(&args[2], Path::new(&args[3]), Path::new(&args[4]), &args[5] == "ro"),
        UNBIND_ARG if args.len() == 4 => unbind_in(&args[2], Path::new(&args[3])),
        _ => return,
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("hearth jail: {e}");
            std::process::exit(JAIL_FAILED);
        }
    }
}

fn cstr(p: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| io::Error::other("a path holds a NUL byte"))
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{}: {e}", what())));
    }
    Ok(())
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fs_c = fstype.map(CString::new).transpose().map_err(io::Error::other)?;
    let data_c = data.map(CString::new).transpose().map_err(io::Error::other)?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            dst_c.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr() as *const libc::c_void),
        )
    };
    check(rc, || {
        format!(
            "mounting {} on {}",
            src.map_or("-".into(), |s| s.display().to_string()),
            dst.display()
        )
    })
}

/// `path` inside the new root `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn mkdirs(p: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(p)
}

/// Creates what a bind mount of `src` lands on: a directory for a directory, an empty
/// file for anything else.
fn mount_point(src: &Path, at: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(at).is_ok() {
        return Ok(()); // made beforehand (a disk's placeholder in the VM's directory)
    }
    if let Some(parent) = at.parent() {
        mkdirs(parent)?;
    }
    if std::fs::metadata(src)?.is_dir() {
        mkdirs(at)
    } else {
        match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(at)
        {
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("creating {}: {e}", at.display()))),
        }
    }
}

fn bind(root: &Path, b: &Bind) -> io::Result<()> {
    let at = inside(root, &b.dst);
    mount_point(&b.src, &at)?;
    mount(Some(&b.src), &at, None, libc::MS_BIND | libc::MS_REC, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    let block_device =
        std::fs::metadata(&b.src).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    if !block_device {
        flags |= libc::MS_NODEV;
    }
    if !b.writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &at, None, flags, None)
}

fn mknod(path: &Path, mode: u32, dev: libc::dev_t, owner: Option<(u32, u32)>) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path.
    check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, dev) }, || {
        format!("creating {}", path.display())
    })?;
    // mknod's mode is masked by the umask; set it exactly.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The private `/dev`: the few nodes every VMM needs, and the host devices the plan
/// names, owned by the VM's user (kvm, net/tun).
fn make_dev(root: &Path, plan: &JailPlan) -> io::Result<()> {
    let dev = inside(root, Path::new("/dev"));
    mkdirs(&dev)?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    for (name, minor) in [("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)] {
        mknod(&dev.join(name), 0o666, libc::makedev(1, minor), None)?;
    }
    for d in &plan.devices {
        let at = inside(root, d);
        if let Some(parent) = at.parent() {
            mkdirs(parent)?;
        }
        let meta = std::fs::metadata(d)?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        mknod(&at, 0o600, rdev, Some((plan.uid, plan.gid)))?;
    }
    let pts = dev.join("pts");
    mkdirs(&pts)?;
    mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))?;
    let shm = dev.join("shm");
    mkdirs(&shm)?;
    mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&format!("mode=700,uid={},gid={},size=16m", plan.uid, plan.gid)),
    )?;
    Ok(())
}

fn jail(args: &[OsString]) -> io::Result<()> {
    let (plan_path, rest) = args.split_first().ok_or_else(|| io::Error::other("no plan given"))?;
    let rest = match rest.split_first() {
        Some((dd, rest)) if dd == "--" => rest,
        _ => return Err(io::Error::other("expected -- and the VMM's command line")),
    };
    let (binary, vmm_args) = rest
        .split_first()
        .ok_or_else(|| io::Error::other("no VMM binary given"))?;
    let plan: JailPlan = serde_json::from_slice(&std::fs::read(plan_path)?).map_err(io::Error::other)?;
    let binary = PathBuf::from(binary);

    // The cgroups first, so everything the VMM allocates is charged to the VM.
    let me = std::process::id().to_string();
    for procs in &plan.cgroup_procs {
        std::fs::write(procs, &me)
            .map_err(|e| io::Error::new(e.kind(), format!("joining {}: {e}", procs.display())))?;
    }

    if plan.net_namespace {
        // The TAPs first, in the host's network namespace, at the numbers the VMM's
        // command line names; then a namespace of its own with nothing in it.
        for tap in &plan.taps {
            for &fd in &tap.fds {
                let file = super::open_tap(&tap.name, tap.multi_queue)?;
                use std::os::fd::IntoRawFd;
                let raw = file.into_raw_fd();
                // SAFETY: plain descriptor calls; `raw` is ours and closed once moved.
                unsafe {
                    check(libc::dup2(raw, fd), || format!("dup2 of TAP {} to {fd}", tap.name))?;
                    libc::close(raw);
                    check(libc::fcntl(fd, libc::F_SETFD, 0), || {
                        "keeping a TAP open across exec".into()
                    })?;
                }
            }
        }
        // SAFETY: unshare takes flags only; the process is single-threaded here.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, || {
            "unshare(CLONE_NEWNET)".into()
        })?;
    }
    // SAFETY: unshare takes flags only; the process is single-threaded here.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }, || {
        "unshare(CLONE_NEWNS)".into()
    })?;
    // Nothing mounted here reaches the host, and nothing the host mounts later arrives.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;

    let root = &plan.root;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755,size=1m"),
    )?;
    for (at, target) in &plan.symlinks {
        let at = inside(root, at);
        if let Some(parent) = at.parent() {
            mkdirs(parent)?;
        }
        std::os::unix::fs::symlink(target, at)?;
    }
    // The private /dev, /proc and /tmp first: binds of host paths under them (a VM
    // directory under /tmp) land on top.
    make_dev(root, &plan)?;
    let proc_dir = inside(root, Path::new("/proc"));
    mkdirs(&proc_dir)?;
    // hidepid: the VMM sees only its own processes.
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("hidepid=2"),
    )?;
    let tmp = inside(root, Path::new("/tmp"));
    mkdirs(&tmp)?;
    mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!("mode=700,uid={},gid={},size=16m", plan.uid, plan.gid)),
    )?;

    let mut binds = plan.binds.clone();
    if !binds.iter().any(|b| binary.starts_with(&b.dst)) {
        binds.push(Bind {
            src: binary.clone(),
            dst: binary.clone(),
            writable: false,
        });
    }
    for b in &binds {
        bind(root, b).map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", b.src.display())))?;
    }
    // Enter the new root and drop the old one.
    let root_c = cstr(root)?;
    let dot = cstr(".")?;
    // SAFETY: NUL-terminated paths; pivot_root(".", ".") stacks the old root on the new.
    unsafe {
        check(libc::chdir(root_c.as_ptr()), || "chdir to the new root".into())?;
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
            || "pivot_root".into(),
        )?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), || {
            "detaching the old root".into()
        })?;
    }
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    let work = cstr(&plan.workdir)?;
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chdir(work.as_ptr()) }, || {
        format!("chdir {}", plan.workdir.display())
    })?;

    drop_privileges(&plan)?;

    let env: Vec<CString> = super::base_env(&plan.workdir)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(plan.env.iter().cloned())
        .map(cstr)
        .collect::<io::Result<_>>()?;
    let bin_c = cstr(&binary)?;
    let argv: Vec<CString> = std::iter::once(Ok(bin_c.clone()))
        .chain(vmm_args.iter().map(cstr))
        .collect::<io::Result<_>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: null-terminated arrays of NUL-terminated strings that live across the call.
    unsafe { libc::execve(bin_c.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    let e = io::Error::last_os_error();
    Err(io::Error::new(e.kind(), format!("exec {}: {e}", binary.display())))
}

/// The VM's user and group, no capabilities in any set (the bounding set too, so no
/// exec can regain them), `no_new_privs` and the baseline seccomp filter.
fn drop_privileges(plan: &JailPlan) -> io::Result<()> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // SAFETY: prctl and the set*id calls take integers and a pointer to `groups`, which
    // outlives the call.
    unsafe {
        for cap in 0..=last_cap {
            // EINVAL for capabilities this kernel does not know: nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ),
            || "clearing ambient capabilities".into(),
        )?;
        let groups: Vec<libc::gid_t> = std::iter::once(plan.gid).chain(plan.groups.iter().copied()).collect();
        check(libc::setgroups(groups.len(), groups.as_ptr()), || "setgroups".into())?;
        check(libc::setresgid(plan.gid, plan.gid, plan.gid), || "setresgid".into())?;
        // Leaving uid 0 clears the permitted and effective sets (no SECBIT_KEEP_CAPS).
        check(libc::setresuid(plan.uid, plan.uid, plan.uid), || "setresuid".into())?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), || {
            "no_new_privs".into()
        })?;
    }
    install_seccomp()
}

fn open_mnt_ns(pid: &OsStr) -> io::Result<std::fs::File> {
    let p = Path::new("/proc").join(pid).join("ns/mnt");
    std::fs::File::open(&p).map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", p.display())))
}

fn enter(ns: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns takes a descriptor and a flag; the process is single-threaded here.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) }, || {
        "setns".into()
    })
}

/// Mounts host file `src` at `dst` inside the mount namespace of process `pid`: the
/// tree is cloned here (`open_tree`), then attached there (`move_mount`).
fn bind_into(pid: &OsStr, src: &Path, dst: &Path, readonly: bool) -> io::Result<()> {
    let ns = open_mnt_ns(pid)?;
    let src_is_dir = std::fs::metadata(src)?.is_dir();
    let src_c = cstr(src)?;
    // SAFETY: NUL-terminated path; returns a new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src_c.as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint,
        )
    } as libc::c_int;
    check(tree, || format!("open_tree {}", src.display()))?;
    if readonly {
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let empty = cstr("")?;
        // SAFETY: `attr` and `empty` live across the call; the size is the struct's.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree,
                empty.as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        } as libc::c_int;
        check(rc, || "making the mount read-only".into())?;
    }
    enter(&ns)?;
    if !dst.exists() {
        if src_is_dir {
            mkdirs(dst)?;
        } else {
            std::fs::File::create(dst)
                .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dst.display())))?;
        }
    }
    let empty = cstr("")?;
    let dst_c = cstr(dst)?;
    // SAFETY: descriptors and NUL-terminated paths valid across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst_c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    } as libc::c_int;
    check(rc, || format!("attaching {} at {}", src.display(), dst.display()))
}

/// Detaches whatever is mounted at `dst` in the namespace of process `pid`.
fn unbind_in(pid: &OsStr, dst: &Path) -> io::Result<()> {
    let ns = open_mnt_ns(pid)?;
    enter(&ns)?;
    let c = cstr(dst)?;
    // SAFETY: NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        return Ok(()); // not a mount point: nothing to take out
    }
    check(rc, || format!("unmounting {}", dst.display()))
}

/// The system calls no VMM needs, refused (`EPERM`) by a seccomp filter the jailer
/// installs before the exec, under the VMM's own (QEMU's `-sandbox`, Cloud
/// Hypervisor's per-thread filters): loading kernel code, mounting or entering
/// namespaces, tracing other processes, changing identity, the clock or the host.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("unshare", libc::SYS_unshare),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("syslog", libc::SYS_syslog),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("uselib", libc::SYS_uselib),
    ("vhangup", libc::SYS_vhangup),
    ("setuid", libc::SYS_setuid),
    ("setgid", libc::SYS_setgid),
    ("setreuid", libc::SYS_setreuid),
    ("setregid", libc::SYS_setregid),
    ("setresuid", libc::SYS_setresuid),
    ("setresgid", libc::SYS_setresgid),
    ("setgroups", libc::SYS_setgroups),
    ("setfsuid", libc::SYS_setfsuid),
    ("setfsgid", libc::SYS_setfsgid),
    ("capset", libc::SYS_capset),
];

/// Installs the jail's baseline filter (after `no_new_privs`, which lets an
/// unprivileged process install one).
/// The x32 ABI's number for an x86-64 system call (same arch in the filter's check).
const X32: libc::c_long = 0x4000_0000;

fn install_seccomp() -> io::Result<()> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
        TargetArch,
    };
    let build = |e: seccompiler::BackendError| io::Error::other(format!("building the seccomp filter: {e}"));
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .flat_map(|(_, nr)| [(*nr, vec![]), (*nr | X32, vec![])])
        .collect();
    // clone with a namespace flag is unshare by another name.
    let ns_flags = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    let clone_rules = ns_flags
        .iter()
        .map(|f| {
            let flag = *f as u64;
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let denied = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    // clone3 hides its flags in memory a filter cannot read: ENOSYS, so the C
    // library falls back to clone (as container runtimes do).
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![]), (libc::SYS_clone3 | X32, vec![])]
            .into_iter()
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    for filter in [denied, clone3] {
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e| io::Error::other(format!("compiling the seccomp filter: {e}")))?;
        seccompiler::apply_filter(&program)
            .map_err(|e| io::Error::other(format!("installing the seccomp filter: {e}")))?;
    }
    Ok(())
}
