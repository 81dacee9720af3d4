//! VMM processes: spawned detached from vmm-manager (own process group, no parent-death
//! signal) so they outlive a daemon restart, identified again by PID plus command line
//! when re-adopted, and watched through a pidfd so an exit is noticed at once.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tokio::io::unix::AsyncFd;

/// How a VMM process ended, as far as vmm-manager could see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// The process was not our child (re-adopted after a restart): its status is gone.
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit status {c}"),
            ExitInfo::Signal(s) => write!(f, "killed by signal {s}"),
            ExitInfo::Unknown => f.write_str("exit status unknown"),
        }
    }
}

/// Spawns `cmd` detached: stdin from /dev/null, stdout and stderr appended to `output`,
/// in a process group of its own so signals aimed at vmm-manager's group miss it.
pub fn spawn_detached(cmd: &mut Command, output: &Path) -> io::Result<u32> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(output)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    let child = cmd.spawn()?;
    // Dropping a std Child neither kills nor waits: the watcher reaps it later.
    Ok(child.id())
}

/// Opens a pidfd for `pid`. Fails with ESRCH when the process is gone.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `pidfd` exits, then reaps it if it is our child.
pub async fn wait_exit(pidfd: OwnedFd) -> ExitInfo {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open and refers to
    // the same pidfd until the AsyncFd is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot watch pidfd: {e}");
            return ExitInfo::Unknown;
        }
    };
    loop {
        match fd.readable().await {
            Ok(mut guard) => {
                guard.clear_ready();
                if let Some(info) = try_reap(fd.get_ref()) {
                    return info;
                }
            }
            Err(_) => return ExitInfo::Unknown,
        }
    }
}

/// `Some` once the process has exited. Reaps children; for non-children the status is unknown.
fn try_reap(pidfd: &OwnedFd) -> Option<ExitInfo> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`, which lives for the whole call.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc < 0 {
        // ECHILD: not our child, and a readable pidfd means it has exited.
        return Some(ExitInfo::Unknown);
    }
    // SAFETY: waitid filled `info`; si_pid is zero when no child changed state (WNOHANG).
    let pid = unsafe { info.si_pid() };
    if pid == 0 {
        return None;
    }
    // SAFETY: as above, `info` was filled for an exited child.
    let status = unsafe { info.si_status() };
    Some(match info.si_code {
        libc::CLD_EXITED => ExitInfo::Code(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => ExitInfo::Signal(status),
        _ => ExitInfo::Unknown,
    })
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// True when `pid` is alive (not a zombie) and its command line mentions `marker`
/// (the VM's state directory), so a recycled PID is never mistaken for our VMM.
pub fn is_our_process(pid: u32, marker: &str) -> bool {
    if !is_alive(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(marker),
        Err(_) => false,
    }
}

/// A live process (not this one) whose command line mentions `marker`: a VMM started
/// by a vmm-manager that died before it could write the pid file.
pub fn find_by_marker(marker: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (pid != me && is_our_process(pid, marker)).then_some(pid)
    })
}

/// Sends `signal` to `pid`. A process that is already gone is not an error.
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    // SAFETY: kill only takes integers.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn exit_of_a_detached_child_is_seen_at_once_with_its_status() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("out.log");
        let pid = spawn_detached(Command::new("sh").args(["-c", "echo hello; sleep 0.2; exit 7"]), &out)?;
        let fd = pidfd_open(pid)?;
        let start = Instant::now();
        let info = tokio::time::timeout(Duration::from_secs(5), wait_exit(fd)).await;
        assert_eq!(info.ok(), Some(ExitInfo::Code(7)));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(std::fs::read_to_string(&out)?, "hello\n");
        // Reaped: no zombie left behind.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[tokio::test]
    async fn killed_child_reports_the_signal_and_recycled_pids_are_not_ours() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let marker = dir.path().display().to_string();
        let pid = spawn_detached(
            Command::new("sleep").arg("30").arg0("sleep").env("X", &marker),
            &dir.path().join("o"),
        )?;
        // Let the child get past exec, so /proc shows sleep's command line.
        std::thread::sleep(Duration::from_millis(100));
        // The marker is not on the command line, so this PID is not "our VMM".
        assert!(!is_our_process(pid, &marker));
        assert!(is_our_process(pid, "30"));
        let fd = pidfd_open(pid)?;
        signal(pid, libc::SIGKILL)?;
        let info = tokio::time::timeout(Duration::from_secs(5), wait_exit(fd)).await;
        assert_eq!(info.ok(), Some(ExitInfo::Signal(libc::SIGKILL)));
        assert!(!is_our_process(pid, "30"));
        // Signalling a gone process is fine.
        signal(pid, libc::SIGTERM)?;
        Ok(())
    }
}
