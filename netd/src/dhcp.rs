//! DHCP for a network: one dnsmasq per bridge, started and supervised by netd, serving
//! only IPAM's MAC-to-IP reservations (`static` range, so it never invents an address).
//! Reservations live in a hosts file that dnsmasq re-reads on SIGHUP.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::watch;

/// A supervised dnsmasq serving one bridge.
pub struct Dnsmasq {
    dir: PathBuf,
    stop: watch::Sender<bool>,
    pid: watch::Receiver<Option<u32>>,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Where a network's DHCP files live.
pub fn hosts_file(dir: &Path) -> PathBuf {
    dir.join("dhcp-hosts")
}

/// Writes the reservations (`mac,ip` lines) atomically.
pub fn write_hosts(dir: &Path, reservations: &[(String, Ipv4Addr)]) -> std::io::Result<()> {
    let mut text = String::new();
    for (mac, ip) in reservations {
        text.push_str(&format!("{mac},{ip}\n"));
    }
    let tmp = dir.join("dhcp-hosts.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, hosts_file(dir))
}

/// dnsmasq's argument vector for a bridge.
pub fn dnsmasq_args(dir: &Path, bridge: &str, subnet: Ipv4Net, gateway: Ipv4Addr) -> Vec<String> {
    vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        // DHCP only: DNS for VMs is not netd's job (yet).
        "--port=0".into(),
        "--bind-interfaces".into(),
        format!("--interface={bridge}"),
        "--except-interface=lo".into(),
        format!("--dhcp-range={},static,{},12h", subnet.network(), subnet.netmask()),
        format!("--dhcp-hostsfile={}", hosts_file(dir).display()),
        format!("--dhcp-leasefile={}", dir.join("dhcp-leases").display()),
        format!("--dhcp-option=option:router,{gateway}"),
        "--dhcp-authoritative".into(),
        format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        format!("--log-facility={}", dir.join("dnsmasq.log").display()),
        "--user=root".into(),
        "--group=root".into(),
    ]
}

impl Dnsmasq {
    /// Starts dnsmasq for `bridge` and keeps it running: when it exits it is restarted
    /// (after a second, so a persistent failure does not spin).
    pub fn start(binary: &str, dir: &Path, bridge: &str, subnet: Ipv4Net, gateway: Ipv4Addr) -> Self {
        stop_stale(dir);
        let args = dnsmasq_args(dir, bridge, subnet, gateway);
        let (stop, mut stop_rx) = watch::channel(false);
        let (pid_tx, pid) = watch::channel(None);
        let binary = binary.to_string();
        let dir2 = dir.to_path_buf();
        tokio::spawn(async move {
            loop {
                let child = tokio::process::Command::new(&binary)
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn();
                let mut child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(dir = %dir2.display(), "cannot start dnsmasq ({binary}): {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = stopped(&mut stop_rx) => return,
                        }
                    }
                };
                let _ = pid_tx.send(child.id());
                tokio::select! {
                    status = child.wait() => {
                        let _ = pid_tx.send(None);
                        tracing::warn!(dir = %dir2.display(), "dnsmasq exited ({status:?}); restarting");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stopped(&mut stop_rx) => return,
                        }
                    }
                    _ = stopped(&mut stop_rx) => {
                        let _ = child.kill().await;
                        let _ = pid_tx.send(None);
                        return;
                    }
                }
            }
        });
        Self {
            dir: dir.to_path_buf(),
            stop,
            pid,
        }
    }

    /// The running dnsmasq's PID, if it runs.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.borrow()
    }

    /// Tells dnsmasq to re-read the reservations.
    pub fn reload(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill only takes integers; the PID is our running child.
            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Resolves once `rx` says stop (the borrowed value is dropped inside, keeping the
/// future `Send`).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A dnsmasq left by a netd that died (its children outlive it when it is killed):
/// stop it, so the new one can bind the bridge.
fn stop_stale(dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(dir.join("dnsmasq.pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else { return };
    let marker = dir.display().to_string();
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&marker))
        .unwrap_or(false);
    if ours {
        // SAFETY: kill only takes integers; the process was checked to be our dnsmasq.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..50 {
            if !running(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops the dnsmasq processes a netd before this one started for networks under
/// `networks_dir` that no longer exist (a netd killed half way through deleting one,
/// after its directory went): found by the `--pid-file=<networks dir>/<name>/…` on
/// their command line.
pub fn stop_orphans(networks_dir: &Path) {
    let prefix = format!("--pid-file={}/", networks_dir.display());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(pid_file) = args.iter().find_map(|a| a.strip_prefix(&prefix)) else {
            continue;
        };
        let network_dir = networks_dir.join(pid_file.split('/').next().unwrap_or_default());
        if !network_dir.join("spec.json").exists() && running(pid) {
            tracing::warn!(pid, dir = %network_dir.display(), "stopping a dnsmasq whose network is gone");
            // SAFETY: kill only takes integers; the process serves a network of ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

/// Whether `pid` is a live process. A dnsmasq left by a netd that was killed belongs to
/// whoever adopted it; until that process reaps it, it stays a zombie: exited.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}
