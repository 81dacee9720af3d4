//! End to end: one REST call boots a real VM, and its whole lifecycle works, through
//! both drivers: QEMU under TCG booting the real tiny guest, and Cloud Hypervisor (the
//! fake in vmm-manager/tests, or the real binary when HEARTH_TEST_CH_BINARY names one).

mod common;

use std::time::Duration;

use common::{create_body, in_private_netns, Etcd, Stack};

/// The whole lifecycle of one VM. With `etcd`, the api keeps its state there, and the
/// test also stops etcd while the VM runs.
async fn lifecycle(hypervisor: &'static str, mut etcd: Option<Etcd>) {
    let store = etcd.as_ref().map(|e| e.store_url());
    let args: Vec<&str> = store.as_deref().map(|u| vec!["--store", u]).unwrap_or_default();
    let stack = Stack::start(&args).await;
    let (status, accepted) = stack
        .call("POST", "/v1/vms", Some(create_body("web", hypervisor)))
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["vm"]["state"], "creating");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}\n{}", stack.log());

    // The listing (cached, and followed through vmm-manager's events) is asked first,
    // so it cannot have learnt the state from the request for the VM alone.
    assert_eq!(stack.listed("web").await["state"], "running");
    let vm = stack.vm("web").await;
    assert_eq!(vm["hypervisor"], hypervisor);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(stack.listed("web").await, vm, "the listing and the VM alone agree");
    let pid = vm["pid"].as_u64().expect("running VM has a VMM pid") as u32;
    assert!(
        stack.vmm_processes().iter().any(|(p, _)| *p == pid),
        "VMM {pid} is not running"
    );

    let boot = stack
        .wait_console("web", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
        .await;
    eprintln!("{hypervisor}: HEARTH-GUEST-READY after {boot:?}");
    let out = stack.console_exchange("web", "echo $((6*7))\n", "42\r\n").await;
    assert!(out.contains("42"), "{out}");

    if let Some(etcd) = etcd.as_mut() {
        etcd_outage(&stack, etcd).await;
    }

    stack.act("web", "pause").await;
    assert_eq!(stack.listed("web").await["state"], "paused");
    assert_eq!(stack.vm("web").await["state"], "paused");
    stack.act("web", "resume").await;
    assert_eq!(stack.listed("web").await["state"], "running");
    assert_eq!(stack.vm("web").await["state"], "running");

    stack.act("web", "stop").await;
    assert_eq!(stack.listed("web").await["state"], "stopped");
    let vm = stack.vm("web").await;
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(
        stack.vmm_processes().is_empty(),
        "VMM left after stop: {:?}",
        stack.vmm_processes()
    );
    // Actions that need a running VM are refused while it is stopped.
    let (status, err) = stack.call("POST", "/v1/vms/web/pause", None).await;
    assert_eq!(status, 409, "{err}");

    stack.act("web", "start").await;
    assert_eq!(stack.listed("web").await["state"], "running");
    stack
        .wait_console("web", "HEARTH-GUEST-READY", 2, Duration::from_secs(60))
        .await;
    let out = stack.console_exchange("web", "echo $((6*7))\n", "42\r\n").await;
    assert!(out.contains("42"));

    let (status, accepted) = stack.call("DELETE", "/v1/vms/web", None).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let (status, _) = stack.call("GET", "/v1/vms/web", None).await;
    assert_eq!(status, 404);
    assert_eq!(stack.call("GET", "/v1/vms", None).await.1, serde_json::json!([]));
    assert!(
        stack.vmm_processes().is_empty(),
        "VMM left after delete: {:?}",
        stack.vmm_processes()
    );
    assert!(
        stack.vm_dirs().is_empty(),
        "VM state directories left: {:?}",
        stack.vm_dirs()
    );
    let sockets: Vec<_> = walk(&stack.data_dir().join("run/vms"));
    assert!(sockets.is_empty(), "files left: {sockets:?}");
}

/// With etcd stopped, requests fail with 503 and a message naming etcd, the VM keeps
/// running, and once etcd is back everything works again without restarting the api.
async fn etcd_outage(stack: &Stack, etcd: &mut Etcd) {
    etcd.kill();
    for (method, path, body) in [
        (
            "POST",
            "/v1/networks",
            Some(serde_json::json!({"name": "lab", "subnet": "10.78.0.0/24"})),
        ),
        ("POST", "/v1/vms/web/pause", None),
        ("GET", "/v1/vms", None),
    ] {
        let t = std::time::Instant::now();
        let (status, err) = stack.call(method, path, body).await;
        assert_eq!(status, 503, "{method} {path} with etcd down: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("etcd at http://127.0.0.1:"), "{message}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{method} {path} took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        stack.vmm_processes().len(),
        1,
        "the VM keeps running while etcd is down"
    );

    etcd.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = stack.call("GET", "/v1/vms/web", None).await;
        if status == 200 {
            assert_eq!(body["state"], "running", "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the api did not recover: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, accepted) = stack
        .call(
            "POST",
            "/v1/networks",
            Some(serde_json::json!({"name": "lab", "subnet": "10.78.0.0/24"})),
        )
        .await;
    assert_eq!(status, 201, "{accepted}");
    let (status, _) = stack.call("DELETE", "/v1/networks/lab", None).await;
    assert!(status < 300, "{status}");
    let out = stack.console_exchange("web", "echo $((6*9))\n", "54\r\n").await;
    assert!(out.contains("54"), "{out}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn qemu_tcg_vm_lifecycle_with_serial_console() {
    in_private_netns(|| lifecycle("qemu", None));
}

/// The same lifecycle with the state in a real etcd (`--store etcd://…`), started here.
#[test]
fn qemu_tcg_vm_lifecycle_on_etcd() {
    in_private_netns(|| async { lifecycle("qemu", Some(Etcd::start(12379, 12380))).await });
}

#[test]
fn cloud_hypervisor_vm_lifecycle_with_serial_console() {
    in_private_netns(|| lifecycle("cloud-hypervisor", None));
}

/// QEMU's other options: `microvm` (which needs `tsc_early_khz` under TCG to boot
/// reliably), a VNC display on a Unix socket that speaks RFB, and `accel = auto`, whose
/// probe must not trust a present /dev/kvm.
#[test]
fn qemu_microvm_vnc_and_accel_auto() {
    in_private_netns(|| async {
        let stack = Stack::start(&["--qemu-accel", "auto"]).await;
        let mut micro = create_body("micro", "qemu");
        micro["machine"] = serde_json::json!("microvm");
        let mut vnc = create_body("screen", "qemu");
        vnc["vnc"] = serde_json::json!(true);
        for body in [micro, vnc] {
            let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
            assert_eq!(status, 202, "{accepted}");
            let op = stack.wait_op(&accepted).await;
            assert_eq!(op["status"], "succeeded", "{op}");
        }
        stack
            .wait_console("micro", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        stack
            .wait_console("screen", "HEARTH-GUEST-READY", 1, Duration::from_secs(60))
            .await;
        let micro_id = stack.vm("micro").await["id"].as_str().expect("id").to_string();
        let cmdline =
            std::fs::read_to_string(stack.data_dir().join(format!("run/vms/{micro_id}/spec.json"))).expect("spec");
        assert!(cmdline.contains("microvm"), "{cmdline}");

        // The probe ran and recorded its verdict; on hosts where it fails, TCG runs the VM.
        let probe: serde_json::Value = serde_json::from_slice(
            &std::fs::read(stack.data_dir().join("run/kvm-probe.json")).expect("kvm-probe.json"),
        )
        .expect("json");
        let kvm = probe["kvm_usable"].as_bool().expect("verdict");
        let pid = stack.vm("micro").await["pid"].as_u64().expect("pid");
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        assert!(argv.contains(if kvm { "-accel kvm" } else { "-accel tcg" }), "{argv}");
        if !kvm {
            assert!(
                argv.contains("tsc_early_khz="),
                "microvm under TCG needs the TSC hint: {argv}"
            );
        }

        // VNC: the Unix socket answers with an RFB greeting.
        let screen_id = stack.vm("screen").await["id"].as_str().expect("id").to_string();
        let sock = stack.data_dir().join(format!("run/vms/{screen_id}/vnc.sock"));
        let mut s = tokio::net::UnixStream::connect(&sock).await.expect("vnc socket");
        let mut greeting = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut greeting)
            .await
            .expect("greeting");
        assert!(greeting.starts_with(b"RFB 003."), "{greeting:?}");

        // Refused combinations.
        let mut bad = create_body("bad", "cloud-hypervisor");
        bad["vnc"] = serde_json::json!(true);
        assert_eq!(stack.call("POST", "/v1/vms", Some(bad)).await.0, 422);
        let mut bad = create_body("bad", "qemu");
        bad["machine"] = serde_json::json!("pc");
        assert_eq!(stack.call("POST", "/v1/vms", Some(bad)).await.0, 422);
        for vm in ["micro", "screen"] {
            let (_, accepted) = stack.call("DELETE", &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        }
        assert!(stack.vmm_processes().is_empty());
    });
}
