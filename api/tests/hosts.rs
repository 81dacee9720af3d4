//! Several hosts as one cloud, on this machine: three "hosts", each a network namespace
//! of its own joined to the others by veth pairs on one bridge (the underlay,
//! 10.99.0.0/24), each running `hearth-api --all-in-one` with its daemons served to the
//! other hosts over TLS, all three sharing one real etcd. Shows what a user of a
//! cluster sees: every host listed with its capacity; a VM created through one host's
//! api placed where the scheduler says (and why), run and reached there; cordoned
//! hosts skipped; a host whose api dies marked lost within seconds, and back when it
//! returns.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cloud_hypervisor_binary, images_dir, in_private_netns, patience};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const UNDERLAY: &str = "10.99.0";
const NAMES: [&str; 3] = ["h-a", "h-b", "h-c"];

fn ip(args: &[&str]) {
    testkit::run("ip", args);
}

/// One host: its namespace, data directory and api process.
struct Host {
    name: &'static str,
    ns: String,
    address: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    key: String,
    store: String,
    /// The hearth.toml `hearth host join` wrote, once it joined (else the flags).
    config: Option<std::path::PathBuf>,
}

impl Host {
    fn url(&self) -> String {
        format!("http://{}:8080", self.address)
    }

    /// `hearth-api --all-in-one` as host `name` with data directory `dir`, started
    /// inside this host's namespace with a fresh sysfs there (netd reads it) and the
    /// cgroup file systems kept.
    fn launch(&self, name: &str, dir: &Path, config: Option<&Path>) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("api.log"))
            .expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth-api"));
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        } else {
            cmd.args(["--host-name", name, "--host-address", &self.address])
                .args(["--store", &self.store]);
        }
        cmd.args(["--all-in-one", "--qemu-accel", "tcg", "--stop-timeout", "5"])
            .arg("--cloud-hypervisor-binary")
            .arg(cloud_hypervisor_binary())
            .arg("--images-dir")
            .arg(images_dir())
            .arg("--data-dir")
            .arg(dir)
            .arg("--cgroup-name")
            .arg(common::cgroup_name(dir))
            .arg("--jail-uid-base")
            .arg(common::jail_uid_base(dir).to_string())
            .args(["--listen", &format!("{}:8080", self.address)])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        let ns = std::fs::File::open(format!("/run/netns/{}", self.ns)).expect("netns file");
        let aside = std::ffi::CString::new(format!("/tmp/hearth-hosts-aside-{}-{}", std::process::id(), self.ns))
            .expect("path");
        let aside_path = aside.to_str().unwrap_or_default().to_string();
        let _ = std::fs::create_dir(&aside_path);
        {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            // SAFETY: between fork and exec the child only makes system calls: it joins
            // the host's network namespace, takes a mount namespace of its own, and
            // mounts sysfs there with the cgroup file systems moved back on top.
            unsafe {
                cmd.pre_exec(move || {
                    let ok = |rc: libc::c_int| {
                        if rc == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    };
                    ok(libc::setns(fd, libc::CLONE_NEWNET))?;
                    ok(libc::unshare(libc::CLONE_NEWNS))?;
                    ok(libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    let kept = libc::mount(
                        c"/sys/fs/cgroup".as_ptr(),
                        aside.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    );
                    ok(libc::mount(
                        c"sysfs".as_ptr(),
                        c"/sys".as_ptr(),
                        c"sysfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    ))?;
                    if kept == 0 {
                        ok(libc::mount(
                            aside.as_ptr(),
                            c"/sys/fs/cgroup".as_ptr(),
                            std::ptr::null(),
                            libc::MS_MOVE,
                            std::ptr::null(),
                        ))?;
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn hearth-api");
        drop(ns);
        // The child moved the cgroup mounts out of it: empty again.
        let _ = std::fs::remove_dir(&aside_path);
        child
    }

    /// Starts (or starts again) this host's api and waits until it is ready.
    async fn spawn(&mut self) {
        self.child = Some(self.launch(self.name, self.dir.path(), self.config.as_deref()));
        let deadline = Instant::now() + patience(Duration::from_secs(60));
        loop {
            if let Ok((200, _)) = call(&self.url(), "", "GET", "/health/ready", None).await {
                break;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("{}'s api exited with {status}: {}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{}'s api is not ready: {}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.key = std::fs::read_to_string(self.dir.path().join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_string();
    }

    fn log(&self) -> String {
        testkit::tail(
            &std::fs::read_to_string(self.dir.path().join("api.log")).unwrap_or_default(),
            60,
        )
    }

    /// Kills the api (-9) and reaps it; its VMMs run on.
    fn kill_api(&mut self) {
        self.stop_api(libc::SIGKILL);
    }

    /// Stops the api with `signal` and reaps it; its VMMs run on.
    fn stop_api(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signals only the api process this test started.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.url(), &self.key, method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.name))
    }

    /// Processes whose command line names this host's data directory (its VMMs).
    fn processes(&self) -> Vec<u32> {
        let marker = self.dir.path().display().to_string();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).replace('\0', " ").contains(&marker) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_api();
        for pid in self.processes() {
            // SAFETY: signals a process this test started (it names the host's data dir).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        drop(testkit::CgroupCleanup(common::cgroup_name(self.dir.path())));
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

async fn call(base: &str, key: &str, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(format!("{base}{path}"));
    if !key.is_empty() {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let payload = match &body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(b).map_err(|e| e.to_string())?)
        }
        None => Bytes::new(),
    };
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(req.body(Full::new(payload)).map_err(|e| e.to_string())?),
    )
    .await
    .map_err(|_| "no answer in 60 s".to_string())?
    .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

/// One member of the test's etcd cluster, in its host's namespace (Debian's
/// etcd-server), started and killed by PID; its data stays for a restart.
struct Member {
    child: Option<Child>,
    address: String,
}

impl Member {
    fn start(i: usize, host: &Host) -> Member {
        let dir = host.dir.path().join("etcd");
        let cluster: Vec<String> = (1..=3).map(|n| format!("m{n}=http://{UNDERLAY}.{n}:2380")).collect();
        let (client, peer) = (
            format!("http://{}:2379", host.address),
            format!("http://{}:2380", host.address),
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.ns,
                "etcd",
                "--name",
                &format!("m{}", i + 1),
                "--data-dir",
            ])
            .arg(&dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args([
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd (Debian package etcd-server)");
        Member {
            child: Some(child),
            address: host.address.clone(),
        }
    }

    /// Waits until the member says the cluster is healthy (a quorum of members).
    fn wait_healthy(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + patience(Duration::from_secs(60));
        loop {
            let mut out = String::new();
            if let Ok(mut s) = std::net::TcpStream::connect((self.address.as_str(), 2379)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n");
                let _ = s.read_to_string(&mut out);
            }
            if out.contains("\"health\":\"true\"") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member at {} is not healthy: {out}",
                self.address
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signals only the etcd process this test started (`ip netns exec`
            // execs it in place).
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The underlay: a bridge in the test's namespace and, per host, a namespace joined to
/// it by a veth pair.
fn make_hosts(store: &str) -> Vec<Host> {
    ip(&["link", "add", "hunder0", "type", "bridge"]);
    ip(&["addr", "add", &format!("{UNDERLAY}.254/24"), "dev", "hunder0"]);
    ip(&["link", "set", "hunder0", "up"]);
    let mut hosts = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let ns = format!("hh{}{}", std::process::id(), &name[2..]);
        ip(&["netns", "add", &ns]);
        let (outer, inner) = (format!("hu{i}"), format!("hu{i}p"));
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["link", "set", &outer, "master", "hunder0", "up"]);
        let address = format!("{UNDERLAY}.{}", i + 1);
        ip(&["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", &inner]);
        ip(&["-n", &ns, "link", "set", &inner, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        hosts.push(Host {
            name,
            ns,
            address,
            dir: tempfile::Builder::new()
                .prefix("hearth-host-")
                .tempdir()
                .expect("tempdir"),
            child: None,
            key: String::new(),
            store: store.to_string(),
            config: None,
        });
    }
    hosts
}

/// Asks `via` for a tiny VM `nope` on `host` (what the tests expect refused).
async fn place_on(via: &Host, host: &str) -> (u16, Value) {
    via.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "nope", "image": "tiny", "placement": {"host": host}})),
    )
    .await
}

fn by_name<'a>(hosts: &'a Value, name: &str) -> &'a Value {
    hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == name))
        .unwrap_or_else(|| panic!("no host {name} in {hosts}"))
}

async fn wait_vm(host: &Host, vm: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + patience(within);
    loop {
        let (status, v) = host.call("GET", &format!("/v1/vms/{vm}"), None).await;
        if status == 200 && v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "VM {vm} is not {state}: {v}\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `vm`'s console log (read through `via`) shows the guest ready.
async fn wait_booted(via: &Host, vm: &str, within: Duration) {
    let deadline = Instant::now() + patience(within);
    loop {
        let (_, log) = via.call("GET", &format!("/v1/vms/{vm}/console/log"), None).await;
        if log.as_str().is_some_and(|l| l.contains("HEARTH-GUEST-READY")) {
            return;
        }
        assert!(Instant::now() < deadline, "{vm} does not boot: {log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn vm_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("run/vms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn three_hosts_are_one_cloud() {
    in_private_netns(|| async {
        ip(&["link", "set", "lo", "up"]);
        // One etcd cluster of three members, one on each host.
        let endpoints: Vec<String> = (1..=3).map(|i| format!("{UNDERLAY}.{i}:2379")).collect();
        let mut hosts = make_hosts(&format!("etcd://{}", endpoints.join(",")));
        let mut members: Vec<Member> = hosts.iter().enumerate().map(|(i, h)| Member::start(i, h)).collect();
        for m in &members {
            m.wait_healthy();
        }
        // A makes the cluster; a machine that has not joined it is refused.
        hosts[0].spawn().await;
        let stranger = tempfile::Builder::new()
            .prefix("hearth-host-")
            .tempdir()
            .expect("tempdir");
        let mut refused = hosts[1].launch("h-d", stranger.path(), None);
        let deadline = Instant::now() + patience(Duration::from_secs(60));
        let status = loop {
            if let Some(status) = refused.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "an api that did not join is still running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let said = std::fs::read_to_string(stranger.path().join("api.log")).unwrap_or_default();
        assert!(
            !status.success() && said.contains("has not joined this cluster"),
            "{status}: {said}"
        );
        // B and C join with tokens from A's api, through the CLI on each "machine".
        let mut last_token = String::new();
        for i in 1..3 {
            let (status, t) = hosts[0].call("POST", "/v1/hosts/join-tokens", Some(json!({}))).await;
            assert_eq!(status, 201, "{t}");
            assert!(
                t["join_command"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("hearth host join --url http://{UNDERLAY}.1:8080"))),
                "{t}"
            );
            last_token = t["token"].as_str().unwrap_or_default().to_string();
            let config = hosts[i].dir.path().join("hearth.toml");
            let out = Command::new(common::hearth_cli())
                .args(["--url", &hosts[0].url(), "host", "join", "--token", &last_token])
                .args(["--name", hosts[i].name, "--address", &hosts[i].address])
                .arg("--write-config")
                .arg(&config)
                .output()
                .expect("hearth host join");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let written = std::fs::read_to_string(&config).expect("hearth.toml");
            assert!(
                written.contains(&format!("store = \"etcd://{}/hearth\"", endpoints.join(","))),
                "{written}"
            );
            hosts[i].config = Some(config);
            hosts[i].spawn().await;
        }
        // A token works once.
        let (status, again) = call(
            &hosts[0].url(),
            "",
            "POST",
            "/v1/hosts/join",
            Some(json!({"token": last_token, "name": "h-d", "address": format!("{UNDERLAY}.9")})),
        )
        .await
        .expect("join");
        assert_eq!(status, 401, "{again}");
        let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);

        // Every host is listed, by any host's api, ready, with its capacity and versions.
        let (status, listed) = b.call("GET", "/v1/hosts", None).await;
        assert_eq!(status, 200, "{listed}");
        assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
        let leaders = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["leader"] == true)
            .count();
        assert_eq!(leaders, 1, "one leader: {listed}");
        for name in NAMES {
            let h = by_name(&listed, name);
            assert_eq!(h["state"], "ready", "{h}");
            assert!(h["capacity"]["vcpus"].as_u64().unwrap_or(0) >= 1, "{h}");
            assert!(h["allocatable"]["memory_mib"].as_u64().unwrap_or(0) > 256, "{h}");
            assert_eq!(h["daemons"].as_object().map(|d| d.len()), Some(4), "{h}");
            assert!(h["versions"]["vmm-manager"].is_string(), "{h}");
        }
        // The daemons served to other hosts want the cluster's token.
        let url = by_name(&listed, "h-c")["daemons"]["vmm-manager"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(url.starts_with(&format!("https://{UNDERLAY}.3:")), "{url}");
        // Mutual TLS: with the cluster's token but no certificate from its CA, C's
        // vmm-manager serves nothing; with A's api's certificate it answers.
        let cluster = hosts[0].dir.path().join("cluster");
        let token = std::fs::read_to_string(cluster.join("daemon-token")).expect("token");
        let curl = |extra: &[&str]| {
            Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    "--cacert",
                ])
                .arg(cluster.join("ca.pem"))
                .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
                .args(extra)
                .arg(format!("{url}/health"))
                .output()
                .expect("curl")
        };
        let anonymous = curl(&[]);
        assert_ne!(
            String::from_utf8_lossy(&anonymous.stdout),
            "200",
            "served without a client certificate"
        );
        let (cert, key) = (cluster.join("api.pem"), cluster.join("api.key"));
        let known = curl(&[
            "--cert",
            cert.to_str().unwrap_or_default(),
            "--key",
            key.to_str().unwrap_or_default(),
        ]);
        assert_eq!(String::from_utf8_lossy(&known.stdout), "200", "{known:?}");

        // A VM created through A's api with placement on C runs on C, and every api
        // shows it there with the scheduler's reasons.
        let body = json!({"name": "on-c", "image": "tiny", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
            "placement": {"host": "h-c"}});
        let (status, created) = a.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{created}\n{}", a.log());
        let vm = wait_vm(b, "on-c", "running", Duration::from_secs(120)).await;
        assert_eq!(vm["host"], "h-c", "{vm}");
        let verdicts = vm["placement"]["verdicts"].as_array().cloned().unwrap_or_default();
        assert_eq!(verdicts.len(), 3, "{vm}");
        assert_eq!(
            (
                verdicts[0]["host"].as_str(),
                verdicts[0]["chosen"].as_bool(),
                verdicts[0]["reason"].as_str()
            ),
            (Some("h-c"), Some(true), Some("the host placement names")),
            "{vm}"
        );
        assert!(
            verdicts[1..].iter().all(|v| v["reason"] == "placement names host h-c"),
            "{vm}"
        );
        let id = vm["id"].as_str().unwrap_or_default().to_string();
        assert!(vm_dirs(c.dir.path()).contains(&id), "C's vmm-manager holds the VM");
        assert!(!vm_dirs(a.dir.path()).contains(&id) && !vm_dirs(b.dir.path()).contains(&id));
        let pid = vm["pid"].as_u64().unwrap_or(0) as u32;
        assert!(c.processes().contains(&pid), "its VMM is C's ({pid})");
        // Its console, through A's api and C's vmm-manager over TLS.
        let deadline = Instant::now() + patience(Duration::from_secs(120));
        loop {
            let (status, log) = a.call("GET", "/v1/vms/on-c/console/log", None).await;
            if status == 200 && log.as_str().is_some_and(|l| l.contains("HEARTH-GUEST-READY")) {
                break;
            }
            assert!(Instant::now() < deadline, "no boot on C's console: {log}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (status, listing) = c.call("GET", "/v1/vms", None).await;
        assert_eq!(status, 200);
        let on_c = listing
            .as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == "on-c"))
            .cloned();
        assert_eq!(on_c.map(|v| v["state"].clone()), Some(json!("running")), "{listing}");

        // Networks span hosts: a VM of the default network on A reaches the one on C
        // across the overlay hearth made, with an address no other host handed out;
        // a VM of another network (on B) reaches neither.
        let (status, net) = a
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": "other", "subnet": "10.66.0.0/24"})),
            )
            .await;
        assert_eq!(status, 201, "{net}");
        for (name, host, nets) in [
            ("n-a", "h-a", json!([{"network": "default"}])),
            ("o-b", "h-b", json!([{"network": "other"}])),
        ] {
            let body = json!({"name": name, "image": "tiny", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
                "nics": nets, "placement": {"host": host}});
            let (status, created) = c.call("POST", "/v1/vms", Some(body)).await;
            assert_eq!(status, 202, "{created}");
        }
        let mut addresses = Vec::new();
        for vm in ["on-c", "n-a", "o-b"] {
            let v = wait_vm(a, vm, "running", Duration::from_secs(120)).await;
            addresses.push(v["nics"][0]["ip"].as_str().unwrap_or_default().to_string());
        }
        assert_ne!(
            addresses[0], addresses[1],
            "one address per VM across hosts: {addresses:?}"
        );
        let listen = format!("{}:8080", a.address);
        for (vm, ip) in [("on-c", &addresses[0]), ("n-a", &addresses[1]), ("o-b", &addresses[2])] {
            let deadline = Instant::now() + patience(Duration::from_secs(60));
            loop {
                let shown = common::console_run_at(&listen, &a.key, vm, "ip -4 -o addr show dev eth0").await;
                if shown.contains(&format!("{ip}/")) {
                    break;
                }
                assert!(Instant::now() < deadline, "{vm} has no address {ip}: {shown}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let out = common::console_run_at(&listen, &a.key, "n-a", &format!("ping -c 2 -W 2 {}", addresses[0])).await;
        assert!(
            out.contains("2 packets received"),
            "A's VM cannot reach C's across the overlay: {out}"
        );
        let out = common::console_run_at(&listen, &a.key, "o-b", &format!("ping -c 2 -W 1 {}", addresses[0])).await;
        assert!(
            out.contains("0 packets received"),
            "another network's VM reached it: {out}"
        );
        let (_, nets) = c.call("GET", "/v1/networks/default", None).await;
        assert!(
            nets["spec"]["vxlan"]["vni"].as_u64().is_some(),
            "C's copy is on the overlay: {nets}"
        );

        // Without a rule the scheduler spreads: C already holds a VM, so the next
        // goes elsewhere, and says why.
        let (status, _) = b
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "spread", "image": "tiny", "hypervisor": "qemu",
                "vcpus": 1, "memory_mib": 256, "start": false})),
            )
            .await;
        assert_eq!(status, 202);
        let vm = wait_vm(a, "spread", "stopped", Duration::from_secs(60)).await;
        assert_ne!(vm["host"], "h-c", "{vm}");
        let chosen = &vm["placement"]["verdicts"][0];
        assert!(
            chosen["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("most room after placing")),
            "{vm}"
        );

        // A cordoned host takes no VM, and the refusal names each host's reason.
        let (status, h) = c.call("POST", "/v1/hosts/h-b/cordon", None).await;
        assert_eq!((status, h["state"].as_str()), (200, Some("cordoned")), "{h}");
        let (status, refused) = place_on(a, "h-b").await;
        assert_eq!(
            (status, refused["error"]["code"].as_str()),
            (409, Some("no_host_fits")),
            "{refused}"
        );
        assert!(
            refused["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("h-b: cordoned")),
            "{refused}"
        );
        let (status, _) = a.call("GET", "/v1/vms/nope", None).await;
        assert_eq!(status, 404, "nothing of a refused VM stays");
        let (status, refused) = place_on(a, "h-z").await;
        assert_eq!(status, 422, "{refused}");
        let (status, refused) = a.call("POST", "/v1/hosts/h-b/reboot", None).await;
        assert_eq!(status, 404, "{refused}");
        let (status, _) = c.call("POST", "/v1/hosts/h-b/uncordon", None).await;
        assert_eq!(status, 200);
        // A running host cannot be forgotten.
        let (status, refused) = a.call("DELETE", "/v1/hosts/h-b", None).await;
        assert_eq!(status, 409, "{refused}");

        // A VM that keeps nothing on its host (the tiny image has no disk), placed on B
        // by the scheduler alone: A and C cordoned while it is made.
        for h in ["h-a", "h-c"] {
            assert_eq!(a.call("POST", &format!("/v1/hosts/{h}/cordon"), None).await.0, 200);
        }
        let (status, created) = a
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "mv", "image": "tiny", "hypervisor": "qemu",
                "vcpus": 1, "memory_mib": 256})),
            )
            .await;
        assert_eq!(status, 202, "{created}");
        for h in ["h-a", "h-c"] {
            assert_eq!(a.call("POST", &format!("/v1/hosts/{h}/uncordon"), None).await.0, 200);
        }
        let mv = wait_vm(a, "mv", "running", Duration::from_secs(120)).await;
        assert_eq!(mv["host"], "h-b", "{mv}");
        let (mv_id, mv_ip) = (
            mv["id"].as_str().unwrap_or_default().to_string(),
            mv["nics"][0]["ip"].clone(),
        );

        // A rolling restart of every host's api (and so its daemons: all-in-one) while
        // the VMs run: no host is marked lost, no VM moves or restarts, and the VMs on
        // A and C still reach each other.
        let before: Vec<(Value, Value)> = {
            let (_, l) = hosts[0].call("GET", "/v1/vms", None).await;
            l.as_array()
                .into_iter()
                .flatten()
                .map(|v| (v["host"].clone(), v["pid"].clone()))
                .collect()
        };
        for i in 0..3 {
            hosts[i].stop_api(libc::SIGTERM);
            hosts[i].spawn().await;
            let (_, listed) = hosts[(i + 1) % 3].call("GET", "/v1/hosts", None).await;
            for h in listed.as_array().into_iter().flatten() {
                assert_eq!(h["state"], "ready", "after restarting {}: {h}", hosts[i].name);
            }
        }
        let after: Vec<(Value, Value)> = {
            let (_, l) = hosts[0].call("GET", "/v1/vms", None).await;
            l.as_array()
                .into_iter()
                .flatten()
                .map(|v| (v["host"].clone(), v["pid"].clone()))
                .collect()
        };
        assert_eq!(before, after, "a VM moved or restarted during the rolling restart");
        let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
        let listen = format!("{}:8080", a.address);
        let out = common::console_run_at(&listen, &a.key, "n-a", &format!("ping -c 2 -W 2 {}", addresses[0])).await;
        assert!(out.contains("2 packets received"), "after the rolling restart: {out}");
        let _ = (b, c);

        // The overlays of A reach B (network "other" has VMs on A's side only through
        // its copy there, and o-b on B).
        let fdb_on_a = |hosts: &[Host]| testkit::run("bridge", &["-n", &hosts[0].ns, "fdb", "show"]);
        assert!(
            fdb_on_a(&hosts).contains(&format!("dst {UNDERLAY}.2 ")),
            "{}",
            fdb_on_a(&hosts)
        );

        // B's api dies: within seconds the leader marks it lost, and B's VMs say so.
        // One etcd member down (C's, as when C reboots): the other two keep the
        // quorum, and the cluster goes on (a VM made and shown through A).
        members[2].kill();
        // While the other two elect a leader (when C's was it), a write may be 503 for
        // a moment: a careful client tries again.
        let down = Instant::now();
        let created = loop {
            let (status, created) = hosts[0]
                .call(
                    "POST",
                    "/v1/vms",
                    Some(json!({"name": "quorum", "image": "tiny", "hypervisor": "qemu",
                    "vcpus": 1, "memory_mib": 256, "start": false})),
                )
                .await;
            if status == 202 {
                break created;
            }
            assert_eq!(status, 503, "{created}");
            assert!(
                down.elapsed() < patience(Duration::from_secs(15)),
                "no quorum: {created}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!(
            "hosts: with one etcd member down, a VM made {:.1} s later",
            down.elapsed().as_secs_f64()
        );
        assert!(created["operation"]["id"].is_string(), "{created}");
        wait_vm(&hosts[0], "quorum", "stopped", Duration::from_secs(60)).await;
        let (status, listed) = hosts[1].call("GET", "/v1/hosts", None).await;
        assert_eq!(status, 200, "{listed}");
        assert!(
            listed.as_array().into_iter().flatten().all(|h| h["state"] == "ready"),
            "{listed}"
        );
        members[2] = Member::start(2, &hosts[2]);
        members[2].wait_healthy();

        let on_b = vm["host"] == "h-b";
        // B's api (with its daemons) dies; its VMMs run on.
        hosts[1].kill_api();
        let killed = Instant::now();
        let a = &hosts[0];
        let lost_after = loop {
            let (_, h) = a.call("GET", "/v1/hosts/h-b", None).await;
            if h["state"] == "lost" {
                assert!(h["lost"]["reason"].as_str().is_some_and(|r| r.contains("lease")), "{h}");
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < patience(Duration::from_secs(10)),
                "B is not lost: {h}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!(
            "hosts: B lost {:.1} s after its api was killed",
            lost_after.as_secs_f64()
        );
        assert!(
            lost_after <= patience(Duration::from_secs(5)),
            "lost after {lost_after:?}"
        );
        // B's VM that keeps nothing there runs on another host within 15 s of the
        // failure, with its address, and boots there; the one whose placement names B
        // stays, lost with it.
        let moved_after = loop {
            let (_, v) = a.call("GET", "/v1/vms/mv", None).await;
            if v["state"] == "running" && v["host"] != "h-b" {
                assert_eq!(v["nics"][0]["ip"], mv_ip, "{v}");
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < patience(Duration::from_secs(30)),
                "mv did not move: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!(
            "hosts: B's VM running on another host {:.1} s after its api was killed",
            moved_after.as_secs_f64()
        );
        assert!(
            moved_after <= patience(Duration::from_secs(15)),
            "moved after {moved_after:?}"
        );
        wait_booted(a, "mv", Duration::from_secs(60)).await;
        let (_, v) = a.call("GET", "/v1/vms/o-b", None).await;
        assert_eq!(v["state"], "host_lost", "{v}");
        if on_b {
            // Stopped, it moves too, and stays stopped.
            let v = wait_vm(a, "spread", "stopped", Duration::from_secs(15)).await;
            assert_ne!(v["host"], "h-b", "{v}");
        }
        // Fenced: no overlay of A sends to B or floods there any more.
        let deadline = Instant::now() + patience(Duration::from_secs(5));
        while fdb_on_a(&hosts).contains(&format!("dst {UNDERLAY}.2 ")) {
            assert!(
                Instant::now() < deadline,
                "A still peers with lost B: {}",
                fdb_on_a(&hosts)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, other) = a.call("GET", "/v1/networks/other", None).await;
        assert_eq!(other["spec"]["vxlan"]["peers"], json!([]), "{other}");
        // No new VM goes to a lost host.
        let (status, refused) = place_on(a, "h-b").await;
        assert_eq!(status, 409, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("h-b: lost")),
            "{refused}"
        );

        // B comes back: ready again, its VMs as they were.
        hosts[1].spawn().await;
        let (a, b) = (&hosts[0], &hosts[1]);
        let (_, h) = a.call("GET", "/v1/hosts/h-b", None).await;
        assert_eq!(h["state"], "ready", "{h}");
        assert!(h["lost"].is_null(), "{h}");
        // Back in the overlays.
        let (_, other) = a.call("GET", "/v1/networks/other", None).await;
        assert_eq!(
            other["spec"]["vxlan"]["peers"],
            json!([format!("{UNDERLAY}.2")]),
            "{other}"
        );
        wait_vm(b, "spread", "stopped", Duration::from_secs(30)).await;
        // The pinned VM's VMM ran on through its api's death; the moved one's stale copy
        // on B is gone: no VM runs twice.
        wait_vm(b, "o-b", "running", Duration::from_secs(30)).await;
        assert!(!vm_dirs(b.dir.path()).contains(&mv_id), "B still holds mv's stale copy");
        let (_, listed) = b.call("GET", "/v1/vms", None).await;
        let copies = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["name"] == "mv")
            .count();
        assert_eq!(copies, 1, "{listed}");

        // Draining mv's host (`hearth host drain`): mv moves off, cold (a new VMM that
        // boots again, its address kept); VMs whose placement names the host stay,
        // and the drain says why. The host is cordoned afterwards.
        let (_, v) = a.call("GET", "/v1/vms/mv", None).await;
        let (from, old_pid) = (v["host"].as_str().unwrap_or_default().to_string(), v["pid"].clone());
        let out = Command::new(common::hearth_cli())
            .args(["--url", &a.url(), "--api-key", &a.key, "host", "drain", &from])
            .output()
            .expect("hearth host drain");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
        assert!(said.contains("mv -> "), "{said}");
        assert!(said.contains("its placement names the drained host"), "{said}");
        let v = wait_vm(a, "mv", "running", Duration::from_secs(60)).await;
        assert_ne!(v["host"].as_str(), Some(from.as_str()), "{v}");
        assert_ne!(v["pid"], old_pid, "{v}");
        assert_eq!(v["nics"][0]["ip"], mv_ip, "{v}");
        wait_booted(a, "mv", Duration::from_secs(60)).await;
        let (_, h) = a.call("GET", &format!("/v1/hosts/{from}"), None).await;
        assert_eq!(h["state"], "cordoned", "{h}");
        assert!(
            !h["vms"].as_array().into_iter().flatten().any(|v| v == "default/mv"),
            "{h}"
        );
        assert_eq!(a.call("POST", &format!("/v1/hosts/{from}/uncordon"), None).await.0, 200);

        // Deleting through any api removes the VM on its own host.
        for (via, vm) in [
            (b, "on-c"),
            (a, "spread"),
            (a, "n-a"),
            (b, "o-b"),
            (b, "mv"),
            (a, "quorum"),
        ] {
            let (status, accepted) = via.call("DELETE", &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(status, 202, "{accepted}");
            let deadline = Instant::now() + patience(Duration::from_secs(60));
            loop {
                let (status, _) = via.call("GET", &format!("/v1/vms/{vm}"), None).await;
                if status == 404 {
                    break;
                }
                assert!(Instant::now() < deadline, "{vm} is not deleted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert!(
            !vm_dirs(hosts[2].dir.path()).contains(&id),
            "C's vmm-manager let the VM go"
        );
        assert!(!hosts[2].processes().contains(&pid), "its VMM is gone");
        drop(members);
        drop(hosts);
        let _ = Command::new("ip").args(["link", "del", "hunder0"]).status();
    });
}
