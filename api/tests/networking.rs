//! Networks with real traffic between real guests (QEMU/TCG, tiny image), inside the
//! test's private network namespace: the host reaches VMs, VMs on one network reach
//! each other, networks are isolated (proved by our drop counter), DHCP hands out the
//! IPAM address, and a guest that changes its MAC or IP can no longer send.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{in_private_netns, Stack};
use serde_json::{json, Value};

async fn create_vm(stack: &Stack, name: &str, network: &str, ip: Option<&str>) -> Value {
    let mut nic = json!({"network": network});
    if let Some(ip) = ip {
        nic["ip"] = json!(ip);
    }
    let body = json!({"name": name, "image": "tiny", "hypervisor": "qemu", "memory_mib": 192, "nics": [nic]});
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    accepted
}

fn host_ping(ip: &str) -> bool {
    Command::new("busybox")
        .args(["ping", "-c", "2", "-W", "2", ip])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn counter(name: &str) -> u64 {
    netd::firewall::counters()
        .ok()
        .and_then(|c| c.get(name).map(|v| v.packets))
        .unwrap_or(0)
}

fn received(ping_output: &str) -> Option<u32> {
    let line = ping_output.lines().find(|l| l.contains("packets received"))?;
    line.split(',').nth(1)?.split_whitespace().next()?.parse().ok()
}

#[test]
fn vms_reach_each_other_and_the_host_but_not_other_networks() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        // The default network exists from the first start: NAT and DHCP.
        let (status, default) = stack.call("GET", "/v1/networks/default", None).await;
        assert_eq!(status, 200, "{default}");
        assert_eq!(default["spec"]["nat"], true);
        for (name, subnet) in [("lan-a", "10.50.0.0/24"), ("lan-b", "10.60.0.0/24")] {
            let (status, net) = stack
                .call(
                    "POST",
                    "/v1/networks",
                    Some(json!({"name": name, "subnet": subnet, "dhcp": false})),
                )
                .await;
            assert_eq!(status, 201, "{net}");
            assert_eq!(net["bridge_present"], true);
        }

        // Bad input.
        let cases = [
            (json!({"name": "bad", "subnet": "10.70.0.0/33"}), 422),
            (json!({"name": "bad", "subnet": "not-a-cidr"}), 422),
            (json!({"name": "bad", "subnet": "10.70.0.5/24"}), 422),
            (json!({"name": "overlap", "subnet": "10.50.0.128/25"}), 409),
            (json!({"name": "lan-a", "subnet": "10.80.0.0/24"}), 409),
            (
                json!({"name": "vx0", "subnet": "10.81.0.0/24", "vxlan": {"vni": 0, "local": "127.0.0.1"}}),
                422,
            ),
            (
                json!({"name": "vx1", "subnet": "10.82.0.0/24", "vxlan": {"vni": 16777216, "local": "127.0.0.1"}}),
                422,
            ),
        ];
        for (body, want) in cases {
            let (status, err) = stack.call("POST", "/v1/networks", Some(body.clone())).await;
            assert_eq!(status, want, "{body}: {err}");
        }
        // Long names are fine: interface names are derived and bounded.
        let long = "a-network-name-far-longer-than-linux-interface-names-allow";
        let (status, net) = stack
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": long, "subnet": "10.90.0.0/24"})),
            )
            .await;
        assert_eq!(status, 201, "{net}");
        assert!(net["bridge"].as_str().expect("bridge").len() <= 15);
        assert_eq!(stack.call("DELETE", &format!("/v1/networks/{long}"), None).await.0, 204);

        let a1 = create_vm(&stack, "a1", "lan-a", Some("10.50.0.10")).await;
        let a2 = create_vm(&stack, "a2", "lan-a", None).await;
        let b1 = create_vm(&stack, "b1", "lan-b", None).await;
        let d1 = create_vm(&stack, "d1", "default", None).await;
        // A taken address and one outside the subnet are refused at once.
        let (status, err) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "x1", "image": "tiny", "nics": [{"network": "lan-a", "ip": "10.50.0.10"}]})),
            )
            .await;
        assert_eq!(status, 409, "{err}");
        let (status, err) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "x2", "image": "tiny", "nics": [{"network": "lan-a", "ip": "10.99.0.10"}]})),
            )
            .await;
        assert_eq!(status, 422, "{err}");
        assert_eq!(stack.call("GET", "/v1/vms/x1", None).await.0, 404);
        for acc in [&a1, &a2, &b1, &d1] {
            let op = stack.wait_op(acc).await;
            assert_eq!(op["status"], "succeeded", "{op}");
        }
        let ip_of = |v: &Value| v["nics"][0]["ip"].as_str().expect("nic ip").to_string();
        let a1 = stack.vm("a1").await;
        let a2 = stack.vm("a2").await;
        let b1 = stack.vm("b1").await;
        let d1 = stack.vm("d1").await;
        assert_eq!(ip_of(&a1), "10.50.0.10");
        assert!(ip_of(&a2).starts_with("10.50.0.") && ip_of(&a2) != "10.50.0.10" && ip_of(&a2) != "10.50.0.1");
        assert!(ip_of(&b1).starts_with("10.60.0."));
        for vm in ["a1", "a2", "b1", "d1"] {
            stack
                .wait_console(vm, "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
                .await;
        }

        // The host reaches a VM.
        assert!(host_ping(&ip_of(&a1)), "host cannot ping a1");
        // Two VMs on one network reach each other.
        let out = stack.console_run("a1", &format!("ping -c 2 -W 2 {}", ip_of(&a2))).await;
        assert_eq!(received(&out), Some(2), "a1 -> a2: {out}");
        // A VM on lan-a cannot reach lan-b, and our rule is what dropped it.
        let before = counter(&netd::firewall::isolation_counter("lan-a"));
        let out = stack.console_run("a1", &format!("ping -c 2 -W 1 {}", ip_of(&b1))).await;
        assert_eq!(received(&out), Some(0), "a1 -> b1 must fail: {out}");
        let after = counter(&netd::firewall::isolation_counter("lan-a"));
        assert!(
            after >= before + 2,
            "isolation counter went {before} -> {after}: packets were not dropped by hearth"
        );

        // DHCP: the guest on the default network got exactly IPAM's address.
        let mut got = String::new();
        for _ in 0..20 {
            got = stack.console_run("d1", "ip -4 -o addr show dev eth0").await;
            if got.contains("inet ") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(got.contains(&format!("inet {}/24", ip_of(&d1))), "DHCP address: {got}");

        // Anti-spoofing: a guest sending from another IP, then from another MAC, is cut off.
        let gw = "10.50.0.1";
        let tap = a1["nics"][0]["tap"].as_str().expect("tap").to_string();
        let spoof = netd::firewall::spoof_counter(&tap);
        let before = counter(&spoof);
        let out = stack
            .console_run(
                "a1",
                &format!("ip addr add 10.50.0.250/24 dev eth0; ping -c 2 -W 1 -I 10.50.0.250 {gw}"),
            )
            .await;
        assert_eq!(received(&out), Some(0), "spoofed IP must not get through: {out}");
        let out = stack.console_run("a1", &format!("ping -c 1 -W 2 {gw}")).await;
        assert_eq!(received(&out), Some(1), "its own address still works: {out}");
        let out = stack
            .console_run("a1", &format!("ip link set eth0 down; ip link set eth0 address 52:54:00:66:66:66; ip link set eth0 up; ping -c 2 -W 1 {gw}"))
            .await;
        assert_eq!(received(&out), Some(0), "spoofed MAC must not get through: {out}");
        assert!(counter(&spoof) > before, "spoof counter did not move");

        // A network with VMs cannot be deleted; deleting the VMs frees TAPs and addresses.
        let (status, err) = stack.call("DELETE", "/v1/networks/lan-a", None).await;
        assert_eq!(status, 409, "{err}");
        for vm in ["a1", "a2", "b1", "d1"] {
            let (_, acc) = stack.call("DELETE", &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(stack.wait_op(&acc).await["status"], "succeeded");
        }
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists(),
            "TAP {tap} left behind"
        );
        let (_, lan_a) = stack.call("GET", "/v1/networks/lan-a", None).await;
        assert_eq!(lan_a["allocated"], 0, "{lan_a}");
        assert_eq!(stack.call("DELETE", "/v1/networks/lan-a", None).await.0, 204);
        assert_eq!(stack.call("GET", "/v1/networks/lan-a", None).await.0, 404);
    });
}

fn nft_ruleset() -> String {
    let out = Command::new("nft").args(["list", "ruleset"]).output().expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// netd puts back a bridge or TAP deleted by hand, and a restart of the whole stack
/// (SIGKILL) changes no address, duplicates no rule and keeps traffic flowing.
#[test]
fn netd_repairs_the_host_and_restarts_keep_traffic_flowing() {
    in_private_netns(|| async {
        let mut stack = Stack::start(&[]).await;
        let (status, net) = stack
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": "lan-r", "subnet": "10.55.0.0/24", "dhcp": false})),
            )
            .await;
        assert_eq!(status, 201, "{net}");
        let bridge = net["bridge"].as_str().expect("bridge").to_string();
        let acc = create_vm(&stack, "r1", "lan-r", None).await;
        assert_eq!(stack.wait_op(&acc).await["status"], "succeeded");
        let vm = stack.vm("r1").await;
        let ip = vm["nics"][0]["ip"].as_str().expect("ip").to_string();
        let tap = vm["nics"][0]["tap"].as_str().expect("tap").to_string();
        stack
            .wait_console("r1", "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
            .await;
        assert!(host_ping(&ip));

        // The CLI lists it.
        let out = Command::new(common::hearth_cli())
            .args(["network", "list"])
            .env("HEARTH_URL", stack.url())
            .env("HEARTH_API_KEY", &stack.key)
            .output()
            .expect("hearth");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            list.lines()
                .any(|l| l.starts_with("lan-r") && l.contains("10.55.0.0/24")),
            "{list}"
        );

        // Delete the bridge behind netd's back: it comes back, with the TAP on it.
        assert!(Command::new("ip")
            .args(["link", "del", &bridge])
            .status()
            .expect("ip")
            .success());
        let mut back = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).ok();
            if master.is_some_and(|m| m.ends_with(&bridge)) {
                back = true;
                break;
            }
        }
        assert!(back, "netd did not restore bridge {bridge} with {tap} on it");
        assert!(host_ping(&ip), "traffic after the bridge came back");

        // Restart everything; the VM, its address and the rules stay as they were.
        let rules = nft_ruleset();
        stack.restart(libc::SIGKILL).await;
        assert!(host_ping(&ip), "traffic right after the restart");
        let vm = stack.vm("r1").await;
        assert_eq!(vm["nics"][0]["ip"].as_str(), Some(ip.as_str()));
        assert_eq!(vm["state"], "running");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = nft_ruleset();
        let count = |r: &str| {
            r.lines()
                .filter(|l| l.contains("drop") || l.contains("accept") || l.contains("masquerade"))
                .count()
        };
        assert_eq!(
            count(&again),
            count(&rules),
            "rules duplicated or lost across the restart:\n{rules}\n---\n{again}"
        );
        let out = stack.console_run("r1", "ping -c 2 -W 2 10.55.0.1").await;
        assert_eq!(received(&out), Some(2), "guest -> gateway after restart: {out}");
    });
}
