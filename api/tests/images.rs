//! Images through the public API and the CLI, with real guests (QEMU/TCG): an image
//! with a root disk is imported over HTTP from a server this test runs on loopback
//! (inside the test's own network namespace) and from a path; VMs get copy-on-write
//! clones of it, equally fast for 100 MiB and 10 GiB; what the guest writes never
//! reaches the image; an image in use cannot be deleted; bad sources fail clearly and
//! leave nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use common::{images_dir, in_private_netns, Stack, LISTEN};
use serde_json::{json, Value};
use testkit::run;

/// A raw disk holding an ext4 file system with `/marker` in it, made by mkfs.ext4
/// from a folder (sparse: a 10 GiB one takes a few MiB).
fn ext4_disk(path: &Path, size: &str, marker: &str) {
    let root = path.with_extension("root");
    std::fs::create_dir_all(&root).expect("dir");
    std::fs::write(root.join("marker"), marker).expect("marker");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            "-d",
            root.to_str().expect("utf8"),
            path.to_str().expect("utf8"),
            size,
        ],
    );
    std::fs::remove_dir_all(&root).expect("rm");
}

fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().expect("utf8")])
        .split_whitespace()
        .next()
        .expect("sum")
        .to_string()
}

/// Serves the files of one folder over HTTP on loopback.
async fn serve_dir(dir: PathBuf) -> String {
    async fn file(State(dir): State<Arc<PathBuf>>, UrlPath(name): UrlPath<String>) -> Response {
        match tokio::fs::read(dir.join(&name)).await {
            Ok(bytes) => Response::new(Body::from(bytes)),
            Err(_) => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from("not here"))
                .expect("response"),
        }
    }
    let app = axum::Router::new()
        .route("/{name}", get(file))
        .with_state(Arc::new(dir));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn import(stack: &Stack, body: Value) -> Value {
    let (status, accepted) = stack.call("POST", "/v1/images", Some(body.clone())).await;
    assert_eq!(status, 202, "{body}: {accepted}");
    stack.wait_op(&accepted).await
}

/// Creates a VM from `image` without starting it; returns (VM, seconds the create took).
async fn create_stopped(stack: &Stack, name: &str, image: &str) -> (Value, f64) {
    let t = Instant::now();
    let body =
        json!({"name": name, "image": image, "hypervisor": "qemu", "memory_mib": 256, "nics": [], "start": false});
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let op = stack.wait_op(&accepted).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    (stack.vm(name).await, t.elapsed().as_secs_f64())
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs the CLI without blocking the runtime (the test's HTTP server runs on it).
async fn cli(stack: &Stack, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(common::hearth_cli())
        .args(args)
        .env("HEARTH_URL", format!("http://{LISTEN}"))
        .env("HEARTH_API_KEY", &stack.key)
        .output()
        .await
        .expect("hearth")
}

#[test]
fn images_are_imported_once_and_cloned_for_each_vm() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let work = tempfile::tempdir().expect("tmp");
        let tiny = images_dir().join("tiny");
        let small = work.path().join("small.raw");
        let big = work.path().join("big.raw");
        ext4_disk(&small, "100M", "made-by-the-test");
        ext4_disk(&big, "10G", "big-one");
        let base = serve_dir(work.path().to_path_buf()).await;
        let boot = |name: &str, src: Value| {
            let mut b = json!({
                "name": name,
                "kernel": tiny.join("vmlinuz").display().to_string(),
                "initramfs": tiny.join("initrd.img").display().to_string(),
                "cmdline": std::fs::read_to_string(tiny.join("cmdline")).expect("cmdline").trim(),
            });
            for (k, v) in src.as_object().expect("object") {
                b[k] = v.clone();
            }
            b
        };

        // Over HTTP with the CLI (progress bar) and a checksum.
        let small_sum = sha256(&small);
        let out = cli(
            &stack,
            &[
                "image",
                "import",
                "small",
                &format!("{base}/small.raw"),
                "--sha256",
                &small_sum,
                "--kernel",
                tiny.join("vmlinuz").to_str().expect("utf8"),
                "--initramfs",
                tiny.join("initrd.img").to_str().expect("utf8"),
                "--cmdline",
                std::fs::read_to_string(tiny.join("cmdline")).expect("cmdline").trim(),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "hearth image import: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            stack.log()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Digest") && stdout.contains("sha256:"), "{stdout}");
        let (_, img) = stack.call("GET", "/v1/images/small", None).await;
        assert_eq!(img["disk"]["source_digest"], format!("sha256:{small_sum}"), "{img}");
        assert_eq!(img["disk"]["virtual_size"], 100 << 20);
        assert!(
            img["disk"].get("path").is_none(),
            "no host path in the public view: {img}"
        );
        let stored = in_imaged(&stack, "small").await;
        let blob = PathBuf::from(stored["disk"]["path"].as_str().expect("disk path"));
        assert_eq!(sha256(&blob), small_sum, "the stored disk is the file");

        // From a path: the sparse 10 GiB image.
        let op = import(&stack, boot("big", json!({"path": big.display().to_string()}))).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let out = cli(&stack, &["image", "list"]).await;
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("small") && listing.contains("big") && listing.contains("10G"),
            "{listing}"
        );

        // Root disks are clones: as fast for 10 GiB as for 100 MiB, and tiny.
        let (vm_small, t_small) = create_stopped(&stack, "from-small", "small").await;
        let (vm_big, t_big) = create_stopped(&stack, "from-big", "big").await;
        eprintln!("create from 100 MiB image: {t_small:.3} s; from 10 GiB image: {t_big:.3} s");
        assert!(t_big < 3.0 && t_big < t_small * 3.0 + 0.5, "{t_small} vs {t_big}");
        let root_file = |vm: &Value| {
            let vol = vm["root_disk"]["volume"].as_str().expect("root disk").to_string();
            let dir = stack.data_dir().join("volumes/volumes");
            files_in(&dir)
                .into_iter()
                .find(|f| f.starts_with(&vol))
                .map(|f| dir.join(f))
                .unwrap_or_else(|| panic!("no file for {vol} in {}", dir.display()))
        };
        for vm in [&vm_small, &vm_big] {
            let f = root_file(vm);
            let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&f).expect("md")) * 512;
            assert!(
                used < 4 << 20,
                "{}: a clone takes almost no space ({used} bytes)",
                f.display()
            );
        }

        // The guest sees the image's files and writes its own; the image stays as it was.
        let blob_mtime = std::fs::metadata(&blob).expect("md").modified().expect("mtime");
        stack.act("from-small", "start").await;
        stack
            .wait_console("from-small", "HEARTH-GUEST-READY", 1, Duration::from_secs(90))
            .await;
        let out = stack.console_run("from-small", "cat /mnt/vda/marker; echo").await;
        assert!(out.contains("made-by-the-test"), "{out}");
        stack
            .console_run(
                "from-small",
                "dd if=/dev/urandom of=/mnt/vda/noise bs=1M count=8 2>/dev/null; echo guest-was-here > /mnt/vda/marker; sync",
            )
            .await;
        let out = stack.console_run("from-small", "cat /mnt/vda/marker; echo").await;
        assert!(out.contains("guest-was-here"), "{out}");
        // The cloud-init seed is the second disk: a FAT file system labelled CIDATA.
        let out = stack
            .console_run("from-small", "dd if=/dev/vdb bs=1 skip=43 count=6 2>/dev/null; echo")
            .await;
        assert!(out.contains("CIDATA"), "seed disk: {out}");
        stack.act("from-small", "stop").await;
        assert_eq!(sha256(&blob), small_sum, "the image is untouched by the guest's writes");
        assert_eq!(
            std::fs::metadata(&blob).expect("md").modified().expect("mtime"),
            blob_mtime
        );
        let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(root_file(&vm_small)).expect("md")) * 512;
        assert!(used >= 8 << 20, "the guest's writes went to the clone ({used} bytes)");

        // In use: the image cannot be deleted.
        let (status, e) = stack.call("DELETE", "/v1/images/small", None).await;
        assert_eq!(status, 409, "{e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains("in use"), "{e}");

        // Deleting the VM deletes its clone, never the image; then the image can go.
        let small_root = root_file(&vm_small);
        for vm in ["from-small", "from-big"] {
            let (status, accepted) = stack.call("DELETE", &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(status, 202, "{accepted}");
            assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        }
        assert!(!small_root.exists(), "the root disk went with its VM");
        assert!(files_in(&stack.data_dir().join("volumes/volumes")).is_empty());
        assert!(
            files_in(&stack.data_dir().join("imaged/seeds")).is_empty(),
            "seeds went too"
        );
        assert_eq!(sha256(&blob), small_sum);
        let out = cli(&stack, &["image", "delete", "small"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!blob.exists(), "an unused image's files are collected");
        let (status, _) = stack.call("GET", "/v1/images/small", None).await;
        assert_eq!(status, 404);
    });
}

#[test]
fn bad_image_sources_fail_clearly_and_leave_nothing() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let work = tempfile::tempdir().expect("tmp");
        std::fs::write(work.path().join("notes.txt"), "not a disk\n".repeat(500)).expect("write");
        let mut vmdk = vec![0u8; 1 << 16];
        vmdk[..4].copy_from_slice(b"KDMV");
        std::fs::write(work.path().join("disk.vmdk"), vmdk).expect("write");
        ext4_disk(&work.path().join("ok.raw"), "16M", "x");
        let base = serve_dir(work.path().to_path_buf()).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let tmp = stack.data_dir().join("imaged/tmp");
        let blobs = stack.data_dir().join("imaged/blobs/sha256");
        let blobs_before = files_in(&blobs);

        // Refused at once (422).
        for body in [
            json!({"name": "a/b", "url": format!("{base}/ok.raw")}),
            json!({"name": "..", "url": format!("{base}/ok.raw")}),
            json!({"name": "ok", "url": "ftp://example.invalid/x"}),
            json!({"name": "ok", "path": "relative/x.raw"}),
            json!({"name": "ok", "path": "/nonexistent/x.raw"}),
            json!({"name": "ok", "url": format!("{base}/ok.raw"), "sha256": "abc"}),
            json!({"name": "ok", "url": format!("{base}/ok.raw"), "format": "vmdk"}),
            json!({"name": "ok"}),
        ] {
            let (status, e) = stack.call("POST", "/v1/images", Some(body.clone())).await;
            assert_eq!(status, 422, "{body}: {e}");
            assert!(e["error"]["message"].is_string(), "{e}");
        }
        // Accepted, then the operation fails with the reason.
        let cases = [
            (
                json!({"name": "x", "url": format!("http://{closed}/ok.raw")}),
                "source_unreachable",
                "cannot reach",
            ),
            (
                json!({"name": "x", "url": format!("{base}/missing.raw")}),
                "source_error",
                "404",
            ),
            (
                json!({"name": "x", "url": format!("{base}/notes.txt")}),
                "not_a_disk_image",
                "partition table",
            ),
            (
                json!({"name": "x", "url": format!("{base}/disk.vmdk")}),
                "unsupported_format",
                "VMDK",
            ),
            (
                json!({"name": "x", "url": format!("{base}/ok.raw"), "sha256": "0".repeat(64)}),
                "checksum_mismatch",
                "expected sha256:0000",
            ),
            (
                json!({"name": "x", "path": work.path().join("notes.txt").display().to_string()}),
                "not_a_disk_image",
                "partition table",
            ),
        ];
        for (body, code, words) in cases {
            let op = import(&stack, body.clone()).await;
            assert_eq!(op["status"], "failed", "{body}: {op}");
            assert_eq!(op["error"]["code"], code, "{body}: {op}");
            let msg = op["error"]["message"].as_str().unwrap_or("");
            assert!(msg.contains(words), "{body}: {msg}");
            assert!(files_in(&tmp).is_empty(), "{body}: partial files {:?}", files_in(&tmp));
        }
        assert_eq!(files_in(&blobs), blobs_before, "no failed import stored anything");
        let (_, list) = stack.call("GET", "/v1/images", None).await;
        let list = list.as_array().expect("list").clone();
        assert!(!list.iter().any(|i| i["name"] == "x"), "{list:?}");
        // The catalog's recipes are listed before their first use, without a digest.
        let tiny = list.iter().find(|i| i["name"] == "tiny").expect("tiny is listed");
        assert_eq!(tiny["catalog_only"], true, "{tiny}");
        let (status, shown) = stack.call("GET", "/v1/images/tiny", None).await;
        assert_eq!(status, 200, "{shown}");
        assert!(
            shown["digest"].as_str().unwrap_or("").starts_with("sha256:"),
            "first use imports it: {shown}"
        );
        assert!(shown.get("catalog_only").is_none(), "{shown}");
        // A VM from an unknown image, or with bad cloud-init input, is refused.
        for (body, what) in [
            (json!({"name": "v1", "image": "nope"}), "unknown image"),
            (
                json!({"name": "v2", "image": "tiny", "ssh_keys": ["not a key"]}),
                "bad key",
            ),
            (
                json!({"name": "v3", "image": "tiny", "user_data": "#cloud-config\n[1, 2"}),
                "bad YAML",
            ),
            (
                json!({"name": "v4", "image": "tiny", "disk_size": "10G"}),
                "disk_size without a disk",
            ),
        ] {
            let (status, e) = stack.call("POST", "/v1/vms", Some(body)).await;
            assert_eq!(status, 422, "{what}: {e}");
        }
        let (_, vms) = stack.call("GET", "/v1/vms", None).await;
        assert_eq!(vms.as_array().map(Vec::len), Some(0), "{vms}");
    });
}

/// The volume pool's bytes in use, from `/metrics`.
async fn pool_used(stack: &Stack) -> f64 {
    let (_, metrics) = stack.call("GET", "/metrics", None).await;
    let text = metrics
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| metrics.to_string());
    text.lines()
        .find_map(|l| l.strip_prefix(r#"hearth_volume_pool_bytes{state="used"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pool figure in /metrics: {text}"))
}

async fn wait_pool_used(stack: &Stack, want: f64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut used = pool_used(stack).await;
    while used != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        used = pool_used(stack).await;
    }
    assert_eq!(used, want, "{why}");
}

/// blockd's own API on its socket (the all-in-one api serves it in its data dir).
async fn blockd(stack: &Stack, method: &str, path: &str, body: Option<Value>) -> Value {
    daemon(stack, "blockd", method, path, body).await
}

/// An image as imaged itself knows it, with its files' paths in the store (the public
/// API shows what an image can boot, not where its files are).
async fn in_imaged(stack: &Stack, image: &str) -> Value {
    daemon(stack, "imaged", "GET", &format!("/images/{image}"), None).await
}

/// A daemon's own API on its socket.
async fn daemon(stack: &Stack, name: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let sock = stack.data_dir().join(format!("run/{name}.sock"));
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "--unix-socket"]).arg(&sock).args([
        "-X",
        method,
        "-H",
        "content-type: application/json",
    ]);
    if let Some(b) = body {
        cmd.args(["-d", &b.to_string()]);
    }
    let out = cmd.arg(format!("http://{name}{path}")).output().await.expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{method} {path}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A root disk of `image` the way blockd makes one for a VM: a clone keyed by the
/// image's digest. On the memory pool (which holds no VM root disks) it is made
/// through blockd's own API.
async fn clone_of(stack: &Stack, image: &str, volume: &str) {
    let img = in_imaged(stack, image).await;
    let body = json!({"source": {"image_clone": {"path": img["disk"]["path"], "key": img["digest"]}}});
    blockd(stack, "PUT", &format!("/volumes/{volume}"), Some(body)).await;
}

async fn blockd_volumes(stack: &Stack) -> Vec<String> {
    let list = blockd(stack, "GET", "/volumes", None).await;
    let mut names: Vec<String> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect();
    names.sort();
    names
}

/// On a pool that clones a snapshot of one base volume per image (the memory pool
/// here, LVM thin on a host with device-mapper), the base goes with its image: when
/// the image is deleted, and when an import moves the image's name to other bytes
/// and garbage collection takes the old image (the reconciler removes its base).
/// hearth's name for such a base cannot be taken by a user's volume.
#[test]
fn image_base_volumes_go_with_their_image() {
    in_private_netns(|| async {
        let stack = Stack::start(&["--volume-pool", "memory:1073741824", "--reconcile-interval", "1"]).await;
        let work = tempfile::tempdir().expect("tmp");
        let import_disk = |name: &'static str, marker: &'static str| {
            let path = work.path().join(format!("{marker}.raw"));
            ext4_disk(&path, "32M", marker);
            json!({"name": name, "path": path.display().to_string()})
        };
        assert_eq!(pool_used(&stack).await, 0.0);

        // Deleting the image removes its base.
        let op = import(&stack, import_disk("base-a", "a")).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        clone_of(&stack, "base-a", "disk-a").await;
        let vols = blockd_volumes(&stack).await;
        assert_eq!(vols.len(), 2, "the clone and the image's base: {vols:?}");
        assert!(vols.iter().any(|v| v.starts_with("image-sha256")), "{vols:?}");
        assert!(pool_used(&stack).await >= (32 << 20) as f64);
        blockd(&stack, "DELETE", "/volumes/disk-a", None).await;
        let (status, report) = stack.call("DELETE", "/v1/images/base-a", None).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(
            blockd_volumes(&stack).await,
            Vec::<String>::new(),
            "the base went with the image"
        );
        assert_eq!(pool_used(&stack).await, 0.0);

        // An import moves the name; the old image is collected, the reconciler its base.
        let op = import(&stack, import_disk("moving", "b")).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        clone_of(&stack, "moving", "disk-b").await;
        blockd(&stack, "DELETE", "/volumes/disk-b", None).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            blockd_volumes(&stack).await.len(),
            1,
            "the base of `moving` stays while the image does"
        );
        let op = import(&stack, import_disk("moving", "c")).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        wait_pool_used(&stack, 0.0, "the reconciler removed the base of the collected image").await;
        assert_eq!(blockd_volumes(&stack).await, Vec::<String>::new());

        let (status, e) = stack
            .call(
                "POST",
                "/v1/volumes",
                Some(json!({"name": "image-sha2560123456789abcdef01", "size": "1M"})),
            )
            .await;
        assert_eq!(status, 422, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap_or("").contains("kept for hearth"),
            "{e}"
        );
    });
}
