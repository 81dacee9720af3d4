//! The `hearth` CLI against a live stack: tables, JSON output, errors, and
//! `hearth console` driven through a pseudo-terminal (input reaches the guest, Ctrl-]
//! detaches, the VM keeps running).

mod common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{in_private_netns, Stack};

fn hearth(stack: &Stack, args: &[&str]) -> Output {
    Command::new(common::hearth_cli())
        .args(args)
        .env("HEARTH_URL", stack.url())
        .env("HEARTH_API_KEY", &stack.key)
        .output()
        .expect("run hearth")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "hearth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Opens a pseudo-terminal; returns (master, slave).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the integers it is given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[test]
fn cli_manages_vms_and_attaches_to_the_console() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let created = ok(&hearth(
            &stack,
            &[
                "vm",
                "create",
                "cli1",
                "--image",
                "tiny",
                "--hypervisor",
                "cloud-hypervisor",
            ],
        ));
        assert!(created.contains("running"), "{created}");
        let list = ok(&hearth(&stack, &["vm", "list"]));
        assert!(list.starts_with("NAME"), "{list}");
        assert!(
            list.lines().any(|l| l.starts_with("cli1") && l.contains("running")),
            "{list}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&ok(&hearth(&stack, &["-o", "json", "vm", "show", "cli1"]))).expect("json");
        assert_eq!(json["state"], "running");
        // The VM has one NIC (on the default network), shown once.
        let shown = ok(&hearth(&stack, &["vm", "show", "cli1"]));
        assert_eq!(shown.lines().filter(|l| l.starts_with("NIC")).count(), 1, "{shown}");
        assert!(shown.contains("on default"), "{shown}");
        stack
            .wait_console("cli1", "HEARTH-GUEST-READY", 1, Duration::from_secs(30))
            .await;

        // hearth console through a pseudo-terminal.
        let (master, slave) = openpty();
        let mut child = Command::new(common::hearth_cli())
            .args(["console", "cli1"])
            .env("HEARTH_URL", stack.url())
            .env("HEARTH_API_KEY", &stack.key)
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("hearth console");
        let mut term = std::fs::File::from(master);
        let mut reader = term.try_clone().expect("dup");
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut screen = String::new();
        let wait_for = |needle: &str, screen: &mut String| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !screen.contains(needle) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(b) => screen.push_str(&String::from_utf8_lossy(&b)),
                    Err(_) => panic!("{needle:?} never appeared on the terminal: {screen:?}"),
                }
            }
        };
        wait_for("Detach with Ctrl-]", &mut screen);
        term.write_all(b"echo $((6*7))\r").expect("type");
        wait_for("42\r\n", &mut screen);
        term.write_all(&[0x1d]).expect("escape");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "hearth console did not detach on Ctrl-]");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success());
        assert_eq!(
            stack.vm("cli1").await["state"],
            "running",
            "detaching leaves the VM running"
        );

        ok(&hearth(&stack, &["vm", "stop", "cli1"]));
        assert_eq!(stack.vm("cli1").await["state"], "stopped");
        let out = hearth(&stack, &["vm", "show", "ghost"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does not exist"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(common::hearth_cli())
            .args(["vm", "list"])
            .env("HEARTH_URL", stack.url())
            .env("HEARTH_API_KEY", "hth_bad_key")
            .output()
            .expect("run");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("401"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(ok(&hearth(&stack, &["vm", "delete", "cli1"])).contains("deleted cli1"));
        assert_eq!(ok(&hearth(&stack, &["vm", "list"])).trim(), "no VMs");
    });
}

#[test]
fn volume_commands() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let out = ok(&hearth(&stack, &["volume", "create", "data", "--size", "64M"]));
        assert!(out.contains("size:        64M"), "{out}");
        ok(&hearth(&stack, &["volume", "snapshot", "data", "s1"]));
        ok(&hearth(
            &stack,
            &["volume", "clone", "data", "copy", "--snapshot", "s1"],
        ));
        let list = ok(&hearth(&stack, &["volume", "list"]));
        let lines: Vec<&str> = list.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("ATTACHED TO"),
            "{list}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("copy ") && l.contains("64M")),
            "{list}"
        );
        let show = ok(&hearth(&stack, &["volume", "show", "data"]));
        assert!(show.contains("snapshot:    s1 (64M), clones: copy"), "{show}");
        let json: serde_json::Value =
            serde_json::from_str(&ok(&hearth(&stack, &["-o", "json", "volume", "show", "copy"]))).expect("json");
        assert_eq!(json["origin"], "data@s1");

        let shrink = hearth(&stack, &["volume", "resize", "data", "--size", "1M"]);
        assert!(!shrink.status.success());
        let err = String::from_utf8_lossy(&shrink.stderr);
        assert!(err.contains("shrink"), "{err}");
        let busy = hearth(&stack, &["volume", "delete", "data"]);
        assert!(!busy.status.success(), "a volume with clones is kept");
        assert!(String::from_utf8_lossy(&busy.stderr).contains("copy"));
        ok(&hearth(&stack, &["volume", "resize", "data", "--size", "128M"]));
        ok(&hearth(&stack, &["volume", "delete", "copy"]));
        ok(&hearth(&stack, &["volume", "delete-snapshot", "data", "s1"]));
        ok(&hearth(&stack, &["volume", "delete", "data"]));
        assert_eq!(ok(&hearth(&stack, &["volume", "list"])).trim(), "no volumes");
    });
}

/// Projects, users and keys from the CLI, and a config file (url, key, project) that
/// replaces the environment.
#[test]
fn identity_commands_and_config_file() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        ok(&hearth(
            &stack,
            &["project", "create", "lab", "--description", "the lab"],
        ));
        ok(&hearth(&stack, &["user", "create", "carol"]));
        ok(&hearth(&stack, &["project", "grant", "lab", "carol", "member"]));
        let members = ok(&hearth(&stack, &["project", "members", "lab"]));
        assert!(members.contains("carol") && members.contains("member"), "{members}");
        let key = ok(&hearth(&stack, &["key", "create", "laptop", "--user", "carol"]));
        let key = key.trim().to_string();
        assert!(key.starts_with("hth_"), "{key}");

        // Carol's config file: no environment at all.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("cli.toml");
        std::fs::write(
            &config,
            format!("url = \"{}\"\napi_key = \"{key}\"\nproject = \"lab\"\n", stack.url()),
        )
        .expect("config");
        let carol = |args: &[&str]| {
            std::process::Command::new(common::hearth_cli())
                .args(args)
                .env_clear()
                .env("HEARTH_CLI_CONFIG", &config)
                .output()
                .expect("run hearth")
        };
        let out = ok(&carol(&["network", "create", "lab-net", "--subnet", "10.82.0.0/24"]));
        assert!(out.contains("lab-net"), "{out}");
        let listed = ok(&carol(&["network", "list"]));
        assert!(listed.contains("lab-net"), "{listed}");
        // The admin in `default` does not see lab's network; with --project it does.
        let default_list = ok(&hearth(&stack, &["network", "list"]));
        assert!(!default_list.contains("lab-net"), "{default_list}");
        let lab_list = ok(&hearth(&stack, &["--project", "lab", "network", "list"]));
        assert!(lab_list.contains("lab-net"), "{lab_list}");
        // Carol may not make users: the error names the permission.
        let refused = carol(&["user", "create", "mallory"]);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("users.write") && err.contains("403"), "{err}");
        let keys = ok(&carol(&["key", "list"]));
        assert!(keys.contains("laptop") && !keys.contains(&key), "{keys}");
        ok(&carol(&["network", "delete", "lab-net"]));
        ok(&hearth(&stack, &["project", "delete", "lab"]));
    });
}
