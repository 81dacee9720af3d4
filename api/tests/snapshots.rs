//! VM snapshots under QEMU/TCG with the tiny guest: a shell loop counts on the console
//! and a volume holds a marker; a snapshot with memory is taken while it counts; the
//! loop goes on and the disk is overwritten; the restore brings back the count (the
//! loop resumes from the snapshot's value, in the same shell) and the disk's content.
//! Bad requests change nothing. The real Cloud Hypervisor's part is in
//! `cloud_hypervisor.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{in_private_netns, Stack};
use serde_json::{json, Value};

/// The numbers the guest's loop printed (`COUNT=n`), in order.
fn counts(log: &str) -> Vec<u64> {
    log.split("COUNT=")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

async fn last_count(stack: &Stack, vm: &str) -> u64 {
    counts(&stack.console_log(vm).await).last().copied().unwrap_or(0)
}

async fn count_past(stack: &Stack, vm: &str, n: u64) -> u64 {
    let start = Instant::now();
    loop {
        let c = last_count(stack, vm).await;
        if c > n {
            return c;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{vm} did not count past {n}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn op_of(stack: &Stack, accepted: &Value) -> Value {
    stack.wait_op(accepted).await
}

/// What the first 32 bytes of the guest's data disk hold.
async fn disk_marker(stack: &Stack, vm: &str) -> String {
    stack
        .console_run(vm, "dd if=/dev/vda bs=32 count=1 2>/dev/null | tr -d '\\000'; echo")
        .await
}

#[test]
fn a_snapshot_with_memory_brings_back_the_count_and_the_disk() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let (status, v) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "16M"})))
            .await;
        assert_eq!(status, 201, "{v}");
        let (status, v) = stack
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": "lab", "subnet": "10.91.0.0/24"})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        let body = json!({"name": "orig", "image": "tiny", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
                          "volumes": ["data"], "nics": [{"network": "lab"}]});
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(op_of(&stack, &accepted).await["status"], "succeeded");
        stack
            .wait_console("orig", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        stack
            .console_run(
                "orig",
                "printf SNAPSHOT-BEFORE- | dd of=/dev/vda conv=fsync 2>/dev/null",
            )
            .await;
        stack
            .console_exchange(
                "orig",
                "(i=0; while true; do i=$((i+1)); echo COUNT=$i; sleep 1; done) &\n",
                "COUNT=1",
            )
            .await;
        count_past(&stack, "orig", 2).await;
        // A second volume hot-plugged while it runs (it lands in a PCIe root port, where
        // the restore must put it again).
        let (status, v) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "hot", "size": "16M"})))
            .await;
        assert_eq!(status, 201, "{v}");
        let (status, v) = stack
            .call("POST", "/v1/volumes/hot/attach", Some(json!({"vm": "orig"})))
            .await;
        assert_eq!(status, 200, "{v}");
        let start = Instant::now();
        while !stack.console_run("orig", "ls /sys/block").await.contains("vdb") {
            assert!(start.elapsed() < Duration::from_secs(30), "the guest did not see vdb");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stack
            .console_run("orig", "printf HOT-BEFORE | dd of=/dev/vdb conv=fsync 2>/dev/null")
            .await;

        // Taken while it counts: the VM is paused for it and runs on after.
        let (status, accepted) = stack
            .call(
                "POST",
                "/v1/vms/orig/snapshots",
                Some(json!({"name": "s1", "memory": true})),
            )
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(accepted["snapshot"]["state"], "creating", "{accepted}");
        let op = op_of(&stack, &accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let at_snapshot = last_count(&stack, "orig").await;
        let (status, list) = stack.call("GET", "/v1/vms/orig/snapshots", None).await;
        assert_eq!(status, 200, "{list}");
        let s1 = &list[0];
        assert_eq!(
            (s1["name"].as_str(), s1["memory"].as_bool(), s1["state"].as_str()),
            (Some("s1"), Some(true), Some("ready")),
            "{list}"
        );
        assert!(
            s1["size_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "holds the guest's memory: {s1}"
        );
        assert_eq!(s1["disks"][0]["volume"], "data", "{s1}");
        assert_eq!(stack.vm("orig").await["state"], "running");

        // The loop goes on; the disk is overwritten.
        let later = count_past(&stack, "orig", at_snapshot + 3).await;
        stack
            .console_run(
                "orig",
                "printf OVERWRITTEN-AFTER | dd of=/dev/vda conv=fsync 2>/dev/null",
            )
            .await;
        assert!(disk_marker(&stack, "orig").await.contains("OVERWRITTEN-AFTER"));

        // Restored: the count resumes from the snapshot's value, the disk is as it was.
        let log_before = stack.console_log("orig").await.len();
        let (status, accepted) = stack
            .call("POST", "/v1/vms/orig/restore", Some(json!({"snapshot": "s1"})))
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(
            accepted["vm"]["state"], "running",
            "the VM as the restore began: {accepted}"
        );
        let op = op_of(&stack, &accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}\n{}", stack.log());
        let vm = stack.vm("orig").await;
        assert_eq!(vm["state"], "running", "{vm}");
        let start = Instant::now();
        let resumed = loop {
            let log = stack.console_log("orig").await;
            if let Some(&first) = counts(&log[log_before.min(log.len())..]).first() {
                break first;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no count after the restore");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        eprintln!("counted to {at_snapshot} at the snapshot, {later} after it, {resumed} first after the restore");
        assert!(
            resumed <= at_snapshot + 2 && resumed + 2 >= at_snapshot,
            "the loop resumed at {resumed}, the snapshot was taken at {at_snapshot} (and it had reached {later})"
        );
        assert!(
            disk_marker(&stack, "orig").await.contains("SNAPSHOT-BEFORE-"),
            "the disk holds the snapshot's content"
        );
        let hot = stack
            .console_run("orig", "dd if=/dev/vdb bs=16 count=1 2>/dev/null | tr -d '\\000'; echo")
            .await;
        assert!(
            hot.contains("HOT-BEFORE"),
            "the hot-plugged disk is back in its place: {hot}"
        );

        // Listed by the CLI.
        let out = std::process::Command::new(common::hearth_cli())
            .args(["vm", "snapshots", "orig"])
            .env("HEARTH_URL", stack.url())
            .env("HEARTH_API_KEY", &stack.key)
            .output()
            .expect("run hearth");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains("s1") && shown.contains("ready") && shown.contains("yes"),
            "{shown}"
        );

        // A VM made from the snapshot runs beside the original, with its own MAC and
        // address.
        let body = json!({"name": "copy", "image": "tiny", "hypervisor": "qemu", "from_snapshot": "orig@s1",
                          "nics": [{"network": "lab"}]});
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(op_of(&stack, &accepted).await["status"], "succeeded");
        stack
            .wait_console("copy", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        let (orig, copy) = (stack.vm("orig").await, stack.vm("copy").await);
        assert_eq!(
            (orig["state"].as_str(), copy["state"].as_str()),
            (Some("running"), Some("running"))
        );
        assert_ne!(orig["nics"][0]["ip"], copy["nics"][0]["ip"], "{orig}\n{copy}");
        assert_ne!(orig["nics"][0]["mac"], copy["nics"][0]["mac"]);
        // Its data volumes are clones of the snapshot's, attached in the same order,
        // with the content they had then; a write to the copy's leaves the original's.
        let attached: Vec<&str> = copy["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["volume"].as_str())
            .collect();
        assert_eq!(attached, ["copy-data", "copy-hot"], "{copy}");
        let (_, cloned) = stack.call("GET", "/v1/volumes/copy-data", None).await;
        assert_eq!(cloned["origin"], "data@vm-s1", "{cloned}");
        assert!(
            disk_marker(&stack, "copy").await.contains("SNAPSHOT-BEFORE-"),
            "the copy's data volume holds the snapshot's content"
        );
        let hot = stack
            .console_run("copy", "dd if=/dev/vdb bs=16 count=1 2>/dev/null | tr -d '\\000'; echo")
            .await;
        assert!(hot.contains("HOT-BEFORE"), "the copy's second volume too: {hot}");
        stack
            .console_run("copy", "printf COPY-WROTE-THIS | dd of=/dev/vda conv=fsync 2>/dev/null")
            .await;
        assert!(disk_marker(&stack, "copy").await.contains("COPY-WROTE-THIS"));
        assert!(
            disk_marker(&stack, "orig").await.contains("SNAPSHOT-BEFORE-"),
            "the original's volume is its own"
        );
        // A name a clone would take is taken: 409 before anything is made.
        let (status, vol) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "c3-data", "size": "1M"})))
            .await;
        assert_eq!(status, 201, "{vol}");
        let (status, e) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "c3", "image": "tiny", "from_snapshot": "orig@s1"})),
            )
            .await;
        assert_eq!(status, 409, "{e}");
        let (status, _) = stack.call("GET", "/v1/volumes/c3-hot", None).await;
        assert_eq!(status, 404, "nothing made");
        let (status, _) = stack.call("DELETE", "/v1/volumes/c3-data", None).await;
        assert_eq!(status, 204);
        for (body, needle) in [
            (
                json!({"name": "c2", "image": "tiny", "from_snapshot": "orig@nope"}),
                "no such snapshot",
            ),
            (
                json!({"name": "c2", "image": "tiny", "from_snapshot": "nope@s1"}),
                "no such VM",
            ),
            (
                json!({"name": "c2", "image": "debian", "from_snapshot": "orig@s1"}),
                "runs image \"tiny\"",
            ),
        ] {
            let (status, e) = stack.call("POST", "/v1/vms", Some(body.clone())).await;
            assert_eq!(status, 422, "{body}: {e}");
            assert!(
                e["error"]["message"].as_str().unwrap_or_default().contains(needle),
                "{e}"
            );
        }

        // Bad requests: 4xx with a message, nothing changed.
        for (method, path, body, want) in [
            (
                "POST",
                "/v1/vms/nope/snapshots",
                json!({"name": "x", "memory": true}),
                404,
            ),
            ("POST", "/v1/vms/orig/snapshots", json!({"name": "s1"}), 409),
            ("POST", "/v1/vms/orig/snapshots", json!({"name": "Bad Name"}), 422),
            ("POST", "/v1/vms/orig/snapshots", json!({"name": "x", "colour": 1}), 422),
            ("POST", "/v1/vms/orig/restore", json!({"snapshot": "nope"}), 404),
        ] {
            let (status, e) = stack.call(method, path, Some(body.clone())).await;
            assert_eq!(status, want, "{method} {path} {body}: {e}");
            assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        }
        // A snapshot of another VM cannot be restored into this one.
        let (status, accepted) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "other", "image": "tiny", "hypervisor": "qemu"})),
            )
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(op_of(&stack, &accepted).await["status"], "succeeded");
        let (status, e) = stack
            .call("POST", "/v1/vms/other/restore", Some(json!({"snapshot": "s1"})))
            .await;
        assert_eq!(status, 404, "{e}");
        // Without memory, of a stopped VM: the restore leaves it stopped.
        stack.act("other", "stop").await;
        let (status, e) = stack
            .call(
                "POST",
                "/v1/vms/other/snapshots",
                Some(json!({"name": "m", "memory": true})),
            )
            .await;
        assert_eq!(status, 409, "memory of a stopped VM: {e}");
        let (status, accepted) = stack
            .call("POST", "/v1/vms/other/snapshots", Some(json!({"name": "cold"})))
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(op_of(&stack, &accepted).await["status"], "succeeded");

        // A snapshot the copy's volumes are clones of stays while they do (409, with
        // the reason); they outlive the copy, as every volume does.
        let (status, e) = stack.call("DELETE", "/v1/vms/orig/snapshots/s1", None).await;
        assert_eq!(status, 409, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap_or_default().contains("clones"),
            "{e}"
        );
        let (status, e) = stack.call("DELETE", "/v1/vms/orig", None).await;
        assert_eq!(status, 409, "the original, with its snapshot's clones alive: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("volume copy-data"),
            "{e}"
        );
        let (status, accepted) = stack.call("DELETE", "/v1/vms/copy", None).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(op_of(&stack, &accepted).await["status"], "succeeded");
        for v in ["copy-data", "copy-hot"] {
            let (_, kept) = stack.call("GET", &format!("/v1/volumes/{v}"), None).await;
            assert!(kept.get("attached_to").is_none(), "{kept}");
            let (status, _) = stack.call("DELETE", &format!("/v1/volumes/{v}"), None).await;
            assert_eq!(status, 204, "{v}");
        }
        // Deleted: gone from the list; the VM's delete takes the rest.
        let (status, _) = stack.call("DELETE", "/v1/vms/orig/snapshots/s1", None).await;
        assert_eq!(status, 204);
        assert_eq!(stack.call("GET", "/v1/vms/orig/snapshots", None).await.1, json!([]));
        for vm in ["orig", "other"] {
            let (status, accepted) = stack.call("DELETE", &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(status, 202, "{accepted}");
            assert_eq!(op_of(&stack, &accepted).await["status"], "succeeded");
        }
        assert!(stack.vmm_processes().is_empty(), "{:?}", stack.vmm_processes());
        let states = stack.data_dir().join("vmm");
        let left: Vec<_> = std::fs::read_dir(&states)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "saved states left: {left:?}");
        let (_, vol) = stack.call("GET", "/v1/volumes/data", None).await;
        assert_eq!(
            vol["snapshots"],
            json!([]),
            "the VM's snapshots of the volume went with it: {vol}"
        );
    });
}
