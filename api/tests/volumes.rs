//! Volumes through the public API, with real guests (tiny image, QEMU/TCG): data
//! written by one VM is read by the next, through a file attachment, a vhost-user-blk
//! attachment (blockd's backend), and a volume another blockd serves over NBD,
//! hot-plugged into a running VM. Then blockd restarts under a VM using a volume.

mod common;

use std::time::Duration;

use common::{create_body, in_private_netns, patience, Stack};
use serde_json::{json, Value};

async fn create_vm(stack: &Stack, name: &str, volumes: Value) -> Value {
    create_vm_from(stack, name, "tiny", volumes).await
}

async fn create_vm_from(stack: &Stack, name: &str, image: &str, volumes: Value) -> Value {
    let mut body = create_body(name, "qemu");
    body["image"] = json!(image);
    body["nics"] = json!([]);
    body["volumes"] = volumes;
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    stack
        .wait_console(name, "HEARTH-GUEST-READY", 1, patience(Duration::from_secs(90)))
        .await;
    stack.vm(name).await
}

async fn delete_vm(stack: &Stack, name: &str) {
    let (status, accepted) = stack.call("DELETE", &format!("/v1/vms/{name}"), None).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
}

/// Writes `text` at sector `sector` of the guest's `dev`, and syncs.
async fn guest_write(stack: &Stack, vm: &str, dev: &str, sector: u32, text: &str) {
    let out = stack
        .console_run(
            vm,
            &format!("printf '{text}' | dd of={dev} bs=512 seek={sector} conv=fsync 2>&1; echo rc=$?; sync"),
        )
        .await;
    assert!(out.contains("rc=0"), "write to {dev} failed: {out}");
}

/// Reads `len` bytes at sector `sector` of the guest's `dev`.
async fn guest_read(stack: &Stack, vm: &str, dev: &str, sector: u32, len: usize) -> String {
    // Drop the guest's cache so the bytes come from the device.
    stack
        .console_run(vm, &format!("echo 3 > /proc/sys/vm/drop_caches; dd if={dev} bs=512 skip={sector} count=1 2>/dev/null | head -c {len}; echo"))
        .await
}

async fn wait_for_device(stack: &Stack, vm: &str, dev: &str) {
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(30));
    loop {
        let out = stack
            .console_run(vm, &format!("[ -b {dev} ] && echo PRESENT-$((1+1))"))
            .await;
        if out.contains("PRESENT-2") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dev} never appeared in {vm}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The size of the guest's `dev` in 512-byte sectors.
async fn guest_sectors(stack: &Stack, vm: &str, dev: &str) -> u64 {
    let out = stack
        .console_run(vm, &format!("echo SECTORS-$((1+1))=$(cat /sys/block/{dev}/size)"))
        .await;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("SECTORS-2="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size of {dev} in {vm}: {out:?}"))
}

async fn wait_for_sectors(stack: &Stack, vm: &str, dev: &str, want: u64) {
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(30));
    loop {
        let now = guest_sectors(stack, vm, dev).await;
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vm}'s {dev} has {now} sectors, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Takes snapshot `snap` of `vol` (201).
async fn snapshot(stack: &Stack, vol: &str, snap: &str) {
    let (status, s) = stack
        .call(
            "POST",
            &format!("/v1/volumes/{vol}/snapshots"),
            Some(json!({"name": snap})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
}

/// Clones `vol@snap` into a new volume `name` (201, its origin named).
async fn clone_snapshot(stack: &Stack, vol: &str, snap: &str, name: &str) {
    let (status, c) = stack
        .call(
            "POST",
            &format!("/v1/volumes/{vol}/clone"),
            Some(json!({"name": name, "snapshot": snap})),
        )
        .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["origin"], format!("{vol}@{snap}"));
}

/// Attaches `vol` to the running `vm` and waits for the guest to see it as `dev`.
async fn hot_plug(stack: &Stack, vol: &str, vm: &str, dev: &str) {
    let (status, v) = stack
        .call("POST", &format!("/v1/volumes/{vol}/attach"), Some(json!({"vm": vm})))
        .await;
    assert_eq!(status, 200, "hot-plug {vol}: {v}");
    wait_for_device(stack, vm, dev).await;
}

async fn volume(stack: &Stack, name: &str) -> Value {
    let (status, v) = stack.call("GET", &format!("/v1/volumes/{name}"), None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// The VM writes 4 MiB at 16 MiB of its `dev` (the volume), then discards them: the
/// volume's `allocated_bytes` grows by them, then drops by at least 3 MiB. Returns both
/// figures.
async fn discard_gives_space_back(stack: &Stack, vm: &str, dev: &str, name: &str) -> (u64, u64) {
    let out = stack
        .console_run(
            vm,
            &format!("dd if=/dev/urandom of={dev} bs=1M seek=16 count=4 conv=fsync 2>&1; echo rc=$?"),
        )
        .await;
    assert!(out.contains("rc=0"), "{out}");
    let written = allocated(stack, name).await;
    assert!(written >= 4 << 20, "4 MiB written, {written} bytes allocated");
    let out = stack
        .console_run(vm, &format!("blkdiscard -o 16777216 -l 4194304 {dev}; echo rc=$?"))
        .await;
    assert!(out.contains("rc=0"), "{out}");
    let trimmed = allocated(stack, name).await;
    assert!(
        trimmed + (3 << 20) <= written,
        "the guest's discard gave nothing back to the pool: {written} bytes allocated before, {trimmed} after"
    );
    (written, trimmed)
}

async fn allocated(stack: &Stack, name: &str) -> u64 {
    volume(stack, name).await["allocated_bytes"]
        .as_u64()
        .expect("allocated_bytes")
}

/// A second blockd (another "host"): the same library the daemon runs, in this test
/// process, serving NBD on loopback.
struct RemoteBlockd {
    // Stopped before its directory goes.
    _running: blockd::InProcess,
    dir: tempfile::TempDir,
    port: u16,
}

impl RemoteBlockd {
    async fn start() -> RemoteBlockd {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = 20000 + (std::process::id() % 20000) as u16;
        let d = dir.path();
        let config = blockd::BlockdConfig {
            pool: blockd::PoolConfig::File(d.join("pool")),
            state_dir: d.join("state"),
            socket_dir: d.join("run"),
            nbd: blockd::exports::NbdSettings {
                tcp: Some(format!("127.0.0.1:{port}").parse().expect("address")),
                unix: Some(d.join("run/nbd.sock")),
                allow: Some(vec!["127.0.0.0/8".parse().expect("network")]),
                tls: None,
            },
        };
        let running = blockd::InProcess::start(config, &d.join("blockd.sock"))
            .await
            .expect("second blockd");
        RemoteBlockd {
            _running: running,
            dir,
            port,
        }
    }

    fn client(&self) -> blockd::http::client::BlockdClient {
        blockd::http::client::BlockdClient::new(self.dir.path().join("blockd.sock"))
    }
}

#[test]
fn volumes_outlive_vms_and_travel_between_hosts() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;

        // A volume, written by one VM (file attachment)...
        let (status, v) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "64M"})))
            .await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["size_bytes"], 64 << 20);
        create_vm(&stack, "writer", json!(["data"])).await;
        assert_eq!(volume(&stack, "data").await["attached_to"]["vm_name"], "writer");
        let (status, e) = stack.call("DELETE", "/v1/volumes/data", None).await;
        assert_eq!(status, 409, "deleting an attached volume: {e}");
        guest_write(&stack, "writer", "/dev/vda", 100, "HEARTH-PATTERN-ONE").await;
        // Attached at create, the disk sits on q35's root bus: QEMU cannot unplug it from
        // the running VM. A 409 that says what to do, and nothing changed.
        let (status, e) = stack.call("POST", "/v1/volumes/data/detach", None).await;
        assert_eq!(status, 409, "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("stop the VM"),
            "{e}"
        );
        assert_eq!(volume(&stack, "data").await["attached_to"]["vm_name"], "writer");
        // The guest's discards reach the pool: 4 MiB written, then discarded, come back.
        discard_gives_space_back(&stack, "writer", "/dev/vda", "data").await;
        // Grown while the VM runs: the guest sees the new size at once.
        let (status, v) = stack
            .call("POST", "/v1/volumes/data/resize", Some(json!({"size": "96M"})))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["size_bytes"], 96 << 20);
        wait_for_sectors(&stack, "writer", "vda", (96 << 20) / 512).await;
        stack.act("writer", "stop").await;
        delete_vm(&stack, "writer").await;
        assert!(
            volume(&stack, "data").await["attached_to"].is_null(),
            "the VM's delete released the volume"
        );

        // ... is read back by the next VM, through blockd's vhost-user-blk backend.
        create_vm(&stack, "reader", json!([{"volume": "data", "via": "vhost-user"}])).await;
        let read = guest_read(&stack, "reader", "/dev/vda", 100, 18).await;
        assert!(read.contains("HEARTH-PATTERN-ONE"), "read through vhost-user: {read:?}");
        guest_write(&stack, "reader", "/dev/vda", 200, "HEARTH-PATTERN-TWO").await;
        assert_eq!(guest_sectors(&stack, "reader", "vda").await, (96 << 20) / 512);
        // Grown under a vhost-user attachment: blockd tells QEMU over the back-end
        // channel, and the running guest sees the new size at once...
        let (status, v) = stack
            .call("POST", "/v1/volumes/data/resize", Some(json!({"size": "128M"})))
            .await;
        assert_eq!(status, 200, "{v}");
        wait_for_sectors(&stack, "reader", "vda", (128 << 20) / 512).await;
        // ... and can use it: a write past the old end reads back.
        guest_write(&stack, "reader", "/dev/vda", (120 << 20) / 512, "HEARTH-PAST-OLD-END").await;
        let read = guest_read(&stack, "reader", "/dev/vda", (120 << 20) / 512, 19).await;
        assert!(read.contains("HEARTH-PAST-OLD-END"), "past the old end: {read:?}");
        // The next start is served the grown volume too.
        stack.act("reader", "stop").await;
        stack.act("reader", "start").await;
        stack
            .wait_console("reader", "HEARTH-GUEST-READY", 2, Duration::from_secs(90))
            .await;
        assert_eq!(guest_sectors(&stack, "reader", "vda").await, (128 << 20) / 512);
        let read = guest_read(&stack, "reader", "/dev/vda", 200, 18).await;
        assert!(read.contains("HEARTH-PATTERN-TWO"), "after the restart: {read:?}");

        // A snapshot keeps the old content; a clone is independent.
        snapshot(&stack, "data", "s1").await;
        clone_snapshot(&stack, "data", "s1", "copy").await;

        // blockd restarts (the api with it) while the VM uses the volume over vhost-user:
        // the socket comes back and the guest keeps reading and writing.
        let mut stack = stack;
        stack.restart(libc::SIGTERM).await;
        let exports = volume(&stack, "data").await["exports"].clone();
        assert_eq!(
            exports[0]["kind"], "vhost-user",
            "the vhost-user export came back: {exports}"
        );
        guest_write(&stack, "reader", "/dev/vda", 300, "HEARTH-AFTER-RESTART").await;
        let read = guest_read(&stack, "reader", "/dev/vda", 300, 20).await;
        assert!(
            read.contains("HEARTH-AFTER-RESTART"),
            "after blockd restarted: {read:?}"
        );
        let read = guest_read(&stack, "reader", "/dev/vda", 200, 18).await;
        assert!(
            read.contains("HEARTH-PATTERN-TWO"),
            "data from before the restart: {read:?}"
        );

        // A volume on another host, exported over NBD, hot-plugged into the running VM.
        let remote = RemoteBlockd::start().await;
        let rc = remote.client();
        let spec = blockd::service::VolumeSpec {
            size_bytes: Some(32 << 20),
            source: None,
        };
        let far = rc.ensure_volume("far", &spec).await.expect("remote volume");
        std::fs::write(far.path.as_ref().expect("path"), {
            let mut b = vec![0u8; 32 << 20];
            b[512 * 7..512 * 7 + 17].copy_from_slice(b"HEARTH-FROM-AFAR!");
            b
        })
        .expect("fill the remote volume");
        rc.export("far", "nbd", &blockd::exports::ExportSpec { read_only: false })
            .await
            .expect("export");
        let body = json!({"name": "far", "remote": {"tcp": format!("127.0.0.1:{}", remote.port), "export": "far"}});
        let (status, v) = stack.call("POST", "/v1/volumes", Some(body)).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["location"], "remote");
        assert_eq!(v["size_bytes"], 32 << 20, "the size the export offered: {v}");
        hot_plug(&stack, "far", "reader", "/dev/vdb").await;
        let read = guest_read(&stack, "reader", "/dev/vdb", 7, 17).await;
        assert!(read.contains("HEARTH-FROM-AFAR!"), "read over NBD: {read:?}");
        guest_write(&stack, "reader", "/dev/vdb", 9, "WRITTEN-FROM-VM").await;
        let bytes = std::fs::read(far.path.as_ref().expect("path")).expect("remote file");
        assert_eq!(
            &bytes[512 * 9..512 * 9 + 15],
            b"WRITTEN-FROM-VM",
            "the write reached the other host's file"
        );

        // Its owner grows it by asking for it again with a larger size, which re-adds the
        // export: the next NBD client is offered the new size...
        let grown = blockd::service::VolumeSpec {
            size_bytes: Some(48 << 20),
            source: None,
        };
        assert_eq!(
            rc.ensure_volume("far", &grown).await.expect("grow").size_bytes,
            48 << 20
        );
        let address = blockd::nbd::NbdAddress::Tcp(format!("127.0.0.1:{}", remote.port));
        let nbd = blockd::nbd::NbdClient::connect(&address, "far")
            .await
            .expect("connect to the export");
        assert_eq!(nbd.size(), 48 << 20, "the export after a PUT that grew the volume");
        drop(nbd);
        // ... and the VM here, whose NBD connection that ended, sees the new size with
        // no I/O of its own (blockd's NBD client reconnects as soon as the connection
        // ends, and tells the VM), and keeps its data.
        wait_for_sectors(&stack, "reader", "vdb", (48 << 20) / 512).await;
        let (_, v) = stack.call("GET", "/v1/volumes/far", None).await;
        assert_eq!(v["size_bytes"], 48 << 20, "the api shows the grown remote volume: {v}");
        let read = guest_read(&stack, "reader", "/dev/vdb", 7, 17).await;
        assert!(read.contains("HEARTH-FROM-AFAR!"), "read after the growth: {read:?}");
        guest_write(&stack, "reader", "/dev/vdb", (40 << 20) / 512, "PAST-THE-OLD-END").await;
        let bytes = std::fs::read(far.path.as_ref().expect("path")).expect("remote file");
        assert_eq!(
            &bytes[40 << 20..(40 << 20) + 16],
            b"PAST-THE-OLD-END",
            "a write past the old end reached the other host's file"
        );

        // The api grows it too: on its owner, through the NBD connection the VM's disk
        // uses (NBD_CMD_RESIZE). The owner's file, the api and the idle guest see 64 MiB.
        let far_file = far.path.clone().expect("path");
        let (status, v) = stack
            .call("POST", "/v1/volumes/far/resize", Some(json!({"size": "64M"})))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["size_bytes"], 64 << 20, "{v}");
        assert_eq!(
            std::fs::metadata(&far_file).expect("file").len(),
            64 << 20,
            "the owner's file"
        );
        wait_for_sectors(&stack, "reader", "vdb", (64 << 20) / 512).await;
        let (status, e) = stack
            .call("POST", "/v1/volumes/far/resize", Some(json!({"size": "32M"})))
            .await;
        assert_eq!(status, 422, "shrinking a remote volume: {e}");
        let read = guest_read(&stack, "reader", "/dev/vdb", (40 << 20) / 512, 16).await;
        assert!(
            read.contains("PAST-THE-OLD-END"),
            "read after the api's resize: {read:?}"
        );

        // Hot-unplug, then clean up in dependency order.
        // The NBD client goes with the attachment: no connection to the other host is
        // left, and none is made again (while attached it reconnects by itself).
        let connected = || {
            let out = std::process::Command::new("ss")
                .args([
                    "-Htn",
                    "state",
                    "established",
                    "dst",
                    &format!("127.0.0.1:{}", remote.port),
                ])
                .output()
                .expect("ss");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert!(!connected().is_empty(), "ss sees the attached volume's NBD connection");
        let (status, v) = stack.call("POST", "/v1/volumes/far/detach", None).await;
        assert_eq!(status, 200, "hot-unplug: {v}");
        assert!(v["attached_to"].is_null());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !connected().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(connected(), "", "NBD connections left after the hot-unplug");
        // Detached, the api grows it through a connection of its own, which it closes.
        let (status, v) = stack
            .call("POST", "/v1/volumes/far/resize", Some(json!({"size": "80M"})))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["size_bytes"], 80 << 20, "{v}");
        assert_eq!(std::fs::metadata(&far_file).expect("file").len(), 80 << 20);
        let (_, v) = stack.call("GET", "/v1/volumes/far", None).await;
        assert_eq!(v["size_bytes"], 80 << 20, "the size is kept in the record: {v}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !connected().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(connected(), "", "NBD connections left after the detached resize");
        // A remote volume with a name as long as the api allows is checked and grown
        // the same way (through remote disks whose names must fit in blockd's 63
        // characters too).
        let long = format!("far-{}", "x".repeat(58));
        let body = json!({"name": long, "remote": {"tcp": format!("127.0.0.1:{}", remote.port), "export": "far"}});
        let (status, v) = stack.call("POST", "/v1/volumes", Some(body)).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["size_bytes"], 80 << 20, "{v}");
        let (status, v) = stack
            .call(
                "POST",
                &format!("/v1/volumes/{long}/resize"),
                Some(json!({"size": "96M"})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(std::fs::metadata(&far_file).expect("file").len(), 96 << 20);
        let (status, e) = stack.call("DELETE", &format!("/v1/volumes/{long}"), None).await;
        assert_eq!(status, 204, "{e}");
        // A remote disk an earlier api process made for a moment and left (it ended
        // between making and removing one) is removed by the pass at the next start.
        let blockd_here = blockd::http::client::BlockdClient::new(stack.data_dir().join("run/blockd.sock"));
        let left = blockd::exports::RemoteDiskSpec {
            tcp: Some(format!("127.0.0.1:{}", remote.port)),
            unix: None,
            export: "far".into(),
            read_only: false,
            tls: false,
        };
        blockd_here
            .remote_disk("probe1.0-far", &left)
            .await
            .expect("a remote disk left by an api that ended");
        assert!(!connected().is_empty(), "it holds a connection");
        stack.restart(libc::SIGTERM).await;
        let remote_disks: Vec<String> = blockd_here
            .exports()
            .await
            .expect("exports")
            .into_iter()
            .filter(|e| e.remote.is_some())
            .map(|e| e.volume)
            .collect();
        assert!(
            remote_disks.is_empty(),
            "remote disks after the restart: {remote_disks:?}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !connected().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(connected(), "", "the left remote disk's connection");
        delete_vm(&stack, "reader").await;
        let (status, e) = stack.call("DELETE", "/v1/volumes/data", None).await;
        assert_eq!(status, 409, "a volume whose snapshot has a clone: {e}");
        for v in ["copy", "data", "far"] {
            let (status, e) = stack.call("DELETE", &format!("/v1/volumes/{v}"), None).await;
            assert_eq!(status, 204, "{v}: {e}");
        }
        let (_, list) = stack.call("GET", "/v1/volumes", None).await;
        assert_eq!(list, json!([]));
        assert!(
            std::fs::read_dir(stack.data_dir().join("run/blockd"))
                .expect("socket dir")
                .flatten()
                .all(|e| {
                    !e.file_name().to_string_lossy().starts_with("vol-")
                        && !e.file_name().to_string_lossy().starts_with("remote-")
                }),
            "no vhost-user socket left"
        );
    });
}

#[test]
fn bad_volume_requests_get_clear_errors() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let cases = [
            (json!({"name": "a/b", "size": "1M"}), 422),
            (json!({"name": "..", "size": "1M"}), 422),
            (json!({"name": "bad\u{1}", "size": "1M"}), 422),
            (json!({"name": "zero", "size_bytes": 0}), 422),
            (json!({"name": "odd", "size_bytes": 1000}), 422),
            (json!({"name": "nosize"}), 422),
            (json!({"name": "units", "size": "12Q"}), 422),
            (json!({"name": "huge", "size": "1000000T"}), 507),
            (json!({"name": "clone", "source": {"snapshot": "nope@x"}}), 404),
            (
                json!({"name": "far", "remote": {"tcp": "127.0.0.1:1", "export": "x"}}),
                404,
            ),
        ];
        for (body, want) in cases {
            let (status, e) = stack.call("POST", "/v1/volumes", Some(body.clone())).await;
            assert_eq!(status, want, "{body}: {e}");
            assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        }
        let (_, list) = stack.call("GET", "/v1/volumes", None).await;
        assert_eq!(list, json!([]), "failed creates left nothing");
        assert_eq!(
            std::fs::read_dir(stack.data_dir().join("volumes/volumes"))
                .expect("pool")
                .count(),
            0
        );

        let (status, _) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "v", "size": "8M"})))
            .await;
        assert_eq!(status, 201);
        let (status, e) = stack
            .call("POST", "/v1/volumes/v/resize", Some(json!({"size": "4M"})))
            .await;
        assert_eq!(status, 422, "shrink: {e}");
        let (status, v) = stack
            .call("POST", "/v1/volumes/v/resize", Some(json!({"size": "16M"})))
            .await;
        assert_eq!((status, v["size_bytes"].as_u64()), (200, Some(16 << 20)), "{v}");
        let (status, _) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "v", "size": "8M"})))
            .await;
        assert_eq!(status, 409, "a second volume with the same name");

        // Attaching to a stopped VM records the disk for its next start; a second VM
        // cannot take the same volume.
        let mut body = create_body("idle", "qemu");
        body["nics"] = json!([]);
        body["start"] = json!(false);
        body["volumes"] = json!(["v"]);
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let mut body = create_body("greedy", "qemu");
        body["nics"] = json!([]);
        body["start"] = json!(false);
        body["volumes"] = json!(["v"]);
        let (status, e) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 409, "the volume is taken: {e}");
        let (status, e) = stack.call("DELETE", "/v1/volumes/v", None).await;
        assert_eq!(status, 409, "{e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("idle"), "{e}");
        let (status, _) = stack.call("POST", "/v1/volumes/v/detach", None).await;
        assert_eq!(status, 200);
        assert!(stack.vm("idle").await["volumes"]
            .as_array()
            .is_some_and(|v| v.is_empty()));
        let (status, _) = stack.call("DELETE", "/v1/volumes/v", None).await;
        assert_eq!(status, 204);
        delete_vm(&stack, "idle").await;
    });
}

/// A volume group of its own on a 1 GiB loop device (a sparse file under /var/tmp),
/// removed with the device when dropped, also when the test fails.
struct TestVg {
    name: String,
    device: String,
    _dir: tempfile::TempDir,
}

impl TestVg {
    fn new() -> TestVg {
        assert_eq!(
            std::env::var("HEARTH_TEST_LVM").as_deref(),
            Ok("1"),
            "this test makes a volume group on a loop device: set HEARTH_TEST_LVM=1 to confirm"
        );
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let file = dir.path().join("pv.raw");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(1 << 30))
            .expect("sparse file");
        let device = testkit::run("losetup", &["--find", "--show", file.to_str().expect("utf8")])
            .trim()
            .to_string();
        let vg = TestVg {
            name: format!("hearthapi{}", std::process::id()),
            device,
            _dir: dir,
        };
        testkit::run("pvcreate", &["-q", &vg.device]);
        testkit::run("vgcreate", &["-q", &vg.name, &vg.device]);
        vg
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        for (prog, args) in [
            ("vgremove", vec!["-f", "-q", &self.name]),
            ("pvremove", vec!["-q", &self.device]),
            ("losetup", vec!["-d", &self.device]),
        ] {
            let _ = std::process::Command::new(prog).args(args).status();
        }
    }
}

/// The api with its volumes in an LVM thin pool (`--volume-pool lvm:VG/pool`, the pool
/// made by blockd in a fresh volume group): a tiny VM under QEMU gets a thin volume as
/// its disk (a device node, so QEMU's `host_device`), writes a pattern, gives a trimmed
/// range back to the pool, sees the volume grow (rounded up to whole extents) while it
/// runs; a snapshot keeps the old content, and its clone, hot-plugged into the same VM,
/// shows it while the volume has moved on. Needs device-mapper: these machines have
/// none, so `lvm_volumes_through_the_api_in_a_debian_guest` runs it in a guest.
#[test]
#[ignore = "needs device-mapper: runs inside lvm_volumes_through_the_api_in_a_debian_guest, or with HEARTH_TEST_LVM=1 cargo test -p api --test volumes -- --ignored on such a host"]
fn volumes_on_an_lvm_thin_pool() {
    in_private_netns(|| async {
        let vg = TestVg::new();
        let pool = format!("lvm:{}/pool", vg.name);
        let stack = Stack::start(&["--volume-pool", &pool]).await;

        let (status, v) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "64M"})))
            .await;
        assert_eq!(status, 201, "{v}\n{}", stack.log());
        assert_eq!(v["backend"], "lvm", "{v}");
        assert_eq!(v["size_bytes"], 64 << 20);

        // An image with a disk: its base volume is made in the thin pool once, and each
        // VM's root disk is a thin snapshot of it.
        let work = tempfile::tempdir().expect("tmp");
        let disk = work.path().join("rooted.raw");
        let mut bytes = vec![0u8; 16 << 20];
        bytes[50 * 512..50 * 512 + 17].copy_from_slice(b"HEARTH-IMAGE-ROOT");
        std::fs::write(&disk, &bytes).expect("image disk");
        let tiny = common::images_dir().join("tiny");
        let path = |f: &str| tiny.join(f).display().to_string();
        let body = json!({
            "name": "rooted",
            "path": disk.display().to_string(),
            // Bytes with no partition table: imaged asks to be told it is a raw disk.
            "format": "raw",
            "kernel": path("vmlinuz"),
            "initramfs": path("initrd.img"),
            "cmdline": std::fs::read_to_string(tiny.join("cmdline")).expect("cmdline").trim(),
        });
        let (status, accepted) = stack.call("POST", "/v1/images", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}");

        let started = std::time::Instant::now();
        let vm = create_vm_from(&stack, "lv", "rooted", json!(["data"])).await;
        eprintln!("the VM on the thin volumes booted in {:?}", started.elapsed());
        let root = format!("hv-vm-{}-root", vm["id"].as_str().expect("id"));
        let origins = testkit::run("lvs", &["--noheadings", "-o", "lv_name,origin", &vg.name]);
        let origin = origins
            .lines()
            .map(str::split_whitespace)
            .find_map(|mut f| (f.next() == Some(root.as_str())).then(|| f.next().unwrap_or("").to_string()))
            .unwrap_or_else(|| panic!("no {root} in the volume group: {origins}"));
        // (The clone's origin is the base volume's snapshot `base`: hs-image-…+base.)
        let base_lv = match origin.strip_prefix("hs-image-").and_then(|o| o.strip_suffix("+base")) {
            Some(digest) => format!("hv-image-{digest}"),
            None => panic!("the root disk is not a thin snapshot of the image's base volume: {origins}"),
        };
        // The guest reads the image's bytes on its root disk and writes its own; the
        // image's base volume keeps the image's.
        let read = guest_read(&stack, "lv", "/dev/vda", 50, 17).await;
        assert!(read.contains("HEARTH-IMAGE-ROOT"), "the root disk: {read:?}");
        guest_write(&stack, "lv", "/dev/vda", 50, "HEARTH-VM-WROTE-IT").await;
        let base = std::fs::read(format!("/dev/{}/{base_lv}", vg.name)).expect("read the base volume");
        assert_eq!(
            &base[50 * 512..50 * 512 + 17],
            b"HEARTH-IMAGE-ROOT",
            "the image's base volume changed"
        );

        // The root disk is vda, the image's cloud-init seed vdb, the data volume vdc.
        assert_eq!(guest_sectors(&stack, "lv", "vdc").await, (64 << 20) / 512);

        // QEMU opened the thin volumes' device nodes as block devices: in its jail,
        // at <vm dir>/disks/<disk>, the very nodes of the logical volumes.
        let lv = format!("/dev/{}/hv-data", vg.name);
        let (qemu_pid, qemu) = stack
            .vmm_processes()
            .into_iter()
            .find(|(_, cmd)| cmd.contains("qemu"))
            .expect("the VM's QEMU");
        assert!(
            qemu.contains("/disks/root") && qemu.contains("/disks/vol0") && qemu.contains("host_device"),
            "QEMU does not open its disks as host_device: {qemu}"
        );
        let vm_dir = stack.data_dir().join("run/vms").join(vm["id"].as_str().expect("id"));
        let numbers = |path: &str, in_jail: bool| -> String {
            let mut cmd = std::process::Command::new(if in_jail { "nsenter" } else { "stat" });
            if in_jail {
                cmd.args(["--target", &qemu_pid.to_string(), "--mount", "--", "stat"]);
            }
            let out = cmd.args(["-L", "-c", "%t:%T", path]).output().expect("stat");
            assert!(
                out.status.success(),
                "stat {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        for (disk, host) in [("vol0", lv.clone()), ("root", format!("/dev/{}/{root}", vg.name))] {
            let jailed = vm_dir.join("disks").join(disk).display().to_string();
            assert_eq!(
                numbers(&jailed, true),
                numbers(&host, false),
                "{disk} in the jail is {host}"
            );
        }

        guest_write(&stack, "lv", "/dev/vdc", 100, "HEARTH-LVM-ONE").await;
        let (written, trimmed) = discard_gives_space_back(&stack, "lv", "/dev/vdc", "data").await;
        eprintln!("allocated in the thin pool: {written} bytes after the write, {trimmed} after the discard");

        // 98M is not a whole number of 4 MiB extents: the volume gets 100M, and the
        // running guest sees exactly what the volume got.
        let (status, v) = stack
            .call("POST", "/v1/volumes/data/resize", Some(json!({"size": "98M"})))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["size_bytes"], 100 << 20);
        wait_for_sectors(&stack, "lv", "vdc", (100 << 20) / 512).await;

        // A thin snapshot keeps the old content; its clone is a volume of its own.
        snapshot(&stack, "data", "s1").await;
        guest_write(&stack, "lv", "/dev/vdc", 100, "HEARTH-LVM-TWO").await;
        clone_snapshot(&stack, "data", "s1", "copy").await;
        hot_plug(&stack, "copy", "lv", "/dev/vdd").await;
        let read = guest_read(&stack, "lv", "/dev/vdd", 100, 14).await;
        assert!(read.contains("HEARTH-LVM-ONE"), "the clone of the snapshot: {read:?}");
        guest_write(&stack, "lv", "/dev/vdd", 100, "HEARTH-LVM-TRI").await;
        let read = guest_read(&stack, "lv", "/dev/vdc", 100, 14).await;
        assert!(
            read.contains("HEARTH-LVM-TWO"),
            "the volume after its clone was written: {read:?}"
        );

        let (status, e) = stack.call("DELETE", "/v1/volumes/data", None).await;
        assert_eq!(status, 409, "deleting an attached volume: {e}");
        let (status, v) = stack.call("POST", "/v1/volumes/copy/detach", None).await;
        assert_eq!(status, 200, "hot-unplug: {v}");
        delete_vm(&stack, "lv").await;
        for v in ["copy", "data"] {
            let (status, e) = stack.call("DELETE", &format!("/v1/volumes/{v}"), None).await;
            assert_eq!(status, 204, "{v}: {e}");
        }
        let lvs = testkit::run("lvs", &["--noheadings", "-o", "lv_name", &vg.name]);
        assert!(!lvs.contains(&root), "the VM's delete left its root disk: {lvs}");
        assert!(lvs.contains(&base_lv), "the image's base went before the image: {lvs}");
        let (status, report) = stack.call("DELETE", "/v1/images/rooted", None).await;
        assert_eq!(status, 200, "{report}");
        eprintln!("the test's steps took {:?} in all", started.elapsed());
        let lvs = testkit::run("lvs", &["--noheadings", "-o", "lv_name", &vg.name]);
        assert!(
            !lvs.contains("hv-") && !lvs.contains("hs-"),
            "volumes or snapshots left in the volume group: {lvs}"
        );
    });
}

/// Where the host has no device-mapper (these machines), `volumes_on_an_lvm_thin_pool`
/// runs in a Debian guest under QEMU/TCG made into a hearth host: it installs QEMU,
/// nftables, dnsmasq and lvm2 from the .debs `guest-images/debian/guest-debs.sh` fetched
/// (the image's own versions), and runs this test binary and `hearth-api` as root. The
/// tiny VM then runs under TCG inside that guest, some 50 times slower than here.
/// Needs the debian and tiny images in `$HEARTH_TEST_IMAGES` and the .debs in
/// `$HEARTH_TEST_HOST_DEBS` (scripts/test.sh makes them; defaults under /var/cache/hearth).
#[test]
fn lvm_volumes_through_the_api_in_a_debian_guest() {
    let mut guest = testkit::DebianGuest::new();
    guest.memory = "2048M".into();
    guest.timeout = Duration::from_secs(40 * 60);
    let debs = std::env::var_os("HEARTH_TEST_HOST_DEBS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/debs/hearth-host-guest".into());
    guest.copy_debs(
        &debs,
        &["qemu-system-x86", "nftables", "dnsmasq-base", "lvm2", "thin-provisioning-tools"],
        "run guest-images/debian/guest-debs.sh IMAGE_DIR DIR qemu-system-x86 qemu-utils nftables dnsmasq-base lvm2 thin-provisioning-tools (scripts/test.sh does)",
    );
    guest.copy_in(&std::env::current_exe().expect("this test binary"), "volumes");
    let api = std::env::var("HEARTH_API_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hearth-api").to_string());
    guest.copy_in(std::path::Path::new(&api), "hearth-api");
    guest.copy_in(&common::images_dir().join("tiny"), "images/tiny");
    let run = guest.run(&testkit::script_installing_debs(
        "HEARTH-API-LVM-GUEST-EXIT ",
        API_GUEST_SCRIPT_BODY,
    ));
    let log = &run.console;
    eprintln!("the guest ran the api on an LVM pool in {:?}", run.elapsed);
    // (The first may share the line that names the test.)
    for line in log.lines() {
        if let Some(at) = ["the VM on", "allocated in", "the test's steps"]
            .iter()
            .find_map(|p| line.find(p))
        {
            eprintln!("in the guest: {}", &line[at..]);
        }
    }
    run.assert_tests_passed("HEARTH-API-LVM-GUEST-EXIT ", &["volumes_on_an_lvm_thin_pool"]);
}

/// What the guest runs once the .debs are in (`testkit::script_installing_debs`), from
/// the payload disk, as root, with its console on ttyS0; hearth starts what it needs.
const API_GUEST_SCRIPT_BODY: &str = r#"ldconfig
modprobe dm-thin-pool
qemu-system-x86_64 --version | head -1
lvm version | head -1
mkdir -p /var/tmp/images && cp -a /payload/images/. /var/tmp/images/
cd /var/tmp
HEARTH_TEST_LVM=1 HEARTH_TEST_SLOWDOWN=20 HEARTH_API_BIN=/payload/hearth-api HEARTH_TEST_IMAGES=/var/tmp/images RUST_BACKTRACE=1 /payload/volumes --ignored --exact volumes_on_an_lvm_thin_pool --nocapture --test-threads=1
rc=$?
echo "HEARTH-API-LVM-GUEST-EXIT $rc"
"#;
