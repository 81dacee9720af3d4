//! A Debian guest configured by cloud-init, the way a user makes one: `POST /v1/vms`
//! with the `debian` image (built by guest-images/debian/build.sh, imported from the
//! catalog on first use), an SSH key and user-data. Under QEMU/TCG it boots, cloud-init
//! applies the hostname, writes the file the user-data asks for and installs the key;
//! the test checks all three over SSH from its own network namespace, at the address
//! IPAM gave the VM (no DHCP: the address comes from the seed's network-config).

mod common;

use std::time::Duration;

use common::{images_dir, in_private_netns, Stack};
use serde_json::json;

async fn ssh(key: &std::path::Path, ip: &str, cmd: &str) -> (bool, String) {
    let out = tokio::process::Command::new("ssh")
        .args([
            "-i",
            key.to_str().expect("utf8"),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            &format!("root@{ip}"),
            cmd,
        ])
        .output()
        .await
        .expect("ssh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn debian_vm_is_configured_by_cloud_init() {
    assert!(
        images_dir().join("debian/image.json").is_file(),
        "the debian image is missing: run guest-images/debian/build.sh (scripts/test.sh does)"
    );
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let keys = tempfile::tempdir().expect("tmp");
        let key = keys.path().join("id");
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "hearth-test-key", "-f"])
            .arg(&key)
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let public = std::fs::read_to_string(key.with_extension("pub")).expect("pub");
        let (status, net) = stack
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": "lan", "subnet": "10.88.0.0/24", "dhcp": false})),
            )
            .await;
        assert_eq!(status, 201, "{net}");
        let user_data =
            "#cloud-config\nwrite_files:\n  - path: /etc/hearth-test.txt\n    content: \"written by cloud-init\\n\"\n";
        let body = json!({
            "name": "deb-1",
            "image": "debian",
            "hypervisor": "qemu",
            "vcpus": 2,
            "memory_mib": 1024,
            "disk_size": "3G",
            "nics": [{"network": "lan"}],
            "ssh_keys": [public.trim()],
            "user_data": user_data,
        });
        let t = std::time::Instant::now();
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let vm = stack.vm("deb-1").await;
        let ip = vm["nics"][0]["ip"].as_str().expect("ip").to_string();
        let ready = stack
            .wait_console("deb-1", "HEARTH-GUEST-READY", 1, Duration::from_secs(240))
            .await;
        eprintln!(
            "debian: created and booted to HEARTH-GUEST-READY in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let log = stack.console_log("deb-1").await;
        assert!(
            log.contains("HEARTH-GUEST-CLOUD-INIT ok"),
            "cloud-init reported errors:\n{log}"
        );
        let _ = ready;

        // Over SSH with the key cloud-init installed, at the address IPAM gave.
        let mut last = String::new();
        let mut ok = false;
        for _ in 0..20 {
            let (success, text) = ssh(
                &key,
                &ip,
                "hostname; cat /etc/hearth-test.txt; df -B1 --output=size / | tail -1",
            )
            .await;
            last = text;
            if success {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert!(
            ok,
            "ssh root@{ip} with the VM's key failed: {last}\n{}",
            stack.console_log("deb-1").await
        );
        let lines: Vec<&str> = last.lines().collect();
        assert_eq!(lines.first().copied(), Some("deb-1"), "hostname: {last}");
        assert!(last.contains("written by cloud-init"), "user-data file: {last}");
        let root_size: u64 = lines.last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        assert!(
            root_size > 2_500_000_000,
            "the root file system grew to the 3G disk: {last}"
        );
        // A key that was not given does not get in.
        let other = keys.path().join("other");
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other)
            .output()
            .expect("ssh-keygen");
        let (success, _) = ssh(&other, &ip, "true").await;
        assert!(!success, "a key the VM was not given must be refused");

        let (status, accepted) = stack.call("DELETE", "/v1/vms/deb-1", None).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        assert!(stack.vmm_processes().is_empty(), "{:?}", stack.vmm_processes());
    });
}
