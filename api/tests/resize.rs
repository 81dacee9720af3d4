//! Resizing a VM: `PATCH /v1/vms/{id}` hot-adds vCPUs and memory that a running guest
//! sees without a reboot (QEMU/TCG, the tiny guest), says when a restart would be
//! needed and restarts only when asked (`?restart=true`), and changes nothing on bad
//! input.

mod common;

use std::time::{Duration, Instant};

use common::{in_private_netns, Stack};
use serde_json::{json, Value};

/// What the guest says about itself: online vCPUs and MemTotal in MiB.
async fn guest_size(stack: &Stack, vm: &str) -> (u32, u64) {
    let out = stack
        .console_run(
            vm,
            "echo CPUS=$(nproc) MEM=$(sed -n 's/MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)",
        )
        .await;
    let field = |k: &str| -> u64 {
        out.split_whitespace()
            .rev()
            .filter_map(|w| w.strip_prefix(k))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {out:?}"))
    };
    (field("CPUS=") as u32, field("MEM=") / 1024)
}

/// Polls the guest until it has `cpus` vCPUs and at least `mem_mib` of memory online
/// (hot-plugged CPUs and memory blocks come online a moment after the ACPI event, each
/// on its own).
async fn wait_guest_size(stack: &Stack, vm: &str, cpus: u32, mem_mib: u64) -> (u32, u64) {
    let start = Instant::now();
    loop {
        let size = guest_size(stack, vm).await;
        if size.0 == cpus && size.1 >= mem_mib {
            return size;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{vm} sees {size:?}, not {cpus} vCPUs and {mem_mib} MiB"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn patch(stack: &Stack, vm: &str, query: &str, body: Value) -> (u16, Value) {
    stack.call("PATCH", &format!("/v1/vms/{vm}{query}"), Some(body)).await
}

#[test]
fn a_running_qemu_guest_sees_hot_added_vcpus_and_memory() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let body = json!({"name": "grow", "image": "tiny", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
                          "max_vcpus": 4, "max_memory_mib": 512});
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let vm = stack.vm("grow").await;
        assert_eq!(
            (vm["max_vcpus"].as_u64(), vm["max_memory_mib"].as_u64()),
            (Some(4), Some(512)),
            "{vm}"
        );
        let pid = vm["pid"].as_u64();
        stack
            .wait_console("grow", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        let (cpus, mem) = guest_size(&stack, "grow").await;
        assert_eq!(cpus, 1);

        // Grown while it runs: 2 more vCPUs and 256 MiB more, no reboot.
        let (status, v) = patch(&stack, "grow", "", json!({"vcpus": 3, "memory_mib": 512})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            (v["vcpus"].as_u64(), v["memory_mib"].as_u64()),
            (Some(3), Some(512)),
            "{v}"
        );
        let (cpus, mem_after) = wait_guest_size(&stack, "grow", 3, mem + 250).await;
        assert_eq!(cpus, 3);
        assert!(mem_after >= mem + 250, "MemTotal {mem} MiB -> {mem_after} MiB");
        let v = stack.vm("grow").await;
        assert_eq!(v["pid"].as_u64(), pid, "the same VMM: no restart");
        assert_eq!(
            stack.console_log("grow").await.matches("HEARTH-GUEST-READY").count(),
            1,
            "no reboot"
        );
        eprintln!("guest: 1 vCPU, {mem} MiB -> {cpus} vCPUs, {mem_after} MiB");

        // A snapshot with memory of the grown VM, restored: the fresh QEMU is built with
        // the hot-plugged vCPUs and DIMM where they were, and the guest goes on with
        // them, without a reboot.
        let (status, accepted) = stack
            .call(
                "POST",
                "/v1/vms/grow/snapshots",
                Some(json!({"name": "grown", "memory": true})),
            )
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let (status, accepted) = stack
            .call("POST", "/v1/vms/grow/restore", Some(json!({"snapshot": "grown"})))
            .await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}\n{}", stack.log());
        let restored = stack.vm("grow").await;
        assert_ne!(restored["pid"].as_u64(), pid, "a fresh QEMU: {restored}");
        assert_eq!(
            guest_size(&stack, "grow").await,
            (cpus, mem_after),
            "the restored guest's size"
        );
        assert_eq!(
            stack.console_log("grow").await.matches("HEARTH-GUEST-READY").count(),
            1,
            "no reboot"
        );
        let (status, _) = stack.call("DELETE", "/v1/vms/grow/snapshots/grown", None).await;
        assert_eq!(status, 204);
        let pid = restored["pid"].as_u64();

        // What would need a restart is refused, saying so, and changes nothing.
        for (body, needle) in [
            (json!({"vcpus": 5}), "room for 4 vCPUs"),
            (json!({"memory_mib": 256}), "memory back"),
            (json!({"vcpus": 2}), "vCPUs back"),
        ] {
            let (status, e) = patch(&stack, "grow", "", body.clone()).await;
            assert_eq!(status, 409, "{body}: {e}");
            assert_eq!(e["error"]["code"], "restart_required", "{e}");
            let msg = e["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(needle) && msg.contains("restart=true"), "{body}: {msg}");
        }
        // Bad input: 4xx with a message, nothing changed.
        for (body, status_wanted) in [
            (json!({}), 422),
            (json!({"vcpus": 0}), 422),
            (json!({"memory_mib": 16}), 422),
            (json!({"vcpus": 2, "colour": "red"}), 422),
            (json!({"vcpus": "two"}), 422),
        ] {
            let (status, e) = patch(&stack, "grow", "", body.clone()).await;
            assert_eq!(status, status_wanted, "{body}: {e}");
            assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        }
        assert_eq!(patch(&stack, "nope", "", json!({"vcpus": 2})).await.0, 404);
        let v = stack.vm("grow").await;
        assert_eq!(
            (v["vcpus"].as_u64(), v["memory_mib"].as_u64(), v["pid"].as_u64()),
            (Some(3), Some(512), pid)
        );
        assert_eq!(guest_size(&stack, "grow").await.0, 3);

        // Asked to restart: it does, with the new size.
        let (status, v) = patch(&stack, "grow", "?restart=true", json!({"vcpus": 2, "memory_mib": 384})).await;
        assert_eq!(status, 200, "{v}");
        assert_ne!(v["pid"].as_u64(), pid, "restarted: {v}");
        assert_eq!(v["state"], "running", "{v}");
        stack
            .wait_console("grow", "HEARTH-GUEST-READY", 2, Duration::from_secs(60))
            .await;
        let (cpus, mem_restarted) = guest_size(&stack, "grow").await;
        assert_eq!(cpus, 2);
        assert!(
            mem_restarted < mem_after && mem_restarted > mem,
            "{mem} < {mem_restarted} < {mem_after}"
        );

        // A stopped VM takes its new size at the next start (here through the CLI).
        stack.act("grow", "stop").await;
        let out = std::process::Command::new(common::hearth_cli())
            .args(["vm", "resize", "grow", "--vcpus", "1", "--memory", "256"])
            .env("HEARTH_URL", stack.url())
            .env("HEARTH_API_KEY", &stack.key)
            .output()
            .expect("run hearth");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shown}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            shown.contains("1 (room for 4)") && shown.contains("256 MiB (room for 512 MiB)"),
            "{shown}"
        );
        stack.act("grow", "start").await;
        stack
            .wait_console("grow", "HEARTH-GUEST-READY", 3, Duration::from_secs(60))
            .await;
        assert_eq!(guest_size(&stack, "grow").await.0, 1);
    });
}
