//! `hearth doctor` on this host, inside a private network namespace the test shapes:
//! its verdicts follow what the host really has (forwarding off then on, a Docker-style
//! forward chain with policy drop, a tool missing from PATH, device-mapper as the
//! kernel reports it, KVM as a real boot probe finds it).

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
        assert!(
            tools["detail"].as_str().unwrap_or("").contains("qemu-img (qemu-utils"),
            "{tools}"
        );
    });
}
