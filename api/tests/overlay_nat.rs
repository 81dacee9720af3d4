//! Traffic that leaves the host: NAT through a namespace playing the uplink router, and
//! a VXLAN network spanning two "hosts" (this test's namespace running the whole stack,
//! and a second namespace running its own netd) joined by a veth underlay.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{in_private_netns, Stack};
use serde_json::json;

/// A network namespace held open by a `sleep` process; commands run in it through
/// nsenter. Dropping it kills what it started, by PID.
struct PeerNs {
    holder: Child,
    extra: Vec<Child>,
}

impl PeerNs {
    fn new() -> Self {
        let holder = Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .spawn()
            .expect("unshare");
        std::thread::sleep(Duration::from_millis(100));
        let ns = Self { holder, extra: vec![] };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn pid(&self) -> String {
        self.holder.id().to_string()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid(), "-n", "--"]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("nsenter");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PeerNs {
    fn drop(&mut self) {
        for c in self.extra.iter_mut().chain(std::iter::once(&mut self.holder)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn host(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn received(ping_output: &str) -> Option<u32> {
    let line = ping_output.lines().find(|l| l.contains("packets received"))?;
    line.split(',').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Links this namespace to `peer` with a veth pair: `ours` here, `theirs` there.
fn underlay(peer: &PeerNs, ours: &str, our_ip: &str, theirs: &str, their_ip: &str) {
    host(&["ip", "link", "add", ours, "type", "veth", "peer", "name", theirs]);
    host(&["ip", "link", "set", theirs, "netns", &peer.pid()]);
    host(&["ip", "addr", "add", our_ip, "dev", ours]);
    host(&["ip", "link", "set", ours, "up"]);
    peer.run(&["ip", "addr", "add", their_ip, "dev", theirs]);
    peer.run(&["ip", "link", "set", theirs, "up"]);
}

async fn guest_address(stack: &Stack, vm: &str, ip: &str) {
    for _ in 0..30 {
        if stack
            .console_run(vm, "ip -4 -o addr show dev eth0")
            .await
            .contains(&format!("inet {ip}/"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{vm} never got {ip}");
}

#[test]
fn nat_network_reaches_the_uplink_with_the_hosts_address() {
    in_private_netns(|| async {
        let router = PeerNs::new();
        underlay(&router, "hup0", "192.0.2.1/24", "rup0", "192.0.2.254/24");
        host(&["ip", "route", "add", "default", "via", "192.0.2.254"]);
        // Behind the router: an address the host has no route to except through it.
        // (On its loopback: this kernel has no dummy interfaces.)
        router.run(&["ip", "addr", "add", "198.51.100.10/32", "dev", "lo"]);
        // The router counts echo requests by source address.
        let script = "table ip watch {\n counter from_host {}\n counter from_vm {}\n chain input {\n  type filter hook input priority 0; policy accept;\n  ip saddr 192.0.2.1 icmp type echo-request counter name from_host\n  ip saddr 10.77.0.0/24 icmp type echo-request counter name from_vm\n }\n}\n";
        let mut nft = router
            .cmd(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        std::io::Write::write_all(nft.stdin.as_mut().expect("stdin"), script.as_bytes()).expect("write");
        drop(nft.stdin.take());
        assert!(nft.wait().expect("nft").success());

        let stack = Stack::start(&[]).await;
        // On the default network (NAT + DHCP).
        let (status, acc) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "n1", "image": "tiny", "hypervisor": "qemu", "memory_mib": 192})),
            )
            .await;
        assert_eq!(status, 202, "{acc}");
        assert_eq!(stack.wait_op(&acc).await["status"], "succeeded");
        let vm = stack.vm("n1").await;
        assert_eq!(vm["nics"][0]["network"], "default");
        let ip = vm["nics"][0]["ip"].as_str().expect("ip").to_string();
        stack
            .wait_console("n1", "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
            .await;
        guest_address(&stack, "n1", &ip).await;

        let out = stack.console_run("n1", "ping -c 2 -W 2 198.51.100.10").await;
        assert_eq!(
            received(&out),
            Some(2),
            "the VM cannot reach the address behind the router: {out}"
        );
        let counters = router.run(&["nft", "list", "counters"]);
        let packets = |name: &str| -> u64 {
            let block = counters.split("counter ").find(|b| b.starts_with(name)).unwrap_or("");
            block
                .split("packets ")
                .nth(1)
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        assert!(
            packets("from_host") >= 2,
            "the router did not see the host's address: {counters}"
        );
        assert_eq!(
            packets("from_vm"),
            0,
            "the VM's own address leaked past NAT: {counters}"
        );
    });
}

#[test]
fn vxlan_network_spans_two_hosts() {
    in_private_netns(|| async {
        let mut host2 = PeerNs::new();
        underlay(&host2, "u1", "192.0.2.1/24", "u2", "192.0.2.2/24");
        let stack = Stack::start(&[]).await;
        let vx1 = json!({"vni": 4242, "local": "192.0.2.1", "device": "u1", "peers": ["192.0.2.2"]});
        let (status, net) = stack
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": "overlay", "subnet": "10.88.0.0/24", "dhcp": false,
                            "range": {"start": "10.88.0.10", "end": "10.88.0.100"}, "vxlan": vx1})),
            )
            .await;
        assert_eq!(status, 201, "{net}");

        // Host 2: its own netd (with a sysfs of its namespace), same VNI, its own range
        // and gateway address.
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("netd.sock");
        let netd_bin = std::path::Path::new(env!("CARGO_BIN_EXE_hearth-api")).with_file_name("netd");
        assert!(netd_bin.exists(), "netd binary missing at {}", netd_bin.display());
        let script = format!(
            "mount -t sysfs sysfs /sys && exec {} --socket {} --state-dir {}",
            netd_bin.display(),
            sock.display(),
            tmp.path().join("state").display()
        );
        let netd2 = host2
            .cmd(&["unshare", "-m", "--propagation", "private", "sh", "-c", &script])
            .stderr(Stdio::null())
            .spawn()
            .expect("netd on host 2");
        host2.extra.push(netd2);
        let client = netd::http::client::NetdClient::new(&sock);
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.networks().await.is_err() {
            assert!(Instant::now() < deadline, "netd on host 2 did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let spec: netd::network::NetworkSpec = serde_json::from_value(json!({
            "name": "overlay", "subnet": "10.88.0.0/24", "gateway": "10.88.0.254", "dhcp": false,
            "range": {"start": "10.88.0.200", "end": "10.88.0.250"},
            "vxlan": {"vni": 4242, "local": "192.0.2.2", "device": "u2", "peers": ["192.0.2.1"]}
        }))
        .expect("spec");
        let status = client.ensure_network(&spec).await.expect("network on host 2");
        assert!(status.bridge_present);

        let (status, acc) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "v1", "image": "tiny", "hypervisor": "qemu", "memory_mib": 192, "nics": [{"network": "overlay"}]})),
            )
            .await;
        assert_eq!(status, 202, "{acc}");
        assert_eq!(stack.wait_op(&acc).await["status"], "succeeded");
        let ip = stack.vm("v1").await["nics"][0]["ip"].as_str().expect("ip").to_string();
        stack
            .wait_console("v1", "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
            .await;

        // Host 2 reaches the VM on host 1 across the overlay, and the VM reaches host 2.
        let out = host2
            .cmd(&["busybox", "ping", "-c", "2", "-W", "2", &ip])
            .output()
            .expect("ping");
        assert!(
            out.status.success(),
            "host 2 -> VM: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = stack.console_run("v1", "ping -c 2 -W 2 10.88.0.254").await;
        assert_eq!(received(&out), Some(2), "VM -> host 2: {out}");
    });
}
