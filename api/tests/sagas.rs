//! Sagas, step by step: a VM create, a VM delete and a volume attach get a failure
//! injected after each of their steps (`HEARTH_SAGA_FAULT=<saga>/<step>=fail`), and the api is killed right
//! after each step (`…=crash`: the process aborts, as kill -9 would) and started again.
//! Every run ends with the VM whole or entirely gone: no record, name claim, saga or
//! volume claim in the store, no port in netd, no root disk in blockd, no seed or image
//! lease in imaged, no VMM in vmm-manager. A create killed after its VM was recorded
//! ready is resumed (and started), never undone; a delete is always finished. The VM is
//! made from an image with a root disk and gets a data volume and an SSH key (a seed),
//! so every step has work to do. An attach (over vhost-user, hot-plugged into a running
//! VM) ends attached whole (claim, record, disk in the VMM, blockd's export) or not at
//! all.

mod common;

use std::path::Path;

use common::{in_private_netns, Stack};
use hearth_api::store::StateStore;
use serde_json::{json, Value};
use socket_http::UnixClient;

const CREATE_STEPS: [&str; 11] = [
    "name",
    "record",
    "ports",
    "volumes",
    "image-lease",
    "recorded",
    "root-disk",
    "seed",
    "define",
    "ready",
    "start",
];
/// Steps of a create that run before its `202`.
const BEFORE_ACCEPTED: usize = 6;
/// A create killed after this many steps is resumed, not undone.
const PIVOT: usize = 10;
const DELETE_STEPS: [&str; 7] = ["vmm", "ports", "root-disk", "seed", "volumes", "image-lease", "records"];

fn daemon(stack: &Stack, name: &str) -> UnixClient {
    UnixClient::new(stack.data_dir().join(format!("run/{name}.sock")))
}

async fn daemon_get(stack: &Stack, name: &str, path: &str) -> Value {
    daemon(stack, name)
        .get::<Value>(path)
        .await
        .unwrap_or_else(|e| panic!("{name} GET {path}: {e}"))
}

/// Imports `disky`: the tiny image's kernel with a small ext4 root disk.
async fn import_disky(stack: &Stack) {
    let tiny = common::images_dir().join("tiny");
    let disk = stack.data_dir().join("disky.raw");
    testkit::run("mkfs.ext4", &["-q", "-F", disk.to_str().expect("utf8"), "16M"]);
    let body = json!({
        "name": "disky",
        "path": disk.display().to_string(),
        "kernel": tiny.join("vmlinuz").display().to_string(),
        "initramfs": tiny.join("initrd.img").display().to_string(),
        "cmdline": std::fs::read_to_string(tiny.join("cmdline")).expect("cmdline").trim(),
    });
    let (status, accepted) = stack.call("POST", "/v1/images", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
}

fn vm_body() -> Value {
    json!({
        "name": "v", "image": "disky", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
        "volumes": ["data"], "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ0ZXN0a2V5Zm9yaGVhcnRoc2FnYXN0ZXN0cw test"],
    })
}

/// Everything hearth holds for VMs in the daemons, named (`id`: one VM's, or any).
async fn parts_of(stack: &Stack, id: Option<&str>) -> Vec<String> {
    let ours = |name: &str| id.is_none_or(|id| name.starts_with(id));
    let mut parts = Vec::new();
    let vms = daemon_get(stack, "vmm-manager", "/vms").await;
    for v in vms.as_array().into_iter().flatten() {
        if v["spec"]["id"].as_str().is_some_and(ours) {
            parts.push(format!("VMM definition {}", v["spec"]["id"]));
        }
    }
    // VM ports are named `<vm id>-<n>`.
    for p in daemon_get(stack, "netd", "/ports")
        .await
        .as_array()
        .into_iter()
        .flatten()
    {
        if p["id"].as_str().is_some_and(|p| p.len() > 36 && ours(p)) {
            parts.push(format!("port {}", p["id"]));
        }
    }
    for v in daemon_get(stack, "blockd", "/volumes")
        .await
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or_default();
        if let Some(vm) = name.strip_prefix("vm-").and_then(|n| n.strip_suffix("-root")) {
            if ours(vm) {
                parts.push(format!("root disk {name}"));
            }
        }
    }
    let seeds = stack.data_dir().join("imaged/seeds");
    for e in std::fs::read_dir(&seeds).into_iter().flatten().flatten() {
        if ours(&e.file_name().to_string_lossy()) {
            parts.push(format!("seed {}", e.path().display()));
        }
    }
    let image = daemon_get(stack, "imaged", "/images/disky").await;
    for holder in image["in_use_by"].as_array().into_iter().flatten() {
        if holder.as_str().is_some_and(ours) {
            parts.push(format!("image lease of {holder}"));
        }
    }
    parts
}

/// The store's keys under the prefixes a VM leaves, read with the api stopped.
async fn store_keys(data_dir: &Path) -> Vec<String> {
    let store = hearth_api::store::embedded::EmbeddedStore::open(&data_dir.join("store.redb")).expect("open the store");
    let mut keys = Vec::new();
    for prefix in ["vms/", "vm-names/", "sagas/", "volume-attachments/"] {
        keys.extend(store.list(prefix).await.expect("list").into_iter().map(|(k, _)| k));
    }
    keys
}

/// No VM is left: the api lists none, no daemon holds a part of one, the volume is free.
async fn assert_gone(stack: &Stack, case: &str) {
    let (_, list) = stack.call("GET", "/v1/vms", None).await;
    assert_eq!(list, json!([]), "{case}: VMs are listed");
    let parts = parts_of(stack, None).await;
    assert!(parts.is_empty(), "{case}: left behind: {parts:?}");
    let (_, data) = stack.call("GET", "/v1/volumes/data", None).await;
    assert!(
        data["attached_to"].is_null(),
        "{case}: the volume is still attached: {data}"
    );
}

/// The VM `v` is whole: ready, running, with its port, root disk, seed, lease and volume.
async fn assert_whole(stack: &Stack, case: &str) -> String {
    let (status, vm) = stack.call("GET", "/v1/vms/v", None).await;
    assert_eq!(status, 200, "{case}: {vm}");
    assert_eq!(vm["state"], "running", "{case}: {vm}");
    let id = vm["id"].as_str().expect("id").to_string();
    let parts = parts_of(stack, Some(&id)).await;
    for want in ["VMM definition", "port", "root disk", "seed", "image lease"] {
        assert!(
            parts.iter().any(|p| p.starts_with(want)),
            "{case}: no {want} in {parts:?}"
        );
    }
    let (_, data) = stack.call("GET", "/v1/volumes/data", None).await;
    assert_eq!(data["attached_to"]["vm"], id.as_str(), "{case}: {data}");
    id
}

/// Restarts the api with `fault` (or none), checking the store while it is down.
async fn restart_with(stack: &mut Stack, fault: Option<String>, store_must_be_empty: Option<&str>) {
    stack.stop_api(libc::SIGTERM);
    if let Some(case) = store_must_be_empty {
        let keys = store_keys(stack.data_dir()).await;
        assert!(keys.is_empty(), "{case}: left in the store: {keys:?}");
    }
    stack.spawn_with_fault(fault).await;
}

async fn setup() -> Stack {
    let stack = Stack::start(&[]).await;
    import_disky(&stack).await;
    let (status, v) = stack
        .call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "16M"})))
        .await;
    assert_eq!(status, 201, "{v}");
    stack
}

#[test]
fn a_create_that_fails_after_any_step_leaves_nothing() {
    in_private_netns(|| async {
        let mut stack = setup().await;
        let mut previous: Option<String> = None;
        for (i, step) in CREATE_STEPS.iter().enumerate() {
            let case = format!("create failing after {step}");
            restart_with(&mut stack, Some(format!("vm.create/{step}=fail")), previous.as_deref()).await;
            let (status, body) = stack.call("POST", "/v1/vms", Some(vm_body())).await;
            if i < BEFORE_ACCEPTED {
                assert_eq!(status, 500, "{case}: {body}");
                assert!(
                    body["error"]["message"].as_str().unwrap_or_default().contains(step),
                    "{case}: {body}"
                );
            } else {
                assert_eq!(status, 202, "{case}: {body}");
                let op = stack.wait_op(&body).await;
                assert_eq!(op["status"], "failed", "{case}: {op}");
                assert_eq!(op["saga"]["failed_step"], *step, "{case}: {op}");
                assert_eq!(op["saga"]["state"], "undone", "{case}: {op}");
                assert_eq!(op["saga"]["done"], 0, "{case}: {op}");
                assert!(
                    op["error"]["message"].as_str().unwrap_or_default().contains(step),
                    "{case}: {op}"
                );
            }
            assert_gone(&stack, &case).await;
            previous = Some(case);
        }
        // Without a fault the same request makes a whole VM (its name was freed each time).
        restart_with(&mut stack, None, previous.as_deref()).await;
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(vm_body())).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        assert_eq!(op["saga"]["done"], CREATE_STEPS.len(), "{op}");
        assert_eq!(op["saga"]["steps"], json!(CREATE_STEPS), "{op}");
        assert_whole(&stack, "create without a fault").await;
    });
}

#[test]
fn a_create_killed_after_any_step_is_undone_or_finished() {
    in_private_netns(|| async {
        let mut stack = setup().await;
        for (i, step) in CREATE_STEPS.iter().enumerate() {
            let case = format!("create killed after {step}");
            restart_with(&mut stack, Some(format!("vm.create/{step}=crash")), None).await;
            let key = stack.key.clone();
            let body = vm_body().to_string();
            let before = stack
                .request_as("POST", "/v1/vms", Some(body.as_bytes()), Some(&key))
                .await;
            stack.wait_for_crash(&case, std::time::Duration::from_secs(60));
            // The answer may or may not have left before the crash once the saga runs
            // in its task; before that it cannot have.
            let accepted = before.ok().filter(|(s, _)| *s == 202).map(|(_, b)| b);
            if i < BEFORE_ACCEPTED {
                assert!(accepted.is_none(), "{case}: {accepted:?}");
            }
            restart_with(&mut stack, None, None).await;
            if i + 1 >= PIVOT {
                assert_whole(&stack, &case).await;
                // Deleted again for the next round.
                let (status, deleting) = stack.call("DELETE", "/v1/vms/v", None).await;
                assert_eq!(status, 202, "{case}: {deleting}");
                assert_eq!(stack.wait_op(&deleting).await["status"], "succeeded");
            }
            assert_gone(&stack, &case).await;
            // The operation the api accepted is settled, saying what became of it.
            if let Some(a) = &accepted {
                let op = stack.wait_op(a).await;
                let want = if i + 1 >= PIVOT { "succeeded" } else { "failed" };
                assert_eq!(op["status"], want, "{case}: {op}");
            }
            stack.stop_api(libc::SIGTERM);
            let keys = store_keys(stack.data_dir()).await;
            assert!(keys.is_empty(), "{case}: left in the store: {keys:?}");
            stack.spawn().await;
        }
    });
}

#[test]
fn a_delete_that_fails_or_is_killed_after_any_step_is_finished() {
    in_private_netns(|| async {
        let mut stack = setup().await;
        for step in DELETE_STEPS {
            for fault in ["fail", "crash"] {
                let case = format!("delete with {fault} after {step}");
                restart_with(&mut stack, None, None).await;
                let (status, accepted) = stack.call("POST", "/v1/vms", Some(vm_body())).await;
                assert_eq!(status, 202, "{case}: {accepted}");
                assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded", "{case}");
                assert_whole(&stack, &case).await;

                restart_with(&mut stack, Some(format!("vm.delete/{step}={fault}")), None).await;
                let (status, accepted) = stack.call("DELETE", "/v1/vms/v", None).await;
                assert_eq!(status, 202, "{case}: {accepted}");
                if fault == "crash" {
                    stack.wait_for_crash(&case, std::time::Duration::from_secs(60));
                } else {
                    let op = stack.wait_op(&accepted).await;
                    assert_eq!(op["status"], "failed", "{case}: {op}");
                    assert_eq!(op["saga"]["failed_step"], step, "{case}: {op}");
                    stack.stop_api(libc::SIGTERM);
                }
                // The next start finishes it.
                restart_with(&mut stack, None, None).await;
                assert_gone(&stack, &case).await;
                let op = stack.wait_op(&accepted).await;
                assert_eq!(
                    op["status"],
                    if fault == "crash" { "succeeded" } else { "failed" },
                    "{case}: {op}"
                );
                restart_with(&mut stack, None, Some(&case)).await;
            }
        }
    });
}

const ATTACH_STEPS: [&str; 4] = ["claim", "disk", "hot-plug", "record"];
/// An attach killed after this many steps is finished, not undone.
const ATTACH_PIVOT: usize = 4;

/// The sagas in the store, read with the api stopped (then started again).
async fn sagas_left(stack: &mut Stack) -> Vec<String> {
    stack.stop_api(libc::SIGTERM);
    let store =
        hearth_api::store::embedded::EmbeddedStore::open(&stack.data_dir().join("store.redb")).expect("open the store");
    let keys = store
        .list("sagas/")
        .await
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    drop(store);
    stack.spawn().await;
    keys
}

/// `data` is attached to the VM `id` (whole) or to nothing (and nothing of an attach is
/// left): the claim, the VM's record, the disk in vmm-manager, blockd's vhost-user export.
async fn assert_attached(stack: &Stack, id: &str, attached: bool, case: &str) {
    let (_, data) = stack.call("GET", "/v1/volumes/data", None).await;
    let (_, vm) = stack.call("GET", "/v1/vms/v", None).await;
    let defined = daemon_get(stack, "vmm-manager", &format!("/vms/{id}")).await;
    let exports = daemon_get(stack, "blockd", "/exports").await;
    let disk_in_vmm = defined["spec"]["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["id"] == "vol0");
    let exported = exports
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["volume"] == "data" && e["kind"] == "vhost-user");
    let recorded = vm["volumes"]
        .as_array()
        .is_some_and(|v| v.iter().any(|v| v["volume"] == "data"));
    let seen = (data["attached_to"]["vm"] == id, recorded, disk_in_vmm, exported);
    let want = (attached, attached, attached, attached);
    assert_eq!(
        seen, want,
        "{case}: (claimed, recorded, in the VMM, exported)\nvolume {data}\nvm {vm}\nvmm {defined}\nexports {exports}"
    );
}

async fn attach_data(stack: &Stack) -> (u16, Value) {
    stack
        .call(
            "POST",
            "/v1/volumes/data/attach",
            Some(json!({"vm": "v", "via": "vhost-user"})),
        )
        .await
}

/// The attach's saga runs in the api, which is killed here: the daemons run as their
/// own processes, as the systemd units run them. (With `--all-in-one` a killed api
/// takes blockd's vhost-user back-ends with it, and a guest whose disk lost its
/// back-end may never release it: see the issue notes.)
#[test]
fn an_attach_that_fails_or_is_killed_after_any_step_is_whole_or_gone() {
    in_private_netns(|| async {
        let mut stack = Stack::start_separate(&[]).await;
        import_disky(&stack).await;
        let (status, v) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "16M"})))
            .await;
        assert_eq!(status, 201, "{v}");
        let mut body = vm_body();
        body["volumes"] = json!([]);
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let (_, vm) = stack.call("GET", "/v1/vms/v", None).await;
        let id = vm["id"].as_str().expect("id").to_string();
        // Disks are plugged into a guest that runs (one still booting may not answer an
        // unplug request at all).
        stack
            .wait_console("v", "HEARTH-GUEST-READY", 1, std::time::Duration::from_secs(120))
            .await;
        for (i, step) in ATTACH_STEPS.iter().enumerate() {
            let case = format!("attach failing after {step}");
            restart_with(&mut stack, Some(format!("volume.attach/{step}=fail")), None).await;
            let (status, body) = attach_data(&stack).await;
            assert_eq!(status, 500, "{case}: {body}");
            assert!(
                body["error"]["message"].as_str().unwrap_or_default().contains(step),
                "{case}: {body}"
            );
            assert_attached(&stack, &id, false, &case).await;

            let case = format!("attach killed after {step}");
            restart_with(&mut stack, Some(format!("volume.attach/{step}=crash")), None).await;
            let key = stack.key.clone();
            let body = json!({"vm": "v", "via": "vhost-user"}).to_string();
            let _ = stack
                .request_as("POST", "/v1/volumes/data/attach", Some(body.as_bytes()), Some(&key))
                .await;
            stack.wait_for_crash(&case, std::time::Duration::from_secs(60));
            restart_with(&mut stack, None, None).await;
            let whole = i + 1 >= ATTACH_PIVOT;
            assert_attached(&stack, &id, whole, &case).await;
            assert_eq!(sagas_left(&mut stack).await, Vec::<String>::new(), "{case}");
            if whole {
                let (status, body) = stack.call("POST", "/v1/volumes/data/detach", None).await;
                assert_eq!(status, 200, "{case}: {body}");
                assert_attached(&stack, &id, false, &format!("{case}, then detached")).await;
            }
        }
        // Without a fault: attached whole, and the guest sees the disk appear.
        restart_with(&mut stack, None, None).await;
        let (status, body) = attach_data(&stack).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["attached_to"]["vm"], id.as_str(), "{body}");
        assert_attached(&stack, &id, true, "attach without a fault").await;
    });
}

const IMPORT_STEPS: [&str; 2] = ["start", "follow"];

/// An import killed after its job started still ends: the api started again follows
/// the same job (in a task, serving meanwhile) and its operation says how it ended,
/// where it used to be failed with "the api restarted"; killed before its operation
/// was recorded, the import still completes.
#[test]
fn an_import_killed_after_any_step_still_ends_its_operation() {
    in_private_netns(|| async {
        let mut stack = Stack::start(&[]).await;
        let tiny = common::images_dir().join("tiny");
        for step in IMPORT_STEPS {
            let case = format!("import killed after {step}");
            let name = format!("copy-{step}");
            restart_with(&mut stack, Some(format!("image.import/{step}=crash")), None).await;
            let key = stack.key.clone();
            let body = json!({"name": name, "path": tiny.display().to_string()}).to_string();
            let answer = stack
                .request_as("POST", "/v1/images", Some(body.as_bytes()), Some(&key))
                .await;
            stack.wait_for_crash(&case, std::time::Duration::from_secs(60));
            restart_with(&mut stack, None, None).await;
            let (_, ops) = stack.call("GET", "/v1/operations", None).await;
            let op = ops
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["kind"] == "image.import" && o["target_id"] == name.as_str())
                .cloned();
            match (step, op) {
                // Killed before its operation was recorded (the client saw the
                // connection break): the job still runs to its end.
                ("start", None) => assert!(answer.as_ref().map_or(true, |(s, _)| *s != 202), "{case}: {answer:?}"),
                (_, Some(op)) => {
                    let op = stack.wait_op(&json!({ "operation": op })).await;
                    assert_eq!(op["status"], "succeeded", "{case}: {op}");
                }
                (_, None) => panic!("{case}: no operation in {ops} (answered {answer:?})"),
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let (status, image) = stack.call("GET", &format!("/v1/images/{name}"), None).await;
                if status == 200 {
                    assert!(
                        image["disk"].is_null() && image["boot"]["kernel_bzimage"] == true,
                        "{case}: {image}"
                    );
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{case}: {status} {image}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(sagas_left(&mut stack).await, Vec::<String>::new(), "{case}");
        }
    });
}
