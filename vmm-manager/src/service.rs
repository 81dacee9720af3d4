//! The VM service: lifecycle, supervision and re-adoption.
//!
//! ```text
//!            start              guest boots           stop (power button,
//!  Stopped ─────────▶ Starting ─────────────▶ Running ─── then force) ──▶ Stopping
//!     ▲                  │                    │  ▲                           │
//!     │                  │ launch fails       │  │ resume                    │ VMM exits
//!     │                  ▼                 pause │                           ▼
//!     │               Failed ◀── VMM dies ──  Paused                  Stopped / Failed
//!     └───────────────────────────────────────────────────────────────────────┘
//! ```
//! Each VM has one operation lock, so lifecycle calls on a VM run one at a time. The
//! VMM process is watched through a pidfd by a task that classifies its exit (with the
//! driver's rules) the moment it happens. Everything needed to find a VM again lives in
//! its state directory, so after a restart [`VmService::open`] re-adopts running VMMs
//! (checked by PID and command line) and reports the others as stopped or failed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use socket_http::ApiError;
use tokio::sync::{broadcast, watch};

use crate::console::SerialConsole;
use crate::hypervisor::cloud_hypervisor::CloudHypervisorDriver;
use crate::hypervisor::qemu::{Accel, QemuDriver};
use crate::hypervisor::{Hypervisor, RuntimeState, VmmError};
use crate::jail::{JailConfig, Jailer};
use crate::process;
use crate::spec::{
    self, now_micros, now_ms, DiskSpec, HypervisorKind, SpecError, VmEvent, VmInfo, VmSpec, VmState, VmStatus,
};
use crate::vm_dir::VmDir;

mod agent;
mod states;
pub use states::SavedState;

/// vmm-manager's settings.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// Where VM state directories live (`<run dir>/vms/<id>/`).
    pub run_dir: PathBuf,
    /// Where saved VM states (memory and devices) live, `<state dir>/<id>/<name>/`: on
    /// a disk, not the tmpfs `/run` usually is.
    pub state_dir: PathBuf,
    pub qemu_binary: String,
    pub cloud_hypervisor_binary: String,
    pub accel: Accel,
    /// How long a guest gets to power off after the power button before it is forced.
    pub stop_timeout: Duration,
    /// How VMMs are jailed (on unless explicitly turned off).
    pub jail: JailConfig,
}

impl VmmConfig {
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        let run_dir: PathBuf = run_dir.into();
        Self {
            state_dir: run_dir.join("states"),
            run_dir,
            qemu_binary: "qemu-system-x86_64".into(),
            cloud_hypervisor_binary: "cloud-hypervisor".into(),
            accel: Accel::Auto,
            stop_timeout: Duration::from_secs(30),
            jail: JailConfig::default(),
        }
    }
}

/// Whether a hypervisor can run VMs here, and why not.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HypervisorAvailability {
    pub kind: HypervisorKind,
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("VM {0} does not exist")]
    NotFound(String),
    #[error("VM {vm} has no disk {disk:?}")]
    NoDisk { vm: String, disk: String },
    #[error("VM {vm} has no saved state {name:?}")]
    NoState { vm: String, name: String },
    #[error("VM {id} already exists with a different spec")]
    Exists { id: String },
    #[error("invalid VM spec: {0}")]
    Spec(#[from] SpecError),
    #[error("VM {id} is {state}: cannot {action}")]
    State {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("{0}")]
    Vmm(#[from] VmmError),
    #[error("console of VM {0} already has a writer; connect with takeover=true to take the keyboard")]
    WriterBusy(String),
    #[error("{0}")]
    NoDisplay(String),
    #[error("VM {vm} already has a different disk {disk:?}")]
    DiskExists { vm: String, disk: String },
    #[error("I/O error on VM state: {0}")]
    Io(#[from] std::io::Error),
    /// The guest agent could not be reached or did not answer.
    #[error("{0}")]
    Agent(String),
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::NotFound(_) | ServiceError::NoDisk { .. } | ServiceError::NoState { .. } => {
                ApiError::not_found(msg)
            }
            ServiceError::Exists { .. }
            | ServiceError::State { .. }
            | ServiceError::WriterBusy(_)
            | ServiceError::DiskExists { .. }
            | ServiceError::NoDisplay(_) => ApiError::conflict(msg),
            ServiceError::Spec(_) => ApiError::unprocessable(msg),
            ServiceError::Vmm(VmmError::MissingBinary { .. }) => {
                ApiError::new(http::StatusCode::UNPROCESSABLE_ENTITY, "hypervisor_unavailable", msg)
            }
            ServiceError::Vmm(VmmError::Unsupported(_)) => {
                ApiError::new(http::StatusCode::CONFLICT, "unsupported", msg)
            }
            ServiceError::Vmm(_) => ApiError::new(http::StatusCode::BAD_GATEWAY, "vmm_error", msg),
            ServiceError::Io(_) => ApiError::internal(msg),
            ServiceError::Agent(_) => ApiError::new(http::StatusCode::GATEWAY_TIMEOUT, "agent_unreachable", msg),
        }
    }
}

struct Runtime {
    pid: u32,
    console: Arc<SerialConsole>,
    stop_requested: Arc<AtomicBool>,
    exited: watch::Receiver<bool>,
}

struct Vm {
    /// The spec as created; its `disks` are the ones it was created with.
    spec: VmSpec,
    /// The disks now: created ones plus attached, minus detached. Saved in the spec file.
    disks: Mutex<Vec<DiskSpec>>,
    /// The vCPUs and memory now (after resizes). Saved in the spec file.
    shape: Mutex<(u32, u64)>,
    dir: VmDir,
    driver: Arc<dyn Hypervisor>,
    status: Mutex<VmStatus>,
    op: tokio::sync::Mutex<()>,
    /// Taken for each conversation with the guest agent.
    agent: tokio::sync::Mutex<()>,
    runtime: Mutex<Option<Runtime>>,
}

impl Vm {
    /// The spec with the disks the VM has now.
    fn current_spec(&self) -> VmSpec {
        let (vcpus, memory_mib) = *lock(&self.shape);
        VmSpec {
            disks: lock(&self.disks).clone(),
            vcpus,
            memory_mib,
            ..self.spec.clone()
        }
    }

    fn save_spec(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.current_spec()).map_err(std::io::Error::other)?;
        VmDir::write_atomic(&self.dir.spec(), &bytes)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// All VMs on this host.
pub struct VmService {
    config: VmmConfig,
    qemu: Arc<QemuDriver>,
    cloud_hypervisor: Arc<dyn Hypervisor>,
    jail: Arc<Jailer>,
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
    events: broadcast::Sender<VmEvent>,
    /// The source of [`VmStatus::seq`].
    seq: std::sync::atomic::AtomicU64,
    /// Flipped by [`VmService::close_streams`].
    closing: watch::Sender<bool>,
}

impl VmService {
    /// Opens the run directory and re-adopts every VM found in it.
    pub async fn open(config: VmmConfig) -> Result<Arc<Self>, ServiceError> {
        std::fs::create_dir_all(config.run_dir.join("vms"))?;
        let jail = Arc::new(Jailer::new(config.jail.clone(), &config.run_dir, &config.state_dir));
        let svc = Arc::new(Self {
            qemu: Arc::new(QemuDriver::new(
                config.qemu_binary.clone(),
                config.accel,
                config.run_dir.clone(),
                jail.clone(),
            )),
            cloud_hypervisor: Arc::new(CloudHypervisorDriver::new(
                config.cloud_hypervisor_binary.clone(),
                jail.clone(),
                config.state_dir.clone(),
            )),
            jail,
            config,
            vms: RwLock::new(BTreeMap::new()),
            events: broadcast::channel(1024).0,
            seq: std::sync::atomic::AtomicU64::new(now_micros()),
            closing: watch::channel(false).0,
        });
        svc.adopt_all().await?;
        Ok(svc)
    }

    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// What the host offers for jailing VMMs and what vmm-manager does with it.
    pub fn jail_support(&self) -> crate::jail::JailSupport {
        self.jail.support()
    }

    /// The peak memory use of VM `id`'s cgroup, in bytes.
    pub fn memory_peak(&self, id: &str) -> Option<u64> {
        self.jail.memory_peak(id)
    }

    /// Whether KVM runs a stock Linux guest here, learned by booting `kernel` (a
    /// Linux kernel, bzImage or ELF) once, unless the operator set the accelerator.
    pub async fn kvm(&self, kernel: &std::path::Path) -> Result<crate::hypervisor::qemu::KvmVerdict, ServiceError> {
        if !kernel.is_file() {
            return Err(ServiceError::Spec(SpecError::MissingFile {
                what: "kernel",
                path: kernel.to_path_buf(),
            }));
        }
        Ok(self.qemu.kvm_verdict(kernel).await)
    }

    /// The driver for `kind`.
    pub fn driver(&self, kind: HypervisorKind) -> Arc<dyn Hypervisor> {
        match kind {
            HypervisorKind::Qemu => self.qemu.clone(),
            HypervisorKind::CloudHypervisor => self.cloud_hypervisor.clone(),
        }
    }

    /// This host's CPUs, memory and hypervisors (`GET /host`).
    pub fn host(&self) -> crate::spec::HostFacts {
        crate::spec::HostFacts {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mib: crate::spec::host_memory_mib(),
            available_memory_mib: crate::spec::host_available_memory_mib(),
            hypervisors: self.hypervisors(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            jail: Some(self.jail.support()),
        }
    }

    /// Which hypervisors can run VMs on this host.
    pub fn hypervisors(&self) -> Vec<HypervisorAvailability> {
        [HypervisorKind::CloudHypervisor, HypervisorKind::Qemu]
            .into_iter()
            .map(|kind| match self.driver(kind).check_available() {
                Ok(()) => HypervisorAvailability {
                    kind,
                    available: true,
                    detail: None,
                },
                Err(e) => HypervisorAvailability {
                    kind,
                    available: false,
                    detail: Some(e.to_string()),
                },
            })
            .collect()
    }

    /// State changes of every VM.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// Ends every event stream served (they would otherwise hold a graceful shutdown
    /// open for as long as their readers stay).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`VmService::close_streams`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    fn vm(&self, id: &str) -> Result<Arc<Vm>, ServiceError> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(id.to_string()))
    }

    fn info(vm: &Vm) -> VmInfo {
        VmInfo {
            spec: vm.current_spec(),
            status: lock(&vm.status).clone(),
        }
    }

    pub fn list(&self) -> Vec<VmInfo> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|vm| Self::info(vm))
            .collect()
    }

    pub fn get(&self, id: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.vm(id)?;
        Ok(Self::info(&vm))
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    fn set_status(&self, vm: &Vm, state: VmState, reason: Option<String>) {
        let pid = lock(&vm.runtime).as_ref().map(|r| r.pid);
        // The sequence number is taken and the event sent under the status lock, so the
        // events of one VM leave in the order of their `seq`.
        let mut current = lock(&vm.status);
        let status = VmStatus {
            state,
            reason: reason.clone(),
            pid: pid.filter(|_| state.is_active()),
            since_ms: now_ms(),
            seq: self.next_seq(),
            jail: Jailer::info_of(&vm.dir).filter(|_| state.is_active()),
        };
        if let Ok(bytes) = serde_json::to_vec(&status) {
            let _ = VmDir::write_atomic(&vm.dir.status(), &bytes);
        }
        tracing::info!(vm = %vm.spec.id, name = %vm.spec.name, state = state.as_str(), reason = reason.as_deref().unwrap_or(""), "VM state");
        let _ = self.events.send(VmEvent {
            vm_id: vm.spec.id.clone(),
            name: vm.spec.name.clone(),
            state: Some(state),
            reason,
            pid: status.pid,
            at_ms: status.since_ms,
            seq: status.seq,
            jail: status.jail.clone(),
        });
        *current = status;
    }

    /// Ensures a VM exists with `spec` (stopped if new). Returns whether it was created.
    pub async fn create(&self, spec: VmSpec) -> Result<(VmInfo, bool), ServiceError> {
        spec::validate_id(&spec.id)?;
        if let Ok(existing) = self.vm(&spec.id) {
            return if existing.spec == spec {
                Ok((Self::info(&existing), false))
            } else {
                Err(ServiceError::Exists { id: spec.id })
            };
        }
        spec.validate(spec::host_memory_mib())?;
        let driver = self.driver(spec.hypervisor);
        driver.check_available()?;
        let dir = VmDir::new(&self.config.run_dir, &spec.id);
        std::fs::create_dir_all(&dir.dir)?;
        let written = serde_json::to_vec_pretty(&spec)
            .map_err(std::io::Error::other)
            .and_then(|b| VmDir::write_atomic(&dir.spec(), &b));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir.dir);
            return Err(e.into());
        }
        let vm = Arc::new(Vm {
            disks: Mutex::new(spec.disks.clone()),
            shape: Mutex::new((spec.vcpus, spec.memory_mib)),
            spec,
            dir,
            driver,
            status: Mutex::new(VmStatus {
                state: VmState::Stopped,
                reason: None,
                pid: None,
                since_ms: now_ms(),
                seq: 0,
                jail: None,
            }),
            op: tokio::sync::Mutex::new(()),
            agent: tokio::sync::Mutex::new(()),
            runtime: Mutex::new(None),
        });
        self.vms
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.spec.id.clone(), vm.clone());
        self.set_status(&vm, VmState::Stopped, None);
        Ok((Self::info(&vm), true))
    }

    /// Boots a VM. Starting a running VM changes nothing.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        if lock(&vm.runtime).is_some() {
            return Ok(Self::info(&vm));
        }
        self.set_status(&vm, VmState::Starting, None);
        let spec = vm.current_spec();
        match vm.driver.launch(&vm.dir, &spec).await {
            Ok(pid) => {
                self.supervise(&vm, pid).await?;
                // The watcher may already have seen a very quick exit.
                if lock(&vm.status).state == VmState::Starting {
                    self.set_status(&vm, VmState::Running, None);
                }
                Ok(Self::info(&vm))
            }
            Err(e) => {
                self.jail.release(&vm.dir);
                self.set_status(&vm, VmState::Failed, Some(format!("start failed: {e}")));
                Err(e.into())
            }
        }
    }

    /// Records a VMM just launched for `vm` and watches it; one that cannot be watched
    /// is killed and the VM marked failed.
    async fn supervise(self: &Arc<Self>, vm: &Arc<Vm>, pid: u32) -> Result<(), ServiceError> {
        let watched = VmDir::write_atomic(&vm.dir.pid(), pid.to_string().as_bytes()).and_then(|_| self.attach(vm, pid));
        if let Err(e) = watched {
            crate::hypervisor::qemu::kill_and_reap(pid).await;
            vm.dir.remove_runtime_files();
            self.set_status(vm, VmState::Failed, Some(format!("cannot supervise the VMM: {e}")));
            return Err(e.into());
        }
        Ok(())
    }

    /// Watches a VMM process and serves its console.
    fn attach(self: &Arc<Self>, vm: &Arc<Vm>, pid: u32) -> std::io::Result<()> {
        let pidfd = process::pidfd_open(pid)?;
        let console = Arc::new(SerialConsole::start(
            vm.dir.serial_socket(),
            vm.dir.console_log(),
            !vm.driver.writes_console_log(),
        ));
        let stop_requested = Arc::new(AtomicBool::new(false));
        let (exited_tx, exited) = watch::channel(false);
        let follower_exited = exited.clone();
        *lock(&vm.runtime) = Some(Runtime {
            pid,
            console,
            stop_requested: stop_requested.clone(),
            exited,
        });
        if vm.driver.kind() == HypervisorKind::CloudHypervisor {
            self.follow_ch_events(vm, follower_exited);
        }
        let svc = Arc::downgrade(self);
        let vm = vm.clone();
        tokio::spawn(async move {
            let exit = process::wait_exit(pidfd).await;
            let verdict = vm
                .driver
                .classify_exit(&vm.dir, exit, stop_requested.load(Ordering::SeqCst));
            tracing::info!(vm = %vm.spec.id, pid, %exit, "VMM exited");
            vm.dir.remove_runtime_files();
            if let Some(svc) = svc.upgrade() {
                let (jail, dir) = (svc.jail.clone(), vm.dir.clone());
                let _ = tokio::task::spawn_blocking(move || jail.release(&dir)).await;
            }
            // Drop the console only after the last output has been read.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = lock(&vm.runtime).take();
            if let Some(svc) = svc.upgrade() {
                svc.set_status(&vm, verdict.state, Some(verdict.reason));
            }
            let _ = exited_tx.send(true);
        });
        Ok(())
    }

    /// Follows Cloud Hypervisor's event monitor while its VMM runs, from what it holds
    /// now on: a pause, resume or reboot made outside hearth (the VMM's own API,
    /// `ch-remote`, the guest) shows in the VM's state within a poll. Changes hearth
    /// makes itself hold the VM's operation lock and set the state themselves.
    fn follow_ch_events(self: &Arc<Self>, vm: &Arc<Vm>, mut exited: watch::Receiver<bool>) {
        use crate::hypervisor::ch_events::{state_change, EventStream};
        use std::io::{Read, Seek};
        let path = vm.dir.events();
        let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let svc = Arc::downgrade(self);
        let vm = vm.clone();
        tokio::spawn(async move {
            let mut stream = EventStream::default();
            loop {
                tokio::select! {
                    _ = exited.wait_for(|e| *e) => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                let mut bytes = Vec::new();
                let read =
                    crate::vm_dir::open_regular(&path, std::fs::OpenOptions::new().read(true)).and_then(|mut f| {
                        f.seek(std::io::SeekFrom::Start(offset))?;
                        f.read_to_end(&mut bytes)
                    });
                let Ok(n) = read else { continue };
                offset += n as u64;
                for ev in stream.push(&bytes) {
                    let Some((state, reason)) = state_change(&ev) else {
                        continue;
                    };
                    let Some(svc) = svc.upgrade() else { return };
                    let Ok(_op) = vm.op.try_lock() else {
                        continue; // hearth's own action: it sets the state
                    };
                    let current = lock(&vm.status).state;
                    if matches!(current, VmState::Running | VmState::Paused)
                        && (current != state || ev.event == "rebooted")
                    {
                        svc.set_status(&vm, state, Some(reason.to_string()));
                    }
                }
            }
        });
    }

    fn runtime_handles(vm: &Vm) -> Option<(u32, Arc<AtomicBool>, watch::Receiver<bool>)> {
        lock(&vm.runtime)
            .as_ref()
            .map(|r| (r.pid, r.stop_requested.clone(), r.exited.clone()))
    }

    /// Stops a VM: the power button first (unless `force`), then the VMM's own forced
    /// stop after the stop timeout, then SIGKILL. Stopping a stopped VM changes nothing.
    pub async fn stop(&self, id: &str, force: bool) -> Result<VmInfo, ServiceError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        self.stop_locked(&vm, force).await?;
        Ok(Self::info(&vm))
    }

    async fn stop_locked(&self, vm: &Vm, force: bool) -> Result<(), ServiceError> {
        let Some((pid, stop_requested, mut exited)) = Self::runtime_handles(vm) else {
            return Ok(());
        };
        stop_requested.store(true, Ordering::SeqCst);
        self.set_status(vm, VmState::Stopping, None);
        let wait = |d: Duration| {
            let mut rx = exited.clone();
            async move { tokio::time::timeout(d, rx.wait_for(|e| *e)).await.is_ok() }
        };
        if !force {
            match vm.driver.power_button(&vm.dir).await {
                Ok(()) => {
                    if wait(self.config.stop_timeout).await {
                        return Ok(());
                    }
                    tracing::warn!(vm = %vm.spec.id, "guest ignored the power button; forcing");
                }
                Err(e) => tracing::warn!(vm = %vm.spec.id, "power button failed ({e}); forcing"),
            }
        }
        if let Err(e) = vm.driver.force_stop(&vm.dir, pid).await {
            tracing::warn!(vm = %vm.spec.id, "forced stop failed ({e}); killing");
        }
        if wait(Duration::from_secs(5)).await {
            return Ok(());
        }
        process::signal(pid, libc::SIGKILL)?;
        let _ = exited.wait_for(|e| *e).await;
        Ok(())
    }

    async fn with_running<F>(&self, id: &str, action: &'static str, f: F) -> Result<VmInfo, ServiceError>
    where
        F: for<'a> FnOnce(&'a dyn Hypervisor, &'a VmDir) -> futures_util::future::BoxFuture<'a, Result<(), VmmError>>,
    {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        if Self::runtime_handles(&vm).is_none() {
            let state = lock(&vm.status).state.as_str();
            return Err(ServiceError::State {
                id: id.to_string(),
                state,
                action,
            });
        }
        f(vm.driver.as_ref(), &vm.dir).await?;
        Ok(Self::info(&vm))
    }

    pub async fn reboot(&self, id: &str) -> Result<VmInfo, ServiceError> {
        self.with_running(id, "reboot", |d, dir| d.reboot(dir)).await
    }

    pub async fn pause(&self, id: &str) -> Result<VmInfo, ServiceError> {
        let info = self.with_running(id, "pause", |d, dir| d.pause(dir)).await?;
        let vm = self.vm(id)?;
        self.set_status(&vm, VmState::Paused, None);
        let status = lock(&vm.status).clone();
        Ok(VmInfo { status, ..info })
    }

    pub async fn resume(&self, id: &str) -> Result<VmInfo, ServiceError> {
        let info = self.with_running(id, "resume", |d, dir| d.resume(dir)).await?;
        let vm = self.vm(id)?;
        self.set_status(&vm, VmState::Running, None);
        let status = lock(&vm.status).clone();
        Ok(VmInfo { status, ..info })
    }

    /// Changes a VM's vCPUs and memory. A running VM grows by hot-plug within the room
    /// its spec gave it (`max_vcpus`, `max_memory_mib`), memory in steps of
    /// [`spec::MEMORY_STEP_MIB`]; what would need a restart is refused with the reason
    /// (`Unsupported`) and changes nothing. A stopped VM takes the new size at its next
    /// start. The size is kept in the spec file, so restarts keep it.
    pub async fn resize(&self, id: &str, want: spec::Resize) -> Result<VmInfo, ServiceError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let current = vm.current_spec();
        if want.vcpus == 0 || want.vcpus > spec::MAX_VCPUS {
            return Err(SpecError::Vcpus {
                got: want.vcpus,
                max: spec::MAX_VCPUS,
            }
            .into());
        }
        let host_mib = spec::host_memory_mib();
        if want.memory_mib < spec::MIN_MEMORY_MIB || want.memory_mib > host_mib {
            return Err(SpecError::Memory {
                got: want.memory_mib,
                host_mib,
            }
            .into());
        }
        if (want.vcpus, want.memory_mib) == (current.vcpus, current.memory_mib) {
            return Ok(Self::info(&vm));
        }
        if Self::runtime_handles(&vm).is_some() {
            let restart =
                |what: String| ServiceError::Vmm(VmmError::Unsupported(format!("{what}: restart the VM to resize it")));
            if want.vcpus > current.vcpu_limit() {
                return Err(restart(format!(
                    "the VM was started with room for {} vCPUs, {} asked",
                    current.vcpu_limit(),
                    want.vcpus
                )));
            }
            if want.memory_mib > current.memory_limit_mib() {
                return Err(restart(format!(
                    "the VM was started with room for {} MiB of memory, {} asked",
                    current.memory_limit_mib(),
                    want.memory_mib
                )));
            }
            if want.memory_mib.abs_diff(current.memory_mib) % spec::MEMORY_STEP_MIB != 0 {
                return Err(SpecError::Device(format!(
                    "a running VM's memory changes in steps of {} MiB: {} MiB now, {} asked",
                    spec::MEMORY_STEP_MIB,
                    current.memory_mib,
                    want.memory_mib
                ))
                .into());
            }
            vm.driver.resize(&vm.dir, &current, want.vcpus, want.memory_mib).await?;
        }
        *lock(&vm.shape) = (want.vcpus, want.memory_mib);
        vm.save_spec()?;
        tracing::info!(vm = %vm.spec.id, vcpus = want.vcpus, memory_mib = want.memory_mib, "VM resized");
        Ok(Self::info(&vm))
    }

    /// Attaches a disk: hot-plugged into a running VM, or kept for the next start of a
    /// stopped one. The same disk again changes nothing; another disk with the same id
    /// is a conflict.
    pub async fn attach_disk(&self, id: &str, disk: DiskSpec) -> Result<VmInfo, ServiceError> {
        spec::validate_id(&disk.id)?;
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        if let Some(existing) = lock(&vm.disks).iter().find(|d| d.id == disk.id) {
            return if *existing == disk {
                Ok(Self::info(&vm))
            } else {
                Err(ServiceError::DiskExists {
                    vm: id.to_string(),
                    disk: disk.id,
                })
            };
        }
        let mut candidate = vm.current_spec();
        candidate.disks.push(disk.clone());
        candidate.validate(spec::host_memory_mib())?;
        if Self::has_vmm(&vm, id, "attach a disk")? {
            let pid = lock(&vm.runtime).as_ref().map(|r| r.pid).unwrap_or_default();
            let seen = self
                .jail
                .attach_disk(&vm.dir, pid, &disk)
                .await
                .map_err(|e| ServiceError::Vmm(VmmError::Launch(e.to_string())))?;
            let view = self.jail.view(&vm.dir, &candidate);
            if let Err(e) = vm.driver.add_disk(&vm.dir, &view, &seen).await {
                self.jail.detach_disk(&vm.dir, pid, &disk.id).await;
                return Err(e.into());
            }
        }
        lock(&vm.disks).push(disk);
        vm.save_spec()?;
        Ok(Self::info(&vm))
    }

    /// Detaches a disk (hot-unplug from a running VM: the guest must release it).
    /// Detaching a disk the VM does not have succeeds.
    pub async fn detach_disk(&self, id: &str, disk_id: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        if !lock(&vm.disks).iter().any(|d| d.id == disk_id) {
            return Ok(Self::info(&vm));
        }
        if Self::has_vmm(&vm, id, "detach a disk")? {
            vm.driver.remove_disk(&vm.dir, disk_id).await?;
            let pid = lock(&vm.runtime).as_ref().map(|r| r.pid).unwrap_or_default();
            self.jail.detach_disk(&vm.dir, pid, disk_id).await;
        }
        if let Some(d) = lock(&vm.disks).iter().find(|d| d.id == disk_id) {
            self.jail.give_back(d);
        }
        lock(&vm.disks).retain(|d| d.id != disk_id);
        vm.save_spec()?;
        Ok(Self::info(&vm))
    }

    /// Whether a disk change must go through the VM's VMM (running or paused) or only
    /// into its spec (stopped or failed); refused while it starts or stops.
    fn has_vmm(vm: &Vm, id: &str, action: &'static str) -> Result<bool, ServiceError> {
        match lock(&vm.status).state {
            VmState::Running | VmState::Paused => Ok(true),
            VmState::Stopped | VmState::Failed => Ok(false),
            other => Err(ServiceError::State {
                id: id.to_string(),
                state: other.as_str(),
                action,
            }),
        }
    }

    /// Tells a running VM that disk `disk_id` grew to `size` bytes (its file or device
    /// already has). A stopped VM sees the size at its next start: nothing to do.
    pub async fn resize_disk(&self, id: &str, disk_id: &str, size: u64) -> Result<VmInfo, ServiceError> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let disk = lock(&vm.disks)
            .iter()
            .find(|d| d.id == disk_id)
            .cloned()
            .ok_or_else(|| ServiceError::NoDisk {
                vm: id.to_string(),
                disk: disk_id.to_string(),
            })?;
        if Self::has_vmm(&vm, id, "resize a disk")? {
            vm.driver
                .resize_disk(&vm.dir, &self.jail.disk_view(&vm.dir, &disk), size)
                .await?;
        }
        Ok(Self::info(&vm))
    }

    /// Deletes a VM: forces its VMM down and removes its state directory. Deleting a
    /// missing VM succeeds.
    pub async fn delete(&self, id: &str) -> Result<(), ServiceError> {
        let Ok(vm) = self.vm(id) else {
            return self.delete_states(id);
        };
        let _op = vm.op.lock().await;
        self.stop_locked(&vm, true).await?;
        for d in lock(&vm.disks).iter() {
            self.jail.give_back(d);
        }
        self.vms.write().unwrap_or_else(|p| p.into_inner()).remove(id);
        match std::fs::remove_dir_all(&vm.dir.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.delete_states(id)?;
        let _ = self.events.send(VmEvent {
            vm_id: vm.spec.id.clone(),
            name: vm.spec.name.clone(),
            state: None,
            reason: Some("deleted".into()),
            pid: None,
            at_ms: now_ms(),
            seq: self.next_seq(),
            jail: None,
        });
        Ok(())
    }

    /// The live console of a running VM.
    pub fn console(&self, id: &str) -> Result<Arc<SerialConsole>, ServiceError> {
        let vm = self.vm(id)?;
        let rt = lock(&vm.runtime);
        match rt.as_ref() {
            Some(r) => Ok(r.console.clone()),
            None => Err(ServiceError::State {
                id: id.to_string(),
                state: lock(&vm.status).state.as_str(),
                action: "attach to its console",
            }),
        }
    }

    /// The VNC socket of a running VM that has a display; 409 with the reason otherwise.
    pub fn vnc_socket(&self, id: &str) -> Result<std::path::PathBuf, ServiceError> {
        let vm = self.vm(id)?;
        if vm.spec.hypervisor != crate::spec::HypervisorKind::Qemu {
            return Err(ServiceError::NoDisplay(format!(
                "VM {id} runs on Cloud Hypervisor, which has no framebuffer: use its serial console"
            )));
        }
        if !vm.spec.qemu.vnc {
            return Err(ServiceError::NoDisplay(format!(
                "VM {id} was created without a display (vnc: false): use its serial console"
            )));
        }
        if lock(&vm.runtime).is_none() {
            return Err(ServiceError::State {
                id: id.to_string(),
                state: lock(&vm.status).state.as_str(),
                action: "show its screen",
            });
        }
        Ok(vm.dir.vnc_socket())
    }

    /// The last `max` bytes the guest printed (kept across stops and restarts).
    pub fn console_log(&self, id: &str, max: usize) -> Result<Vec<u8>, ServiceError> {
        let vm = self.vm(id)?;
        match crate::console::read_tail(&vm.dir.console_log(), max) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds the VMs of a previous run and takes them back.
    async fn adopt_all(self: &Arc<Self>) -> Result<(), ServiceError> {
        let entries = std::fs::read_dir(self.config.run_dir.join("vms"))?;
        for entry in entries.flatten() {
            let dir = VmDir { dir: entry.path() };
            let spec = match dir.read_spec() {
                Ok(s) => s,
                Err(e) => {
                    // A create that crashed before its spec was written: nothing to keep.
                    tracing::warn!(dir = %dir.dir.display(), "removing VM directory without a valid spec: {e}");
                    let _ = std::fs::remove_dir_all(&dir.dir);
                    continue;
                }
            };
            let last: Option<VmStatus> = crate::vm_dir::read_trusted(&dir.status())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            // The counter starts at the wall clock; a clock that went back must not make
            // new changes look older than the adopted ones.
            if let Some(l) = &last {
                self.seq.fetch_max(l.seq, std::sync::atomic::Ordering::Relaxed);
            }
            let vm = Arc::new(Vm {
                driver: self.driver(spec.hypervisor),
                disks: Mutex::new(spec.disks.clone()),
                shape: Mutex::new((spec.vcpus, spec.memory_mib)),
                spec,
                dir,
                status: Mutex::new(last.clone().unwrap_or(VmStatus {
                    state: VmState::Stopped,
                    reason: None,
                    pid: None,
                    since_ms: now_ms(),
                    seq: 0,
                    jail: None,
                })),
                op: tokio::sync::Mutex::new(()),
                agent: tokio::sync::Mutex::new(()),
                runtime: Mutex::new(None),
            });
            self.vms
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vm.spec.id.clone(), vm.clone());
            self.adopt(&vm, last).await;
        }
        Ok(())
    }

    async fn adopt(self: &Arc<Self>, vm: &Arc<Vm>, last: Option<VmStatus>) {
        // No pid file, yet a VMM may run: one launched just before vmm-manager died
        // (its last status says it was starting). Stopped VMs need no /proc scan.
        let was_active = last.as_ref().is_some_and(|s| s.state.is_active());
        let pid = vm.dir.read_pid().or_else(|| {
            if !was_active {
                return None;
            }
            let found = process::find_by_marker(&vm.dir.marker())?;
            tracing::warn!(vm = %vm.spec.id, pid = found, "found a VMM without a pid file");
            let _ = VmDir::write_atomic(&vm.dir.pid(), found.to_string().as_bytes());
            Some(found)
        });
        match pid {
            Some(pid) if process::is_our_process(pid, &vm.dir.marker()) => {
                if let Err(e) = self.attach(vm, pid) {
                    tracing::warn!(vm = %vm.spec.id, "cannot re-adopt VMM {pid}: {e}");
                    return;
                }
                let state = vm.driver.query(&vm.dir).await;
                tracing::info!(vm = %vm.spec.id, pid, ?state, "re-adopted running VMM");
                match state {
                    Ok(RuntimeState::Running) => self.set_status(
                        vm,
                        VmState::Running,
                        Some("re-adopted after a vmm-manager restart".into()),
                    ),
                    Ok(RuntimeState::Paused) => self.set_status(
                        vm,
                        VmState::Paused,
                        Some("re-adopted after a vmm-manager restart".into()),
                    ),
                    // A VMM whose guest never booted (start interrupted by the restart),
                    // or one that no longer answers: take it down.
                    other => {
                        tracing::warn!(vm = %vm.spec.id, "VMM found in state {other:?}; stopping it");
                        let _ = self.stop_locked(vm, true).await;
                        self.set_status(
                            vm,
                            VmState::Failed,
                            Some("the VM's start was interrupted by a vmm-manager restart".into()),
                        );
                    }
                }
            }
            Some(_) => {
                // It was running when vmm-manager went away and has exited since.
                let verdict = vm.driver.classify_exit(&vm.dir, process::ExitInfo::Unknown, false);
                vm.dir.remove_runtime_files();
                self.jail.release(&vm.dir);
                self.set_status(vm, verdict.state, Some(verdict.reason));
            }
            None => {
                if last.map(|s| s.state.is_active()).unwrap_or(false) {
                    vm.dir.remove_runtime_files();
                    self.jail.release(&vm.dir);
                    self.set_status(
                        vm,
                        VmState::Stopped,
                        Some("found stopped after a vmm-manager restart".into()),
                    );
                }
            }
        }
    }
}
