//! Test harness: runs `hearth-api --all-in-one` in a private network namespace and a
//! temporary data directory, talks to it over HTTP and WebSocket, and cleans up every
//! process it started (by PID) even when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub const LISTEN: &str = "127.0.0.1:18080";

/// Runs `f` on a thread inside a fresh network namespace (with loopback up), on a
/// runtime of its own: the api, its daemons and every VMM it starts live there.
pub fn in_private_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        enter_private_netns().expect("cannot create a network namespace (tests need root)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f());
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn enter_private_netns() -> std::io::Result<()> {
    // A network namespace, and a mount namespace with a fresh sysfs: /sys/class/net
    // shows the namespace sysfs was mounted in, and netd reads it.
    // SAFETY: unshare only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The cgroup file systems live under /sys: kept aside while the fresh sysfs is
    // mounted, then moved back, so VMs' cgroups work in the namespace too.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let aside = std::ffi::CString::new(format!("/tmp/hearth-cgroup-aside-{}-{n}", std::process::id()))
        .map_err(std::io::Error::other)?;
    let _ = std::fs::create_dir(aside.to_str().unwrap_or_default());
    // SAFETY: mount with NUL-terminated strings; makes our mounts private, then mounts sysfs.
    let rc = unsafe {
        let root = c"/".as_ptr();
        let private = libc::mount(
            std::ptr::null(),
            root,
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        let kept = libc::mount(
            c"/sys/fs/cgroup".as_ptr(),
            aside.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        );
        let sys = libc::mount(
            c"sysfs".as_ptr(),
            c"/sys".as_ptr(),
            c"sysfs".as_ptr(),
            0,
            std::ptr::null(),
        );
        let back = if kept == 0 {
            libc::mount(
                aside.as_ptr(),
                c"/sys/fs/cgroup".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            )
        } else {
            0
        };
        private.min(sys).min(back)
    };
    let _ = std::fs::remove_dir(aside.to_str().unwrap_or_default());
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a plain datagram socket for interface ioctls.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: `ifr` names an interface and outlives both ioctls; `fd` is ours.
    let rc = unsafe {
        let get = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        let set = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        libc::close(fd);
        get.min(set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `d` times `$HEARTH_TEST_SLOWDOWN` (default 1): how long to wait for something that
/// takes `d` at most on a CI machine, where everything runs slower (a guest under
/// TCG running a guest under TCG, about 50 times).
pub fn patience(d: Duration) -> Duration {
    let factor = std::env::var("HEARTH_TEST_SLOWDOWN")
        .ok()
        .and_then(|f| f.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}

/// The `hearth` CLI's binary (crate `hearth-cli`), built next to `hearth-api` by
/// `cargo build --workspace --bins`, as scripts/test.sh does first.
pub fn hearth_cli() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_hearth-api"))
        .parent()
        .expect("bin dir")
        .join("hearth");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// Where the guest images are (built by guest-images/tiny/build.sh).
pub fn images_dir() -> PathBuf {
    let dir = std::env::var_os("HEARTH_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/images".into());
    assert!(
        dir.join("tiny/image.json").is_file(),
        "the tiny image is missing in {}: run guest-images/tiny/build.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// The real Cloud Hypervisor kept for tests beside the checkout
/// (`../shared/cloud-hypervisor/bin/cloud-hypervisor`), when it is there.
pub fn real_cloud_hypervisor() -> Option<PathBuf> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let bin = Path::new(&dir).join("../../shared/cloud-hypervisor/bin/cloud-hypervisor");
    bin.is_file().then_some(bin)
}

/// The real Cloud Hypervisor the tests that need one use: HEARTH_TEST_CH_BINARY when
/// set, else the one kept beside the checkout ([`real_cloud_hypervisor`]). `None`
/// when neither exists; such a test then says that it did not run.
pub fn real_cloud_hypervisor_binary() -> Option<String> {
    std::env::var("HEARTH_TEST_CH_BINARY")
        .ok()
        .or_else(|| real_cloud_hypervisor().map(|p| p.display().to_string()))
}

/// The fake Cloud Hypervisor, or the real one when HEARTH_TEST_CH_BINARY names it.
pub fn cloud_hypervisor_binary() -> String {
    std::env::var("HEARTH_TEST_CH_BINARY").unwrap_or_else(|_| {
        // The manifest directory at run time: a shared target directory may hold a
        // binary built from another checkout.
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
        format!("{dir}/../vmm-manager/tests/fake-cloud-hypervisor/fake-cloud-hypervisor")
    })
}

/// A running stack: `hearth-api --all-in-one`, or ([`Stack::start_separate`]) the api
/// and each daemon as a process of its own.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub key: String,
    pub args: Vec<String>,
    /// The daemons' own processes, when they do not run inside the api.
    pub daemons: Option<Daemons>,
    /// Environment the api process gets besides the test's own (set before `spawn`).
    pub env: Vec<(String, String)>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Stack {
    pub async fn start(extra: &[&str]) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .expect("tempdir");
        let mut stack = Stack {
            dir,
            child: None,
            key: String::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            daemons: None,
            env: Vec::new(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        };
        stack.spawn().await;
        stack
    }

    /// vmm-manager, netd, blockd, imaged and the api each as its own process, started
    /// the way the systemd units start them (`<program> --config hearth.toml`), with
    /// every path of the file pointing into the test's data directory.
    pub async fn start_separate(extra: &[&str]) -> Stack {
        Self::start_separate_tls(extra, &[]).await
    }

    /// [`Stack::start_separate`] with the daemons named in `over_tls` reached by the
    /// api over TCP with TLS and a token only (see [`Daemons::new_with_tls`]).
    pub async fn start_separate_tls(extra: &[&str], over_tls: &[&'static str]) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .expect("tempdir");
        let (mut daemons, mut args) = if over_tls.is_empty() {
            (Daemons::new(dir.path()), vec![])
        } else {
            Daemons::new_with_tls(dir.path(), over_tls)
        };
        for name in DAEMONS {
            daemons.spawn(name).await;
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut stack = Stack {
            dir,
            child: None,
            key: String::new(),
            args,
            daemons: Some(daemons),
            env: Vec::new(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        };
        stack.spawn().await;
        stack
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("http://{LISTEN}")
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("api.log"))
            .expect("log");
        // HEARTH_API_BIN: where the binary is when not where cargo built it (in a guest).
        let bin = std::env::var("HEARTH_API_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hearth-api").to_string());
        let mut cmd = Command::new(bin);
        if let Some(d) = &self.daemons {
            cmd.arg("--config").arg(&d.config);
        } else {
            if !self.args.iter().any(|a| a == "--cloud-hypervisor-binary") {
                cmd.arg("--cloud-hypervisor-binary").arg(cloud_hypervisor_binary());
            }
            if !self.args.iter().any(|a| a == "--qemu-accel") {
                cmd.args(["--qemu-accel", "tcg"]);
            }
            if !self.args.iter().any(|a| a == "--stop-timeout") {
                cmd.args(["--stop-timeout", "20"]);
            }
            if !self.args.iter().any(|a| a == "--cgroup-name") {
                cmd.arg("--cgroup-name").arg(cgroup_name(self.dir.path()));
            }
            if !self.args.iter().any(|a| a == "--jail-uid-base") {
                cmd.arg("--jail-uid-base")
                    .arg(jail_uid_base(self.dir.path()).to_string());
            }
            cmd.arg("--all-in-one").arg("--images-dir").arg(images_dir());
        }
        cmd.args(["--listen", LISTEN])
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().expect("spawn hearth-api"));
        let deadline = Instant::now() + patience(Duration::from_secs(30));
        loop {
            if let Ok((200, _)) = self.request_as("GET", "/health/ready", None, None).await {
                break;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("hearth-api exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "hearth-api did not become ready: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.key = std::fs::read_to_string(self.dir.path().join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_string();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api.log")).unwrap_or_default()
    }

    /// Stops the api process with `signal` and starts it again on the same data directory.
    pub async fn restart(&mut self, signal: i32) {
        self.stop_api(signal);
        self.spawn().await;
    }

    /// The api process's PID.
    pub fn api_pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("the api runs")
    }

    /// Starts the api again (after [`Stack::stop_api`]) with a saga fault injected
    /// (`HEARTH_SAGA_FAULT`, see the api's `saga` module) or none.
    pub async fn spawn_with_fault(&mut self, fault: Option<String>) {
        self.env = fault
            .map(|f| vec![("HEARTH_SAGA_FAULT".to_string(), f)])
            .unwrap_or_default();
        self.spawn().await;
    }

    /// Waits for the api process to end by itself (an injected crash) within `within`.
    pub fn wait_for_crash(&mut self, case: &str, within: Duration) {
        let mut child = self.child.take().expect("the api runs");
        let deadline = std::time::Instant::now() + patience(within);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(!status.success(), "{case}: the api exited cleanly");
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{case}: the api did not crash");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop_api(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals only the api process this harness started.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    pub async fn request_as(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        key: Option<&str>,
    ) -> Result<(u16, Value), String> {
        self.request_with(method, path, body, key, &[])
            .await
            .map(|(status, _, value)| (status, value))
    }

    /// A request with extra headers; returns the response's headers too.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        key: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, http::HeaderMap, Value), String> {
        self.client().request_with(method, path, body, key, headers).await
    }

    /// A handle for requests that does not borrow the stack (so the test may restart
    /// the api meanwhile).
    pub fn client(&self) -> ApiClient {
        ApiClient {
            http: self.http.clone(),
            key: self.key.clone(),
        }
    }

    /// An authenticated request; panics when the api cannot be reached.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.request_as(method, path, bytes.as_deref(), Some(&self.key))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Gives `user` (made if needed) the `role` in `project` (made if needed) and returns
    /// a new API key of that user.
    pub async fn key_for(&self, user: &str, project: &str, role: &str) -> String {
        let (status, body) = self.call("POST", "/v1/projects", Some(json!({"name": project}))).await;
        assert!(status == 201 || status == 409, "{status} {body}");
        let (status, body) = self.call("POST", "/v1/users", Some(json!({"name": user}))).await;
        assert!(status == 201 || status == 409, "{status} {body}");
        let (status, body) = self
            .call(
                "PUT",
                &format!("/v1/projects/{project}/members/{user}"),
                Some(json!({"role": role})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = self
            .call(
                "POST",
                "/v1/api-keys",
                Some(json!({"name": format!("{user}-key"), "user": user})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["key"].as_str().expect("key").to_string()
    }

    /// Waits for an operation to finish and returns it.
    pub async fn wait_op(&self, accepted: &Value) -> Value {
        let id = accepted["operation"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no operation in {accepted}"));
        let deadline = Instant::now() + patience(Duration::from_secs(120));
        loop {
            let (status, op) = self.call("GET", &format!("/v1/operations/{id}?wait=10"), None).await;
            assert_eq!(status, 200, "{op}");
            if op["status"] != "running" {
                return op;
            }
            assert!(Instant::now() < deadline, "operation {id} still running: {op}");
        }
    }

    /// Runs an action and asserts its operation succeeded.
    pub async fn act(&self, vm: &str, action: &str) -> Value {
        let (status, accepted) = self.call("POST", &format!("/v1/vms/{vm}/{action}"), None).await;
        assert_eq!(status, 202, "{action}: {accepted}");
        let op = self.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{action}: {op}");
        op
    }

    /// `vm` as `GET /v1/vms` lists it (the cached listing), without asking for it alone.
    pub async fn listed(&self, vm: &str) -> Value {
        let (status, list) = self.call("GET", "/v1/vms", None).await;
        assert_eq!(status, 200, "{list}");
        list.as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == vm))
            .cloned()
            .unwrap_or_else(|| panic!("{vm} is not listed: {list}"))
    }

    pub async fn vm(&self, vm: &str) -> Value {
        let (status, v) = self.call("GET", &format!("/v1/vms/{vm}"), None).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    pub async fn console_log(&self, vm: &str) -> String {
        let (status, v) = self.call("GET", &format!("/v1/vms/{vm}/console/log"), None).await;
        assert_eq!(status, 200, "{v}");
        v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
    }

    /// Polls the console log until it contains `needle` `times` times.
    pub async fn wait_console(&self, vm: &str, needle: &str, times: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let log = self.console_log(vm).await;
            if log.matches(needle).count() >= times {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{needle:?} x{times} not in {vm}'s console after {timeout:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `line` into the console over the WebSocket and returns what came back
    /// once `expect` appeared.
    pub async fn console_exchange(&self, vm: &str, line: &str, expect: &str) -> String {
        console_exchange_at(LISTEN, &self.key, vm, line, expect).await
    }

    /// Runs a shell command in the guest over the console and returns its output (what
    /// came back up to an end marker the command prints).
    pub async fn console_run(&self, vm: &str, cmd: &str) -> String {
        console_run_at(LISTEN, &self.key, vm, cmd).await
    }

    /// PIDs of live processes whose command line mentions this stack's data directory
    /// (VMMs, the api itself).
    pub fn processes_using_data_dir(&self) -> Vec<(u32, String)> {
        let marker = self.dir.path().display().to_string();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                        .unwrap_or(false)
                })
                .unwrap_or(false);
            if cmd.contains(&marker) && !zombie {
                out.push((pid, cmd));
            }
        }
        out
    }

    pub fn vmm_processes(&self) -> Vec<(u32, String)> {
        let mut ours: Vec<u32> = self.child.iter().map(|c| c.id()).collect();
        if let Some(d) = &self.daemons {
            ours.extend(d.children.iter().map(|(_, c)| c.id()));
        }
        // dnsmasq (netd's DHCP server) also names the data directory; it is not a VMM.
        self.processes_using_data_dir()
            .into_iter()
            .filter(|(pid, cmd)| !ours.contains(pid) && !cmd.contains("dnsmasq"))
            .collect()
    }

    /// The VM state directories vmm-manager holds.
    pub fn vm_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("run/vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("HEARTH_KEEP_TEST_DIR").is_some() {
            eprintln!("HEARTH_KEEP_TEST_DIR: kept {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
        self.stop_api(libc::SIGKILL);
        if let Some(d) = &mut self.daemons {
            for name in DAEMONS {
                d.kill(name, libc::SIGKILL);
            }
        }
        // Whatever the test left running (it failed half way), stop it: only processes
        // whose command line names this stack's private data directory.
        for (pid, _) in self.processes_using_data_dir() {
            // SAFETY: signals a process this stack started (identified by its data dir).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        // The VMs' cgroups, once their killed VMMs are gone.
        drop(testkit::CgroupCleanup(cgroup_name(self.dir.path())));
    }
}

/// Types `line` into the console over the WebSocket and returns what came back
/// once `expect` appeared.
pub async fn console_exchange_at(listen: &str, key: &str, vm: &str, line: &str, expect: &str) -> String {
    // The previous exchange's writer slot is released when the server has finished
    // with its closed WebSocket, which can be a moment after our close: a 409
    // ("already has a writer") right after one is retried for up to 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    let ws = loop {
        let mut req = format!("ws://{listen}/v1/vms/{vm}/console")
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().expect("header"));
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => break ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 409 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("console websocket: {e:?}"),
        }
    };
    let (mut tx, mut rx) = ws.split();
    // The first frame is the scrollback; what follows is live.
    let _scrollback = tokio::time::timeout(patience(Duration::from_secs(10)), rx.next())
        .await
        .expect("scrollback frame");
    tx.send(Message::Binary(Bytes::from(line.to_string())))
        .await
        .expect("send");
    let mut seen = String::new();
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    // A line typed while the shell sets its terminal up (printing a prompt) can
    // lose its first characters; it is typed once more after 10 s without answer.
    let mut again = Some(Instant::now() + patience(Duration::from_secs(10)));
    while !seen.contains(expect) {
        let until = again.map_or(deadline, |a| a.min(deadline));
        match tokio::time::timeout(until.saturating_duration_since(Instant::now()), rx.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            Err(_) if again.take().is_some() => {
                tx.send(Message::Binary(Bytes::from(line.to_string())))
                    .await
                    .expect("send");
            }
            other => panic!("console ended before {expect:?} ({other:?}); saw {seen:?}"),
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    // Wait for the server's side of the close, so its writer slot is free sooner.
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while rx.next().await.is_some() {} }).await;
    seen
}

/// Runs a shell command in the guest over the console and returns its output (what
/// came back up to an end marker the command prints).
pub async fn console_run_at(listen: &str, key: &str, vm: &str, cmd: &str) -> String {
    let out = console_exchange_at(
        listen,
        key,
        vm,
        &format!("{cmd}; echo __END_$((40+2))__\n"),
        "__END_42__",
    )
    .await;
    let start = out.find(cmd).map(|i| i + cmd.len()).unwrap_or(0);
    out[start..].to_string()
}

/// VM users of their own for this stack: stacks run side by side in one test run,
/// while a host has one vmm-manager (and so one range).
pub fn jail_uid_base(data_dir: &Path) -> u32 {
    let h = data_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    1_900_000_000 + (h % 100_000) as u32 * 1024
}

/// The cgroup (under the test's own) that holds this stack's VMs' cgroups.
pub fn cgroup_name(data_dir: &Path) -> String {
    testkit::CgroupCleanup::name_for(data_dir)
}

/// Requests to the stack's api, independent of the [`Stack`] value.
#[derive(Clone)]
pub struct ApiClient {
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// The admin key.
    pub key: String,
}

impl ApiClient {
    /// A request with extra headers; returns the response's headers too.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        key: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, http::HeaderMap, Value), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{LISTEN}{path}"));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let payload = body.map(Bytes::copy_from_slice).unwrap_or_default();
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let resp = self
            .http
            .request(req.body(Full::new(payload)).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, headers, value))
    }
}

/// The daemons, in the order their systemd units start.
pub const DAEMONS: [&str; 4] = ["vmm-manager", "netd", "blockd", "imaged"];

/// hearth's daemons as processes of their own, each started as
/// `<program> --config <dir>/hearth.toml` (what the systemd units run), logging to
/// `<dir>/<program>.log`. Stopped by PID.
pub struct Daemons {
    dir: PathBuf,
    pub config: PathBuf,
    children: Vec<(&'static str, Child)>,
    /// Daemons that serve over TCP with TLS, and their ports.
    tls: Vec<(&'static str, u16)>,
}

impl Daemons {
    /// Writes the configuration: sockets under `<dir>/run` (the api's `socket_dir`),
    /// state under `<dir>`, QEMU under TCG, the test's Cloud Hypervisor and images.
    pub fn new(dir: &Path) -> Daemons {
        let d = dir.display();
        let config = dir.join("hearth.toml");
        let text = format!(
            r#"[api]
socket_dir = "{d}/run"

[vmm-manager]
socket = "{d}/run/vmm-manager.sock"
run_dir = "{d}/run"
state_dir = "{d}/vmm"
accel = "tcg"
stop_timeout = 20
cloud_hypervisor_binary = "{ch}"
cgroup_name = "{cgroup}"
jail_uid_base = {uid_base}

[netd]
socket = "{d}/run/netd.sock"
state_dir = "{d}/netd"

[blockd]
socket = "{d}/run/blockd.sock"
pool = "file:{d}/volumes"
state_dir = "{d}/blockd"
socket_dir = "{d}/run/blockd"
nbd_unix = "{d}/run/blockd/nbd.sock"

[imaged]
socket = "{d}/run/imaged.sock"
store_dir = "{d}/imaged"
seeds_dir = "{d}/imaged/seeds"
catalog_dir = "{images}"
"#,
            ch = cloud_hypervisor_binary(),
            cgroup = cgroup_name(dir),
            uid_base = jail_uid_base(dir),
            images = images_dir().display(),
        );
        std::fs::write(&config, text).expect("hearth.toml");
        Daemons {
            dir: dir.to_path_buf(),
            config,
            children: Vec::new(),
            tls: Vec::new(),
        }
    }

    /// [`Daemons::new`], with `over_tls` serving over TCP with TLS and a token as on
    /// another host: their sockets move to `<dir>/private/`, where the api does not
    /// look, so it can reach them only over TCP. A CA, a certificate for 127.0.0.1 and
    /// a token are made in `<dir>/pki/`. Returns the api's arguments to reach them.
    pub fn new_with_tls(dir: &Path, over_tls: &[&'static str]) -> (Daemons, Vec<String>) {
        let mut daemons = Daemons::new(dir);
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Subject names of their own: OpenSSL (curl) takes a certificate whose issuer
        // is its own subject for a self-signed one.
        ca.distinguished_name.push(rcgen::DnType::CommonName, "hearth test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        leaf.distinguished_name.push(rcgen::DnType::CommonName, "hearth daemon");
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).expect("certificate");
        std::fs::write(pki.join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(pki.join("cert.pem"), cert.pem()).expect("write");
        std::fs::write(pki.join("key.pem"), key.serialize_pem()).expect("write");
        let token = uuid::Uuid::new_v4().simple().to_string();
        std::fs::write(pki.join("token"), format!("{token}\n")).expect("write");
        let mut text = std::fs::read_to_string(&daemons.config).expect("config");
        let mut args = vec![
            "--daemon-ca".to_string(),
            pki.join("ca.pem").display().to_string(),
            "--daemon-token-file".to_string(),
            pki.join("token").display().to_string(),
        ];
        for name in over_tls {
            let port = testkit::etcd::free_port();
            let section = format!("[{name}]\n");
            let (old_socket, new_socket) = (
                format!("socket = \"{}/run/{name}.sock\"", dir.display()),
                format!("socket = \"{}/private/{name}.sock\"", dir.display()),
            );
            assert!(text.contains(&old_socket), "{name} has a socket line");
            text = text.replace(&old_socket, &new_socket);
            text = text.replace(
                &section,
                &format!(
                    "{section}listen_tls = \"127.0.0.1:{port}\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\ntoken_file = \"{t}\"\n",
                    c = pki.join("cert.pem").display(),
                    k = pki.join("key.pem").display(),
                    t = pki.join("token").display(),
                ),
            );
            args.push("--daemon".into());
            args.push(format!("{name}=https://127.0.0.1:{port}"));
            daemons.tls.push((name, port));
        }
        std::fs::write(&daemons.config, text).expect("hearth.toml");
        (daemons, args)
    }

    /// A daemon's binary: built next to `hearth-api` by `cargo build --workspace`
    /// (`cargo test --workspace` does that).
    fn binary(name: &str) -> PathBuf {
        let bin = Path::new(env!("CARGO_BIN_EXE_hearth-api"))
            .parent()
            .expect("bin dir")
            .join(name);
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build --workspace --bins` first",
            bin.display()
        );
        bin
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        if self.tls.iter().any(|(n, _)| *n == name) {
            self.dir.join(format!("private/{name}.sock"))
        } else {
            self.dir.join(format!("run/{name}.sock"))
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts `name` and waits until it answers `GET /health` on its socket.
    pub async fn spawn(&mut self, name: &'static str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log");
        let child = Command::new(Self::binary(name))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.children.push((name, child));
        let client = socket_http::UnixClient::new(self.socket(name)).with_timeout(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.get::<Value>("/health").await.is_ok() {
                return;
            }
            if let Some((_, c)) = self.children.iter_mut().find(|(n, _)| *n == name) {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("{name} exited with {status}: {}", self.log(name));
                }
            }
            assert!(Instant::now() < deadline, "{name} did not answer: {}", self.log(name));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The TCP port `name` serves TLS on, if it does.
    pub fn tls_port(&self, name: &str) -> Option<u16> {
        self.tls.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| *n == name).map(|(_, c)| c.id())
    }

    /// Sends `signal` to the daemon and reaps it.
    pub fn kill(&mut self, name: &str, signal: i32) {
        if let Some(i) = self.children.iter().position(|(n, _)| *n == name) {
            let (_, mut child) = self.children.remove(i);
            // SAFETY: signals only a daemon process this harness started.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for name in DAEMONS {
            self.kill(name, libc::SIGKILL);
        }
    }
}

pub fn create_body(name: &str, hypervisor: &str) -> Value {
    json!({"name": name, "image": "tiny", "hypervisor": hypervisor, "vcpus": 1, "memory_mib": 256})
}

#[allow(unused_imports)]
pub use testkit::etcd::{free_port, Etcd};
