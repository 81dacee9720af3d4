//! The QEMU driver.
//!
//! One `qemu-system-x86_64` per VM, `q35` by default (`microvm` on request), direct
//! kernel boot, serial on a chardev socket whose `logfile` keeps what the guest prints
//! even while vmm-manager is away, QMP on a socket for lifecycle, VNC on a Unix socket
//! when the VM has a display. The accelerator is `kvm` only where KVM really runs a
//! guest: with `accel = auto` a probe boots the VM's kernel under KVM once and falls
//! back to TCG when it does not get through (see TEST-MACHINES.md: a present
//! `/dev/kvm` may still be unable to run stock kernels).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::OnceCell;

use super::{
    find_binary, log_tail, qmp, vhost_user_resize_unsupported, wait_for_socket, ExitVerdict, Hypervisor, RuntimeState,
    VmmError,
};
use crate::jail::Jailer;
use crate::process::{self, ExitInfo};
use crate::spec::{DiskFormat, DiskSource, DiskSpec, HypervisorKind, QemuMachine, VmSpec, VmState};
use crate::vm_dir::VmDir;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe boot under KVM succeeds, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            o => Err(format!("unknown accelerator {o:?}: use auto, kvm or tcg")),
        }
    }
}

/// Whether KVM can run a stock Linux guest here (`POST /host/kvm`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvmVerdict {
    pub usable: bool,
    /// How it was decided.
    pub how: String,
}

/// The QEMU driver.
pub struct QemuDriver {
    binary: String,
    accel: Accel,
    probe_dir: PathBuf,
    kvm_verdict: OnceCell<bool>,
    jail: Arc<Jailer>,
}

/// How long the KVM probe may take before KVM is declared unusable.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(8);

impl QemuDriver {
    pub fn new(binary: impl Into<String>, accel: Accel, probe_dir: PathBuf, jail: Arc<Jailer>) -> Self {
        Self {
            binary: binary.into(),
            accel,
            probe_dir,
            kvm_verdict: OnceCell::new(),
            jail,
        }
    }

    /// Jails a QEMU about to start (its user, files, cgroup) and gives the spec as it
    /// sees it, plus the seccomp sandbox options jailing adds to its command line.
    fn jailed(&self, dir: &VmDir, spec: &VmSpec, kvm: bool) -> Result<(VmSpec, Vec<String>), VmmError> {
        let view = self
            .jail
            .prepare(dir, spec, !kvm)
            .map_err(|e| VmmError::Launch(format!("cannot jail the VMM: {e}")))?;
        let sandbox = if self.jail.enabled() {
            // Every deny option: nothing hearth uses needs the obsolete calls, set*id,
            // fork/exec (states are saved to a file QEMU opens itself) or affinity and
            // scheduler changes.
            vec![
                "-sandbox".to_string(),
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".to_string(),
            ]
        } else {
            vec![]
        };
        Ok((view, sandbox))
    }

    /// Whether KVM runs a stock Linux guest on this host, and how that was decided:
    /// the operator's `--accel`, or (auto) one probe boot of `kernel`, made once and
    /// shared with every later VM.
    pub async fn kvm_verdict(&self, kernel: &Path) -> KvmVerdict {
        let usable = self.use_kvm(kernel).await;
        let how = match (self.accel, usable) {
            (Accel::Kvm, _) => "QEMU's accelerator is set to kvm".to_string(),
            (Accel::Tcg, _) => "QEMU's accelerator is set to tcg".to_string(),
            (Accel::Auto, true) => "a Linux kernel booted under KVM".to_string(),
            (Accel::Auto, false) => {
                "a Linux kernel did not boot under KVM (no /dev/kvm, or nested or paravirtual KVM)".to_string()
            }
        };
        KvmVerdict { usable, how }
    }

    /// Decides whether this VM runs under KVM.
    async fn use_kvm(&self, kernel: &Path) -> bool {
        match self.accel {
            Accel::Kvm => true,
            Accel::Tcg => false,
            Accel::Auto => {
                *self
                    .kvm_verdict
                    .get_or_init(|| probe_kvm(&self.binary, kernel, &self.probe_dir))
                    .await
            }
        }
    }
}

/// Boots `kernel` under KVM without a root filesystem: a kernel that gets as far as
/// "VFS: Unable to mount root fs" ran its whole boot under KVM, so KVM works.
pub async fn probe_kvm(binary: &str, kernel: &Path, probe_dir: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let _ = std::fs::create_dir_all(probe_dir);
    let log = probe_dir.join("kvm-probe.log");
    let _ = std::fs::remove_file(&log);
    let child = tokio::process::Command::new(binary)
        .args(["-accel", "kvm", "-cpu", "host", "-M", "q35", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = tokio::time::Instant::now() + KVM_PROBE_TIMEOUT;
    let ok = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("VFS: Unable to mount root fs") {
            break true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) || tokio::time::Instant::now() >= deadline {
            // Exited before the kernel finished booting (QEMU abort) or hung.
            break std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("VFS: Unable to mount root fs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill().await;
    let verdict = json!({"kvm_usable": ok, "kernel": kernel, "at_ms": crate::spec::now_ms()});
    let _ = std::fs::write(probe_dir.join("kvm-probe.json"), verdict.to_string());
    tracing::info!(kvm_usable = ok, "KVM probe finished");
    ok
}

/// The two block nodes of a disk backed by a file or a block device: the protocol
/// node, which opens `path`, and the format node the guest's device uses. A block
/// device (an LVM volume, a loop device) needs QEMU's `host_device` driver: `file`
/// refuses anything but a regular file. Writable disks pass the guest's discards
/// down (`discard=unmap`), so a trim in the guest gives the space back to a sparse
/// file, a qcow2 overlay or a thin pool.
fn file_blockdevs(id: &str, path: &Path, format: DiskFormat, readonly: bool) -> [serde_json::Value; 2] {
    use std::os::unix::fs::FileTypeExt;
    let block_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let discard = if readonly { "ignore" } else { "unmap" };
    let protocol = json!({
        "driver": if block_device { "host_device" } else { "file" },
        "node-name": format!("{id}-file"),
        "filename": path,
        "cache": {"direct": false},
        "read-only": readonly,
        "discard": discard,
    });
    let format = json!({
        "driver": match format { DiskFormat::Raw => "raw", DiskFormat::Qcow2 => "qcow2" },
        "node-name": id,
        "file": format!("{id}-file"),
        "read-only": readonly,
        "discard": discard,
    });
    [protocol, format]
}

/// QEMU's option syntax treats ',' as a separator; a literal comma is doubled.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The host TSC frequency in kHz, which `microvm` guests need under TCG.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Builds QEMU's argument vector for `spec`.
pub fn qemu_args(spec: &VmSpec, dir: &VmDir, kvm: bool, tsc_khz: Option<u64>) -> Vec<String> {
    let microvm = spec.qemu.machine == QemuMachine::Microvm;
    let bus = if microvm { "device" } else { "pci" };
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", spec.name.replace(',', "_")),
    ]);
    push(&["-machine", if microvm { "microvm" } else { "q35" }]);
    // Under TCG the translation cache is capped, so the VMM's memory (and the cgroup
    // limit sized from it) has a known ceiling.
    let tcg = format!("tcg,tb-size={}", crate::jail::TCG_TB_MIB);
    push(&["-accel", if kvm { "kvm" } else { &tcg }]);
    push(&["-cpu", if kvm { "host" } else { "max" }]);
    let [smp, mem] = super::qemu_resize::smp_and_memory_args(spec);
    push(&["-smp", &smp]);
    push(&["-m", &mem]);
    if spec.needs_shared_memory() || !microvm {
        // vhost-user backends map guest memory: it must be a shareable memfd. q35 VMs
        // always get one, so a vhost-user disk can be hot-plugged later.
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib),
            "-numa",
            "node,memdev=mem",
        ]);
    }
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-kernel", &spec.kernel.display().to_string()]);
    if let Some(initrd) = &spec.initramfs {
        push(&["-initrd", &initrd.display().to_string()]);
    }
    let mut cmdline = spec.cmdline.clone();
    if microvm && !kvm {
        if let Some(khz) = tsc_khz {
            if !cmdline.contains("tsc_early_khz=") {
                cmdline = format!("{cmdline} tsc_early_khz={khz}").trim().to_string();
            }
        }
    }
    push(&["-append", &cmdline]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            opt_path(&dir.serial_socket()),
            opt_path(&dir.console_log())
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_path(&dir.qmp_socket())),
    ]);
    if spec.qemu.vnc {
        push(&[
            "-vnc",
            &format!("unix:{}", opt_path(&dir.vnc_socket())),
            "-device",
            "VGA",
        ]);
    }
    if spec.agent_channel {
        push(&[
            "-device",
            &format!("virtio-serial-{bus},id=agent-serial"),
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt_path(&dir.agent_socket())
            ),
            "-device",
            &format!(
                "virtserialport,bus=agent-serial.0,chardev=agent,name={}",
                crate::spec::AGENT_SERIAL_PORT
            ),
        ]);
    }
    if !microvm {
        // q35's root bus cannot hot-plug: disks attached later go into these ports.
        for i in 0..HOTPLUG_PORTS {
            push(&["-device", &format!("pcie-root-port,id=hp{i},chassis={}", i + 1)]);
        }
    }
    for d in &spec.disks {
        match &d.source {
            DiskSource::File { path, format } => {
                let [protocol, format] = file_blockdevs(&d.id, path, *format, d.readonly);
                push(&[
                    "-blockdev",
                    &protocol.to_string(),
                    "-blockdev",
                    &format.to_string(),
                    "-device",
                    &format!("virtio-blk-{bus},drive={id},id={id}", id = d.id),
                ]);
            }
            DiskSource::VhostUser { socket } => {
                push(&[
                    "-chardev",
                    // reconnect: when blockd restarts, QEMU dials the socket again.
                    &format!("socket,id={}-chr,path={},reconnect=1", d.id, opt_path(socket)),
                    "-device",
                    &format!("vhost-user-blk-{bus},chardev={id}-chr,id={id}", id = d.id),
                ]);
            }
        }
    }
    for n in &spec.nics {
        let mq = n.queue_pairs > 1;
        let netdev = match n.fds.as_slice() {
            // Opened by the jailer (QEMU has no network namespace of the host's).
            [fd] => format!("tap,id={},fd={fd},vhost=off", n.id),
            [_, ..] => {
                let fds: Vec<String> = n.fds.iter().map(i32::to_string).collect();
                format!("tap,id={},fds={},vhost=off", n.id, fds.join(":"))
            }
            [] => format!(
                "tap,id={id},ifname={},script=no,downscript=no,vhost=off{q}",
                n.tap,
                id = n.id,
                q = if mq {
                    format!(",queues={}", n.queue_pairs)
                } else {
                    String::new()
                }
            ),
        };
        push(&[
            "-netdev",
            &netdev,
            "-device",
            &format!(
                "virtio-net-{bus},netdev={id},id={id}-dev,mac={}{mq}",
                n.mac,
                id = n.id,
                mq = if mq && !microvm {
                    format!(",mq=on,vectors={}", 2 * n.queue_pairs + 2)
                } else {
                    String::new()
                }
            ),
        ]);
    }
    a
}

/// Starts QEMU with `args` and returns its PID once its QMP socket answers and `ready`
/// (what the caller waits for then) succeeded; on failure nothing is left running.
async fn spawn_qemu(
    mut cmd: Command,
    dir: &VmDir,
    ready: impl std::future::Future<Output = Result<(), VmmError>>,
) -> Result<u32, VmmError> {
    dir.remove_runtime_files();
    let pid = process::spawn_detached(cmd.current_dir(&dir.dir), &dir.vmm_output())?;
    let started = async {
        wait_for_socket(&dir.qmp_socket(), pid, Duration::from_secs(15)).await?;
        ready.await
    }
    .await;
    match started {
        Ok(()) => Ok(pid),
        Err(e) => {
            kill_and_reap(pid).await;
            dir.remove_runtime_files();
            Err(launch_error(e, &dir.vmm_output()))
        }
    }
}

impl Hypervisor for QemuDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn check_available(&self) -> Result<(), VmmError> {
        find_binary(&self.binary).map(|_| ())
    }

    fn launch<'a>(&'a self, dir: &'a VmDir, spec: &'a VmSpec) -> BoxFuture<'a, Result<u32, VmmError>> {
        Box::pin(async move {
            let binary = find_binary(&self.binary)?;
            let kvm = self.use_kvm(&spec.kernel).await;
            let (view, sandbox) = self.jailed(dir, spec, kvm)?;
            let mut args = qemu_args(&view, dir, kvm, host_tsc_khz());
            args.extend(sandbox);
            spawn_qemu(self.jail.command(dir, &binary, &args), dir, async {
                qmp::execute(&dir.qmp_socket(), "query-status", None).await.map(|_| ())
            })
            .await
        })
    }

    fn power_button<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            qmp::execute(&dir.qmp_socket(), "system_powerdown", None)
                .await
                .map(|_| ())
        })
    }

    fn force_stop<'a>(&'a self, dir: &'a VmDir, pid: u32) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            if qmp::execute(&dir.qmp_socket(), "quit", None).await.is_err() {
                process::signal(pid, libc::SIGTERM)?;
            }
            Ok(())
        })
    }

    fn reboot<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { qmp::execute(&dir.qmp_socket(), "system_reset", None).await.map(|_| ()) })
    }

    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { qmp::execute(&dir.qmp_socket(), "stop", None).await.map(|_| ()) })
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { qmp::execute(&dir.qmp_socket(), "cont", None).await.map(|_| ()) })
    }

    fn query<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<RuntimeState, VmmError>> {
        Box::pin(async move {
            let status = qmp::execute(&dir.qmp_socket(), "query-status", None).await?;
            Ok(match status.get("status").and_then(|s| s.as_str()) {
                Some("running") => RuntimeState::Running,
                Some("paused") | Some("suspended") => RuntimeState::Paused,
                _ => RuntimeState::NotRunning,
            })
        })
    }

    fn classify_exit(&self, dir: &VmDir, exit: ExitInfo, stop_requested: bool) -> ExitVerdict {
        let stopped = |reason: &str| ExitVerdict {
            state: VmState::Stopped,
            reason: reason.to_string(),
        };
        match exit {
            _ if stop_requested => stopped("stopped on request"),
            ExitInfo::Code(0) => stopped("the guest powered off"),
            ExitInfo::Unknown => {
                // Re-adopted process: QEMU writes a reason to stderr when it fails.
                let tail = log_tail(&dir.vmm_output(), 3);
                if tail.contains("qemu-system") {
                    ExitVerdict {
                        state: VmState::Failed,
                        reason: format!("QEMU exited: {tail}"),
                    }
                } else {
                    stopped("the guest powered off")
                }
            }
            other => ExitVerdict {
                state: VmState::Failed,
                reason: format!("QEMU exited with {other}: {}", log_tail(&dir.vmm_output(), 3)),
            },
        }
    }

    fn add_disk<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        disk: &'a DiskSpec,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            if spec.qemu.machine == QemuMachine::Microvm {
                return Err(VmmError::Unsupported(
                    "a microvm machine has no hot-plug; stop the VM to attach the disk".into(),
                ));
            }
            let qmp_socket = dir.qmp_socket();
            let pci = qmp::execute(&qmp_socket, "query-pci", None).await?;
            let ports = free_hotplug_ports(&pci);
            let id = &disk.id;
            let (backend_cleanup, device) = match &disk.source {
                DiskSource::File { path, format } => {
                    let [protocol, format] = file_blockdevs(id, path, *format, disk.readonly);
                    qmp::execute(&qmp_socket, "blockdev-add", Some(protocol)).await?;
                    let added = qmp::execute(&qmp_socket, "blockdev-add", Some(format)).await;
                    if let Err(e) = added {
                        let _ = qmp::execute(
                            &qmp_socket,
                            "blockdev-del",
                            Some(json!({"node-name": format!("{id}-file")})),
                        )
                        .await;
                        return Err(e);
                    }
                    (
                        vec![
                            ("blockdev-del", json!({"node-name": id})),
                            ("blockdev-del", json!({"node-name": format!("{id}-file")})),
                        ],
                        json!({"driver": "virtio-blk-pci", "id": id, "drive": id}),
                    )
                }
                DiskSource::VhostUser { socket } => {
                    qmp::execute(
                        &qmp_socket,
                        "chardev-add",
                        Some(
                            json!({"id": format!("{id}-chr"), "backend": {"type": "socket", "data": {
                                "addr": {"type": "unix", "data": {"path": socket}},
                                "server": false,
                                "reconnect": 1
                            }}}),
                        ),
                    )
                    .await?;
                    (
                        vec![("chardev-remove", json!({"id": format!("{id}-chr")}))],
                        json!({"driver": "vhost-user-blk-pci", "id": id, "chardev": format!("{id}-chr")}),
                    )
                }
            };
            let mut last = VmmError::Unsupported(format!(
                "all {HOTPLUG_PORTS} hot-plug ports are taken; stop the VM to attach more disks"
            ));
            for port in ports {
                let mut dev = device.clone();
                dev["bus"] = json!(port);
                match qmp::execute(&qmp_socket, "device_add", Some(dev)).await {
                    Ok(_) => return Ok(()),
                    Err(VmmError::Refused { message, .. })
                        if message.contains("occupied") || message.contains("in use") =>
                    {
                        last = VmmError::Unsupported(format!("no free hot-plug port ({message})"));
                    }
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
            }
            for (cmd, args) in backend_cleanup {
                let _ = qmp::execute(&qmp_socket, cmd, Some(args)).await;
            }
            Err(last)
        })
    }

    fn remove_disk<'a>(&'a self, dir: &'a VmDir, disk_id: &'a str) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let qmp_socket = dir.qmp_socket();
            let pci = qmp::execute(&qmp_socket, "query-pci", None).await?;
            if pci_has_device(&pci, disk_id) {
                match qmp::execute(&qmp_socket, "device_del", Some(json!({"id": disk_id}))).await {
                    Ok(_) => {}
                    // A disk the VM was started with sits on q35's root bus, which has no
                    // hot-plug: the request conflicts with the running VM (a 409, not a
                    // VMM fault). Detached while the VM is stopped, it goes.
                    Err(VmmError::Refused { message, .. }) if message.contains("does not support hotplugging") => {
                        return Err(VmmError::Unsupported(format!(
                            "disk {disk_id} was attached when the VM started and QEMU cannot unplug it from a running VM ({message}); stop the VM, then detach it"
                        )));
                    }
                    Err(e) => return Err(e),
                }
                // The device goes once the guest acknowledges the unplug.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let pci = qmp::execute(&qmp_socket, "query-pci", None).await?;
                    if !pci_has_device(&pci, disk_id) {
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(VmmError::Refused {
                            action: "device_del".into(),
                            message: format!("the guest did not release disk {disk_id} within 20 s"),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // Whatever backend the disk had; the ones it did not have answer "not found".
            // The device leaves query-pci before QEMU has let go of its backend: until
            // then the backend is "busy" and is asked again (a chardev left behind would
            // refuse the next disk of the same id).
            let mut left = vec![
                ("blockdev-del", json!({"node-name": disk_id})),
                ("blockdev-del", json!({"node-name": format!("{disk_id}-file")})),
                ("chardev-remove", json!({"id": format!("{disk_id}-chr")})),
            ];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let mut busy = Vec::new();
                for (cmd, args) in left {
                    match qmp::execute(&qmp_socket, cmd, Some(args.clone())).await {
                        Err(VmmError::Refused { message, .. })
                            if message.contains("busy") || message.contains("in use") =>
                        {
                            busy.push((cmd, args))
                        }
                        _ => {}
                    }
                }
                if busy.is_empty() {
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(VmmError::Refused {
                        action: busy[0].0.into(),
                        message: format!("QEMU still holds the backend of disk {disk_id} after 10 s"),
                    });
                }
                left = busy;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn resize<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        vcpus: u32,
        memory_mib: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(super::qemu_resize::resize(dir, spec, vcpus, memory_mib))
    }

    fn save_state<'a>(&'a self, dir: &'a VmDir, dest: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(super::qemu_state::save(dir, dest))
    }

    fn launch_restore<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        src: &'a Path,
    ) -> BoxFuture<'a, Result<u32, VmmError>> {
        Box::pin(async move {
            let binary = find_binary(&self.binary)?;
            let topology = super::qemu_state::read_topology(src)?;
            let (view, sandbox) = self.jailed(dir, spec, topology.kvm)?;
            let mut args = super::qemu_state::restore_args(&view, dir, &topology, host_tsc_khz());
            args.extend(sandbox);
            spawn_qemu(
                self.jail.command(dir, &binary, &args),
                dir,
                super::qemu_state::load(dir, src),
            )
            .await
        })
    }

    fn resize_disk<'a>(&'a self, dir: &'a VmDir, disk: &'a DiskSpec, size: u64) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            match &disk.source {
                // On the format node: QEMU takes the file (or device, which must already
                // be that large) to the size and raises the guest's config interrupt.
                DiskSource::File { .. } => qmp::execute(
                    &dir.qmp_socket(),
                    "block_resize",
                    Some(json!({"node-name": disk.id, "size": size})),
                )
                .await
                .map(|_| ()),
                DiskSource::VhostUser { .. } => Err(vhost_user_resize_unsupported(&disk.id)),
            }
        })
    }

    fn writes_console_log(&self) -> bool {
        true
    }
}

/// PCIe root ports a q35 VM gets for hot-plugged disks.
pub const HOTPLUG_PORTS: usize = 4;

/// The root ports (`hpN`) `query-pci` shows no device behind, in order. A port whose
/// bus the guest has not numbered yet shows no devices even when it has one, so the
/// caller tries the next port when QEMU says a slot is taken.
fn free_hotplug_ports(pci: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for bus in pci.as_array().into_iter().flatten() {
        for dev in bus.get("devices").and_then(|d| d.as_array()).into_iter().flatten() {
            let Some(id) = dev.get("qdev_id").and_then(|v| v.as_str()) else {
                continue;
            };
            if !id.starts_with("hp") {
                continue;
            }
            let empty = dev
                .pointer("/pci_bridge/devices")
                .and_then(|d| d.as_array())
                .is_none_or(|d| d.is_empty());
            if empty {
                out.push(id.to_string());
            }
        }
    }
    out
}

/// True when `query-pci` still lists a device with this id.
fn pci_has_device(pci: &serde_json::Value, id: &str) -> bool {
    fn walk(v: &serde_json::Value, id: &str) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                m.get("qdev_id").and_then(|x| x.as_str()) == Some(id) || m.values().any(|x| walk(x, id))
            }
            serde_json::Value::Array(a) => a.iter().any(|x| walk(x, id)),
            _ => false,
        }
    }
    walk(pci, id)
}

/// A start-up failure with the VMM's last words, without repeating "failed to start".
pub fn launch_error(e: VmmError, output: &Path) -> VmmError {
    let tail = log_tail(output, 5);
    let what = match e {
        VmmError::Launch(m) => m,
        other => other.to_string(),
    };
    VmmError::Launch(if tail.is_empty() {
        what
    } else {
        format!("{what}; the VMM said: {tail}")
    })
}

/// SIGKILLs a VMM that failed during start-up and reaps it, so no zombie or process is left.
pub async fn kill_and_reap(pid: u32) {
    if let Ok(fd) = process::pidfd_open(pid) {
        let _ = process::signal(pid, libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), process::wait_exit(fd)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec, QemuOptions};

    fn spec() -> VmSpec {
        VmSpec {
            id: "abc".into(),
            name: "web,1".into(),
            hypervisor: HypervisorKind::Qemu,
            vcpus: 2,
            memory_mib: 256,
            max_vcpus: None,
            max_memory_mib: None,
            kernel: "/img/vmlinuz".into(),
            initramfs: Some("/img/initrd.img".into()),
            cmdline: "console=ttyS0".into(),
            disks: vec![
                DiskSpec {
                    id: "root".into(),
                    source: DiskSource::File {
                        path: "/v/a,b.qcow2".into(),
                        format: DiskFormat::Qcow2,
                    },
                    readonly: false,
                },
                DiskSpec {
                    id: "data".into(),
                    source: DiskSource::VhostUser {
                        socket: "/run/v.sock".into(),
                    },
                    readonly: false,
                },
            ],
            nics: vec![NicSpec {
                id: "net0".into(),
                tap: "htap0".into(),
                mac: "52:54:00:00:00:01".into(),
                queue_pairs: 2,
                fds: vec![],
            }],
            qemu: QemuOptions::default(),
            limits: Default::default(),
            agent_channel: false,
        }
    }

    fn has(args: &[String], pair: [&str; 2]) -> bool {
        args.windows(2).any(|w| w[0] == pair[0] && w[1] == pair[1])
    }

    #[test]
    fn the_guest_agent_channel_is_a_named_virtio_serial_port() {
        let dir = VmDir::new(Path::new("/run/h"), "abc");
        let plain = qemu_args(&spec(), &dir, false, None);
        assert!(!plain.iter().any(|a| a.contains("virtserialport")));
        let with = VmSpec {
            agent_channel: true,
            ..spec()
        };
        let a = qemu_args(&with, &dir, false, None);
        assert!(has(&a, ["-device", "virtio-serial-pci,id=agent-serial"]));
        assert!(has(
            &a,
            [
                "-chardev",
                "socket,id=agent,path=/run/h/vms/abc/agent.sock,server=on,wait=off"
            ]
        ));
        assert!(has(
            &a,
            [
                "-device",
                "virtserialport,bus=agent-serial.0,chardev=agent,name=org.hearth.agent.0"
            ]
        ));
    }

    #[test]
    fn q35_tcg_command_line() {
        let dir = VmDir::new(Path::new("/run/h"), "abc");
        let a = qemu_args(&spec(), &dir, false, Some(2_000_000));
        assert!(has(&a, ["-machine", "q35"]));
        assert!(has(&a, ["-accel", "tcg,tb-size=256"]));
        assert!(has(&a, ["-cpu", "max"]));
        assert!(has(&a, ["-m", "256M"]));
        assert!(has(&a, ["-name", "guest=web_1,debug-threads=on"]));
        assert!(has(&a, ["-append", "console=ttyS0"]), "no tsc_early_khz on q35");
        assert!(has(&a, ["-qmp", "unix:/run/h/vms/abc/qmp.sock,server=on,wait=off"]));
        assert!(has(&a, ["-chardev", "socket,id=serial0,path=/run/h/vms/abc/serial.sock,server=on,wait=off,logfile=/run/h/vms/abc/console.log,logappend=on"]));
        // vhost-user needs shared guest memory.
        assert!(has(&a, ["-object", "memory-backend-memfd,id=mem,size=256M,share=on"]));
        let blockdevs: Vec<serde_json::Value> = a
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("-blockdev takes JSON"))
            .collect();
        assert_eq!(
            blockdevs,
            [
                json!({"driver": "file", "node-name": "root-file", "filename": "/v/a,b.qcow2",
                       "cache": {"direct": false}, "read-only": false, "discard": "unmap"}),
                json!({"driver": "qcow2", "node-name": "root", "file": "root-file",
                       "read-only": false, "discard": "unmap"}),
            ]
        );
        assert!(has(&a, ["-device", "vhost-user-blk-pci,chardev=data-chr,id=data"]));
        assert!(has(
            &a,
            [
                "-netdev",
                "tap,id=net0,ifname=htap0,script=no,downscript=no,vhost=off,queues=2"
            ]
        ));
        assert!(has(
            &a,
            [
                "-device",
                "virtio-net-pci,netdev=net0,id=net0-dev,mac=52:54:00:00:00:01,mq=on,vectors=6"
            ]
        ));
        assert!(!a.iter().any(|x| x == "-vnc"));
    }

    #[test]
    fn microvm_under_tcg_gets_the_tsc_frequency_and_mmio_devices() {
        let dir = VmDir::new(Path::new("/run/h"), "abc");
        let mut s = spec();
        s.qemu.machine = QemuMachine::Microvm;
        s.qemu.vnc = true;
        let a = qemu_args(&s, &dir, false, Some(2_100_000));
        assert!(has(&a, ["-machine", "microvm"]));
        assert!(has(&a, ["-append", "console=ttyS0 tsc_early_khz=2100000"]));
        assert!(has(&a, ["-device", "virtio-blk-device,drive=root,id=root"]));
        assert!(has(&a, ["-vnc", "unix:/run/h/vms/abc/vnc.sock"]));
        let kvm = qemu_args(&s, &dir, true, Some(2_100_000));
        assert!(has(&kvm, ["-append", "console=ttyS0"]), "KVM needs no TSC hint");
        assert!(has(&kvm, ["-cpu", "host"]));
    }

    #[test]
    fn exits_are_classified() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = VmDir {
            dir: tmp.path().to_path_buf(),
        };
        let d = QemuDriver::new("qemu-system-x86_64", Accel::Tcg, tmp.path().into(), Jailer::off());
        assert_eq!(d.classify_exit(&dir, ExitInfo::Code(0), false).state, VmState::Stopped);
        assert_eq!(d.classify_exit(&dir, ExitInfo::Signal(9), true).state, VmState::Stopped);
        std::fs::write(dir.vmm_output(), "qemu-system-x86_64: terminating on signal 9\n").expect("write");
        let v = d.classify_exit(&dir, ExitInfo::Signal(9), false);
        assert_eq!(v.state, VmState::Failed);
        assert!(v.reason.contains("terminating on signal 9"), "{}", v.reason);
    }

    /// `query-pci` of a q35 VM with two root ports, recorded from QEMU 7.2 (fields the
    /// code does not read dropped), before and after the guest numbered the buses.
    #[test]
    fn hotplug_ports_are_read_from_query_pci() {
        let fresh: serde_json::Value = serde_json::from_str(r#"[{"bus": 0, "devices": [{"bus": 0, "qdev_id": "", "slot": 0, "class_info": {"desc": "Host bridge"}}, {"bus": 0, "pci_bridge": {"bus": {"number": 0}}, "qdev_id": "hp0", "slot": 1, "class_info": {"desc": "PCI bridge"}}, {"bus": 0, "pci_bridge": {"bus": {"number": 0}}, "qdev_id": "hp1", "slot": 2, "class_info": {"desc": "PCI bridge"}}, {"bus": 0, "qdev_id": "", "slot": 31, "class_info": {"desc": "ISA bridge"}}]}]"#).expect("json");
        assert_eq!(free_hotplug_ports(&fresh), ["hp0", "hp1"]);
        assert!(!pci_has_device(&fresh, "vol0"));
        let used: serde_json::Value = serde_json::from_str(r#"[{"bus": 0, "devices": [{"bus": 0, "pci_bridge": {"bus": {"number": 1}, "devices": [{"bus": 1, "qdev_id": "vol0", "slot": 0}]}, "qdev_id": "hp0", "slot": 1}, {"bus": 0, "pci_bridge": {"bus": {"number": 2}, "devices": []}, "qdev_id": "hp1", "slot": 2}]}]"#).expect("json");
        assert_eq!(free_hotplug_ports(&used), ["hp1"]);
        assert!(pci_has_device(&used, "vol0"));
        assert!(free_hotplug_ports(&serde_json::json!({"unexpected": true})).is_empty());
    }
}
