//! Every VMM in its own jail (the default): an unprivileged user with no capabilities,
//! a seccomp filter and `no_new_privs`, a mount namespace holding only its own files,
//! and a cgroup with the VM's memory, CPU and I/O limits. Shown on real VMMs: QEMU
//! under TCG with the tiny guest, and the real Cloud Hypervisor with the PVH guest.

mod common;

use std::time::{Duration, Instant};

use common::{in_private_netns, real_cloud_hypervisor_binary, Stack};
use serde_json::{json, Value};

/// The fields of `/proc/<pid>/status` that say how a process is confined.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the VMM's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Checks the confinement `/proc` shows; returns the VMM's uid.
fn assert_confined(pid: u32) -> u32 {
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect();
    assert!(uids.iter().all(|&u| u != 0), "the VMM runs as root: Uid {uids:?}");
    let gids = status_field(pid, "Gid");
    assert!(!gids.split_whitespace().any(|g| g == "0"), "Gid {gids}");
    assert_eq!(
        status_field(pid, "CapEff"),
        "0000000000000000",
        "effective capabilities"
    );
    assert_eq!(
        status_field(pid, "CapPrm"),
        "0000000000000000",
        "permitted capabilities"
    );
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000", "bounding set");
    assert_eq!(status_field(pid, "Seccomp"), "2", "a seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "no_new_privs");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).expect("mount namespace");
    assert_ne!(ns(&pid.to_string()), ns("self"), "the VMM has its own mount namespace");
    uids[0]
}

/// Runs `script` with `sh` inside `pid`'s mount namespace as `uid`:`gid` (what a VMM
/// taken over by its guest could do). Returns (success, output).
fn in_jail(pid: u32, uid: u32, gid: u32, script: &str) -> (bool, String) {
    let out = std::process::Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--mount"])
        .args(["--setuid", &uid.to_string(), "--setgid", &gid.to_string()])
        .args(["--", "sh", "-c", script])
        .output()
        .expect("nsenter");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every file the jail shows under the stack's data directory is the VM's own: in its
/// directory, its saved states, or its kernel and initramfs (read-only).
fn assert_only_own_files(pid: u32, uid: u32, gid: u32, data: &str, vm_dir: &str) {
    // (find also names what it may not enter: those lines are not files.)
    let (_, out) = in_jail(pid, uid, gid, &format!("find {data} -type f -o -type s"));
    let files: Vec<&str> = out.lines().filter(|l| l.starts_with('/')).collect();
    assert!(!files.is_empty());
    let id = vm_dir.rsplit('/').next().unwrap_or_default();
    for f in &files {
        let own = f.starts_with(&format!("{vm_dir}/")) || f.starts_with(&format!("{data}/vmm/{id}/"));
        let boot = f.starts_with(&format!("{data}/imaged/"));
        assert!(own || boot, "{f} is in the jail of VM {id}: {files:?}");
        if boot {
            let (writable, _) = in_jail(pid, uid, gid, &format!("test -w '{f}'"));
            assert!(!writable, "{f} is writable in the jail");
        }
    }
}

/// The disk id volume `volume` has in VM `vm`.
fn disk_id(vm: &Value, volume: &str) -> String {
    vm["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["volume"] == volume || v["name"] == volume)
        .and_then(|v| v["disk"].as_str())
        .unwrap_or_else(|| panic!("no volume {volume} in {vm}"))
        .to_string()
}

async fn create(stack: &Stack, body: Value) -> Value {
    let name = body["name"].as_str().expect("name").to_string();
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}\n{}", stack.log());
    stack.vm(&name).await
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// The file of the VM's v1 or v2 memory cgroup that holds `v1`/`v2`.
fn memory_file(vm: &Value, v1: &str, v2: &str) -> std::path::PathBuf {
    let dirs: Vec<String> = vm["jail"]["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .filter_map(|d| d.as_str().map(str::to_string))
        .collect();
    for d in &dirs {
        let d = std::path::Path::new(d);
        if d.join(v1).exists() {
            return d.join(v1);
        }
        if d.join(v2).exists() {
            return d.join(v2);
        }
    }
    panic!("no memory cgroup among {dirs:?}");
}

fn read_u64(p: &std::path::Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap_or(u64::MAX) // "max"
}

#[test]
fn qemu_vmms_are_unprivileged_confined_and_limited() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        for v in ["data-a", "data-b"] {
            let (status, body) = stack
                .call("POST", "/v1/volumes", Some(json!({"name": v, "size": "8M"})))
                .await;
            assert_eq!(status, 201, "{body}");
        }
        let a = create(
            &stack,
            json!({"name": "a", "image": "tiny", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
                   "volumes": ["data-a"], "cpu_weight": 100}),
        )
        .await;
        let b = create(
            &stack,
            json!({"name": "b", "image": "tiny", "hypervisor": "qemu", "vcpus": 1, "memory_mib": 256,
                   "volumes": ["data-b"], "cpu_weight": 300, "cpu_limit": 1.0}),
        )
        .await;
        let (pid_a, pid_b) = (
            a["pid"].as_u64().expect("pid") as u32,
            b["pid"].as_u64().expect("pid") as u32,
        );

        // GET shows the jail: its own user, the cgroup and the limits in force.
        let ja = &a["jail"];
        let jb = &b["jail"];
        assert_ne!(ja["uid"], jb["uid"], "each VM has a user of its own: {ja} {jb}");
        assert_eq!(ja["memory_overhead_mib"], 384, "{ja}");
        assert_eq!(ja["memory_limit_mib"], 256 + 384, "{ja}");
        assert_eq!(
            (ja["cpu_weight"].as_u64(), jb["cpu_weight"].as_u64()),
            (Some(100), Some(300))
        );
        assert_eq!(jb["cpu_limit"], 1.0, "{jb}");

        // /proc says the same: no root, no capabilities, seccomp, no_new_privs, its
        // own mount namespace.
        let uid_a = assert_confined(pid_a);
        let uid_b = assert_confined(pid_b);
        assert_eq!(u64::from(uid_a), ja["uid"].as_u64().unwrap_or_default());
        let gid_a = ja["gid"].as_u64().expect("gid") as u32;
        let gid_b = jb["gid"].as_u64().expect("gid") as u32;

        stack
            .wait_console("a", "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
            .await;
        stack
            .wait_console("b", "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
            .await;

        // Inside a's namespace, as a's user: only a's files exist.
        let data = stack.data_dir().display().to_string();
        let dir_a = format!("{data}/run/vms/{}", a["id"].as_str().expect("id"));
        let dir_b = format!("{data}/run/vms/{}", b["id"].as_str().expect("id"));
        let volume_b = format!("{data}/volumes/volumes/data-b.raw");
        assert!(std::path::Path::new(&volume_b).exists(), "b's volume on the host");
        for (what, path) in [
            ("b's disk", volume_b.as_str()),
            ("b's directory", dir_b.as_str()),
            ("b's serial socket", &format!("{dir_b}/serial.sock")),
            ("b's QMP socket", &format!("{dir_b}/qmp.sock")),
            (
                "b's saved states",
                &format!("{data}/vmm/{}", b["id"].as_str().unwrap_or_default()),
            ),
            ("the volume pool", &format!("{data}/volumes")),
            ("the api's store", &format!("{data}/store")),
            ("/var/lib/hearth", "/var/lib/hearth"),
            ("the host's /root", "/root/.bashrc"),
        ] {
            let (ok, out) = in_jail(pid_a, uid_a, gid_a, &format!("test -e '{path}' || ls -d '{path}'"));
            assert!(
                !ok && out.contains("No such file"),
                "{what} ({path}) is visible in a's jail: {out}"
            );
        }
        // b's processes are hidden too (/proc with hidepid).
        let (ok, out) = in_jail(pid_a, uid_a, gid_a, &format!("cat /proc/{pid_b}/cmdline"));
        assert!(
            !ok && out.contains("No such file"),
            "b's process is visible from a's jail: {out}"
        );
        assert_only_own_files(pid_a, uid_a, gid_a, &data, &dir_a);
        // Its own network namespace, holding nothing (its TAP came as a descriptor):
        // the api's port on the host's loopback is out of its reach (the guests' traffic
        // still flows: networking.rs runs with jailed VMMs too).
        let net = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).expect("network namespace");
        assert_ne!(
            net(&pid_a.to_string()),
            net("self"),
            "QEMU has its own network namespace"
        );
        let port = common::LISTEN.rsplit(':').next().expect("port");
        let out = std::process::Command::new("nsenter")
            .args(["--target", &pid_a.to_string(), "--net", "--mount"])
            .args(["--setuid", &uid_a.to_string(), "--setgid", &gid_a.to_string(), "--"])
            .args([
                "python3",
                "-c",
                &format!("import socket; socket.create_connection(('127.0.0.1', {port}), 2)"),
            ])
            .output()
            .expect("nsenter");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a's VMM reached the api on the host's loopback");
        assert!(text.contains("unreachable") || text.contains("refused"), "{text}");

        // a's own disk: writable by a's user.
        let disk_a = format!("{dir_a}/disks/{}", disk_id(&a, "data-a"));
        let (ok, out) = in_jail(
            pid_a,
            uid_a,
            gid_a,
            &format!("printf JAILED-WRITE | dd of='{disk_a}' bs=1 seek=4194304 conv=notrunc 2>&1"),
        );
        assert!(ok, "a cannot write its own disk: {out}");
        let written = std::fs::read(format!("{data}/volumes/volumes/data-a.raw")).expect("a's volume");
        assert_eq!(
            &written[4194304..4194316],
            b"JAILED-WRITE",
            "the write reached a's volume"
        );
        // b's user cannot open a's disk even where it is mounted (owner and mode 0600).
        let (ok, out) = in_jail(pid_a, uid_b, gid_b, &format!("cat '{disk_a}' > /dev/null"));
        assert!(
            !ok && out.contains("Permission denied"),
            "b's user read a's disk: {out}"
        );

        // CPU weights: both guests spin on one host CPU; b (300) gets about three
        // times a's (100) time. b's quota of one CPU does not bind on one shared CPU.
        for vm in ["a", "b"] {
            stack
                .console_run(vm, "(while :; do :; done) > /dev/null 2>&1 & echo $! > /tmp/spin")
                .await;
        }
        for pid in [pid_a, pid_b] {
            let ok = std::process::Command::new("taskset")
                .args(["-a", "-p", "1", &pid.to_string()])
                .output()
                .expect("taskset")
                .status
                .success();
            assert!(ok, "pinning {pid} to CPU 0");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (ta, tb) = (cpu_ticks(pid_a), cpu_ticks(pid_b));
        tokio::time::sleep(Duration::from_secs(8)).await;
        let (da, db) = (cpu_ticks(pid_a) - ta, cpu_ticks(pid_b) - tb);
        let ratio = db as f64 / da.max(1) as f64;
        eprintln!("CPU time over 8 s on one CPU: a (weight 100) {da} ticks, b (weight 300) {db} ticks: {ratio:.2}");
        assert!(
            (2.55..=3.45).contains(&ratio),
            "b/a CPU time {ratio:.2} is not 3 within 15% ({da} vs {db} ticks)"
        );
        for vm in ["a", "b"] {
            stack.console_run(vm, "kill $(cat /tmp/spin)").await;
        }

        // Memory: the guest touches more than it has; the VMM's cgroup never goes
        // past the VM's limit, and the memory was charged to it.
        let limit_file = memory_file(&a, "memory.limit_in_bytes", "memory.max");
        let peak_file = memory_file(&a, "memory.max_usage_in_bytes", "memory.peak");
        assert_eq!(read_u64(&limit_file), (256 + 384) << 20, "the cgroup's limit");
        let before = read_u64(&peak_file);
        stack
            .console_run(
                "a",
                "dd if=/dev/zero of=/dev/null bs=200M count=1; dd if=/dev/zero of=/dev/null bs=400M count=1",
            )
            .await;
        let peak = read_u64(&peak_file);
        eprintln!(
            "a's cgroup: peak {} MiB before, {} MiB after the guest's allocations; limit {} MiB",
            before >> 20,
            peak >> 20,
            read_u64(&limit_file) >> 20
        );
        // The kernel holds the cgroup under its limit; what shows the limit is the VM's
        // is that the guest's memory was charged there and the VMM lived on.
        assert!(
            peak >= 200 << 20,
            "the guest's memory is charged to its VMM's cgroup: peak {peak}"
        );
        let v = stack.vm("a").await;
        assert_eq!(v["state"], "running", "a survived its guest's allocations: {v}");

        // Hot-plug into the jail: a volume attached to the running VM appears in its
        // namespace only, and the guest sees it.
        let (status, body) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "late", "size": "4M"})))
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = stack
            .call("POST", "/v1/volumes/late/attach", Some(json!({"vm": "a"})))
            .await;
        assert!(status == 200 || status == 202, "{status} {body}");
        if status == 202 {
            assert_eq!(stack.wait_op(&body).await["status"], "succeeded");
        }
        let late = disk_id(&stack.vm("a").await, "late");
        let (ok, out) = in_jail(pid_a, uid_a, gid_a, &format!("test -w '{dir_a}/disks/{late}'"));
        assert!(ok, "the hot-plugged volume is not in a's jail: {out}");
        let (ok, out) = in_jail(pid_b, uid_b, gid_b, &format!("ls '{dir_a}/disks/{late}'"));
        assert!(
            !ok && out.contains("No such file"),
            "a's hot-plugged volume is visible in b's jail: {out}"
        );

        // Deleting the VMs leaves no cgroup behind.
        let cgroups: Vec<String> = [&a, &b]
            .iter()
            .flat_map(|v| v["jail"]["cgroups"].as_array().cloned().unwrap_or_default())
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect();
        for vm in ["a", "b"] {
            let (status, body) = stack.call("DELETE", &format!("/v1/vms/{vm}?force=true"), None).await;
            assert!(status == 202 || status == 200 || status == 204, "{status} {body}");
            if status == 202 {
                assert_eq!(stack.wait_op(&body).await["status"], "succeeded");
            }
        }
        let start = Instant::now();
        while cgroups.iter().any(|d| std::path::Path::new(d).exists()) {
            assert!(start.elapsed() < Duration::from_secs(10), "cgroups left: {cgroups:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn the_real_cloud_hypervisor_runs_jailed() {
    let Some(ch) = real_cloud_hypervisor_binary() else {
        eprintln!("no real cloud-hypervisor here: skipped (scripts/test.sh provides one)");
        return;
    };
    in_private_netns(|| async move {
        let stack = Stack::start(&["--cloud-hypervisor-binary", &ch]).await;
        let vm = create(
            &stack,
            json!({"name": "pvh", "image": "pvh-count", "hypervisor": "cloud-hypervisor",
                   "vcpus": 1, "memory_mib": 64, "max_memory_mib": 64, "cpu_weight": 200}),
        )
        .await;
        let pid = vm["pid"].as_u64().expect("pid") as u32;
        stack
            .wait_console("pvh", "HEARTH-COUNT 3", 1, Duration::from_secs(20))
            .await;
        let uid = assert_confined(pid);
        let j = &vm["jail"];
        assert_eq!(j["memory_limit_mib"], 64 + 64, "{j}");
        assert_eq!(j["cpu_weight"], 200, "{j}");
        let gid = j["gid"].as_u64().expect("gid") as u32;
        let data = stack.data_dir().display().to_string();
        let dir = format!("{data}/run/vms/{}", vm["id"].as_str().expect("id"));
        assert_only_own_files(pid, uid, gid, &data, &dir);

        // A VMM may write its own directory, so it could put a link to another VM's
        // API socket where its own is: vmm-manager then refuses to talk to it (the
        // peer is not the VM's user) and the other VM is left alone.
        let other = create(
            &stack,
            json!({"name": "other", "image": "pvh-count", "hypervisor": "cloud-hypervisor",
                   "vcpus": 1, "memory_mib": 64}),
        )
        .await;
        let other_dir = format!("{data}/run/vms/{}", other["id"].as_str().expect("id"));
        let own = format!("{dir}/api.sock");
        std::fs::rename(&own, format!("{dir}/api.sock.real")).expect("move the socket aside");
        std::os::unix::fs::symlink(format!("{other_dir}/api.sock"), &own).expect("link");
        let (status, accepted) = stack.call("POST", "/v1/vms/pvh/pause", None).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "failed", "talked to another VM's VMM: {op}");
        let message = op["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("not uid"), "{op}");
        let (_, b) = stack.call("GET", "/v1/vms/other", None).await;
        assert_eq!(b["state"], "running", "the other VM was not paused: {b}");
        std::fs::remove_file(&own).expect("unlink");
        std::fs::rename(format!("{dir}/api.sock.real"), &own).expect("move it back");
        let (status, accepted) = stack.call("POST", "/v1/vms/pvh/pause", None).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(
            stack.wait_op(&accepted).await["status"],
            "succeeded",
            "its own socket again"
        );

        for name in ["pvh", "other"] {
            let (status, body) = stack.call("DELETE", &format!("/v1/vms/{name}?force=true"), None).await;
            assert!(status == 202 || status == 200 || status == 204, "{status} {body}");
        }
    });
}
