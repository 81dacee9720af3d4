//! `scripts/install.sh` into a scratch root: binaries, the commented hearth.toml and the
//! systemd units land where they should; the units pass `systemd-analyze verify`
//! (which does fail on a broken unit: checked too); a daemon started the way its unit
//! starts it reads hearth.toml; `--uninstall` removes what was installed and keeps a
//! hearth.toml the user changed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::in_private_netns;

const UNITS: [&str; 5] = [
    "hearth-vmm-manager",
    "hearth-netd",
    "hearth-blockd",
    "hearth-imaged",
    "hearth-api",
];

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn install(root: &Path, extra: &[&str]) -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_hearth-api"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg("--root")
        .arg(root)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--no-packages")
        .args(extra)
        .output()
        .expect("install.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh {extra:?}: {text}");
    text
}

fn verify(root: &Path, units: &[std::path::PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .output()
        .expect("systemd-analyze");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn install_writes_verified_units_and_a_config_the_daemons_read() {
    // The built binaries (hearth-api, hearth) must sit next to the daemons'.
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--locked",
            "-p",
            "vmm-manager",
            "-p",
            "netd",
            "-p",
            "blockd",
            "-p",
            "imaged",
            "--bins",
        ])
        .status()
        .expect("cargo build");
    assert!(status.success());
    let root = tempfile::tempdir().expect("tmp");
    let r = root.path();
    install(r, &[]);
    for b in ["hearth-api", "hearth", "vmm-manager", "netd", "blockd", "imaged"] {
        assert!(r.join("usr/local/bin").join(b).is_file(), "{b} installed");
    }
    let config = r.join("etc/hearth/hearth.toml");
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        std::fs::read_to_string(repo().join("scripts/hearth.toml")).expect("template")
    );
    let units: Vec<_> = UNITS
        .iter()
        .map(|u| r.join(format!("etc/systemd/system/{u}.service")))
        .collect();
    let api_unit = std::fs::read_to_string(&units[4]).expect("api unit");
    assert!(api_unit.contains("ExecStart=/usr/local/bin/hearth-api --config /etc/hearth/hearth.toml"));
    assert!(
        api_unit.contains("After=hearth-vmm-manager.service"),
        "ordered after the daemons"
    );
    for u in &units {
        let text = std::fs::read_to_string(u).expect("unit");
        assert!(text.contains("Restart=on-failure"), "{}", u.display());
    }
    // The scratch root gets the host's own units (targets like sysinit.target), as a
    // real root has them; hearth's units are checked against those.
    let sys = r.join("usr/lib/systemd");
    std::fs::create_dir_all(&sys).expect("dir");
    let out = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&sys)
        .output()
        .expect("cp");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, text) = verify(r, &units);
    assert!(ok, "systemd-analyze verify: {text}");

    // verify is not a rubber stamp: a unit with a bad directive and a missing binary fails.
    let broken = r.join("etc/systemd/system/hearth-broken.service");
    std::fs::write(
        &broken,
        "[Service]\nExecStart=/usr/local/bin/no-such-program\nRestart=sometimes\n",
    )
    .expect("write");
    let (ok, text) = verify(r, std::slice::from_ref(&broken));
    assert!(!ok, "a broken unit must fail verification: {text}");
    std::fs::remove_file(&broken).expect("rm");

    // A daemon started as its unit starts it reads hearth.toml: netd's socket and state
    // directory come from the [netd] section.
    let sock = r.join("run/netd.sock");
    let state = r.join("var/lib/netd-from-config");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text = text.replace(
        "[netd]\n",
        &format!(
            "[netd]\nsocket = \"{}\"\nstate_dir = \"{}\"\n",
            sock.display(),
            state.display()
        ),
    );
    std::fs::write(&config, &text).expect("write");
    let netd = r.join("usr/local/bin/netd");
    let config2 = config.clone();
    in_private_netns(move || async move {
        let mut child = tokio::process::Command::new(&netd)
            .arg("--config")
            .arg(&config2)
            .kill_on_drop(true)
            .spawn()
            .expect("netd");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "netd did not open the socket hearth.toml names"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(state.is_dir(), "netd used the state_dir from hearth.toml");
        let _ = child.kill().await;
    });

    // Uninstall: binaries and units go; the changed hearth.toml stays.
    let said = install(r, &["--uninstall"]);
    assert!(said.contains("kept"), "{said}");
    for b in ["hearth-api", "hearth", "netd"] {
        assert!(!r.join("usr/local/bin").join(b).exists(), "{b} removed");
    }
    for u in &units {
        assert!(!u.exists(), "{} removed", u.display());
    }
    assert!(config.exists(), "a changed hearth.toml is kept");
    // An unchanged one goes.
    install(r, &[]);
    std::fs::copy(repo().join("scripts/hearth.toml"), &config).expect("reset");
    install(r, &["--uninstall"]);
    assert!(!config.exists(), "an unchanged hearth.toml is removed");
}
