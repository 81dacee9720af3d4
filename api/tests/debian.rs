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
        let last = ssh_until_ok(
            &stack,
            "deb-1",
            &key,
            &ip,
            "hostname; cat /etc/hearth-test.txt; df -B1 --output=size / | tail -1",
        )
        .await;
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

        cloud_layout_boots_its_own_kernel(&stack, &key, public.trim(), user_data).await;
    });
}

async fn ssh_until_ok(stack: &Stack, vm: &str, key: &std::path::Path, ip: &str, cmd: &str) -> String {
    let mut last = String::new();
    for _ in 0..20 {
        let (success, text) = ssh(key, ip, cmd).await;
        if success {
            return text;
        }
        last = text;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!(
        "ssh root@{ip} with the VM's key failed: {last}\n{}",
        stack.console_log(vm).await
    );
}

const ROOT_PARTUUID: &str = "3b8f5a2e-1c4d-4e6f-8a9b-0c1d2e3f4a5b";

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or("").as_bytes()).expect("stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same Debian system laid out the way Debian's own cloud images are: GPT, the
/// root file system in a partition named by PARTUUID in /etc/fstab, and a grub.cfg.
/// Imported by path with no kernel given, hearth takes the kernel, initramfs and
/// command line from the disk; the VM boots under QEMU and cloud-init configures it.
async fn cloud_layout_boots_its_own_kernel(stack: &Stack, key: &std::path::Path, public: &str, user_data: &str) {
    let work = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let root = work.path().join("root.ext4");
    let p = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    run(
        "cp",
        &["--sparse=always", &p(&images_dir().join("debian/disk.raw")), &p(&root)],
        None,
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images_dir().join("debian/image.json")).expect("image.json"))
            .expect("json");
    let release = meta["kernel_version"].as_str().expect("kernel_version");
    let grub = format!(
        "menuentry 'Debian GNU/Linux' {{\n\tlinux\t/boot/vmlinuz-{release} root=PARTUUID={ROOT_PARTUUID} ro console=tty0 console=ttyS0,115200 panic=-1\n\tinitrd\t/boot/initrd.img-{release}\n}}\n"
    );
    std::fs::write(work.path().join("grub.cfg"), grub).expect("grub.cfg");
    std::fs::write(
        work.path().join("fstab"),
        format!("PARTUUID={ROOT_PARTUUID}\t/\text4\terrors=remount-ro\t0\t1\n"),
    )
    .expect("fstab");
    let cmds = format!(
        "mkdir /boot/grub\nwrite {} /boot/grub/grub.cfg\nrm /etc/fstab\nwrite {} /etc/fstab\n",
        p(&work.path().join("grub.cfg")),
        p(&work.path().join("fstab"))
    );
    run("debugfs", &["-w", "-f", "-", &p(&root)], Some(&cmds));
    let disk = work.path().join("cloud.raw");
    let root_len = std::fs::metadata(&root).expect("md").len();
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(root_len + 2 * (1 << 20)))
        .expect("disk");
    run(
        "sfdisk",
        &["-q", "--no-reread", "--no-tell-kernel", &p(&disk)],
        Some(&format!(
            "label: gpt\nstart=2048, size={}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={ROOT_PARTUUID}\n",
            root_len / 512
        )),
    );
    run(
        "dd",
        &[
            &format!("if={}", p(&root)),
            &format!("of={}", p(&disk)),
            "bs=1M",
            "seek=1",
            "conv=sparse,notrunc",
            "status=none",
        ],
        None,
    );
    std::fs::remove_file(&root).expect("rm");

    let (status, accepted) = stack
        .call(
            "POST",
            "/v1/images",
            Some(json!({"name": "debian-gpt", "path": p(&disk)})),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let (_, image) = stack.call("GET", "/v1/images/debian-gpt", None).await;
    let cmdline = image["boot"]["cmdline"].as_str().unwrap_or_default();
    assert!(
        cmdline.starts_with(&format!("root=PARTUUID={ROOT_PARTUUID} ro console=tty0")),
        "the command line comes from the disk's grub.cfg: {image}"
    );
    assert!(
        image["boot"]["kernel_elf"] == true,
        "a vmlinux for Cloud Hypervisor: {image}"
    );

    let t = std::time::Instant::now();
    let body = json!({
        "name": "deb-gpt",
        "image": "debian-gpt",
        "hypervisor": "qemu",
        "vcpus": 2,
        "memory_mib": 1024,
        "nics": [{"network": "lan"}],
        "ssh_keys": [public],
        "user_data": user_data,
    });
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let ip = stack.vm("deb-gpt").await["nics"][0]["ip"]
        .as_str()
        .expect("ip")
        .to_string();
    stack
        .wait_console("deb-gpt", "HEARTH-GUEST-READY", 1, Duration::from_secs(240))
        .await;
    eprintln!(
        "debian (GPT, kernel from its disk): created and booted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let out = ssh_until_ok(
        stack,
        "deb-gpt",
        key,
        &ip,
        "hostname; cat /etc/hearth-test.txt; findmnt -no SOURCE /",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first().copied(), Some("deb-gpt"), "hostname: {out}");
    assert!(out.contains("written by cloud-init"), "user-data file: {out}");
    assert_eq!(
        lines.last().copied(),
        Some("/dev/vda1"),
        "root is the disk's first partition: {out}"
    );

    let (status, accepted) = stack.call("DELETE", "/v1/vms/deb-gpt", None).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
    let (status, _) = stack.call("DELETE", "/v1/images/debian-gpt", None).await;
    assert!(status == 200 || status == 204, "image delete: {status}");
}
