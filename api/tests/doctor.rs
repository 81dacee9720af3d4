//! `hearth doctor` on this host, inside a private network namespace the test shapes:
//! its verdicts follow what the host really has (forwarding off then on, a Docker-style
//! forward chain with policy drop, a tool missing from PATH, device-mapper as the
//! kernel reports it, KVM as a real boot probe finds it, Cloud Hypervisor's version as
//! the binary says it).

mod common;

use std::process::Command;

use common::{images_dir, in_private_netns};
use serde_json::Value;

/// Runs the doctor; only the first call boots the KVM probe (up to 8 s).
fn doctor(path: Option<&str>) -> (bool, Vec<Value>) {
    static PROBED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut cmd = Command::new(common::hearth_cli());
    cmd.args(["doctor", "-o", "json", "--images-dir"]).arg(images_dir());
    if PROBED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        cmd.arg("--no-kvm-probe");
    }
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().expect("hearth doctor");
    let checks: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor -o json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.success(), checks.as_array().expect("array").clone())
}

fn find<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn doctor_reports_what_the_host_really_has() {
    in_private_netns(|| async {
        // A fresh namespace forwards nothing and has no firewall.
        sh("sysctl -qw net.ipv4.ip_forward=0");
        let (healthy, checks) = doctor(None);
        assert!(healthy, "{checks:?}");
        assert_eq!(find(&checks, "ip-forwarding")["verdict"], "warn");
        assert_eq!(find(&checks, "firewall")["verdict"], "ok");
        assert_eq!(find(&checks, "tools")["verdict"], "ok");

        // Jailing as the kernel allows: seccomp, landlock and cgroup controllers as
        // /proc and the cgroup mounts say.
        let jail = find(&checks, "jail");
        let detail = jail["detail"].as_str().unwrap_or_default();
        let landlock = vmm_manager::jail::landlock_abi() > 0;
        assert!(detail.contains("seccomp: yes"), "{jail}");
        assert_eq!(
            detail.contains("landlock for Cloud Hypervisor: yes"),
            landlock,
            "{jail}"
        );
        let cgroups = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let has = |c: &str| {
            cgroups
                .lines()
                .any(|l| l.contains(" - cgroup ") && l.split(',').any(|o| o.trim() == c))
                || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
                    .is_ok_and(|s| s.split_whitespace().any(|x| x == c))
                || std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
                    .is_ok_and(|s| s.split_whitespace().any(|x| x == c))
        };
        let limited = has("memory") && has("cpu");
        assert_eq!(jail["verdict"], if limited { "ok" } else { "warn" }, "{jail}");

        // Device-mapper as the kernel says.
        let dm = std::path::Path::new("/dev/mapper/control").exists()
            || std::fs::read_to_string("/proc/misc")
                .unwrap_or_default()
                .contains("device-mapper");
        let dm_check = find(&checks, "device-mapper");
        if dm {
            assert!(
                dm_check["detail"].as_str().unwrap_or("").contains("device-mapper"),
                "{dm_check}"
            );
        } else {
            assert_eq!(dm_check["verdict"], "warn", "{dm_check}");
            assert!(
                dm_check["detail"].as_str().unwrap_or("").contains("does not answer"),
                "{dm_check}"
            );
        }

        // KVM by a real boot: on these machines /dev/kvm exists but cannot run stock
        // guests, which the doctor must say rather than trust the device node.
        let kvm = find(&checks, "kvm");
        let detail = kvm["detail"].as_str().unwrap_or("");
        if kvm["verdict"] == "ok" {
            assert!(detail.contains("booted under KVM"), "{kvm}");
        } else {
            assert!(
                detail.contains("could not boot")
                    || detail.contains("no /dev/kvm")
                    || detail.contains("cannot be opened"),
                "{kvm}"
            );
            assert!(kvm["fix"].is_string(), "a warning says what to do: {kvm}");
        }

        // Forwarding on; a Docker-style FORWARD chain that drops.
        sh("sysctl -qw net.ipv4.ip_forward=1");
        sh("nft add table ip filter && nft add chain ip filter FORWARD '{ type filter hook forward priority 0; policy drop; }'");
        let (_, checks) = doctor(None);
        assert_eq!(find(&checks, "ip-forwarding")["verdict"], "ok");
        let fw = find(&checks, "firewall");
        assert_eq!(fw["verdict"], "warn", "{fw}");
        assert!(
            fw["detail"].as_str().unwrap_or("").contains("ip filter FORWARD"),
            "{fw}"
        );
        sh("nft delete table ip filter");
        let (_, checks) = doctor(None);
        assert_eq!(find(&checks, "firewall")["verdict"], "ok");

        // Cloud Hypervisor: the version the binary in PATH reports itself (the real v54
        // binary beside this checkout when it is there, else the test's fake), or a
        // warning that QEMU runs every VM.
        let ch = common::real_cloud_hypervisor().unwrap_or_else(|| common::cloud_hypervisor_binary().into());
        let said = Command::new(&ch).arg("--version").output().expect("--version");
        let first = String::from_utf8_lossy(&said.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let version = first.strip_prefix("cloud-hypervisor ").expect("a version line");
        let with_ch = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(&ch, with_ch.path().join("cloud-hypervisor")).expect("symlink");
        let path = format!(
            "{}:{}",
            with_ch.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (_, checks) = doctor(Some(&path));
        let found = find(&checks, "cloud-hypervisor");
        assert_eq!(found["verdict"], "ok", "{found}");
        assert!(
            found["detail"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("cloud-hypervisor {version} at")),
            "{found}"
        );

        // A required tool missing: the check fails, names it, and the exit status says so.
        let bin = tempfile::tempdir().expect("tmp");
        for tool in ["qemu-system-x86_64", "dnsmasq", "nft", "sh"] {
            if let Some(p) = hearth_cli::doctor::in_path(tool) {
                std::os::unix::fs::symlink(p, bin.path().join(tool)).expect("symlink");
            }
        }
        let (healthy, checks) = doctor(Some(bin.path().to_str().expect("utf8")));
        assert!(!healthy, "a missing qemu-img is a failure");
        let tools = find(&checks, "tools");
        assert_eq!(tools["verdict"], "fail", "{tools}");
        let no_ch = find(&checks, "cloud-hypervisor");
        assert_eq!(no_ch["verdict"], "warn", "{no_ch}");
        assert!(
            no_ch["detail"]
                .as_str()
                .unwrap_or("")
                .contains("every VM runs under QEMU"),
            "{no_ch}"
        );
        assert!(
            tools["detail"].as_str().unwrap_or("").contains("qemu-img (qemu-utils"),
            "{tools}"
        );
    });
}
