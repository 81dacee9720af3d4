//! The Cloud Hypervisor driver.
//!
//! Protocol, step by step (see `shared/cloud-hypervisor/BEHAVIOUR.md`, which wins over
//! the OpenAPI document):
//! 1. start one `cloud-hypervisor` per VM with `--api-socket`, `--event-monitor` and
//!    `--log-file` in the VM's state directory, and wait for the API socket;
//! 2. `PUT vm.create` with the `VmConfig` (it only stores the config: 204);
//! 3. `PUT vm.boot` with no body, exactly once (a second boot is an error even after a
//!    failed one);
//! 4. lifecycle through `vm.power-button`, `vm.reboot`, `vm.pause`, `vm.resume`,
//!    `vm.shutdown` + `vmm.shutdown` (or SIGTERM) to force;
//! 5. a guest power-off ends the process with status 0; a vCPU failure also ends it
//!    with status 0, and only the log says `VCPU generated error`: exits are classified
//!    from the log, not the status. The final events are not always written, so the
//!    driver never waits for them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::Method;
use serde_json::{json, Value};
use socket_http::client::RawResponse;
use socket_http::UnixClient;

use super::qemu::kill_and_reap;
use super::{find_binary, log_tail, wait_for_socket, ExitVerdict, Hypervisor, RuntimeState, VmmError};
use crate::jail::Jailer;
use crate::process::{self, ExitInfo};
use crate::spec::{DiskFormat, DiskSource, DiskSpec, HypervisorKind, VmSpec, VmState};
use crate::vm_dir::VmDir;

/// What the log says when a vCPU failed (the exit status is 0 all the same).
pub const VCPU_ERROR: &str = "VCPU generated error";

/// The Cloud Hypervisor driver.
pub struct CloudHypervisorDriver {
    binary: String,
    jail: Arc<Jailer>,
    state_dir: PathBuf,
}

impl CloudHypervisorDriver {
    pub fn new(binary: impl Into<String>, jail: Arc<Jailer>, state_dir: PathBuf) -> Self {
        Self {
            binary: binary.into(),
            jail,
            state_dir,
        }
    }

    /// Starts a `cloud-hypervisor` (jailed) with its API socket, event monitor and log
    /// in the VM's directory. Returns its PID and the spec as it sees it.
    fn spawn(&self, dir: &VmDir, spec: &VmSpec) -> Result<(u32, VmSpec), VmmError> {
        let binary: PathBuf = find_binary(&self.binary)?;
        let view = self
            .jail
            .prepare(dir, spec, false)
            .map_err(|e| VmmError::Launch(format!("cannot jail the VMM: {e}")))?;
        dir.remove_runtime_files();
        let args = vec![
            "--api-socket".to_string(),
            format!("path={}", dir.api_socket().display()),
            "--event-monitor".to_string(),
            format!("path={}", dir.events().display()),
            "--log-file".to_string(),
            dir.vmm_log().display().to_string(),
            "-v".to_string(),
        ];
        let mut cmd = self.jail.command(dir, &binary, &args);
        cmd.current_dir(&dir.dir);
        Ok((process::spawn_detached(&mut cmd, &dir.vmm_output())?, view))
    }

    /// The VMM's PID when `started` succeeded; otherwise it is asked to exit, then
    /// killed: a failed start leaves no process.
    async fn unwind(&self, dir: &VmDir, pid: u32, started: Result<(), VmmError>) -> Result<u32, VmmError> {
        match started {
            Ok(()) => Ok(pid),
            Err(e) => {
                let _ = Self::put(dir, "vmm.shutdown", None).await;
                kill_and_reap(pid).await;
                dir.remove_runtime_files();
                Err(match e {
                    refused @ VmmError::Refused { .. } => refused,
                    other => super::qemu::launch_error(other, &dir.vmm_output()),
                })
            }
        }
    }

    /// The VMM's API; for a jailed one, only when its own user serves it.
    fn client(dir: &VmDir) -> UnixClient {
        let client = UnixClient::new(dir.api_socket()).with_timeout(Duration::from_secs(30));
        match crate::jail::Jailer::info_of(dir) {
            Some(jail) => client.with_peer_uid(jail.uid),
            None => client,
        }
    }

    /// `PUT /api/v1/<action>`, expecting a 2xx. Cloud Hypervisor's errors are JSON arrays
    /// of strings (the error chain), joined here into one message.
    async fn put(dir: &VmDir, action: &str, body: Option<&Value>) -> Result<RawResponse, VmmError> {
        let encoded = body.map(|b| b.to_string().into_bytes());
        let resp = Self::client(dir)
            .raw(Method::PUT, &format!("/api/v1/{action}"), encoded)
            .await
            .map_err(|e| VmmError::Control(e.to_string()))?;
        if resp.status.is_success() {
            Ok(resp)
        } else {
            Err(VmmError::Refused {
                action: action.to_string(),
                message: error_chain(&resp),
            })
        }
    }
}

/// Joins Cloud Hypervisor's error array: `["Error from API","The VM could not boot",…]`.
pub fn error_chain(resp: &RawResponse) -> String {
    match serde_json::from_slice::<Vec<String>>(&resp.body) {
        Ok(chain) if !chain.is_empty() => format!("{} ({})", chain.join(": "), resp.status.as_u16()),
        _ => format!(
            "HTTP {} {}",
            resp.status.as_u16(),
            String::from_utf8_lossy(&resp.body).trim()
        )
        .trim_end()
        .to_string(),
    }
}

/// Maps a spec to Cloud Hypervisor's `VmConfig`.
/// One disk as Cloud Hypervisor's `DiskConfig` (in `vm.create` and `vm.add-disk`).
pub fn disk_config(d: &DiskSpec) -> Value {
    match &d.source {
        DiskSource::File { path, format } => {
            let mut disk = json!({
                "id": d.id,
                "path": path,
                // Always explicit: without it CH guesses, warns, and refuses writes
                // to sector 0 of raw images.
                "image_type": match format { DiskFormat::Raw => "Raw", DiskFormat::Qcow2 => "Qcow2" },
                "readonly": d.readonly,
            });
            if *format == DiskFormat::Qcow2 {
                disk["backing_files"] = json!(true);
            }
            disk
        }
        DiskSource::VhostUser { socket } => json!({
            "id": d.id,
            "vhost_user": true,
            "vhost_socket": socket,
            "readonly": d.readonly,
        }),
    }
}

pub fn vm_config(spec: &VmSpec, dir: &VmDir) -> Value {
    let mut payload = json!({"kernel": spec.kernel, "cmdline": spec.cmdline});
    if let Some(initrd) = &spec.initramfs {
        payload["initramfs"] = json!(initrd);
    }
    let disks: Vec<Value> = spec.disks.iter().map(disk_config).collect();
    let net: Vec<Value> = spec
        .nics
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "tap": n.tap,
                "mac": n.mac,
                // Two queues (rx + tx) per queue pair, matching how the TAP was created.
                "num_queues": 2 * n.queue_pairs,
            })
        })
        .collect();
    let mut memory = json!({"size": spec.memory_mib * 1024 * 1024});
    let headroom = spec.memory_limit_mib() - spec.memory_mib;
    if headroom > 0 {
        memory["hotplug_size"] = json!(headroom * 1024 * 1024);
    }
    if spec.needs_shared_memory() {
        memory["shared"] = json!(true);
    }
    let mut config = json!({
        "payload": payload,
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpu_limit()},
        "memory": memory,
        "serial": {"mode": "Socket", "socket": dir.serial_socket()},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
    });
    if spec.agent_channel {
        // The guest is CID 3; the host connects to the socket and says `CONNECT <port>`.
        config["vsock"] = json!({"cid": 3, "socket": dir.agent_socket()});
    }
    if uuid::Uuid::parse_str(&spec.id).is_ok() {
        config["platform"] = json!({"system_uuid": spec.id});
    }
    if !disks.is_empty() {
        config["disks"] = Value::Array(disks);
    }
    if !net.is_empty() {
        config["net"] = Value::Array(net);
    }
    config
}

impl Hypervisor for CloudHypervisorDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::CloudHypervisor
    }

    fn check_available(&self) -> Result<(), VmmError> {
        find_binary(&self.binary).map(|_| ())
    }

    fn launch<'a>(&'a self, dir: &'a VmDir, spec: &'a VmSpec) -> BoxFuture<'a, Result<u32, VmmError>> {
        Box::pin(async move {
            let (pid, view) = self.spawn(dir, spec)?;
            let mut config = vm_config(&view, dir);
            if self.jail.enabled() && crate::jail::landlock_abi() > 0 {
                // Its seccomp filter is on by default; landlock (applied at vm.create)
                // limits it to the files of its config plus its own directory (where
                // hot-plugged disks appear) and its saved states.
                config["landlock_enable"] = json!(true);
                config["landlock_rules"] = json!([dir.dir.clone(), self.state_dir.join(&spec.id)]
                    .iter()
                    .map(|p| json!({"path": p, "access": "rw"}))
                    .collect::<Vec<_>>());
            }
            let booted = async {
                wait_for_socket(&dir.api_socket(), pid, Duration::from_secs(10)).await?;
                Self::put(dir, "vm.create", Some(&config)).await?;
                Self::put(dir, "vm.boot", None).await?;
                Ok::<_, VmmError>(())
            }
            .await;
            self.unwind(dir, pid, booted).await
        })
    }

    fn power_button<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { Self::put(dir, "vm.power-button", None).await.map(|_| ()) })
    }

    fn force_stop<'a>(&'a self, dir: &'a VmDir, pid: u32) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let _ = Self::put(dir, "vm.shutdown", None).await;
            if Self::put(dir, "vmm.shutdown", None).await.is_err() {
                process::signal(pid, libc::SIGTERM)?;
            }
            Ok(())
        })
    }

    fn reboot<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { Self::put(dir, "vm.reboot", None).await.map(|_| ()) })
    }

    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { Self::put(dir, "vm.pause", None).await.map(|_| ()) })
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { Self::put(dir, "vm.resume", None).await.map(|_| ()) })
    }

    fn query<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<RuntimeState, VmmError>> {
        Box::pin(async move {
            let resp = Self::client(dir)
                .raw(Method::GET, "/api/v1/vm.info", None)
                .await
                .map_err(|e| VmmError::Control(e.to_string()))?;
            if !resp.status.is_success() {
                return Ok(RuntimeState::NotRunning);
            }
            let info: Value = serde_json::from_slice(&resp.body).map_err(|e| VmmError::Control(e.to_string()))?;
            Ok(match info.get("state").and_then(Value::as_str) {
                Some("Running") => RuntimeState::Running,
                Some("Paused") => RuntimeState::Paused,
                _ => RuntimeState::NotRunning,
            })
        })
    }

    fn classify_exit(&self, dir: &VmDir, exit: ExitInfo, stop_requested: bool) -> ExitVerdict {
        let log = crate::console::read_tail(&dir.vmm_log(), 64 * 1024).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        if let Some(line) = log.lines().find(|l| l.contains(VCPU_ERROR)) {
            return ExitVerdict {
                state: VmState::Failed,
                reason: format!("vCPU failure: {}", line.trim()),
            };
        }
        let events = std::fs::read(dir.events()).unwrap_or_default();
        let panicked = super::ch_events::EventStream::default()
            .push(&events)
            .iter()
            .any(|e| e.source == "guest" && e.event == "panic");
        if panicked {
            return ExitVerdict {
                state: VmState::Failed,
                reason: "the guest kernel panicked".into(),
            };
        }
        match exit {
            _ if stop_requested => ExitVerdict {
                state: VmState::Stopped,
                reason: "stopped on request".into(),
            },
            ExitInfo::Code(0) | ExitInfo::Unknown => ExitVerdict {
                state: VmState::Stopped,
                reason: "the guest powered off".into(),
            },
            other => ExitVerdict {
                state: VmState::Failed,
                reason: format!(
                    "cloud-hypervisor exited with {other}: {}",
                    log_tail(&dir.vmm_output(), 3)
                ),
            },
        }
    }

    fn add_disk<'a>(
        &'a self,
        dir: &'a VmDir,
        _spec: &'a VmSpec,
        disk: &'a DiskSpec,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            Self::put(dir, "vm.add-disk", Some(&disk_config(disk)))
                .await
                .map(|_| ())
        })
    }

    fn remove_disk<'a>(&'a self, dir: &'a VmDir, disk_id: &'a str) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            Self::put(dir, "vm.remove-device", Some(&json!({ "id": disk_id })))
                .await
                .map(|_| ())
        })
    }

    fn resize_disk<'a>(&'a self, dir: &'a VmDir, disk: &'a DiskSpec, size: u64) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            match &disk.source {
                DiskSource::File { .. } => Self::put(
                    dir,
                    "vm.resize-disk",
                    Some(&json!({"id": disk.id, "desired_size": size})),
                )
                .await
                .map(|_| ()),
                DiskSource::VhostUser { .. } => Err(super::vhost_user_resize_unsupported(&disk.id)),
            }
        })
    }

    fn resize<'a>(
        &'a self,
        dir: &'a VmDir,
        _spec: &'a VmSpec,
        vcpus: u32,
        memory_mib: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let body = json!({"desired_vcpus": vcpus, "desired_ram": memory_mib * 1024 * 1024});
            Self::put(dir, "vm.resize", Some(&body)).await.map(|_| ())
        })
    }

    fn save_state<'a>(&'a self, dir: &'a VmDir, dest: &'a std::path::Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let url = format!("file://{}", dest.display());
            Self::put(dir, "vm.snapshot", Some(&json!({ "destination_url": url })))
                .await
                .map(|_| ())
        })
    }

    fn launch_restore<'a>(
        &'a self,
        dir: &'a VmDir,
        spec: &'a VmSpec,
        src: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<u32, VmmError>> {
        Box::pin(async move {
            // The snapshot holds the VM's whole config (its sockets are this VM's own,
            // its disks where the jail puts them).
            let (pid, _) = self.spawn(dir, spec)?;
            let restored = async {
                wait_for_socket(&dir.api_socket(), pid, Duration::from_secs(10)).await?;
                let url = format!("file://{}", src.display());
                Self::put(
                    dir,
                    "vm.restore",
                    Some(&json!({ "source_url": url, "prefault": false })),
                )
                .await?;
                Ok::<_, VmmError>(())
            }
            .await;
            self.unwind(dir, pid, restored).await
        })
    }

    fn writes_console_log(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec, QemuOptions};
    use std::path::Path;

    fn spec() -> VmSpec {
        VmSpec {
            id: "3f2c1d9e-8a7b-4c6d-9e0f-112233445566".into(),
            name: "db".into(),
            hypervisor: HypervisorKind::CloudHypervisor,
            vcpus: 2,
            memory_mib: 512,
            max_vcpus: None,
            max_memory_mib: None,
            kernel: "/img/vmlinux".into(),
            initramfs: Some("/img/initrd.img".into()),
            cmdline: "console=ttyS0 quiet".into(),
            disks: vec![
                DiskSpec {
                    id: "root".into(),
                    source: DiskSource::File {
                        path: "/v/root.raw".into(),
                        format: DiskFormat::Raw,
                    },
                    readonly: false,
                },
                DiskSpec {
                    id: "base".into(),
                    source: DiskSource::File {
                        path: "/v/o.qcow2".into(),
                        format: DiskFormat::Qcow2,
                    },
                    readonly: true,
                },
                DiskSpec {
                    id: "data".into(),
                    source: DiskSource::VhostUser {
                        socket: "/run/vol.sock".into(),
                    },
                    readonly: false,
                },
            ],
            nics: vec![NicSpec {
                id: "net0".into(),
                tap: "htap1a2b3c".into(),
                mac: "52:54:00:12:34:56".into(),
                queue_pairs: 1,
                fds: vec![],
            }],
            qemu: QemuOptions::default(),
            limits: Default::default(),
            agent_channel: false,
        }
    }

    #[test]
    fn room_to_grow_is_max_vcpus_and_hotplug_memory() {
        let dir = VmDir::new(Path::new("/run/hearth"), "x");
        let grow = VmSpec {
            max_vcpus: Some(4),
            max_memory_mib: Some(512 + 256),
            ..spec()
        };
        let c = vm_config(&grow, &dir);
        assert_eq!(c["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 4}));
        assert_eq!(c["memory"]["size"], 512u64 << 20);
        assert_eq!(c["memory"]["hotplug_size"], 256u64 << 20);
    }

    #[test]
    fn the_guest_agent_channel_is_vsock_on_the_agent_socket() {
        let dir = VmDir::new(Path::new("/run/hearth"), "x");
        assert!(vm_config(&spec(), &dir).get("vsock").is_none());
        let with = VmSpec {
            agent_channel: true,
            ..spec()
        };
        assert_eq!(
            vm_config(&with, &dir)["vsock"],
            json!({"cid": 3, "socket": "/run/hearth/vms/x/agent.sock"})
        );
    }

    #[test]
    fn vm_config_follows_behaviour_md() {
        let dir = VmDir::new(Path::new("/run/hearth"), "x");
        let c = vm_config(&spec(), &dir);
        assert_eq!(
            c["payload"],
            json!({"kernel": "/img/vmlinux", "initramfs": "/img/initrd.img", "cmdline": "console=ttyS0 quiet"})
        );
        assert_eq!(c["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 2}));
        assert_eq!(c["memory"], json!({"size": 536870912u64, "shared": true}));
        assert_eq!(
            c["serial"],
            json!({"mode": "Socket", "socket": "/run/hearth/vms/x/serial.sock"})
        );
        assert_eq!(c["console"], json!({"mode": "Off"}));
        assert_eq!(
            c["disks"][0],
            json!({"id": "root", "path": "/v/root.raw", "image_type": "Raw", "readonly": false})
        );
        assert_eq!(c["disks"][1]["image_type"], "Qcow2");
        assert_eq!(c["disks"][1]["backing_files"], true);
        assert_eq!(
            c["disks"][2],
            json!({"id": "data", "vhost_user": true, "vhost_socket": "/run/vol.sock", "readonly": false})
        );
        assert_eq!(
            c["net"][0],
            json!({"id": "net0", "tap": "htap1a2b3c", "mac": "52:54:00:12:34:56", "num_queues": 2})
        );
        assert_eq!(c["platform"]["system_uuid"], "3f2c1d9e-8a7b-4c6d-9e0f-112233445566");
        // Every file disk names its image type.
        for d in c["disks"].as_array().into_iter().flatten() {
            assert!(d.get("image_type").is_some() || d["vhost_user"] == true, "{d}");
        }
    }

    #[test]
    fn error_arrays_are_joined() {
        let resp = RawResponse {
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            body: bytes::Bytes::from_static(br#"["Error from API","The VM could not boot","VM is already created"]"#),
        };
        assert_eq!(
            error_chain(&resp),
            "Error from API: The VM could not boot: VM is already created (500)"
        );
        let empty = RawResponse {
            status: http::StatusCode::BAD_REQUEST,
            body: bytes::Bytes::new(),
        };
        assert_eq!(error_chain(&empty), "HTTP 400");
    }

    #[test]
    fn vcpu_errors_fail_the_vm_despite_exit_status_zero() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = VmDir {
            dir: tmp.path().to_path_buf(),
        };
        let d = CloudHypervisorDriver::new("cloud-hypervisor", Jailer::off(), tmp.path().into());
        assert_eq!(d.classify_exit(&dir, ExitInfo::Code(0), false).state, VmState::Stopped);
        std::fs::write(
            dir.vmm_log(),
            "cloud-hypervisor: 1.2s: <vcpu0> ERROR:vmm/src/cpu.rs: VCPU generated error: VcpuUnhandledKvmExit\n",
        )
        .expect("write");
        let v = d.classify_exit(&dir, ExitInfo::Code(0), false);
        assert_eq!(v.state, VmState::Failed);
        assert!(v.reason.contains("VcpuUnhandledKvmExit"));
    }
}
