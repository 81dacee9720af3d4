//! `hearth doctor`: preflight checks of this host, each with a verdict, a detail and,
//! where something is off, what to do. It runs locally and needs no API key.
//!
//! - kvm: `/dev/kvm` present is no proof that KVM runs guests (nested or "PVM" KVM
//!   cannot run stock kernels), so a guest kernel is booted under KVM once, as
//!   vmm-manager's `auto` accelerator does.
//! - device-mapper: the thin-pool target LVM thin volumes need.
//! - tools: the programs the daemons start.
//! - ip-forwarding: NAT networks route through the host.
//! - firewall: a `forward` chain with policy drop outside hearth's own tables (Docker
//!   sets one; ufw's default "deny (routed)" is one) drops VM traffic that leaves a
//!   bridge, and with br_netfilter even traffic between VMs on one bridge.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{table, Output};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        fix: fix.map(str::to_string),
    }
}

/// Where `tool` is on `PATH`, if anywhere.
pub fn in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A guest kernel to probe KVM with: `--kernel`, else the tiny image's.
fn probe_kernel(given: Option<&Path>, images_dir: &Path) -> Option<PathBuf> {
    given
        .map(Path::to_path_buf)
        .or_else(|| Some(images_dir.join("tiny/vmlinuz")))
        .filter(|p| p.is_file())
}

async fn kvm(kernel: Option<&Path>, images_dir: &Path, probe: bool) -> Check {
    if !Path::new("/dev/kvm").exists() {
        return check(
            "kvm",
            Verdict::Warn,
            "no /dev/kvm: QEMU runs guests under TCG (slow), Cloud Hypervisor cannot run",
            Some("enable virtualization in the firmware and load kvm_intel or kvm_amd"),
        );
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return check(
            "kvm",
            Verdict::Warn,
            "/dev/kvm exists but cannot be opened read-write by this user",
            Some("run the daemons as root or add the user to the kvm group"),
        );
    }
    if !probe {
        return check(
            "kvm",
            Verdict::Warn,
            "/dev/kvm opens; not probed (--no-kvm-probe), so whether it runs guests is unknown",
            None,
        );
    }
    let Some(kernel) = probe_kernel(kernel, images_dir) else {
        return check(
            "kvm",
            Verdict::Warn,
            "/dev/kvm exists but was not tried: no guest kernel to boot (give --kernel, or build guest-images/tiny)",
            None,
        );
    };
    let Some(qemu) = in_path("qemu-system-x86_64") else {
        return check(
            "kvm",
            Verdict::Warn,
            "/dev/kvm exists but was not tried: qemu-system-x86_64 is missing",
            Some("apt-get install qemu-system-x86"),
        );
    };
    let probe_dir = std::env::temp_dir().join(format!("hearth-doctor-{}", std::process::id()));
    let booted = vmm_manager::hypervisor::qemu::probe_kvm(&qemu.to_string_lossy(), &kernel, &probe_dir).await;
    let _ = std::fs::remove_dir_all(&probe_dir);
    if booted {
        check(
            "kvm",
            Verdict::Ok,
            format!("a guest kernel ({}) booted under KVM", kernel.display()),
            None,
        )
    } else {
        check(
            "kvm",
            Verdict::Warn,
            format!(
                "/dev/kvm exists but a guest kernel ({}) could not boot under it (nested or paravirtual KVM?): \
                 QEMU will use TCG, Cloud Hypervisor will fail",
                kernel.display()
            ),
            Some("use bare metal or a host whose KVM runs stock guests; hearth-api --qemu-accel tcg makes it explicit"),
        )
    }
}

fn device_mapper() -> Check {
    // The node can exist (udev, lvm2's packaging) while the kernel has no driver
    // behind it: open it to know.
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
    {
        return check(
            "device-mapper",
            Verdict::Warn,
            format!(
                "the kernel's device-mapper does not answer (/dev/mapper/control: {e}): \
                 LVM thin pools (--volume-pool lvm:…) cannot be used; the file pool works"
            ),
            Some("load dm_mod and dm_thin_pool (modprobe dm_thin_pool)"),
        );
    }
    let thin = std::process::Command::new("dmsetup")
        .arg("targets")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("thin-pool"));
    match thin {
        Some(true) => check(
            "device-mapper",
            Verdict::Ok,
            "device-mapper with the thin-pool target",
            None,
        ),
        Some(false) => check(
            "device-mapper",
            Verdict::Warn,
            "device-mapper without the thin-pool target: LVM thin pools cannot be used",
            Some("modprobe dm_thin_pool"),
        ),
        None => check(
            "device-mapper",
            Verdict::Ok,
            "device-mapper is present (dmsetup is missing, so the thin-pool target was not checked)",
            Some("apt-get install dmsetup to check it"),
        ),
    }
}

fn tools() -> Vec<Check> {
    let required = [
        ("qemu-system-x86_64", "qemu-system-x86", "runs VMs"),
        ("qemu-img", "qemu-utils", "clones and converts disk images"),
        ("dnsmasq", "dnsmasq-base", "serves DHCP on networks"),
    ];
    let optional = [
        ("lvcreate", "lvm2", "LVM thin pools"),
        ("mmdebstrap", "mmdebstrap", "builds the debian guest image"),
    ];
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for (tool, pkg, why) in required {
        if in_path(tool).is_none() {
            missing.push(format!("{tool} ({pkg}: {why})"));
        }
    }
    out.push(if missing.is_empty() {
        check(
            "tools",
            Verdict::Ok,
            "qemu-system-x86_64, qemu-img and dnsmasq are installed",
            None,
        )
    } else {
        check(
            "tools",
            Verdict::Fail,
            format!("missing: {}", missing.join(", ")),
            Some("scripts/install.sh installs them, or apt-get install the packages named"),
        )
    });
    let absent: Vec<String> = optional
        .iter()
        .filter(|(tool, _, _)| in_path(tool).is_none())
        .map(|(tool, pkg, why)| format!("{tool} ({pkg}: {why})"))
        .collect();
    out.push(if absent.is_empty() {
        check("optional-tools", Verdict::Ok, "lvm2 and mmdebstrap are installed", None)
    } else {
        check(
            "optional-tools",
            Verdict::Warn,
            format!("not installed: {}", absent.join(", ")),
            None,
        )
    });
    out
}

fn ip_forwarding() -> Check {
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim().to_string()) {
        Ok(v) if v == "1" => check("ip-forwarding", Verdict::Ok, "net.ipv4.ip_forward = 1", None),
        Ok(v) => check(
            "ip-forwarding",
            Verdict::Warn,
            format!("net.ipv4.ip_forward = {v}: VMs on NAT networks cannot reach beyond the host"),
            Some("sysctl -w net.ipv4.ip_forward=1 (and put it in /etc/sysctl.d/)"),
        ),
        Err(e) => check("ip-forwarding", Verdict::Warn, format!("cannot read it: {e}"), None),
    }
}

/// Chains hooked at `forward` with policy drop in tables that are not hearth's.
pub fn dropping_forward_chains(ruleset: &serde_json::Value) -> Vec<String> {
    ruleset["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["hook"] == "forward" && c["policy"] == "drop" && c["table"] != "hearth")
        .map(|c| {
            format!(
                "{} {} {}",
                c["family"].as_str().unwrap_or("?"),
                c["table"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn firewall() -> Check {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .output();
    let ruleset: serde_json::Value = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
        Ok(o) => {
            return check(
                "firewall",
                Verdict::Warn,
                format!("nft list ruleset failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
                Some("run hearth doctor as root"),
            )
        }
        Err(_) => {
            return check(
                "firewall",
                Verdict::Warn,
                "nft is not installed, so the ruleset was not read",
                Some("apt-get install nftables"),
            )
        }
    };
    let chains = dropping_forward_chains(&ruleset);
    let bridge_nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    let ufw = ruleset.to_string().contains("ufw-");
    if chains.is_empty() {
        return check(
            "firewall",
            Verdict::Ok,
            "no forward chain drops traffic by default",
            None,
        );
    }
    let mut detail = format!(
        "forward chain(s) with policy drop: {}{}: VM traffic leaving a bridge is dropped",
        chains.join(", "),
        if ufw { " (ufw)" } else { "" }
    );
    if bridge_nf {
        detail.push_str("; br_netfilter is on, so even traffic between VMs on one bridge is");
    }
    check(
        "firewall",
        Verdict::Warn,
        detail,
        Some("accept forwarding for hearth's bridges (iifname \"hbr-*\" accept; Docker: the DOCKER-USER chain; ufw: ufw route allow in on hbr-…)"),
    )
}

/// What the host offers for jailing VMMs (cgroup controllers, seccomp, landlock, user
/// namespaces) and what vmm-manager will therefore do.
fn jail() -> Check {
    let (_, cgroups) = vmm_manager::jail::cgroup::detect("hearth-vms");
    let s = vmm_manager::jail::support(true, &cgroups);
    let v2 = s
        .cgroups
        .v2_controllers
        .as_ref()
        .map_or("none".to_string(), |c| c.join(" "));
    let detail = format!(
        "{}. cgroup v2 controllers: {v2}; v1: {}; user namespaces: {}",
        s.summary,
        s.cgroups.v1_controllers.join(" "),
        if s.user_namespaces { "yes" } else { "no" }
    );
    let limited = s.cgroups.used.iter().any(|u| u.starts_with("memory v"))
        && s.cgroups.used.iter().any(|u| u.starts_with("cpu v"));
    if !s.seccomp {
        check(
            "jail",
            Verdict::Fail,
            detail,
            Some("use a kernel with CONFIG_SECCOMP_FILTER"),
        )
    } else if !limited {
        check(
            "jail",
            Verdict::Warn,
            detail,
            Some("VMs run without memory or CPU limits: enable the memory and cpu cgroup controllers"),
        )
    } else {
        check("jail", Verdict::Ok, detail, None)
    }
}

/// The Cloud Hypervisor that `hearth-api` would start (`cloud-hypervisor` in PATH, its
/// default), and its version as the binary itself says it (`--version`).
pub async fn cloud_hypervisor() -> Check {
    let Some(bin) = in_path("cloud-hypervisor") else {
        return check(
            "cloud-hypervisor",
            Verdict::Warn,
            "cloud-hypervisor is not installed: every VM runs under QEMU",
            Some("install a release binary from github.com/cloud-hypervisor/cloud-hypervisor as /usr/local/bin/cloud-hypervisor"),
        );
    };
    let ran = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::process::Command::new(&bin).arg("--version").output(),
    )
    .await;
    let out = match ran {
        Ok(Ok(out)) if out.status.success() => out,
        Ok(Ok(out)) => {
            return check(
                "cloud-hypervisor",
                Verdict::Warn,
                format!(
                    "{} --version failed ({}): {}",
                    bin.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Some("reinstall the release binary"),
            )
        }
        Ok(Err(e)) => {
            return check(
                "cloud-hypervisor",
                Verdict::Warn,
                format!("{} cannot be run: {e}", bin.display()),
                Some("reinstall the release binary"),
            )
        }
        Err(_) => {
            return check(
                "cloud-hypervisor",
                Verdict::Warn,
                format!("{} --version did not answer within 5 s", bin.display()),
                None,
            )
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .next()
        .and_then(|l| l.trim().strip_prefix("cloud-hypervisor "))
        .unwrap_or("of an unknown version")
        .to_string();
    check(
        "cloud-hypervisor",
        Verdict::Ok,
        format!(
            "cloud-hypervisor {version} at {} (it runs guests only where KVM works: see the kvm check)",
            bin.display()
        ),
        None,
    )
}

/// Runs every check; prints a table (or JSON) and says whether none failed.
pub async fn run(out: Output, probe: Option<Option<PathBuf>>, images_dir: PathBuf) -> anyhow::Result<bool> {
    let kvm_check = match &probe {
        Some(kernel) => kvm(kernel.as_deref(), &images_dir, true).await,
        None => kvm(None, &images_dir, false).await,
    };
    let mut checks = vec![kvm_check, device_mapper()];
    checks.extend(tools());
    checks.push(cloud_hypervisor().await);
    checks.push(jail());
    checks.push(ip_forwarding());
    checks.push(firewall());
    let healthy = !checks.iter().any(|c| c.verdict == Verdict::Fail);
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|c| {
                    let mut detail = c.detail.clone();
                    if let Some(f) = &c.fix {
                        detail.push_str(&format!(" → {f}"));
                    }
                    vec![c.name.to_string(), format!("{:?}", c.verdict).to_uppercase(), detail]
                })
                .collect();
            println!("{}", table(&["CHECK", "VERDICT", "DETAIL"], &rows));
            println!(
                "\n{}",
                if healthy {
                    "hearth can run here (see the warnings above for what will be slower or unavailable)"
                } else {
                    "hearth cannot run here until the failed checks are fixed"
                }
            );
        }
    }
    Ok(healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_style_forward_drop_is_found_and_hearths_own_tables_are_not() {
        let rs = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "inet", "table": "hearth", "name": "forward", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING", "hook": "postrouting", "prio": 100, "policy": "accept"}},
        ]});
        assert_eq!(dropping_forward_chains(&rs), vec!["ip filter FORWARD"]);
    }
}
