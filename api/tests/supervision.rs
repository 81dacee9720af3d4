//! Supervision: VMs survive restarts of the api and its daemons, and a VMM that dies
//! is noticed at once and reported with the reason.

mod common;

use std::time::{Duration, Instant};

use common::{create_body, in_private_netns, Stack};

async fn boot(stack: &Stack, name: &str, hypervisor: &str) -> u32 {
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(create_body(name, hypervisor))).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    stack
        .wait_console(name, "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
        .await;
    stack.vm(name).await["pid"].as_u64().expect("pid") as u32
}

/// Restarting the whole all-in-one process (gracefully, then by SIGKILL) leaves the VM
/// running and managed: state, console and stop work afterwards.
async fn restart_keeps_vm(hypervisor: &'static str) {
    let mut stack = Stack::start(&[]).await;
    let pid = boot(&stack, "keep", hypervisor).await;
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let stopping = Instant::now();
        stack.stop_api(signal);
        // A graceful stop does not wait for long-lived streams (the api follows
        // vmm-manager's events; consoles).
        assert!(
            stopping.elapsed() < Duration::from_secs(3),
            "stopping with signal {signal} took {:?}",
            stopping.elapsed()
        );
        stack.spawn().await;
        assert_eq!(stack.listed("keep").await["pid"].as_u64(), Some(pid as u64));
        let vm = stack.vm("keep").await;
        assert_eq!(vm["state"], "running", "after signal {signal}: {vm}");
        assert_eq!(vm["pid"].as_u64(), Some(pid as u64), "the same VMM was re-adopted");
        let out = stack.console_exchange("keep", "echo $((6*7))\n", "42\r\n").await;
        assert!(out.contains("42"));
        // Scrollback from before the restart is still there.
        assert!(stack.console_log("keep").await.contains("HEARTH-GUEST-READY"));
    }
    stack.act("keep", "stop").await;
    assert_eq!(stack.vm("keep").await["state"], "stopped");
    assert!(stack.vmm_processes().is_empty(), "{:?}", stack.vmm_processes());
}

#[test]
fn qemu_vm_survives_api_restarts() {
    in_private_netns(|| restart_keeps_vm("qemu"));
}

#[test]
fn cloud_hypervisor_vm_survives_api_restarts() {
    in_private_netns(|| restart_keeps_vm("cloud-hypervisor"));
}

/// A VMM killed behind hearth's back is reported failed within a second, with the reason.
#[test]
fn dead_vmm_is_noticed_within_a_second() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let pid = boot(&stack, "victim", "qemu").await;
        // SAFETY: kills the VMM this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let start = Instant::now();
        let vm = loop {
            let vm = stack.vm("victim").await;
            if vm["state"] != "running" {
                break vm;
            }
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "still running after 1 s: {vm}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(vm["state"], "failed", "{vm}");
        assert!(vm["reason"].as_str().unwrap_or_default().contains("signal 9"), "{vm}");
        // It can be started again.
        stack.act("victim", "start").await;
        stack
            .wait_console("victim", "HEARTH-GUEST-READY", 2, Duration::from_secs(60))
            .await;
    });
}

/// The guest powering itself off is a clean stop; a Cloud Hypervisor vCPU failure is a
/// failure although the VMM exits with status 0 (only its log tells).
#[test]
fn guest_poweroff_stops_and_vcpu_error_fails() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        boot(&stack, "quitter", "qemu").await;
        stack.console_exchange("quitter", "poweroff\n", "Power down").await;
        let start = Instant::now();
        loop {
            let vm = stack.vm("quitter").await;
            if vm["state"] == "stopped" {
                assert!(
                    vm["reason"].as_str().unwrap_or_default().contains("powered off"),
                    "{vm}"
                );
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{vm}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    in_private_netns(|| async {
        // The fake's failure injection: a vCPU error 1.5 s after boot, exit status 0
        // (VMMs start with a clean environment; --vmm-env gives them a variable).
        let stack = Stack::start(&["--vmm-env", "FAKE_CH_VCPU_ERROR_AFTER_MS=1500"]).await;
        boot(&stack, "crasher", "cloud-hypervisor").await;
        let start = Instant::now();
        loop {
            let vm = stack.vm("crasher").await;
            if vm["state"] != "running" {
                assert_eq!(vm["state"], "failed", "{vm}");
                assert!(
                    vm["reason"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("VCPU generated error"),
                    "{vm}"
                );
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{vm}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
