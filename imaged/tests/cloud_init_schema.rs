//! The seeds imaged writes pass the real cloud-init's checks (Debian bookworm's
//! cloud-init, run by `scripts/cloud-init-check.sh` without installing it): user-data
//! through `cloud-init schema`, network-config through cloud-init's own parser and
//! networkd renderer. The checker must also reject a broken file, or this test proves
//! nothing.

use std::path::Path;
use std::process::Command;

use imaged::cloudinit::{compose, SeedNic, SeedRequest};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@hearth";

fn check(user_data: &str, network_config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let (u, n) = (dir.path().join("user-data"), dir.path().join("network-config"));
    std::fs::write(&u, user_data).expect("write");
    std::fs::write(&n, network_config).expect("write");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cloud-init-check.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&u)
        .arg(&n)
        .output()
        .expect("run cloud-init-check.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.code() != Some(2), "the checker itself failed: {text}");
    (out.status.success(), text)
}

fn request(user_data: Option<&str>, nics: usize) -> SeedRequest {
    SeedRequest {
        instance_id: "0b6f3c1e-8d8e-4a43-9d0e-3f4a9d1b2c3d".into(),
        hostname: "web-1".into(),
        ssh_keys: vec![KEY.into()],
        user_data: user_data.map(str::to_string),
        nics: (0..nics)
            .map(|i| SeedNic {
                mac: format!("52:54:00:12:34:{:02x}", 0x56 + i),
                ip: format!("10.{i}.0.5").parse().expect("ip"),
                prefix: 24,
                gateway: Some(format!("10.{i}.0.1").parse().expect("ip")),
                dns: vec!["10.0.0.1".parse().expect("ip")],
            })
            .collect(),
    }
}

#[test]
fn generated_seeds_pass_cloud_inits_own_checks() {
    let user_config = "#cloud-config\n\
        write_files:\n  - path: /etc/hearth-test.txt\n    content: hello\n    permissions: '0644'\n\
        packages: [htop]\n\
        runcmd:\n  - [sh, -c, 'echo done > /run/x']\n\
        ssh_authorized_keys:\n  - ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@laptop\n";
    for (what, req) in [
        ("no user-data, one NIC", request(None, 1)),
        (
            "a #cloud-config merged with ours, two NICs",
            request(Some(user_config), 2),
        ),
        (
            "a shell script (multipart), no NIC",
            request(Some("#!/bin/sh\necho hi > /run/y\n"), 0),
        ),
    ] {
        let files = compose(&req).expect("compose");
        // `cloud-init schema` checks cloud-configs, not MIME multiparts: check the
        // multipart's cloud-config part, and that the script travels unchanged.
        let user_data = match files
            .user_data
            .strip_prefix("Content-Type: multipart/mixed; boundary=\"")
        {
            Some(rest) => {
                let boundary = rest.split('"').next().expect("boundary");
                let parts: Vec<&str> = files.user_data.split(&format!("--{boundary}")).collect();
                let body = |p: &str| p.split_once("\n\n").map(|(_, b)| b.to_string()).unwrap_or_default();
                let script = parts
                    .iter()
                    .find(|p| p.contains("text/x-shellscript"))
                    .expect("script part");
                assert_eq!(
                    body(script).trim_end(),
                    req.user_data.as_deref().unwrap_or("").trim_end()
                );
                body(
                    parts
                        .iter()
                        .find(|p| p.contains("text/cloud-config"))
                        .expect("cloud-config part"),
                )
            }
            None => files.user_data.clone(),
        };
        let (ok, text) = check(&user_data, &files.network_config);
        assert!(
            ok,
            "{what}: cloud-init refuses what imaged wrote:\n{text}\n--- user-data\n{}\n--- network-config\n{}",
            files.user_data, files.network_config
        );
    }
    // The checker fails on what is wrong.
    let good = compose(&request(None, 1)).expect("compose");
    let (ok, text) = check("#cloud-config\nhostname: [1, 2]\n", &good.network_config);
    assert!(!ok, "a list as hostname must be refused: {text}");
    let (ok, text) = check(
        &good.user_data,
        "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.300/24]\n",
    );
    assert!(!ok, "an impossible address must be refused: {text}");
}
