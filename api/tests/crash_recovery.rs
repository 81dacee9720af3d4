//! Crash recovery: the api is killed (-9) right after accepting VM creates, at
//! different moments, and parts are left in the daemons behind its back; after each
//! restart every VM is either whole (record, VMM definition, port, root disk) or
//! entirely gone, nothing hearth names after a VM id is left without its VM, no
//! operation is still "running", and a VM that was running all along still runs with
//! the same VMM process. What the reconciler did is in the api's log.

mod common;

use std::time::Duration;

use common::{create_body, in_private_netns, Etcd, Stack};
use serde_json::{json, Value};
use socket_http::UnixClient;

fn daemon(stack: &Stack, name: &str) -> UnixClient {
    UnixClient::new(stack.data_dir().join(format!("run/{name}.sock")))
}

/// Whether the daemon has the resource at `path` (200) or not (404).
async fn exists(client: &UnixClient, path: &str) -> bool {
    let r = client.raw(http::Method::GET, path, None).await.expect("daemon answers");
    match r.status.as_u16() {
        200 => true,
        404 => false,
        s => panic!("GET {path}: {s} {}", String::from_utf8_lossy(&r.body)),
    }
}

async fn put(client: &UnixClient, path: &str, body: Value) {
    let r = client
        .raw(http::Method::PUT, path, Some(body.to_string().into_bytes()))
        .await
        .expect("daemon answers");
    assert!(
        r.status.is_success(),
        "PUT {path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}

#[test]
fn killed_api_leaves_every_vm_whole_or_gone() {
    in_private_netns(|| scenario(None));
}

/// The same with the state in a real etcd, which outlives every api process.
#[test]
fn killed_api_on_etcd_leaves_every_vm_whole_or_gone() {
    in_private_netns(|| async { scenario(Some(Etcd::start(12379, 12380))).await });
}

async fn scenario(etcd: Option<Etcd>) {
    {
        let store = etcd.as_ref().map(|e| e.store_url());
        let args: Vec<&str> = store.as_deref().map(|u| vec!["--store", u]).unwrap_or_default();
        let mut stack = Stack::start(&args).await;
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(create_body("keep", "qemu"))).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let keep = stack.vm("keep").await;
        let keep_pid = keep["pid"].as_u64().expect("running");

        // Parts of a VM the store never knew, made behind the api's back.
        let (netd, blockd, vmm) = (
            daemon(&stack, "netd"),
            daemon(&stack, "blockd"),
            daemon(&stack, "vmm-manager"),
        );
        let ghost = uuid::Uuid::new_v4().to_string();
        put(&netd, &format!("/ports/{ghost}-0"), json!({"network": "default"})).await;
        put(
            &blockd,
            &format!("/volumes/vm-{ghost}-root"),
            json!({"size_bytes": 1048576}),
        )
        .await;
        let keep_id = keep["id"].as_str().expect("id").to_string();
        let mut spec: Value = serde_json::from_slice(
            &std::fs::read(stack.data_dir().join(format!("run/vms/{keep_id}/spec.json"))).expect("spec.json"),
        )
        .expect("json");
        let ghost_vm = uuid::Uuid::new_v4().to_string();
        spec["id"] = json!(ghost_vm);
        spec["name"] = json!("ghost");
        put(&vmm, &format!("/vms/{ghost_vm}"), spec).await;
        // A port with a name hearth never gives stays.
        put(&netd, "/ports/router-0", json!({"network": "default"})).await;

        // Creates cut short by kill -9 at different moments. Each time, in project
        // "storm", a network and a volume are being created and the previous ones
        // deleted, concurrently, when the kill comes.
        let (status, body) = stack.call("POST", "/v1/projects", Some(json!({"name": "storm"}))).await;
        assert_eq!(status, 201, "{body}");
        let mut created = Vec::new();
        for (i, delay_ms) in [0u64, 1, 3, 6, 12, 25, 50].into_iter().enumerate() {
            let mut body = create_body(&format!("c{i}"), "qemu");
            body["start"] = json!(i % 2 == 0);
            let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
            assert_eq!(status, 202, "{accepted}");
            created.push(accepted["vm"]["id"].as_str().expect("id").to_string());
            let net = json!({"name": format!("n{i}"), "subnet": format!("10.100.{i}.0/24")}).to_string();
            let vol = json!({"name": format!("v{i}"), "size_bytes": 1048576}).to_string();
            let (prev_net, prev_vol) = (
                format!("/v1/networks/n{}?project=storm", i.wrapping_sub(1)),
                format!("/v1/volumes/v{}?project=storm", i.wrapping_sub(1)),
            );
            let key = Some(stack.key.as_str());
            let mut requests = vec![
                stack.request_as("POST", "/v1/networks?project=storm", Some(net.as_bytes()), key),
                stack.request_as("POST", "/v1/volumes?project=storm", Some(vol.as_bytes()), key),
            ];
            if i > 0 {
                requests.push(stack.request_as("DELETE", &prev_net, None, key));
                requests.push(stack.request_as("DELETE", &prev_vol, None, key));
            }
            let api_pid = stack.api_pid();
            let kill = async {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                // SAFETY: the api process this test started.
                unsafe { libc::kill(api_pid as i32, libc::SIGKILL) };
            };
            let (answers, ()) = tokio::join!(futures_util::future::join_all(requests), kill);
            for a in answers.into_iter().flatten() {
                // 404: deleting what the previous kill left never made (or removed).
                assert!([201, 204, 404, 409].contains(&a.0), "{a:?}");
            }
            stack.restart(libc::SIGKILL).await;
        }

        let log = stack.log();
        assert!(log.contains("reconciled after a restart"), "{log}");
        let (mut whole, mut gone) = (0, 0);
        for (i, id) in created.iter().enumerate() {
            let (status, vm) = stack.call("GET", &format!("/v1/vms/{id}"), None).await;
            let parts = [
                exists(&vmm, &format!("/vms/{id}")).await,
                exists(&netd, &format!("/ports/{id}-0")).await,
            ];
            let root_disk = exists(&blockd, &format!("/volumes/vm-{id}-root")).await;
            match status {
                200 => {
                    // A start cut short leaves the VM failed, with the reason.
                    let state = vm["state"].as_str().unwrap_or_default();
                    assert!(["running", "stopped", "failed"].contains(&state), "c{i}: {vm}");
                    if state == "failed" {
                        assert!(
                            vm["reason"].as_str().is_some_and(|r| r.contains("interrupted")),
                            "c{i}: {vm}"
                        );
                    }
                    assert_eq!(parts, [true; 2], "c{i} is listed, so its VMM and port exist: {vm}");
                    // tiny boots from kernel + initramfs: a root disk only if it has one.
                    assert_eq!(root_disk, vm.get("root_disk").is_some(), "c{i}: {vm}");
                    whole += 1;
                }
                404 => {
                    assert_eq!(parts, [false; 2], "c{i} is gone, so are its VMM and port");
                    assert!(!root_disk, "c{i} is gone, so is any root disk");
                    let (s, _) = stack.call("GET", &format!("/v1/vms/c{i}"), None).await;
                    assert_eq!(s, 404, "its name is free again");
                    gone += 1;
                }
                s => panic!("c{i}: {s} {vm}"),
            }
        }
        eprintln!(
            "after 7 kills ({}): {whole} VMs whole, {gone} gone",
            store.as_deref().unwrap_or("embedded")
        );

        assert!(
            !exists(&netd, &format!("/ports/{ghost}-0")).await,
            "orphan port removed"
        );
        assert!(
            !exists(&blockd, &format!("/volumes/vm-{ghost}-root")).await,
            "orphan root disk removed"
        );
        assert!(
            !exists(&vmm, &format!("/vms/{ghost_vm}")).await,
            "orphan VMM definition removed"
        );
        assert!(
            exists(&netd, "/ports/router-0").await,
            "a port hearth did not name stays"
        );

        // Every network and volume of the storm is whole (the api shows it and the daemon
        // has it) or gone from both.
        let (mut present, mut absent) = (0, 0);
        for i in 0..7 {
            for (what, api_path, daemon, daemon_path) in [
                (
                    "network",
                    format!("/v1/networks/n{i}?project=storm"),
                    &netd,
                    format!("/networks/storm.n{i}"),
                ),
                (
                    "volume",
                    format!("/v1/volumes/v{i}?project=storm"),
                    &blockd,
                    format!("/volumes/storm.v{i}"),
                ),
            ] {
                let (status, body) = stack.call("GET", &api_path, None).await;
                assert!(status == 200 || status == 404, "{api_path}: {status} {body}");
                let held = exists(daemon, &daemon_path).await;
                assert_eq!(
                    status == 200,
                    held,
                    "{what} {i}: the api says {status}, the daemon has it: {held}"
                );
                if held {
                    present += 1;
                } else {
                    absent += 1;
                }
            }
        }
        eprintln!(
            "storm networks and volumes: {present} whole, {absent} gone; the reconciler removed {} cut short",
            stack.log().matches("\"storm/").count()
        );

        let (_, ops) = stack.call("GET", "/v1/operations", None).await;
        for op in ops.as_array().expect("operations") {
            assert_ne!(op["status"], "running", "{op}");
            if op["status"] == "failed" {
                assert!(!op["error"]["message"].as_str().unwrap_or_default().is_empty(), "{op}");
            }
        }
        let keep = stack.vm("keep").await;
        assert_eq!(keep["state"], "running", "{keep}");
        assert_eq!(keep["pid"].as_u64(), Some(keep_pid), "the same VMM process throughout");
        // Typed before its shell is up (a guest booting slowly under load), the
        // input would be lost.
        stack
            .wait_console("keep", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        let out = stack.console_exchange("keep", "echo $((6*7))\n", "42\r\n").await;
        assert!(out.contains("42"), "{out}");

        // A host reboot: every VMM dies and /run is emptied, so vmm-manager knows no VM.
        // The reconciler defines each VM again from its record and starts those the
        // user last wanted running (created with start, or started); the rest stay
        // stopped.
        let (_, before) = stack.call("GET", "/v1/vms", None).await;
        let before = before.as_array().expect("vms").clone();
        // Stopped by the user: stays stopped, whatever the create asked.
        let stopped_by_user = before
            .iter()
            .filter_map(|v| v["name"].as_str())
            .find(|n| n.starts_with('c') && n[1..].parse::<usize>().is_ok_and(|i| i % 2 == 0))
            .map(str::to_string);
        if let Some(name) = &stopped_by_user {
            stack.act(name, "stop").await;
        }
        stack.stop_api(libc::SIGKILL);
        for (pid, _) in stack.vmm_processes() {
            // SAFETY: VMM processes of this test's stack, by PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for _ in 0..100 {
            if stack.vmm_processes().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(stack.vmm_processes().is_empty(), "{:?}", stack.vmm_processes());
        std::fs::remove_dir_all(stack.data_dir().join("run/vms")).expect("empty /run");
        stack.spawn().await;
        let log = stack.log();
        assert!(log.contains("\"redefined\""), "{log}");
        let mut wanted_running = 0;
        for vm in &before {
            let name = vm["name"].as_str().expect("name");
            let id = vm["id"].as_str().expect("id");
            let now = stack.listed(name).await;
            // keep and the even c<i> were created with start (a start cut by the crash
            // left some "failed"): the user wanted them running.
            let wanted = name == "keep"
                || (name[1..].parse::<usize>().is_ok_and(|i| i % 2 == 0) && stopped_by_user.as_deref() != Some(name));
            let expected = if wanted { "running" } else { "stopped" };
            assert_eq!(now["state"], expected, "{name} before: {vm}\nafter: {now}");
            assert!(exists(&vmm, &format!("/vms/{id}")).await, "{name} defined again");
            if expected == "running" {
                wanted_running += 1;
                assert_ne!(now["pid"], vm["pid"], "{name} runs in a new VMM");
            }
        }
        assert!(wanted_running >= 1, "keep at least: {before:?}");
        let (_, metrics) = stack.call("GET", "/metrics", None).await;
        let metrics = metrics.as_str().unwrap_or_default().to_string();
        let repairs = metrics
            .lines()
            .find_map(|l| l.strip_prefix("hearth_reconcile_repairs "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no hearth_reconcile_repairs in {metrics}"));
        assert_eq!(repairs, before.len(), "one repair per VM defined again");
        stack
            .wait_console("keep", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        let out = stack.console_exchange("keep", "echo $((6*7))\n", "42\r\n").await;
        assert!(out.contains("42"), "{out}");

        // Clean up through the API: everything it lists goes.
        for kind in ["networks", "volumes"] {
            let (_, list) = stack.call("GET", &format!("/v1/{kind}?project=storm"), None).await;
            for item in list.as_array().expect("list") {
                let name = item["name"].as_str().or(item["spec"]["name"].as_str()).expect("name");
                let (s, body) = stack
                    .call("DELETE", &format!("/v1/{kind}/{name}?project=storm"), None)
                    .await;
                assert_eq!(s, 204, "{kind} {name}: {body}");
            }
        }
        let (_, vms) = stack.call("GET", "/v1/vms", None).await;
        for vm in vms.as_array().expect("vms") {
            let (s, accepted) = stack
                .call("DELETE", &format!("/v1/vms/{}", vm["id"].as_str().expect("id")), None)
                .await;
            assert_eq!(s, 202, "{accepted}");
            let op = stack.wait_op(&accepted).await;
            assert_eq!(op["status"], "succeeded", "deleting {}: {op}", vm["name"]);
        }
        let r = netd
            .raw(http::Method::DELETE, "/ports/router-0", None)
            .await
            .expect("netd");
        assert!(r.status.is_success());
        assert!(stack.vmm_processes().is_empty(), "{:?}", stack.vmm_processes());
    }
    drop(etcd);
}
