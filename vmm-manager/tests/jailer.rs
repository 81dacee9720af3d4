//! The jailer on its own: what a process started through `__hearth-jail` can and
//! cannot do (the VMM tests show it with real QEMU and Cloud Hypervisor).

use std::path::Path;
use std::process::Command;

use vmm_manager::jail::plan::{self, Bind, JailPlan};

const UID: u32 = 1_900_099_999;

/// Runs `sh -c script` jailed with `dir` as its only writable directory.
fn jailed(dir: &Path, script: &str) -> (bool, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("root");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("work");
    std::os::unix::fs::chown(&work, Some(UID), Some(UID)).expect("chown");
    let mut p = JailPlan {
        uid: UID,
        gid: UID,
        groups: vec![],
        root,
        binds: vec![Bind {
            src: work.clone(),
            dst: work.clone(),
            writable: true,
        }],
        symlinks: vec![],
        devices: vec![],
        cgroup_procs: vec![],
        workdir: work,
        env: vec!["HEARTH_JAILER_TEST=given".into()],
        net_namespace: true,
        taps: vec![],
    };
    plan::system(&mut p);
    p.order();
    let plan_file = dir.join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec(&p).expect("json")).expect("plan");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-manager"))
        .arg("__hearth-jail")
        .arg(&plan_file)
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .expect("run the jailer");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_jailed_process_has_no_privilege_and_sees_only_its_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ok, status) = jailed(tmp.path(), "cat /proc/self/status");
    assert!(ok, "{status}");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        field("Uid").split_whitespace().all(|u| u == UID.to_string()),
        "{status}"
    );
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("CapBnd"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");

    // A clean environment: PATH, LANG, HOME and what the plan gives, nothing of ours.
    let (ok, env) = jailed(tmp.path(), "env | sort");
    assert!(ok, "{env}");
    let mut names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    names.retain(|n| *n != "PWD" && *n != "SHLVL" && *n != "_");
    assert_eq!(names, ["HEARTH_JAILER_TEST", "HOME", "LANG", "PATH"], "{env}");

    // The baseline filter refuses namespaces and tracing, which an unprivileged
    // process may otherwise use.
    let ptrace = "python3 -c 'import ctypes, os, sys; r = ctypes.CDLL(None, use_errno=True).ptrace(0, 0, 0, 0); \
                  sys.exit(os.strerror(ctypes.get_errno())) if r else print(\"traced\")'";
    for (what, cmd) in [("unshare", "unshare --user --map-root-user true"), ("ptrace", ptrace)] {
        let (ok, out) = jailed(tmp.path(), cmd);
        assert!(!ok, "{what} worked in the jail: {out}");
        assert!(out.contains("not permitted"), "{what}: {out}");
    }

    // Only its own directory is writable; the host's files are not there.
    let work = tmp.path().join("work");
    let (ok, out) = jailed(
        tmp.path(),
        &format!("echo hi > {}/f && cat {}/f", work.display(), work.display()),
    );
    assert!(ok && out.contains("hi"), "{out}");
    for gone in ["/root", "/etc/passwd", "/var", "/home"] {
        let (ok, out) = jailed(tmp.path(), &format!("ls -d {gone}"));
        assert!(!ok && out.contains("No such file"), "{gone} is in the jail: {out}");
    }
    let (ok, out) = jailed(tmp.path(), "touch /usr/x");
    assert!(!ok && out.contains("Read-only file system"), "/usr is writable: {out}");
    // A network namespace of its own: the host's loopback services are out of reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let connect = format!("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2)'");
    let (ok, out) = jailed(tmp.path(), &connect);
    assert!(!ok, "the jail reached the host's loopback: {out}");
    assert!(out.contains("unreachable") || out.contains("refused"), "{out}");
    let (ok, out) = jailed(tmp.path(), "cat /proc/net/dev | grep -c :");
    assert!(ok && out.trim() == "1", "only its own loopback: {out}");
    // Its /proc shows its own processes only.
    let (ok, out) = jailed(tmp.path(), "ls /proc | grep -c '^[0-9]'");
    assert!(ok, "{out}");
    assert!(out.trim().parse::<u32>().unwrap_or(99) <= 3, "processes visible: {out}");
}
